"""dUltra unmasking planner head: a per-position Bernoulli unmask logit.

    temb  = TimestepEmbedder(t)[:, None] + mask_embedding[is_candidate]      [B, L, D]
    h     = AdaLN_1(h_last, temb); f = LLaDABlock(h); f = AdaLN_2(f, temb)
    logit = mask_linear(f)                                                    [B, L] float32
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from dultra_jax.config import ModelConfig
from dultra_jax.models.layers import (KV, Embed, Linear, gather_positions, layer_norm_no_affine, make_blocks,
                                      run_layers, run_layers_kv)
from dultra_jax.sharding import BATCH_AXES, constrain

_xavier = jax.nn.initializers.xavier_uniform()


def timestep_features(t: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal features of `t` `[B]` -> `[B, dim]` float32, cosines first."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = t.astype(jnp.float32)[:, None] * freqs
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class TimestepEmbedder(nnx.Module):
    """`Linear(freq_dim, D) -> SiLU -> Linear(D, D)` on sinusoidal features (HF `mlp.0`, `mlp.2`)."""

    def __init__(self, d_model: int, freq_dim: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, use_bias=True, kernel_init=_xavier, dtype=dtype, param_dtype=param_dtype)
        self.mlp_0 = Linear(freq_dim, d_model, **kw)
        self.mlp_2 = Linear(d_model, d_model, **kw)
        self.freq_dim = freq_dim

    def __call__(self, t: jax.Array) -> jax.Array:
        return self.mlp_2(jax.nn.silu(self.mlp_0(timestep_features(t, self.freq_dim))))


class AdaLayerNorm(nnx.Module):
    """`LayerNorm_noaffine(x) * (1 + scale) + shift` with `[scale, shift] = modulation(cond)`."""

    def __init__(self, d_model: int, eps: float, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.modulation = Linear(d_model, 2 * d_model, rngs=rngs, use_bias=True, kernel_init=_xavier,
                                 dtype=dtype, param_dtype=param_dtype)
        self.eps = eps

    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        scale, shift = jnp.split(self.modulation(cond), 2, axis=-1)
        return layer_norm_no_affine(x, self.eps) * (1 + scale) + shift


class PlannerHead(nnx.Module):
    """The planner: AdaLN(t, candidate) -> one LLaDA block -> AdaLN -> Linear(D, 1)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        pc = config.planner
        kw = dict(rngs=rngs, dtype=config.compute_dtype, param_dtype=config.weight_dtype)
        self.time_embedding = TimestepEmbedder(config.d_model, pc.freq_dim, **kw)
        self.norm_out_1 = AdaLayerNorm(config.d_model, pc.adaln_eps, **kw)
        self.norm_out_2 = AdaLayerNorm(config.d_model, pc.adaln_eps, **kw)
        self.mask_embedding = Embed(2, config.d_model, std=0.02, **kw)
        # One block, never scanned: keeps `planner/mask_head/0/...` aligned with HF `mask_head.0.*`.
        self.mask_head = make_blocks(config, pc.num_head_layers, rngs, stacked=False)
        self.mask_linear = Linear(config.d_model, 1, use_bias=True,
                                  kernel_init=jax.nn.initializers.normal(stddev=0.02), **kw)
        self.remat, self.remat_policy = config.remat, config.remat_policy

    def __call__(self, h_last: jax.Array, t: jax.Array, candidates: jax.Array, rope, valid,
                 query_positions: jax.Array | None = None) -> jax.Array:
        """Unmask logits.

        Args:
          h_last: `[B, L, D]` backbone hidden state after `ln_f`.
          t: `[B]` float, the unmasked fraction of the whole canvas.
          candidates: `[B, L]` bool, masked positions of the current block.
          rope, valid: as for the backbone.
        Returns:
          `[B, L]` float32 logits (apply a sigmoid for the unmask probability).
        """
        temb, h = self._modulated_input(h_last, t, candidates)
        f = run_layers(self.mask_head, h, rope, valid, stacked=False, remat=self.remat,
                       remat_policy=self.remat_policy, query_positions=query_positions)
        return self._logits(f, temb, query_positions)

    def with_kv(self, h_last: jax.Array, t: jax.Array, candidates: jax.Array, rope, valid,
                cache: KV | None = None, query_positions: jax.Array | None = None):
        """The head, also returning its block's keys/values (the decoder's KV cache).

        Without `cache` as `__call__`; with `cache` (`[n_head_layers, B, Hkv, L, Dh]` each),
        `h_last`, `candidates` and `rope` cover a window and `valid` is its `WindowKeys`
        (`layers.run_layers_kv`). With `query_positions` `[B, K]` (indices into `h_last`'s rows)
        the logits are computed there only (the keys/values still cover every row).
        Returns `(logits [B, W|L|K], (k, v) [n_head_layers, B, Hkv, W|L, Dh])`, a window's
        keys/values being its fresh ones."""
        temb, h = self._modulated_input(h_last, t, candidates)
        f, kv = run_layers_kv(self.mask_head, h, rope, valid, stacked=False, cache=cache,
                              query_positions=query_positions)
        return self._logits(f, temb, query_positions), kv

    def _modulated_input(self, h_last, t, candidates):
        temb = self.time_embedding(t)[:, None, :] + self.mask_embedding(candidates.astype(jnp.int32))
        return temb, constrain(self.norm_out_1(h_last, temb), BATCH_AXES)

    def _logits(self, f, temb, query_positions=None):
        """`f` the block's output (at `query_positions` when given, where `temb` is taken too)."""
        if query_positions is not None:
            temb = gather_positions(temb, query_positions)
        return constrain(self.mask_linear(self.norm_out_2(f, temb))[..., 0].astype(jnp.float32), BATCH_AXES)
