"""LLaDA masked diffusion LM backbone, with the dUltra planner as an optional part.

Parameter paths mirror the HF LLaDA names: `wte`, `blocks` (stacked `[n_layers, ...]` leaves when
`scan_layers`, else `blocks/{i}`), `ln_f`, `ff_out` (untied LM head), and `planner/...`.
"""

from __future__ import annotations

import math

import jax
from flax import nnx

from dultra_jax.config import ModelConfig
from dultra_jax.models.layers import (KV, Embed, Linear, RMSNorm, gather_positions, make_layers, rope_tables, run_layers,
                                      run_layers_kv, self_attention_kv, swiglu, truncated_normal_init)


class LLaDABlock(nnx.Module):
    """Pre-norm Llama block with bidirectional attention and a SwiGLU MLP, no biases."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, f = config.d_model, config.mlp_hidden_size
        q_dim, kv_dim = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        kw = dict(rngs=rngs, dtype=config.compute_dtype, param_dtype=config.weight_dtype)
        # Output projections use std / sqrt(2) (LLaDA's "mitchell" init).
        self.attn_norm = RMSNorm(d, config.rms_norm_eps, param_dtype=config.weight_dtype)
        self.q_proj = Linear(d, q_dim, **kw)
        self.k_proj = Linear(d, kv_dim, **kw)
        self.v_proj = Linear(d, kv_dim, **kw)
        self.attn_out = Linear(q_dim, d, kernel_init=truncated_normal_init(1 / math.sqrt(q_dim) / math.sqrt(2)), **kw)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps, param_dtype=config.weight_dtype)
        self.ff_proj = Linear(d, f, **kw)
        self.up_proj = Linear(d, f, **kw)
        self.ff_out = Linear(f, d, kernel_init=truncated_normal_init(1 / math.sqrt(f) / math.sqrt(2)), **kw)
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], valid: jax.Array | None,
                 query_positions: jax.Array | None = None) -> jax.Array:
        """`x` `[B, L, D]`, `rope` tables `[B|1, L, Dh]`, `valid` `[B, L]` key mask or None.

        Returns `[B, L, D]`, or `[B, K, D]` at `query_positions` `[B, K]` (only those rows run
        after the keys/values)."""
        return self.with_kv(x, rope, valid, query_positions=query_positions)[0]

    def with_kv(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], valid: jax.Array | None,
                cache: KV | None = None, positions: jax.Array | None = None,
                query_positions: jax.Array | None = None):
        """The block, also returning its attention keys/values (`layers.self_attention_kv`):
        `x` `[B, W, D]` is the whole sequence, or with `cache` a window at `positions` `[B, W]`."""
        attn, kv = self_attention_kv(self.attn_norm(x), self.q_proj, self.k_proj, self.v_proj, self.attn_out,
                                     n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, head_dim=self.head_dim,
                                     rope=rope, valid=valid, cache=cache, positions=positions,
                                     query_positions=query_positions)
        if query_positions is not None:
            x = gather_positions(x, query_positions)
        x = x + attn
        return x + swiglu(self.ff_proj, self.up_proj, self.ff_out, self.ff_norm(x)), kv


def make_blocks(config: ModelConfig, n: int, rngs: nnx.Rngs, stacked: bool):
    """`n` LLaDA blocks, stacked (scan over layers) or as an `nnx.List`."""
    return make_layers(lambda r: LLaDABlock(config, rngs=r), n, rngs, stacked)


class LLaDAModel(nnx.Module):
    """LLaDA backbone `wte -> blocks -> ln_f -> ff_out`, plus `planner` when configured."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        from dultra_jax.models.planner import PlannerHead  # planner reuses LLaDABlock

        self.config = config
        kw = dict(dtype=config.compute_dtype, param_dtype=config.weight_dtype)
        self.wte = Embed(config.vocab_size, config.d_model, rngs=rngs, **kw)
        self.blocks = make_blocks(config, config.n_layers, rngs, stacked=config.scan_layers)
        self.ln_f = RMSNorm(config.d_model, config.rms_norm_eps, param_dtype=config.weight_dtype)
        self.ff_out = Linear(config.d_model, config.vocab_size, rngs=rngs, **kw)
        self.planner = PlannerHead(config, rngs=rngs) if config.has_planner else None

    def rope(self, positions: jax.Array):
        return rope_tables(positions, self.config.head_dim, self.config.rope_theta)

    def hidden(self, tokens: jax.Array, positions: jax.Array, valid: jax.Array | None,
               query_positions: jax.Array | None = None) -> jax.Array:
        """`h_last [B, L, D]` after `ln_f` for `tokens [B, L]`, `positions [B|1, L]`, `valid [B, L]`;
        only at `query_positions` `[B, K]` (`[B, K, D]`, the last layer's other rows skipped) if given."""
        x = self.wte(tokens)
        x = run_layers(self.blocks, x, self.rope(positions), valid, stacked=self.config.scan_layers,
                       remat=self.config.remat, query_positions=query_positions)
        return self.ln_f(x)

    def hidden_kv(self, tokens: jax.Array, positions: jax.Array, valid: jax.Array | None, cache: KV | None = None):
        """`hidden` that also returns every layer's keys/values (`layers.run_layers_kv`).

        Without `cache`: the whole canvas, `tokens`/`valid` `[B, L]`, `positions` `[B|1, L]`.
        With `cache` (`[n_layers, B, L, Hkv, Dh]` each): `tokens` and `positions` `[B, W]` are a
        window of the canvas, `valid` the canvas key mask `[B, L]`.
        Returns `(h_last [B, W|L, D], (k, v) [n_layers, B, L, Hkv, Dh])`.
        """
        x, kv = run_layers_kv(self.blocks, self.wte(tokens), self.rope(positions), valid,
                              stacked=self.config.scan_layers, cache=cache, positions=positions)
        return self.ln_f(x), kv

    def __call__(self, tokens: jax.Array, positions: jax.Array, valid: jax.Array | None):
        """Backbone forward.

        Args:
          tokens: `[B, L]` int token ids.
          positions: `[B, L]` or `[1, L]` absolute positions.
          valid: `[B, L]` bool key mask (None attends to every position).
        Returns:
          `(token_logits [B, L, V]` in the compute dtype, `h_last [B, L, D]` after `ln_f`).
        """
        h_last = self.hidden(tokens, positions, valid)
        return self.ff_out(h_last), h_last
