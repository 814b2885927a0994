"""LLaDA masked diffusion LM backbone, with the dUltra planner as an optional part.

Parameter paths mirror the HF LLaDA names: `wte`, `blocks` (stacked `[n_layers, ...]` leaves when
`scan_layers`, else `blocks/{i}`), `ln_f`, `ff_out` (untied LM head), and `planner/...`.
"""

from __future__ import annotations

import jax
from flax import nnx

from dultra_jax.config import ModelConfig
from dultra_jax.models.layers import (KV, Embed, Linear, RMSNorm, WindowKeys, make_blocks, rope_tables, run_layers,
                                      run_layers_kv)
from dultra_jax.models.planner import PlannerHead
from dultra_jax.sharding import BATCH_AXES, constrain


class LLaDAModel(nnx.Module):
    """LLaDA backbone `wte -> blocks -> ln_f -> ff_out`, plus `planner` when configured."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
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
                       remat=self.config.remat, remat_policy=self.config.remat_policy,
                       query_positions=query_positions)
        return constrain(self.ln_f(x), BATCH_AXES)

    def logits(self, h: jax.Array) -> jax.Array:
        """The LM head `[B, K, D] -> [B, K, V]` (compute dtype), rows over the batch axes and the
        vocabulary over 'tensor': the largest activation of a step."""
        return constrain(self.ff_out(h), BATCH_AXES, None, "tensor")

    def hidden_kv(self, tokens: jax.Array, positions: jax.Array, valid: jax.Array | WindowKeys | None,
                  cache: KV | None = None):
        """`hidden` that also returns every layer's keys/values (`layers.run_layers_kv`).

        Without `cache`: the whole canvas, `tokens`/`valid` `[B, L]`, `positions` `[B|1, L]`.
        With `cache` (`[n_layers, B, Hkv, L, Dh]` each): `tokens` and `positions` `[B, W]` are a
        window of the canvas and `valid` the window's `WindowKeys` (`layers.run_layers_kv`).
        Returns `(h_last [B, W|L, D], (k, v) [n_layers, B, Hkv, W|L, Dh])`: a window forward
        gives the window's fresh keys/values (`cache.write_blocks` keeps those of a refreshed block).
        """
        x, kv = run_layers_kv(self.blocks, self.wte(tokens), self.rope(positions), valid,
                              stacked=self.config.scan_layers, cache=cache)
        return constrain(self.ln_f(x), BATCH_AXES), kv

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
        return self.logits(h_last), h_last
