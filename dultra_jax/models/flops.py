"""Analytic FLOPs of the policy's forward pass (multiply-adds count 2), for compile reports and
MFU: XLA's `cost_analysis` counts a loop body once, so it cannot count a rollout or a replay."""

from __future__ import annotations

import jax
import numpy as np

from dultra_jax.config import ModelConfig
from dultra_jax.models import policy
from dultra_jax.models.policy import PLANNER_KEY


def forward_flops(config: ModelConfig, batch: int, length: int) -> dict[str, float]:
    """FLOPs of one full `policy_apply` on `[batch, length]` tokens:

        2 * N_mm * B * L                  every per-token matmul (the Linear kernels of the
                                          blocks, the LM head, the planner block; lookups: 0)
      + 2 * B * N_row                     the planner's timestep MLP, once per row
      + 4 * B * L^2 * D_attn * n_attn     QK^T and AV over every layer with attention

    Returns `{"flops", "planner_flops"` (the planner head's share), `"attention_flops"` (QK^T and
    AV of every layer), `"params"}`. Norms, RoPE, softmax and activations are left out, so the
    figure slightly underestimates the work.
    """
    flat = jax.tree_util.tree_flatten_with_path(policy.abstract_params(config))[0]
    per_token = planner_per_token = per_row = total = 0
    for path, leaf in flat:
        keys = [str(getattr(k, "key", k)) for k in path]
        size = int(np.prod(leaf.shape))
        total += size
        if keys[-1] != "kernel":
            continue
        if keys[0] == PLANNER_KEY and keys[1] == "time_embedding":
            per_row += size
        elif keys[0] == PLANNER_KEY:
            planner_per_token += size
        else:
            per_token += size
    d_attn = config.n_heads * config.head_dim
    attention_per_layer = 4.0 * batch * length ** 2 * d_attn
    attention = attention_per_layer * config.n_layers
    backbone = 2.0 * per_token * batch * length + attention
    planner = 0.0
    if config.has_planner:
        planner_attention = attention_per_layer * config.planner.num_head_layers
        attention += planner_attention
        planner = 2.0 * planner_per_token * batch * length + 2.0 * per_row * batch + planner_attention
    return {"flops": backbone + planner, "planner_flops": planner, "attention_flops": attention,
            "params": float(total)}
