"""The rollout: semi-autoregressive denoising as one jitted `lax.while_loop`.

The canvas is `[prompt (Lp, left-padded) | gen (Lg)]`. Each row works on its current block (the
first block of its generation that still has masks), moves on as soon as that block is done, and
is frozen once nothing is masked: a frozen row spends no NFE. Every iteration of the loop is one
NFE for each stepping row (every active row; with a KV cache those in the batch's earliest
block, `stepping_rows`): a backbone + planner forward, a rule's choice, the reveal, and the
action's log-probability, computed by `action_log_prob`, which the trainer's replay reuses.

Each row counts its own steps (`nfe`), so a trajectory is fully described by the final tokens
and, per position, the row-step at which it was revealed: the canvas before row-step k is
"revealed iff unmask_step < k" (`canvas_before_step`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dultra_jax.config import ConfigError, DecodeConfig, ModelConfig
from dultra_jax.decoding import cache as block_cache
from dultra_jax.decoding import rules
from dultra_jax.decoding.action import action_log_prob, planner_scores
from dultra_jax.models import policy
from dultra_jax.sharding import BATCH_AXES, constrain

Params = policy.Params


@struct.dataclass
class RolloutState:
    """The `lax.while_loop` carry; every shape is fixed by the configs.

    Attributes:
      canvas: `[B, L]` int32 tokens, `mask_id` where unrevealed.
      valid: `[B, L]` bool, False on prompt padding.
      unmask_step: `[B, Lg]` int32 row-step at which each generated position was revealed
        (`T` while unrevealed).
      block_step: `[B]` int32 steps spent in the current block (schedules, EOSER).
      nfe: `[B]` int32 steps (forward evaluations) this row has taken.
      done: `[B]` bool, nothing left to reveal.
      step_logps: `[B, T]` float32 log-probability of each of the row's actions.
      rng: PRNG key, split once per loop iteration.
      step: scalar int32 loop iteration.
      cache: the block KV cache (`decoding.cache.BlockCache`), None with `decode.cache="none"`.
    """

    canvas: jax.Array
    valid: jax.Array
    unmask_step: jax.Array
    block_step: jax.Array
    nfe: jax.Array
    done: jax.Array
    step_logps: jax.Array
    rng: jax.Array
    step: jax.Array
    cache: block_cache.BlockCache | None = None


@struct.dataclass
class Trajectory:
    """A finished rollout, O(B * L): everything replay and decoding need.

    Attributes:
      tokens: `[B, Lg]` int32 final generated tokens (`mask_id` only if the budget ran out).
      unmask_step: `[B, Lg]` int32 row-step at which each position was revealed (`T` if never).
      num_steps: `[B]` int32 NFE of each row.
      step_logps: `[B, T]` float32 action log-probs at rollout time (0 past `num_steps`).
      prompt_tokens: `[B, Lp]` int32; prompt_valid: `[B, Lp]` bool.
    """

    tokens: jax.Array
    unmask_step: jax.Array
    num_steps: jax.Array
    step_logps: jax.Array
    prompt_tokens: jax.Array
    prompt_valid: jax.Array


# ------------------------------------------------------------------------------- shared pieces


def block_positions(canvas: jax.Array, mask_id: int, config: DecodeConfig):
    """Each row's current block.

    Returns:
      `(positions [B, Lb]` absolute canvas positions of the block, `active [B]` bool: the row
      still has masks). A done row points at its last block.
    """
    batch = canvas.shape[0]
    gen_masked = (canvas[:, config.prompt_length:] == mask_id).reshape(batch, config.num_blocks,
                                                                        config.block_length)
    block_has_mask = jnp.any(gen_masked, axis=-1)
    active = jnp.any(block_has_mask, axis=-1)
    current = jnp.where(active, jnp.argmax(block_has_mask, axis=-1), config.num_blocks - 1)
    start = config.prompt_length + current * config.block_length
    return start[:, None] + jnp.arange(config.block_length, dtype=jnp.int32)[None, :], active


def scatter_positions(x: jax.Array, positions: jax.Array, values: jax.Array) -> jax.Array:
    """`x[b, positions[b, k]] = values[b, k]` for `[B, L]` arrays."""
    rows = jnp.arange(x.shape[0])[:, None]
    return x.at[rows, positions].set(values)


def sample_tokens(token_logits: jax.Array, temperature: float, rng: jax.Array) -> jax.Array:
    """Gumbel-max sampling from softmax(logits / T); T = 0 is argmax. `[B, Lb, V] -> [B, Lb]`."""
    if temperature == 0:
        return jnp.argmax(token_logits, axis=-1).astype(jnp.int32)
    gumbel = jax.random.gumbel(rng, token_logits.shape, jnp.float32)
    return jnp.argmax(token_logits + temperature * gumbel, axis=-1).astype(jnp.int32)


def stepping_rows(positions: jax.Array, active: jax.Array, nfe: jax.Array, config: DecodeConfig) -> jax.Array:
    """`[B]` bool: the rows that take a step this loop iteration.

    A row steps while it has masks and steps left in its budget. Without a cache every such row
    steps every iteration. With a KV cache whose rows take blocks together
    (`cache.rows_take_blocks_together`: a full refresh, or `dual`) only the rows in the batch's
    earliest current block step; rows that finished that block wait, spending no NFE, until the
    others catch up. So rows enter each block together and one batched full forward refreshes all
    their caches, where rows at their own pace would each need a refresh of their own at a
    different iteration (and the batch's window forward besides). Waiting changes no row's
    computation, only the loop iteration at which it takes each step, and so which random draws
    it gets (a rule without randomness takes the same steps, with the same NFE, either way).

    Args:
      positions: `[B, Lb]` each row's current block (`block_positions`); active: `[B]` the row
        has masks; nfe: `[B]` int32 steps the row has taken.
    """
    can_step = active & (nfe < config.step_budget)
    if not block_cache.rows_take_blocks_together(config):
        return can_step
    start = positions[:, 0]
    earliest = jnp.min(jnp.where(can_step, start, config.canvas_length))
    return can_step & (start == earliest)


def evaluate_block(params: Params, canvas: jax.Array, valid: jax.Array, model: ModelConfig,
                   config: DecodeConfig, cache: block_cache.BlockCache | None = None,
                   nfe: jax.Array | None = None):
    """One NFE on each stepping row's current block (through the block KV cache when one is given).

    With `nfe` `[B]` (the rollout) the stepping rows are `stepping_rows`' and the planner head's
    queries run at the block only (`policy_apply(planner_queries_at_outputs=True)`, which no
    gradient may run through on a mesh); without (the replay, which evaluates each row's own step
    under gradients) every row with masks, the planner head in full.

    Returns:
      `(positions [B, Lb]`, `active [B]` the row steps, `candidates [B, Lb]`, `token_logits
      [B, Lb, V]` float32 with the mask logit at -inf, `unmask_logits [B, Lb]` float32 or None,
      the updated cache).
    """
    positions, active = block_positions(canvas, model.mask_token_id, config)
    if nfe is not None:
        active = stepping_rows(positions, active, nfe, config)
    is_masked = canvas == model.mask_token_id
    in_block = jnp.zeros(canvas.shape, jnp.bool_)
    in_block = scatter_positions(in_block, positions, jnp.ones(positions.shape, jnp.bool_))
    if cache is None:
        token_logits, unmask_logits = policy.policy_apply(
            params, canvas, model, valid=valid, candidates=is_masked & in_block, logit_positions=positions,
            with_planner=config.uses_planner, planner_queries_at_outputs=nfe is not None)
    else:
        token_logits, unmask_logits, cache = block_cache.evaluate_block_cached(
            params, canvas, valid, cache, positions, active, is_masked & in_block, model, config)
    candidates = policy.gather_positions(is_masked, positions) & active[:, None]
    return positions, active, candidates, token_logits.astype(jnp.float32), unmask_logits, cache


# ---------------------------------------------------------------------------------- the step


def init_state(prompt_tokens: jax.Array, prompt_valid: jax.Array, rng: jax.Array, model: ModelConfig,
               config: DecodeConfig) -> RolloutState:
    """The loop's initial carry: `[prompt | mask x Lg]`."""
    batch = prompt_tokens.shape[0]
    gen = jnp.full((batch, config.gen_length), model.mask_token_id, jnp.int32)
    canvas = jnp.concatenate([prompt_tokens.astype(jnp.int32), gen], axis=1)
    valid = jnp.concatenate([prompt_valid.astype(jnp.bool_), jnp.ones(gen.shape, jnp.bool_)], axis=1)
    zeros = jnp.zeros((batch,), jnp.int32)
    return RolloutState(
        canvas=canvas, valid=valid,
        unmask_step=jnp.full(gen.shape, config.step_budget, jnp.int32),
        block_step=zeros, nfe=zeros, done=jnp.zeros((batch,), jnp.bool_),
        step_logps=jnp.zeros((batch, config.step_budget), jnp.float32), rng=rng,
        step=jnp.zeros((), jnp.int32), cache=block_cache.init_cache(batch, model, config))


def denoise_step(params: Params, state: RolloutState, model: ModelConfig, config: DecodeConfig,
                 knobs: rules.Knobs | None = None) -> RolloutState:
    """One loop iteration: one NFE for every stepping row (`stepping_rows`), nothing for the
    others. The rules' knobs are `knobs` (traced) when given, else `config`'s."""
    knobs = rules.Knobs.of(config) if knobs is None else knobs
    positions, active, candidates, token_logits, unmask_logits, cache = evaluate_block(
        params, state.canvas, state.valid, model, config, state.cache, state.nfe)
    rng, token_key, rule_key = jax.random.split(state.rng, 3)
    x0 = sample_tokens(token_logits, config.temperature, token_key)
    confidence = jnp.take_along_axis(jax.nn.softmax(token_logits, axis=-1), x0[..., None], axis=-1)[..., 0]
    if config.eoser:
        gamma = rules.eoser_gamma(state.block_step, config, knobs)
        confidence = jnp.where(x0 == config.eos_token_id, confidence * gamma[:, None], confidence)
    unmask_probs = None
    if config.uses_planner:
        unmask_probs = planner_scores(unmask_logits, knobs.factor)
    view = rules.StepView(token_logits=token_logits, x0=x0, confidence=confidence, unmask_probs=unmask_probs,
                          candidates=candidates, block_step=state.block_step, knobs=knobs)
    reveal = rules.select(view, rule_key, config)
    logp = action_log_prob(token_logits, unmask_logits, x0, candidates, reveal, config, knobs)

    block_tokens = policy.gather_positions(state.canvas, positions)
    canvas = scatter_positions(state.canvas, positions, jnp.where(reveal, x0, block_tokens))
    gen_positions = positions - config.prompt_length
    old_steps = policy.gather_positions(state.unmask_step, gen_positions)
    unmask_step = scatter_positions(state.unmask_step, gen_positions,
                                    jnp.where(reveal, state.nfe[:, None], old_steps))
    rows = jnp.arange(canvas.shape[0])
    slot = jnp.minimum(state.nfe, config.step_budget - 1)
    step_logps = state.step_logps.at[rows, slot].set(jnp.where(active, logp, state.step_logps[rows, slot]))
    block_finished = ~jnp.any(candidates & ~reveal, axis=-1)
    block_step = jnp.where(active, jnp.where(block_finished, 0, state.block_step + 1), state.block_step)
    gen_masked = canvas[:, config.prompt_length:] == model.mask_token_id
    return RolloutState(canvas=canvas, valid=state.valid, unmask_step=unmask_step, block_step=block_step,
                        nfe=state.nfe + active.astype(jnp.int32), done=~jnp.any(gen_masked, axis=-1),
                        step_logps=step_logps, rng=rng, step=state.step + 1, cache=cache)


def constrain_rows(state: RolloutState) -> RolloutState:
    """The carry with its rows pinned over the batch axes `('data', 'fsdp')` (the KV cache's heads
    over 'tensor', as the attention makes them) on the mesh in context; unchanged without one.
    Left to itself XLA may keep the small per-row arrays (`nfe`, `done`, `step_logps`, ...)
    whole on every device and hand them out replicated."""
    rows = lambda x: constrain(x, BATCH_AXES)  # noqa: E731
    cache = state.cache
    if cache is not None:
        kv = jax.tree.map(lambda x: constrain(x, None, BATCH_AXES, "tensor", None), cache.kv)
        cache = cache.replace(kv=kv, block=rows(cache.block))
    return state.replace(canvas=rows(state.canvas), valid=rows(state.valid), unmask_step=rows(state.unmask_step),
                         block_step=rows(state.block_step), nfe=rows(state.nfe), done=rows(state.done),
                         step_logps=rows(state.step_logps), cache=cache)


def keep_going(state: RolloutState, config: DecodeConfig) -> jax.Array:
    """Loop condition: some row still has masks and steps left in its budget."""
    return jnp.any(~state.done & (state.nfe < config.step_budget))


def to_trajectory(state: RolloutState, config: DecodeConfig) -> Trajectory:
    """The finished carry's `Trajectory` (slices of the canvas; `rollout` takes them inside its
    jitted program)."""
    lp = config.prompt_length
    return Trajectory(tokens=state.canvas[:, lp:], unmask_step=state.unmask_step, num_steps=state.nfe,
                      step_logps=state.step_logps, prompt_tokens=state.canvas[:, :lp],
                      prompt_valid=state.valid[:, :lp])


# ------------------------------------------------------------------------------- entry points

TRACE_COUNT = {"rollout_loop": 0}  # incremented at trace time; tests assert no retracing


def _rollout_loop(params: Params, state: RolloutState, model: ModelConfig, config: DecodeConfig,
                  knobs: rules.Knobs | None = None) -> RolloutState:
    TRACE_COUNT["rollout_loop"] += 1
    return jax.lax.while_loop(lambda s: keep_going(s, config),
                              lambda s: constrain_rows(denoise_step(params, s, model, config, knobs)), state)


def _rollout(params: Params, prompt_tokens: jax.Array, prompt_valid: jax.Array, rng: jax.Array,
             knobs: rules.Knobs, model: ModelConfig, config: DecodeConfig) -> Trajectory:
    """`rollout` as one program: the initial carry, the loop and the trajectory's slices.

    The slices belong inside: taken eagerly after the loop on arrays sharded over several
    devices, each would be a program of its own, dispatched while the loop still runs, and on
    XLA:CPU two programs with collectives running at once can deadlock. The carry (and its KV
    cache) lives only inside the program, so nothing needs donating. On a mesh (`jax.set_mesh`)
    the carry and the trajectory keep their rows over `('data', 'fsdp')` (`constrain_rows`).
    """
    state = constrain_rows(init_state(prompt_tokens, prompt_valid, rng, model, config))
    trajectory = to_trajectory(_rollout_loop(params, state, model, config, knobs), config)
    return jax.tree.map(lambda x: constrain(x, BATCH_AXES), trajectory)


rollout_jit = jax.jit(_rollout, static_argnames=("model", "config"))
init_state_jit = jax.jit(init_state, static_argnames=("model", "config"))
denoise_step_jit = jax.jit(denoise_step, static_argnames=("model", "config"))


def check_prompts(prompt_tokens, prompt_valid, model: ModelConfig, config: DecodeConfig):
    """Start-up validation and left-padding of host prompts to `config.prompt_length`.

    Returns `(prompt_tokens [B, Lp] int32, prompt_valid [B, Lp] bool)`.
    """
    config.check_model(model)
    prompt_tokens = np.asarray(prompt_tokens)
    prompt_valid = np.ones(prompt_tokens.shape, bool) if prompt_valid is None else np.asarray(prompt_valid, bool)
    if prompt_tokens.ndim != 2 or prompt_valid.shape != prompt_tokens.shape:
        raise ConfigError(f"prompt_tokens has shape {prompt_tokens.shape} and prompt_valid {prompt_valid.shape}; "
                          "both must be the same [B, Lp]")
    width = prompt_tokens.shape[1]
    if width > config.prompt_length:
        raise ConfigError(f"prompts are {width} tokens wide, longer than decode.prompt_length="
                          f"{config.prompt_length}")
    if width < config.prompt_length:
        pad = config.prompt_length - width
        prompt_tokens = np.pad(prompt_tokens, ((0, 0), (pad, 0)), constant_values=model.pad_token_id)
        prompt_valid = np.pad(prompt_valid, ((0, 0), (pad, 0)), constant_values=False)
    bad = (prompt_tokens < 0) | (prompt_tokens >= model.vocab_size) | (prompt_tokens == model.mask_token_id)
    if np.any(bad & prompt_valid):
        b, i = np.argwhere(bad & prompt_valid)[0]
        raise ConfigError(f"prompt row {b}, position {i}: token id {prompt_tokens[b, i]} is the mask id or outside "
                          f"the vocabulary [0, {model.vocab_size})")
    return prompt_tokens.astype(np.int32), prompt_valid


def rollout_inputs(prompt_tokens, prompt_valid, config: DecodeConfig, model: ModelConfig):
    """`(prompt_tokens, prompt_valid, knobs, static config)` as `rollout`'s program takes them:
    host prompts checked and left-padded (`check_prompts`), the knobs `config`'s (traced), the
    static config `config.without_knobs()` (see `rollout`)."""
    if isinstance(prompt_tokens, jax.Array) and prompt_tokens.shape[1] == config.prompt_length:
        config.check_model(model)  # device prompts (the trainer's) are already checked and padded
        if prompt_valid is None:
            prompt_valid = jnp.ones(prompt_tokens.shape, jnp.bool_)
    else:
        prompt_tokens, prompt_valid = check_prompts(prompt_tokens, prompt_valid, model, config)
    return prompt_tokens, prompt_valid, rules.Knobs.of(config), config.without_knobs()


def compile_rollout(params: Params, prompt_tokens, prompt_valid, rng: jax.Array, config: DecodeConfig,
                    model: ModelConfig) -> None:
    """Compiles the program `rollout` runs for these arguments' shapes and shardings without
    decoding anything (ahead of time; the next `rollout` call on them neither traces nor
    compiles), for timings that exclude compilation."""
    prompt_tokens, prompt_valid, knobs, config = rollout_inputs(prompt_tokens, prompt_valid, config, model)
    rollout_jit.lower(params, prompt_tokens, prompt_valid, rng, knobs, model=model, config=config).compile()


def rollout(params: Params, prompt_tokens, prompt_valid, rng: jax.Array, config: DecodeConfig,
            model: ModelConfig) -> Trajectory:
    """Decodes `gen_length` tokens after each prompt with one jitted `lax.while_loop`.

    Args:
      params: model parameters (may be sharded; the batch follows its input sharding).
      prompt_tokens: `[B, Lp']` int, left-padded, `Lp' <= config.prompt_length` (narrower prompts
        are left-padded here); prompt_valid: `[B, Lp']` bool or None (all valid).
      rng: PRNG key (token sampling and stochastic rules).
    Returns:
      The `Trajectory`, computed by one jitted program (`_rollout`); one compile per (shapes,
      model, `config.without_knobs()`): the rules' numeric knobs are traced inputs, so a sweep
      over factor / threshold / entropy bound / steps reuses it.
    """
    prompt_tokens, prompt_valid, knobs, config = rollout_inputs(prompt_tokens, prompt_valid, config, model)
    return rollout_jit(params, prompt_tokens, prompt_valid, rng, knobs, model=model, config=config)


def rollout_python_loop(params: Params, prompt_tokens, prompt_valid, rng: jax.Array, config: DecodeConfig,
                        model: ModelConfig) -> Trajectory:
    """The same decoding driven from Python, one jitted step per NFE (how the PyTorch reference
    implementations run); the test oracle and the benchmark baseline for `rollout`. Its knobs
    are compile-time constants of `config`, where `rollout` traces them."""
    prompt_tokens, prompt_valid = check_prompts(prompt_tokens, prompt_valid, model, config)
    state = init_state_jit(prompt_tokens, prompt_valid, rng, model=model, config=config)
    while bool(keep_going(state, config)):
        state = denoise_step_jit(params, state, model=model, config=config)
    return to_trajectory(state, config)


def loop_iterations(trajectory: Trajectory, config: DecodeConfig) -> jax.Array:
    """The loop iterations (batched forwards) the rollout of `trajectory` took, a scalar: the
    largest row NFE where rows go at their own pace; where they take each block together
    (`stepping_rows`), the sum over blocks of the most steps a row spent there. A row's steps in
    a block are consecutive row-steps, so their number is last - first + 1."""
    if not block_cache.rows_take_blocks_together(config):
        return jnp.max(trajectory.num_steps)
    budget = config.step_budget
    steps = trajectory.unmask_step.reshape(-1, config.num_blocks, config.block_length)
    first = jnp.min(steps, axis=-1)
    last = jnp.max(jnp.where(steps < budget, steps, -1), axis=-1)
    return jnp.sum(jnp.max(jnp.where(last >= 0, last - first + 1, 0), axis=0))


def canvas_before_step(trajectory: Trajectory, k: jax.Array, mask_id: int) -> jax.Array:
    """The `[B, L]` canvas each row saw before its row-step `k` (`[B]` or scalar)."""
    k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), trajectory.num_steps.shape)
    gen = jnp.where(trajectory.unmask_step < k[:, None], trajectory.tokens, mask_id)
    return jnp.concatenate([trajectory.prompt_tokens, gen], axis=1)
