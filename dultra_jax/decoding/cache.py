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
positions (`[n_layers, B, Hkv, L, Dh]`, keys and values, heads before positions as the
attention's batched products read them); a window's queries attend to the
window's fresh keys/values and to the cached ones everywhere else (`layers.attention_over_cache`,
which reads the cache and never copies it), so one code path serves both modes.

Under a full refresh (and under `dual` always), rows enter blocks together: the rollout steps only the rows in the batch's
earliest current block (`rollout.stepping_rows`, `rows_take_blocks_together`), and rows that
finished it wait at no NFE. So a refresh is one batched full forward for every stepping row at
once, as in Fast-dLLM's lockstep decoding, while each row still spends only its own steps (rows
at their own pace would each need a refresh at a different iteration, on top of the batch's
window forward). Each row remembers the block its cache was made for (`block`) and is refreshed
when it moves on; an iteration where only some stepping rows refresh in full (which the
rollout does not produce, but which stays exact) runs the full forward and the window forward.
The prefix window is the canvas suffix from the earliest stepping row's window start on, whose
width depends on the block: a `lax.switch` over that block, each branch with a static suffix
that attends to the cache before it and nothing of the cache after
(`policy.policy_apply_kv(suffix_start=...)`; a row whose window starts later reads its
positions before it from the cache, so its outputs are those of its own window).

`decode.cache_refresh="blocks"` makes every refresh after the first block cheaper: instead of
the full forward, a window forward over the new block and the block just finished against the
cache, whose fresh keys/values are kept. Under `dual` the rows still enter each block together
and the refresh is a window of two blocks; under `prefix` a row's refresh is its own window
started one block earlier (the block just finished and everything after it), one more row of
the batch's suffix forward, so the rows go at their own pace and none waits for the slowest at a
block's end. The finished block's keys/values then see its revealed tokens, while the prompt's
and earlier blocks' stay as their last refresh made them: an approximation beyond Fast-dLLM's
(exact still on a one-layer model, where keys/values are projections of a position's own
token). Under `dual` it costs two blocks' worth of queries where the full forward costs the
whole canvas. It is the default (`cache_refresh="auto"`) under the planner rules, which take
few steps per block: with ~5 steps a block a full forward per block is most of what a `dual`
rollout costs.

Exactness. A full refresh step is exact (it is the full forward). Later steps differ from `none` by
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
      kv: `(backbone_kv, planner_kv)`; each a `(keys, values)` pair of `[n_layers, B, Hkv, L, Dh]`
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
        shape = (n_layers, batch, model.n_kv_heads, config.canvas_length, model.head_dim)
        return jnp.zeros(shape, model.compute_dtype), jnp.zeros(shape, model.compute_dtype)

    # Rules that never read the planner neither run nor cache it.
    planner_kv = zeros(model.planner.num_head_layers) if model.has_planner and config.uses_planner else None
    return BlockCache(kv=(zeros(model.n_layers), planner_kv), block=jnp.full((batch,), -1, jnp.int32))


def _prefix_window(block_start: jax.Array, width: int, length: int) -> jax.Array:
    """`[B, width]` positions `start, start + 1, ...`, clipped at the canvas end `length - 1`."""
    return jnp.minimum(block_start[:, None] + jnp.arange(width, dtype=jnp.int32)[None, :], length - 1)


def _where_rows(rows: jax.Array, new, old):
    """`new` on the rows `rows` `[B]` of every `[B, ...]` leaf, `old` elsewhere (None leaves stay)."""
    return jax.tree.map(lambda n, o: jnp.where(rows.reshape(rows.shape + (1,) * (n.ndim - 1)), n, o), new, old)


def _where_cache_rows(rows: jax.Array, new, old):
    """`_where_rows` for keys/values, whose leaves `[n_layers, B, Hkv, L, Dh]` put the rows second;
    `new` cast to `old`'s dtype."""
    return jax.tree.map(lambda n, o: jnp.where(rows[None, :, None, None, None], n.astype(o.dtype), o), new, old)


def write_window(kv, window: jax.Array, fresh, rows: jax.Array):
    """The cache `kv` with the window forward's `fresh` keys/values written at `window` `[B, W]`
    on the rows `rows` `[B]` (bool); leaves `[n_layers, B, Hkv, L|W, Dh]`, None leaves stay.
    Only `W` positions per row are read and written."""
    def row(cache, new, window, write):  # one row: [n_layers, Hkv, L|W, Dh], window [W]
        return cache.at[:, :, window].set(jnp.where(write, new.astype(cache.dtype), cache[:, :, window]))

    write_rows = jax.vmap(row, in_axes=(1, 1, 0, 0), out_axes=1)
    return jax.tree.map(lambda cache, new: write_rows(cache, new, window, rows), kv, fresh)


def rows_take_blocks_together(config: DecodeConfig) -> bool:
    """Whether the rows enter each block together under `config`'s cache (`rollout.stepping_rows`).

    They do where a refresh is the full forward, so that it is one batched forward for every row
    (rows at their own pace would each need one at a different iteration, on top of the batch's
    window forward), and under `dual`, whose window is the block: a row refreshing by `blocks`
    needs a window twice as wide, which every row would pay for. Under `prefix` with the `blocks`
    refresh the rows go at their own pace: a row's refresh is its own window started one block
    earlier, inside the batch's one suffix forward, which starts at the earliest row's window
    anyway, so no row waits for the slowest one at each block's end."""
    if config.cache == "none":
        return False
    return config.cache == "dual" or config.resolved_cache_refresh == "full"


def evaluate_block_cached(params: Params, canvas: jax.Array, valid: jax.Array, cache: BlockCache,
                          positions: jax.Array, active: jax.Array, candidates: jax.Array,
                          model: ModelConfig, config: DecodeConfig):
    """One NFE on each stepping row's current block, through the cache.

    A row that entered a new block since its cache was made (`refresh`) refreshes it: by the full
    forward (the `full` refresh, or any row without a cache yet), whose keys/values replace its
    cache and whose outputs are its own (exact), or by `blocks`: `dual`, the window forward over
    its block and the block its cache was made for; `prefix`, its suffix window started at that
    block; those windows' fresh keys/values are kept. The other rows run the window forward
    against their cache. Which forwards run depends on which rows refresh (one `lax.switch`):
    no full refresh -> the window forward alone (`prefix`: one suffix forward for every row,
    refreshing by blocks or not; `dual`: with every stepping row refreshing by blocks, the wider
    window); every stepping row refreshing in full (the first block, and each block under the
    lockstep of `rows_take_blocks_together`) -> the full forward alone, which replaces every
    row's keys/values and marks the rows that did not step stale (`block` -1: they refresh
    when they next step); some -> both.

    Args:
      canvas, valid: `[B, L]`; positions: `[B, Lb]` each row's current block; active: `[B]` the
        rows that step;
      candidates: `[B, L]` bool, the masked positions of the current blocks.
    Returns:
      `(token_logits [B, Lb, V]`, `unmask_logits [B, Lb]` or None, the updated `BlockCache`).
    """
    by_blocks_refresh = config.resolved_cache_refresh == "blocks" and config.num_blocks > 1
    block_index = (positions[:, 0] - config.prompt_length) // config.block_length
    refresh = active & (block_index != cache.block)
    # a first refresh has no cache to refresh by blocks
    full = refresh & (cache.block < 0) if by_blocks_refresh else refresh
    by_blocks = refresh & ~full
    finished_start = config.prompt_length + jnp.maximum(cache.block, 0) * config.block_length

    def full_forward():
        token_logits, unmask_logits, fresh = policy.policy_apply_kv(
            params, canvas, model, valid=valid, candidates=candidates, logit_positions=positions,
            with_planner=config.uses_planner)
        return (token_logits, unmask_logits), fresh

    def window_forward(kv, **window):
        """The window forward against `kv` (`window=` or `suffix_start=`, `policy_apply_kv`):
        `(outputs, the keys/values it attended to at its positions)`."""
        token_logits, unmask_logits, fresh = policy.policy_apply_kv(
            params, canvas, model, valid=valid, candidates=candidates, logit_positions=positions,
            cache=kv, with_planner=config.uses_planner, **window)
        return (token_logits, unmask_logits), fresh

    def prefix_window(kv, write: bool = True):
        """One suffix forward for every stepping row without a full refresh, from the earliest of
        their windows' starts (a static suffix per block, `lax.switch`): a row's window starts at
        its block or, refreshing by blocks, at the block its cache was made for; a row whose
        window starts later reads the positions before it from its cache, so its outputs are its
        own window's. The rows refreshing by blocks keep their window's keys/values (`write`
        False: there are none)."""
        own_start = jnp.where(by_blocks, finished_start, positions[:, 0])
        last_start = config.canvas_length - config.block_length
        first = (jnp.min(jnp.where(active & ~full, own_start, last_start)) - config.prompt_length) // config.block_length

        def suffix_from(start):
            outputs, fresh = window_forward(kv, suffix_start=start, suffix_own_start=own_start)
            if not write:
                return kv, outputs
            # A static slice written in place (a scatter of the suffix's positions would copy it);
            # before a row's own window the cached values come back and are written unchanged.
            suffix = jax.tree.map(lambda old: old[:, :, :, start:], kv)
            written = _where_cache_rows(by_blocks, fresh, suffix)
            return jax.tree.map(lambda old, new: old.at[:, :, :, start:].set(new), kv, written), outputs

        return jax.lax.switch(first, [lambda k=k: suffix_from(config.prompt_length + k * config.block_length)
                                      for k in range(config.num_blocks)])

    def no_refresh(kv):
        if config.cache == "prefix":
            return prefix_window(kv, write=False)
        return kv, window_forward(kv, window=positions)[0]

    def dual_blocks_refresh(kv):  # every stepping row refreshes by blocks: its block and the finished one
        finished_block = _prefix_window(finished_start, config.block_length, config.canvas_length)
        window = jnp.concatenate([positions, finished_block], axis=1)
        outputs, fresh = window_forward(kv, window=window)
        return write_window(kv, window, fresh, by_blocks), outputs

    def refresh_all(kv):
        # Every row takes the full forward's keys/values (selecting rows would read and write the
        # whole cache once more); the rows that did not step are marked stale below instead.
        outputs, fresh = full_forward()
        return fresh, outputs

    # `prefix`: the rows refreshing in full take the full forward, the others (refreshing by
    # blocks or not) the suffix forward. `dual`: every refreshing row takes the full forward when
    # not all stepping rows refresh by blocks (the rollout's lockstep never mixes them).
    full_rows = full if config.cache == "prefix" else refresh

    def refresh_some(kv):
        outputs, fresh = full_forward()
        kv = _where_cache_rows(full_rows, fresh, kv)
        kv, window_outputs = prefix_window(kv) if config.cache == "prefix" else no_refresh(kv)
        return kv, _where_rows(full_rows, outputs, window_outputs)

    branches = [no_refresh, refresh_some, refresh_all]
    replace_every_row = 2
    branch = jnp.where(~jnp.any(refresh), 0, jnp.where(jnp.all(full_rows | ~active), replace_every_row, 1))
    if by_blocks_refresh:  # no full refresh, some rows refresh by blocks
        if config.cache == "prefix":
            branches.append(prefix_window)
            branch = jnp.where(jnp.any(refresh) & ~jnp.any(full_rows), 3, branch)
        else:  # dual: only when every stepping row does (its window is twice as wide)
            branches.append(dual_blocks_refresh)
            branch = jnp.where(jnp.any(refresh) & jnp.all(by_blocks | ~active), 3, branch)
    kv, (token_logits, unmask_logits) = jax.lax.switch(branch, branches, cache.kv)
    # A row whose cache another row's refresh replaced refreshes on its next step (under the
    # rollout's lockstep only done rows and rows past the batch's block are replaced: they would
    # refresh anyway).
    kept = jnp.where(branch == replace_every_row, -1, cache.block)
    return token_logits, unmask_logits, BlockCache(kv=kv, block=jnp.where(refresh, block_index, kept))
