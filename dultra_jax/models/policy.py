"""Pure functions over the parameter pytree: init, backbone forward, planner, `policy_apply`.

`params` is a plain nested dict of arrays (`nnx.to_pure_dict` layout); every function takes the
frozen `ModelConfig` as a static argument (see `dultra_jax.models.pure`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dultra_jax.config import ModelConfig
from dultra_jax.models import layers, pure
from dultra_jax.models.layers import gather_positions
from dultra_jax.models.llada import LLaDAModel

Params = pure.Params
PLANNER_KEY = "planner"  # the planner head's parameters: `params["planner"]`; the rest is the backbone


def partition_params(params: Params, train: str) -> tuple[Params, Params]:
    """Splits parameters into `(trained, frozen)` by group: "all", "planner" or "backbone"."""
    planner = {k: v for k, v in params.items() if k == PLANNER_KEY}
    backbone = {k: v for k, v in params.items() if k != PLANNER_KEY}
    if train == "all":
        return dict(params), {}
    if train == "planner":
        if not planner:
            raise ValueError("optim.train='planner' but the model has no planner head")
        return planner, backbone
    return backbone, planner


def merge_params(trained: Params, frozen: Params) -> Params:
    """The inverse of `partition_params`."""
    return {**frozen, **trained}


def abstract_params(config: ModelConfig) -> Params:
    """`jax.ShapeDtypeStruct` pytree of the parameters (for shardings and checkpoint checks)."""
    return pure.abstract_params(LLaDAModel, config)


def init_params(config: ModelConfig, rng: jax.Array) -> Params:
    """Randomly initialised parameters (docs/algorithm.md section 1); jit it with `out_shardings` to shard."""
    return pure.init_params(LLaDAModel, config, rng)


def bind(config: ModelConfig, params: Params) -> LLaDAModel:
    """A module view of `params`, for use inside a traced function."""
    return pure.bind(LLaDAModel, config, params)


def default_positions(length: int) -> jax.Array:
    """Absolute positions `[1, L]`; left padding takes positions too."""
    return jnp.arange(length, dtype=jnp.int32)[None, :]


def _key_mask(config: ModelConfig, valid: jax.Array | None) -> jax.Array | None:
    return valid if (config.mask_padding and valid is not None) else None


def forward(params: Params, tokens: jax.Array, config: ModelConfig, *, valid: jax.Array | None = None,
            logit_positions: jax.Array | None = None):
    """Backbone forward.

    Args:
      tokens: `[B, L]` int32.
      valid: `[B, L]` bool, False on padding; used as a key mask when `config.mask_padding`.
      logit_positions: optional `[B, K]` int positions: the LM head then runs only there (the
        decoder reads one block's logits; the other `L - K` positions would be wasted work).
    Returns:
      `(token_logits [B, L or K, V]` raw, in the compute dtype, `h_last [B, L, D]` after `ln_f`).
    """
    model = bind(config, params)
    h_last = model.hidden(tokens, default_positions(tokens.shape[1]), _key_mask(config, valid))
    h_out = h_last if logit_positions is None else gather_positions(h_last, logit_positions)
    return model.logits(h_out), h_last


def planner_timestep(canvas: jax.Array, mask_id: int, valid: jax.Array | None = None) -> jax.Array:
    """`t = 1 - #mask / L` over the canvas, prompt included, `[B]` float32, where `L` counts the
    `valid` positions only: the reference decodes one unpadded prompt at a time, so its `t` starts
    at `P / (P + Lg)` for a `P`-token prompt whatever the batch's padding width."""
    masked = jnp.sum(canvas == mask_id, axis=-1, dtype=jnp.float32)
    length = canvas.shape[-1] if valid is None else jnp.maximum(jnp.sum(valid, axis=-1, dtype=jnp.float32), 1.0)
    return 1.0 - masked / length


def current_block_candidates(canvas: jax.Array, mask_id: int, gen_start: int, block_length: int) -> jax.Array:
    """Masked positions of each row's current block: `[B, L]` bool.

    The generation occupies `canvas[:, gen_start:]` in blocks of `block_length`; a row's current
    block is the first block that still has a mask (rows without masks get no candidates).
    """
    length = canvas.shape[1]
    is_masked = canvas == mask_id
    position = jnp.arange(length)
    block_of = jnp.where(position >= gen_start, (position - gen_start) // block_length, -1)
    first_masked = jnp.min(jnp.where(is_masked, block_of[None, :], jnp.iinfo(jnp.int32).max), axis=-1)
    return is_masked & (block_of[None, :] == first_masked[:, None])


def planner_apply(params: Params, h_last: jax.Array, canvas: jax.Array, candidates: jax.Array,
                  config: ModelConfig, *, valid: jax.Array | None = None,
                  query_positions: jax.Array | None = None) -> jax.Array:
    """Planner unmask logits `[B, L]` float32 from the backbone's `h_last` `[B, L, D]`; `[B, K]`
    at `query_positions` `[B, K]` only (the head's keys/values still come from every row)."""
    model = bind(config, params)
    if model.planner is None:
        raise ValueError("this model has no planner head (model.planner is None)")
    t = planner_timestep(canvas, config.mask_token_id, valid)
    rope = model.rope(default_positions(canvas.shape[1]))
    return model.planner(h_last, t, candidates, rope, _key_mask(config, valid), query_positions=query_positions)


def suppress_mask_logit(token_logits: jax.Array, mask_id: int) -> jax.Array:
    """Sets the `[MASK]` logit to -inf: the model never proposes the mask token."""
    return token_logits.at[..., mask_id].set(-jnp.inf)


def policy_apply(params: Params, canvas: jax.Array, config: ModelConfig, *, valid: jax.Array | None = None,
                 candidates: jax.Array | None = None, logit_positions: jax.Array | None = None,
                 suppress_mask: bool = True, with_planner: bool = True, planner_queries_at_outputs: bool = False):
    """One policy evaluation (one NFE): backbone + planner on the canvas.

    Args:
      canvas: `[B, L]` int32 tokens with `config.mask_token_id` at unrevealed positions.
      valid: `[B, L]` bool (False on prompt padding) or None.
      candidates: `[B, L]` bool planner candidates; None means every masked position (use
        `current_block_candidates` for semi-autoregressive decoding).
      logit_positions: optional `[B, K]` positions at which to return both outputs (the current
        block); None returns every position. The LM head runs only there, and so, when the
        planner does not run, do the backbone's last layer's queries, attention output and MLP.
      suppress_mask: set the mask token's logit to -inf (False gives raw logits, for parity checks).
      with_planner: run the planner head (if any); False for rules that never read it.
      planner_queries_at_outputs: with `logit_positions`, the planner head's layer runs its
        queries, attention output and MLP there only, like the backbone's last layer without a
        planner (its keys/values still come from every row; the same values, ~8% less work).
        Not under gradients on a mesh: XLA:CPU's SPMD partitioner miscompiles its backward under
        a data x fsdp x tensor mesh (jax 0.10.2; the sharded GRPO update was 0.03 off), so the
        rollout turns it on and the replay leaves it off.
    Returns:
      `(token_logits [B, L|K, V]`, `unmask_logits [B, L|K]` float32, or None without a planner
      or with `with_planner=False`).
    """
    run_planner = config.has_planner and with_planner
    if logit_positions is not None and not run_planner:  # nobody reads the other rows of h_last
        model = bind(config, params)
        h_out = model.hidden(canvas, default_positions(canvas.shape[1]), _key_mask(config, valid),
                             query_positions=logit_positions)
        token_logits = model.logits(h_out)
    else:  # every row is returned, or the planner attends over every row of h_last
        token_logits, h_last = forward(params, canvas, config, valid=valid, logit_positions=logit_positions)
    if suppress_mask:
        token_logits = suppress_mask_logit(token_logits, config.mask_token_id)
    if not run_planner:
        return token_logits, None
    if candidates is None:
        candidates = canvas == config.mask_token_id
    query_positions = logit_positions if planner_queries_at_outputs else None
    unmask_logits = planner_apply(params, h_last, canvas, candidates, config, valid=valid,
                                  query_positions=query_positions)
    if logit_positions is not None and query_positions is None:
        unmask_logits = gather_positions(unmask_logits, logit_positions)
    return token_logits, unmask_logits


def policy_apply_kv(params: Params, canvas: jax.Array, config: ModelConfig, *, valid: jax.Array,
                    candidates: jax.Array, logit_positions: jax.Array, cache=None, window: jax.Array | None = None,
                    suffix_start: int | None = None, suffix_own_start: jax.Array | None = None,
                    with_planner: bool = True):
    """`policy_apply` for decoding with a block KV cache (Fast-dLLM); the mask logit is -inf.

    Full forward (`cache` None): the whole canvas runs, outputs are read at `logit_positions`
    `[B, K]`, and every attention layer's keys/values come back: the cache to keep.
    Window forward (`cache` given): only the canvas positions `window` `[B, W]` run, against the
    cached keys/values of all others; outputs are read at the first `K` window positions (callers
    put the current block first). Or, with `suffix_start` `S` (a Python int) instead of `window`,
    the canvas suffix `[S, L)` runs for every row against the cache before it, and outputs are
    read at `logit_positions`: a row whose block starts after `S` reads its keys/values before
    its block from the cache, so its outputs are those of its own window `[block start, L)`
    (`layers.suffix_window_keys`; what the prefix cache runs, with `L` keys where a general
    window has `L + W`); a row whose block starts before `S` gets meaningless outputs. A row's own
    window may be set instead (`suffix_own_start` `[B]`, e.g. `S` for every row: the whole suffix
    fresh, what the prefix cache's `blocks` refresh runs). Cached keys/values are as stale as the
    canvas they were made on.

    Args:
      canvas, valid, candidates: `[B, L]` (candidates: masked positions of the current block).
      cache: `(backbone_kv, planner_kv)`, `(k, v)` pairs `[n_layers, B, Hkv, L, Dh]` (planner_kv
        None without a planner head).
      window: `[B, W]` canvas positions, or `suffix_start`: a Python int (one of them with a cache).
      with_planner: run the planner head (if any); False for rules that never read it, so its
        keys/values are neither computed nor cached.
    Returns:
      `(token_logits [B, K, V]`, `unmask_logits [B, K]` float32 or None, `kv`): after a full
      forward the cache to keep (`[n_layers, B, Hkv, L, Dh]` leaves); after a window forward the
      keys/values it attended to at its positions (`[n_layers, B, Hkv, W, Dh]`, for
      `cache.write_blocks`).
    """
    model = bind(config, params)
    key_mask = _key_mask(config, valid)
    num_out = logit_positions.shape[1]
    # Unlike `policy_apply`, the last layer runs on every row here: restricting its queries to the
    # output rows was measured (small model, gen 256, CPU) to gain nothing for `prefix` and to
    # cost `dual` 10% (its window is the block already; the split-off last layer adds a copy).
    if cache is None:
        positions, keys = default_positions(canvas.shape[1]), key_mask  # every key, as the canvas masks it
        h_last, backbone_kv = model.hidden_kv(canvas, positions, keys)
        planner_positions, planner_candidates, planner_cache = positions, candidates, None
        outputs = logit_positions  # rows of h_last read out
    else:
        length = canvas.shape[1]
        if suffix_start is None:
            keys = layers.window_keys(key_mask, window, length)
            outputs = jnp.broadcast_to(jnp.arange(num_out, dtype=jnp.int32)[None], logit_positions.shape)
        else:
            window = jnp.broadcast_to(jnp.arange(suffix_start, length, dtype=jnp.int32)[None],
                                      (canvas.shape[0], length - suffix_start))
            own_start = logit_positions[:, 0] if suffix_own_start is None else suffix_own_start
            keys = layers.suffix_window_keys(key_mask, suffix_start, own_start, length)
            # (clipped: a row whose block starts before the suffix reads nothing meaningful)
            outputs = jnp.clip(logit_positions - suffix_start, 0, length - suffix_start - 1)
        tokens = gather_positions(canvas, window)
        # the window's keys, made once for the backbone's layers and the planner's
        h_last, backbone_kv = model.hidden_kv(tokens, window, keys, cache=cache[0])
        planner_positions, planner_cache = window, cache[1]
        planner_candidates = gather_positions(candidates, window)
    token_logits = suppress_mask_logit(model.logits(gather_positions(h_last, outputs)), config.mask_token_id)
    if not (config.has_planner and with_planner):
        return token_logits, None, (backbone_kv, None)
    t = planner_timestep(canvas, config.mask_token_id, valid)
    # The planner's layer runs its queries at the output rows only: its keys/values (the cache's,
    # and every window position's) still come from every row of h_last.
    unmask_logits, planner_kv = model.planner.with_kv(
        h_last, t, planner_candidates, model.rope(planner_positions), keys, cache=planner_cache,
        query_positions=outputs)
    return token_logits, unmask_logits, (backbone_kv, planner_kv)
