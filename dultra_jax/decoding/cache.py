"""Block KV cache for the rollout (Fast-dLLM's prefix and dual cache, `DecodeConfig.cache`).

A masked diffusion LM attends bidirectionally, so every position's keys/values change whenever a
token is revealed anywhere: an exact decoder recomputes the whole canvas every step (`none`).
Fast-dLLM observes that the keys/values outside the block being decoded change little within a
block, and reuses them:

    prefix  when a row enters a new block, one full forward refreshes its cache (every layer's
            keys/values of every canvas position, backbone and planner head); later steps of the
            block run only the window `[block start, L)` against the cached prefix.
    dual    the same refresh; later steps run only the block, against the cached prefix *and*
            suffix (the suffix is still all masks, so its cached keys/values are nearly current).

Everything stays fixed-shape inside the rollout's `lax.while_loop`. The cache holds all `L`
positions (`[n_layers, B, L, Hkv, Dh]`, keys and values); a window forward writes the window's
fresh keys/values over it and attends to all `L` keys, so one code path serves both modes.

Rows move through blocks at their own pace (as without a cache: the same per-row steps and NFE),
so each row remembers the block its cache was made for (`block`) and is refreshed when it moves
on. Under rules whose step counts differ by row (`threshold`, `factor`, the planner's) rows
rarely enter a block together: an iteration where only some rows refresh runs the full forward
over just those rows (gathered into the smallest of a few fixed sub-batch sizes,
`refresh_sizes`), so a row's refresh costs about its share of a batched full forward, plus the
window forward of the batch. An iteration where every active row refreshes runs only the full
forward (over the batch), one where none does only the window forward. The prefix window's
width depends on the block, so it is a `lax.switch` over the slowest active row's block (rows
further on read a window clipped at the canvas end; the clipped duplicates of the last position
compute the same values).

Exactness. A refresh step is exact (it is the full forward). Later steps differ from `none` by
the staleness of the cached keys/values, so tokens can differ; `benchmarks/rollout.py` reports
how often. In particular, even a single block covering the whole generation is not exact under
`prefix`: the prompt's keys/values at layers > 0 depend on the revealed generation tokens
through bidirectional attention. When every block is decoded in one step, every step is a
refresh and all modes agree exactly (tested).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from dultra_jax.config import DecodeConfig, ModelConfig
from dultra_jax.models import policy

Params = policy.Params


@struct.dataclass
class BlockCache:
    """The rollout's KV cache (part of the loop carry).

    Attributes:
      kv: `(backbone_kv, planner_kv)`; each a `(keys, values)` pair of `[n_layers, B, L, Hkv, Dh]`
        arrays in the compute dtype (planner_kv None without a planner head or when the rule
        does not use it).
      block: `[B]` int32 block index each row's cache was refreshed for (-1: never).
    """

    kv: tuple
    block: jax.Array


def init_cache(batch: int, model: ModelConfig, config: DecodeConfig) -> BlockCache | None:
    """An empty cache for `config.cache` (None for `none`); every row refreshes on its first step."""
    if config.cache == "none":
        return None

    def zeros(n_layers: int):
        shape = (n_layers, batch, config.canvas_length, model.n_kv_heads, model.head_dim)
        return jnp.zeros(shape, model.compute_dtype), jnp.zeros(shape, model.compute_dtype)

    # Rules that never read the planner neither run nor cache it.
    planner_kv = zeros(model.planner.num_head_layers) if model.has_planner and config.uses_planner else None
    return BlockCache(kv=(zeros(model.n_layers), planner_kv), block=jnp.full((batch,), -1, jnp.int32))


def _prefix_window(block_start: jax.Array, width: int, length: int) -> jax.Array:
    """`[B, width]` positions `start, start + 1, ...`, clipped at the canvas end `length - 1`."""
    return jnp.minimum(block_start[:, None] + jnp.arange(width, dtype=jnp.int32)[None, :], length - 1)


def refresh_sizes(batch: int) -> tuple[int, ...]:
    """The sub-batch sizes a partial refresh can run over: `B/8`, `B/4`, `B/2` rounded down (at
    least 1), those below `B`. Rows refresh when they enter a block, at their own pace, so an
    iteration usually refreshes a few rows; a full forward over the smallest size that holds them
    costs that share of one over the whole batch. Three sizes bound the compiled variants."""
    return tuple(sorted({max(1, batch >> shift) for shift in (3, 2, 1)} - {batch}))


def _where_rows(rows: jax.Array, new, old):
    """`new` on the rows `rows` `[B]` of every `[B, ...]` leaf, `old` elsewhere (None leaves stay)."""
    return jax.tree.map(lambda n, o: jnp.where(rows.reshape(rows.shape + (1,) * (n.ndim - 1)), n, o), new, old)


def _where_kv_rows(rows: jax.Array, new, old):
    """`_where_rows` for `[n_layers, B, ...]` keys/values."""
    return jax.tree.map(lambda n, o: jnp.where(rows[None, :, None, None, None], n, o), new, old)


def evaluate_block_cached(params: Params, canvas: jax.Array, valid: jax.Array, cache: BlockCache,
                          positions: jax.Array, active: jax.Array, candidates: jax.Array,
                          model: ModelConfig, config: DecodeConfig):
    """One NFE on each row's current block, through the cache.

    Rows that entered a new block since their cache was made (`refresh`) get a full forward: its
    keys/values replace theirs and its outputs are theirs (exact). The others run the window
    forward against the cache. Which forwards run depends on how many rows refresh (one
    `lax.switch`): none -> the window forward alone; every active row -> the full forward over the
    batch alone; some -> the full forward over the smallest sub-batch of `refresh_sizes(B)` that
    holds them (rows gathered, results scattered back; the whole batch when none does) and the
    window forward.

    Args:
      canvas, valid: `[B, L]`; positions: `[B, Lb]` each row's current block; active: `[B]`;
      candidates: `[B, L]` bool, the masked positions of the current blocks.
    Returns:
      `(token_logits [B, Lb, V]`, `unmask_logits [B, Lb]` or None, the updated `BlockCache`).
    """
    batch = canvas.shape[0]
    block_index = (positions[:, 0] - config.prompt_length) // config.block_length
    refresh = active & (block_index != cache.block)

    def full_forward(rows: jax.Array | None):
        """The full forward over the rows `rows` `[S]` (every row when None)."""
        take = (lambda x: x) if rows is None else (lambda x: x[rows])
        token_logits, unmask_logits, fresh = policy.policy_apply_kv(
            params, take(canvas), model, valid=take(valid), candidates=take(candidates),
            logit_positions=take(positions), with_planner=config.uses_planner)
        return (token_logits, unmask_logits), fresh

    def window_forward(window, kv):
        token_logits, unmask_logits, _ = policy.policy_apply_kv(
            params, canvas, model, valid=valid, candidates=candidates, logit_positions=positions,
            cache=kv, window=window, with_planner=config.uses_planner)
        return token_logits, unmask_logits

    def cached_outputs(kv):
        if config.cache == "dual":
            return window_forward(positions, kv)
        # prefix: the window runs from the block start to the canvas end; its width is static per
        # block, so branch on the slowest active row's block (the others' windows are clipped).
        slowest = jnp.min(jnp.where(active, block_index, config.num_blocks - 1))
        start = positions[:, 0]
        branches = [lambda kv, k=k: window_forward(
            _prefix_window(start, config.gen_length - k * config.block_length, config.canvas_length), kv)
            for k in range(config.num_blocks)]
        return jax.lax.switch(slowest, branches, kv)

    def no_refresh(kv):
        return kv, cached_outputs(kv)

    def refresh_all(kv):
        outputs, fresh = full_forward(None)
        return _where_kv_rows(refresh, fresh, kv), outputs

    def refresh_batch_and_window(kv):
        outputs, fresh = full_forward(None)
        kv = _where_kv_rows(refresh, fresh, kv)
        return kv, _where_rows(refresh, outputs, cached_outputs(kv))

    def refresh_rows_and_window(size: int, kv):
        # The refreshing rows first (stable: in row order), topped up with others that only ride along.
        rows = jnp.argsort(~refresh, stable=True)[:size]
        keep = refresh[rows]
        outputs, fresh = full_forward(rows)
        kv = jax.tree.map(lambda old, new: old.at[:, rows].set(
            jnp.where(keep[None, :, None, None, None], new, old[:, rows])), kv, fresh)
        window_outputs = cached_outputs(kv)
        return kv, jax.tree.map(lambda w, f: w.at[rows].set(
            jnp.where(keep.reshape(keep.shape + (1,) * (f.ndim - 1)), f, w[rows])), window_outputs, outputs)

    sizes = refresh_sizes(batch)
    branches = ([no_refresh] + [lambda kv, size=size: refresh_rows_and_window(size, kv) for size in sizes]
                + [refresh_batch_and_window, refresh_all])
    num_refresh = jnp.sum(refresh, dtype=jnp.int32)
    # The smallest sub-batch that holds the refreshing rows: the number of sizes below their count.
    partial = 1 + jnp.sum(num_refresh > jnp.asarray(sizes, jnp.int32), dtype=jnp.int32) if sizes else 1
    branch = jnp.where(num_refresh == 0, 0, jnp.where(jnp.all(refresh | ~active), len(sizes) + 2, partial))
    kv, (token_logits, unmask_logits) = jax.lax.switch(branch, branches, cache.kv)
    return token_logits, unmask_logits, BlockCache(kv=kv, block=jnp.where(refresh, block_index, cache.block))
