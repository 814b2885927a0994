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

While a cache is on, rows enter blocks together: the rollout steps only the rows in the batch's
earliest current block (`rollout.stepping_rows`), and rows that finished it wait at no NFE. So a
refresh is one batched full forward for every stepping row at once, as in Fast-dLLM's lockstep
decoding, while each row still spends only its own steps (rows at their own pace would each need
a refresh at a different iteration, on top of the batch's window forward). Each row remembers
the block its cache was made for (`block`) and is refreshed when it moves on; an iteration where
only some stepping rows refresh (which the rollout does not produce, but which stays exact) runs
the full forward and the window forward. The prefix window is the canvas suffix from the
earliest stepping row's block on, whose width depends on the block: a `lax.switch` over that
block, each branch with a static suffix that attends to the cache before it and nothing of the
cache after (`policy.policy_apply_kv(suffix_start=...)`; a row further on reads its positions
before its own block from the cache, so its outputs are those of its own window).

`decode.cache_refresh="blocks"` makes every refresh after the first block cheaper: instead of
the full forward, a window forward over the new block and the block just finished (`prefix`: and
everything after them) against the cache, whose fresh keys/values are kept. The finished
block's keys/values then see its revealed tokens, while the prompt's and earlier blocks' stay as
their last refresh made them: an approximation beyond Fast-dLLM's (exact still on a one-layer
model, where keys/values are projections of a position's own token). Under `dual` it costs two
blocks' worth of queries where the full forward costs the whole canvas.

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


def write_window(kv, window: jax.Array, fresh, rows: jax.Array):
    """The cache `kv` with the window forward's `fresh` keys/values written at `window` `[B, W]`
    on the rows `rows` `[B]` (bool); leaves `[n_layers, B, Hkv, L|W, Dh]`, None leaves stay.
    Only `W` positions per row are read and written."""
    def row(cache, new, window, write):  # one row: [n_layers, Hkv, L|W, Dh], window [W]
        return cache.at[:, :, window].set(jnp.where(write, new.astype(cache.dtype), cache[:, :, window]))

    write_rows = jax.vmap(row, in_axes=(1, 1, 0, 0), out_axes=1)
    return jax.tree.map(lambda cache, new: write_rows(cache, new, window, rows), kv, fresh)


def evaluate_block_cached(params: Params, canvas: jax.Array, valid: jax.Array, cache: BlockCache,
                          positions: jax.Array, active: jax.Array, candidates: jax.Array,
                          model: ModelConfig, config: DecodeConfig):
    """One NFE on each stepping row's current block, through the cache.

    Rows that entered a new block since their cache was made (`refresh`) get a full forward: its
    keys/values replace theirs and its outputs are theirs (exact; when every stepping row
    refreshes, every row's keys/values are replaced and the rows that did not step are marked
    stale, `block` -1, to refresh when they next step). The others run the window
    forward against the cache. Which forwards run depends on which rows refresh (one
    `lax.switch`): none -> the window forward alone; every stepping row (what the rollout's
    lockstep produces) -> the full forward alone, or with `cache_refresh="blocks"` and every
    refreshing row past its first block, the block refresh's window forward alone; some -> both.

    Args:
      canvas, valid: `[B, L]`; positions: `[B, Lb]` each row's current block; active: `[B]` the
        rows that step;
      candidates: `[B, L]` bool, the masked positions of the current blocks.
    Returns:
      `(token_logits [B, Lb, V]`, `unmask_logits [B, Lb]` or None, the updated `BlockCache`).
    """
    block_index = (positions[:, 0] - config.prompt_length) // config.block_length
    refresh = active & (block_index != cache.block)
    # Windows whose width depends on the block branch on the earliest stepping row's block.
    earliest = jnp.min(jnp.where(active, block_index, config.num_blocks - 1))

    def full_forward():
        token_logits, unmask_logits, fresh = policy.policy_apply_kv(
            params, canvas, model, valid=valid, candidates=candidates, logit_positions=positions,
            with_planner=config.uses_planner)
        return (token_logits, unmask_logits), fresh

    def window_forward(kv, **window):
        token_logits, unmask_logits, _ = policy.policy_apply_kv(
            params, canvas, model, valid=valid, candidates=candidates, logit_positions=positions,
            cache=kv, with_planner=config.uses_planner, **window)
        return token_logits, unmask_logits

    def cached_outputs(kv):
        if config.cache == "dual":
            return window_forward(kv, window=positions)
        # prefix: the window runs from the earliest stepping row's block start to the canvas end
        # (a row further on reads its positions before its own block from the cache).
        branches = [lambda kv, k=k: window_forward(kv, suffix_start=config.prompt_length + k * config.block_length)
                    for k in range(config.num_blocks)]
        return jax.lax.switch(earliest, branches, kv)

    def no_refresh(kv):
        return kv, cached_outputs(kv)

    def refresh_blocks(kv):
        """The window forward over each row's current block, then the block its cache was made
        for (`prefix`: and everything after the current block; no position twice), keeping the
        window's fresh keys/values."""
        finished = config.prompt_length + jnp.maximum(cache.block, 0) * config.block_length

        def run(window):
            window = jnp.concatenate([positions, window], axis=1)
            token_logits, unmask_logits, fresh = policy.policy_apply_kv(
                params, canvas, model, valid=valid, candidates=candidates, logit_positions=positions,
                cache=kv, window=window, with_planner=config.uses_planner)
            return write_window(kv, window, fresh, refresh), (token_logits, unmask_logits)

        finished_block = _prefix_window(finished, config.block_length, config.canvas_length)
        if config.cache == "dual":
            return run(finished_block)

        def after_current(k):  # prefix: and every position after the current block k
            width = config.gen_length - (k + 1) * config.block_length
            after = _prefix_window(positions[:, 0] + config.block_length, width, config.canvas_length)
            return jnp.concatenate([finished_block, after], axis=1) if width else finished_block

        # a blocks refresh enters block k >= 1 (block 0's refresh is the full forward)
        return jax.lax.switch(jnp.maximum(earliest - 1, 0), [lambda k=k: run(after_current(k))
                                                             for k in range(1, config.num_blocks)])

    def refresh_all(kv):
        # Every row takes the full forward's keys/values (selecting rows would read and write the
        # whole cache once more); the rows that did not step are marked stale below instead.
        outputs, fresh = full_forward()
        return fresh, outputs

    def refresh_batch_and_window(kv):
        outputs, fresh = full_forward()
        kv = jax.tree.map(lambda n, o: jnp.where(refresh[None, :, None, None, None], n, o), fresh, kv)
        return kv, _where_rows(refresh, outputs, cached_outputs(kv))

    branches = [no_refresh, refresh_batch_and_window, refresh_all]
    replace_every_row = 2  # every stepping row refreshes
    whole = replace_every_row
    if config.cache_refresh == "blocks" and config.num_blocks > 1:  # a first refresh has no cache: full
        branches.append(refresh_blocks)
        whole = jnp.where(jnp.all(~refresh | (cache.block >= 0)), 3, replace_every_row)
    branch = jnp.where(~jnp.any(refresh), 0, jnp.where(jnp.all(refresh | ~active), whole, 1))
    kv, (token_logits, unmask_logits) = jax.lax.switch(branch, branches, cache.kv)
    # A row whose cache another row's refresh replaced refreshes on its next step (under the
    # rollout's lockstep only done rows and rows past the batch's block are replaced: they would
    # refresh anyway).
    kept = jnp.where(branch == replace_every_row, -1, cache.block)
    return token_logits, unmask_logits, BlockCache(kv=kv, block=jnp.where(refresh, block_index, kept))
