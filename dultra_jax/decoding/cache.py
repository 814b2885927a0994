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
cache, which keeps the finished block's fresh keys/values (the cached positions a later step of
the block reads that the refresh recomputes). Under `dual` the rows still enter each block together
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

import functools

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


def write_blocks(kv, starts: jax.Array, fresh, rows: jax.Array):
    """The cache `kv` with `fresh` written at positions `starts[b], ..., starts[b] + W - 1` of each
    row `b` in `rows` `[B]` (bool); leaves `[n_layers, B, Hkv, L|W, Dh]`, None leaves stay.
    The rows' starts differ by multiples of `W` (block starts, for blocks of `W`).

    Only the blocks some row writes are read and written, in place: one slice of all rows per
    such block (a `lax.fori_loop` over them; none when no row writes), the rows chosen
    elementwise. A batched scatter over rows and positions made XLA:CPU transpose the whole cache
    to rows-major and back around it, and a slice per row, a dynamic index into the rows, made
    XLA's partitioner gather the whole cache onto every device of a batch-sharded mesh."""
    width = jax.tree.leaves(fresh)[0].shape[3]
    first = jnp.min(jnp.where(rows, starts, jnp.iinfo(jnp.int32).max))
    last = jnp.max(jnp.where(rows, starts, 0))
    blocks = jnp.where(jnp.any(rows), (last - first) // width + 1, 0)

    def write_block(index, kv):
        start = first + index * width
        writing = (rows & (starts == start))[None, :, None, None, None]

        def write(cache, new):
            old = jax.lax.dynamic_slice_in_dim(cache, start, width, axis=3)
            return jax.lax.dynamic_update_slice_in_dim(cache, jnp.where(writing, new.astype(cache.dtype), old),
                                                       start, axis=3)

        return jax.tree.map(write, kv, fresh)

    return jax.lax.fori_loop(0, blocks, write_block, kv)


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


def _in_place_if(pred: jax.Array, update, carry):
    """`update(carry)` where the traced bool `pred` holds, else `carry`, its buffers updated in
    place. A `lax.cond` or `lax.switch` whose result is the KV cache, unchanged in some
    branches, makes XLA:CPU copy the whole cache out of the conditional and again into the
    rollout loop's carry, every step (jax 0.10.2; on `small`, 85 MB a step); a while loop of at
    most one trip keeps its carry's buffers."""
    def once(state):
        return jnp.zeros_like(state[0]), update(state[1])

    return jax.lax.while_loop(lambda state: state[0], once, (pred, carry))[1]


def evaluate_block_cached(params: Params, canvas: jax.Array, valid: jax.Array, cache: BlockCache,
                          positions: jax.Array, active: jax.Array, candidates: jax.Array,
                          model: ModelConfig, config: DecodeConfig):
    """One NFE on each stepping row's current block, through the cache.

    A row that entered a new block since its cache was made (`refresh`) refreshes it: by the full
    forward (the `full` refresh, or any row without a cache yet), whose keys/values replace its
    cache and whose outputs are its own (exact), or by `blocks`: `dual`, the window forward over
    its block and the block its cache was made for (the finished block); `prefix`, its suffix
    window started at the finished block. Either way the finished block's fresh keys/values are
    written: of the positions the refresh recomputes, they are the only ones a later step of the
    block reads from the cache (its own window, and `dual`'s suffix, are read fresh or unchanged).
    `dual` refreshes by blocks only when every stepping row does (its window is the block, and
    the finished block would widen it for every row); otherwise its refreshing rows take the full
    forward. The other stepping rows run the window forward against their cache (`prefix`: one
    suffix forward for every row that does not refresh in full, from the earliest of their
    windows' starts, a static suffix per block by `lax.switch`; `dual`: the block, or the two
    blocks). The window forward runs when some stepping row does not refresh in full, the full
    forward when some does (the first block, and each block under the lockstep of
    `rows_take_blocks_together`), before the window forward; the cache is updated in place
    (`_in_place_if`, `write_blocks`), the rows that do not step keep theirs.

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
    if config.cache == "dual":
        every_row_by_blocks = jnp.all(by_blocks | ~active)
        full, by_blocks = refresh & ~every_row_by_blocks, by_blocks & every_row_by_blocks
    window_rows = active & ~full
    finished_start = config.prompt_length + jnp.maximum(cache.block, 0) * config.block_length
    own_start = jnp.where(by_blocks, finished_start, positions[:, 0])  # a row's `prefix` window
    finished_block = _prefix_window(finished_start, config.block_length, config.canvas_length)

    def window_forward(kv, **window):
        """The window forward against `kv` (`window=` or `suffix_start=`, `policy_apply_kv`):
        `(outputs, the keys/values it attended to at its positions)`."""
        token_logits, unmask_logits, fresh = policy.policy_apply_kv(
            params, canvas, model, valid=valid, candidates=candidates, logit_positions=positions,
            cache=kv, with_planner=config.uses_planner, **window)
        return (token_logits, unmask_logits), fresh

    # The window forward's branches: `(outputs, keys/values [.., B, Hkv, Lb, Dh] of the finished
    # block)`, the latter written below on the rows refreshing by blocks (read nowhere else).
    def suffix_from(start: int, kv):
        """`prefix`: the canvas suffix from `start` for every window row; a row's own window
        starts at its block or, refreshing by blocks, at its finished block; a row whose window
        starts later reads the positions before it from its cache, so its outputs are its own
        window's."""
        outputs, fresh = window_forward(kv, suffix_start=start, suffix_own_start=own_start)
        offset = jnp.clip(finished_start - start, 0, config.canvas_length - start - config.block_length)
        take_block = jax.vmap(lambda x, row_offset: jax.lax.dynamic_slice_in_dim(x, row_offset, config.block_length,
                                                                                 axis=2), in_axes=(1, 0), out_axes=1)
        return outputs, jax.tree.map(lambda x: take_block(x, offset), fresh)

    def dual_block(kv):  # nothing to write: no row refreshes by blocks here
        return window_forward(kv, window=positions)

    def dual_two_blocks(kv):  # every stepping row refreshes by blocks
        outputs, fresh = window_forward(kv, window=jnp.concatenate([positions, finished_block], axis=1))
        return outputs, jax.tree.map(lambda x: x[:, :, :, config.block_length:], fresh)

    if config.cache == "prefix":
        branches = [functools.partial(suffix_from, config.prompt_length + k * config.block_length)
                    for k in range(config.num_blocks)]
        last_start = config.canvas_length - config.block_length
        branch = (jnp.min(jnp.where(window_rows, own_start, last_start)) - config.prompt_length) // config.block_length
    else:
        branches = [dual_block, dual_two_blocks]
        branch = jnp.any(by_blocks).astype(jnp.int32)

    def no_window(kv):  # every stepping row refreshes in full
        return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(branches[0], kv))

    def full_refresh(carry):
        kv, outputs = carry
        token_logits, unmask_logits, fresh = policy.policy_apply_kv(
            params, canvas, model, valid=valid, candidates=candidates, logit_positions=positions,
            with_planner=config.uses_planner)
        return _where_cache_rows(full, fresh, kv), (token_logits, unmask_logits)

    # The full forward first: after the window forward's `lax.switch`, XLA:CPU's 8-device tests
    # (tests/test_rollout.py, sharded `dual`) deadlocked in a collective's rendezvous, 3 runs in 4.
    kv, full_outputs = _in_place_if(jnp.any(full), full_refresh, (cache.kv, no_window(cache.kv)[0]))
    outputs, finished_kv = jax.lax.switch(jnp.where(jnp.any(window_rows), branch + 1, 0), [no_window] + branches, kv)
    kv = write_blocks(kv, finished_start, finished_kv, by_blocks)
    token_logits, unmask_logits = _where_rows(full, full_outputs, outputs)
    return token_logits, unmask_logits, BlockCache(kv=kv, block=jnp.where(refresh, block_index, cache.block))
