"""The GRPO objective of dUltra, in one place: group advantages, the replay of a trajectory's
denoising steps under the current parameters, the clipped per-step ratio loss, and its gradient
accumulated step by step with the update's metrics (docs/algorithm.md section 5).

Replay: a row's canvas before its step k is "revealed iff unmask_step < k" (tokens never change
once revealed), the step's action is "reveal the positions with unmask_step == k, with the final
tokens", and its log-probability is `decoding.action.action_log_prob`: the very function the
rollout used, so replay with the rollout's parameters reproduces `step_logps`.

The gradient takes `value_and_grad` of one step's loss *inside* a `lax.fori_loop` over the steps
and accumulates float32 gradients, so peak memory is that of one forward + backward whatever the
number of steps, and steps beyond the batch's largest NFE are never computed. Each step's loss is
a sum divided by the batch's fixed denominator, so the accumulated loss is exactly the mean over
the whole batch.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from dultra_jax.config import ConfigError, DecodeConfig, ModelConfig, RLConfig
from dultra_jax.decoding.action import action_log_prob
from dultra_jax.decoding.rollout import Trajectory, canvas_before_step, evaluate_block
from dultra_jax.models import policy

Params = policy.Params

ADVANTAGE_FNS: dict[str, Callable[[jax.Array], jax.Array]] = {}


def register_advantage(name: str):
    def wrap(fn):
        ADVANTAGE_FNS[name] = fn
        return fn
    return wrap


@register_advantage("mean")
def _mean(grouped: jax.Array) -> jax.Array:
    """`R - mean_group(R)` (the reference: no std division)."""
    return grouped - jnp.mean(grouped, axis=-1, keepdims=True)


@register_advantage("mean_std")
def _mean_std(grouped: jax.Array) -> jax.Array:
    """`(R - mean) / (std + 1e-4)` with the sample std (ddof 1), as TRL's `scale_rewards="group"`
    (the reference's trainer) computes it; a group with equal rewards gets 0, not NaN."""
    return _mean(grouped) / (jnp.std(grouped, axis=-1, keepdims=True, ddof=1) + 1e-4)


@register_advantage("leave_one_out")
def _leave_one_out(grouped: jax.Array) -> jax.Array:
    """`R - mean of the other G-1 rewards` = `(R - mean) * G / (G - 1)`."""
    size = grouped.shape[-1]
    return _mean(grouped) * size / (size - 1)


def compute_advantages(rewards: jax.Array, config: RLConfig) -> jax.Array:
    """Group-relative advantages `[B]` for rewards `[B]` laid out as P groups of G consecutive rows;
    values below `advantage_min_clip` become 0."""
    grouped = rewards.astype(jnp.float32).reshape(-1, config.group_size)
    advantages = ADVANTAGE_FNS[config.advantage](grouped).reshape(-1)
    return jnp.where(advantages < config.advantage_min_clip, 0.0, advantages)


def clipped_step_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, taken: jax.Array,
                      config: RLConfig, ref_logp: jax.Array | None = None):
    """The loss terms of one denoising step for every row.

    `r = exp(logp - old_logp)` (the whole step's log-prob: a per-step sequence ratio);
    `loss = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)` (+ `beta * KL` with the k3
    estimator against `ref_logp`). Rows whose step `taken` is False contribute nothing.

    Args:
      logp, old_logp, advantages: `[B]` float32; taken: `[B]` bool.
    Returns:
      `(loss [B]`, `clipped [B]` bool: the clipped branch was the active one).
    """
    ratio = jnp.exp(logp - old_logp)
    clipped_ratio = jnp.clip(ratio, 1.0 - config.eps_low, 1.0 + config.eps_high)
    unclipped_obj, clipped_obj = ratio * advantages, clipped_ratio * advantages
    loss = -jnp.minimum(unclipped_obj, clipped_obj)
    if ref_logp is not None and config.beta > 0:
        log_ratio_ref = ref_logp - logp
        loss = loss + config.beta * (jnp.exp(log_ratio_ref) - log_ratio_ref - 1.0)
    clipped = taken & (clipped_obj < unclipped_obj)
    return jnp.where(taken, loss, 0.0), clipped


# replay


def trajectory_valid(trajectory: Trajectory) -> jax.Array:
    """`[B, L]` key mask of the canvas: prompt padding False, every generated position True."""
    return jnp.concatenate([trajectory.prompt_valid, jnp.ones(trajectory.tokens.shape, jnp.bool_)], axis=1)


def replay_step_logp(params: policy.Params, trajectory: Trajectory, k: jax.Array, model: ModelConfig,
                     config: DecodeConfig) -> jax.Array:
    """Log-probability `[B]` of each row's step `k` (a scalar); 0 for rows with fewer steps."""
    canvas = canvas_before_step(trajectory, k, model.mask_token_id)
    positions, active, candidates, token_logits, unmask_logits, _ = evaluate_block(
        params, canvas, trajectory_valid(trajectory), model, config)
    gen_positions = positions - config.prompt_length
    reveal = candidates & (policy.gather_positions(trajectory.unmask_step, gen_positions) == k)
    x0 = policy.gather_positions(trajectory.tokens, gen_positions)
    logp = action_log_prob(token_logits, unmask_logits, x0, candidates, reveal, config)
    return jnp.where(active & (k < trajectory.num_steps), logp, 0.0)


def replay_logps(params: policy.Params, trajectory: Trajectory, model: ModelConfig,
                 config: DecodeConfig) -> jax.Array:
    """All step log-probs `[B, T]`; steps past the batch's largest NFE are not computed."""
    def body(k, logps):
        return logps.at[:, k].set(replay_step_logp(params, trajectory, k, model, config))

    return jax.lax.fori_loop(0, jnp.max(trajectory.num_steps), body, jnp.zeros_like(trajectory.step_logps))


def old_logps_need_replay(config: DecodeConfig, num_iterations: int) -> bool:
    """Whether the rollout's recorded `step_logps` cannot serve as the "old" log-probs of
    `num_iterations` updates on one batch.

    A rollout with a KV cache (`config.cache` not "none") records log-probs under stale keys and
    values, which the exact replay of an update does not reproduce: the ratios would start away
    from 1 and the clip would act on cache noise. With one update per batch the old log-probs are
    the replay itself (`grpo_update`), and without a cache the recorded ones are exact.
    """
    return num_iterations > 1 and config.cache != "none"


def exact_old_logps(params: policy.Params, trajectory: Trajectory, model: ModelConfig,
                    config: DecodeConfig) -> tuple[Trajectory, jax.Array]:
    """The trajectory with its `step_logps` replayed exactly with the rollout's `params` (as TRL
    recomputes the old log-probs of a reused batch; see `old_logps_need_replay`), and the largest
    gap between the recorded and the exact values over the steps taken."""
    exact = replay_logps(params, trajectory, model, config)
    taken = jnp.arange(exact.shape[1])[None, :] < trajectory.num_steps[:, None]
    gap = jnp.max(jnp.where(taken, jnp.abs(exact - trajectory.step_logps), 0.0))
    return trajectory.replace(step_logps=exact), gap


def grpo_gradients(trainable: Params, frozen: Params, reference: Params | None, trajectory: Trajectory,
                   advantages: jax.Array, *, model: ModelConfig, decode: DecodeConfig, rl: RLConfig):
    """The GRPO loss of a batch of trajectories and its gradient with respect to `trainable`.

    Args:
      trainable, frozen: the parameter groups (the gradient is of `trainable` only).
      reference: the frozen initial policy of the KL term, or None (`rl.beta == 0`).
      trajectory: `B` rows from the rollout (its `step_logps` are the "old" log-probs when
        `rl.num_iterations > 1`, and the reference of the `logp_gap` metric).
      advantages: `[B]` float32.
    Returns:
      `(grads` float32 like `trainable`, `loss` scalar, `metrics)`: `clip_fraction` (clipped
      steps / steps taken) and `logp_gap` (max |rollout - replayed| step log-prob).

    With `rl.update_micro_batches = n > 1` the rows are replayed in n slices (slice c: rows
    c, c + n, c + 2n, ..., so each device keeps replaying its own rows) with the gradient
    accumulated: every row's loss has the whole batch's denominator, so the sum over slices is
    the one-pass gradient, with 1/n of the activations alive at a time.
    """
    rows, gen_length = trajectory.tokens.shape
    denominator = float(rows * gen_length)  # the reference divides by rows and by Lg
    slices = rl.update_micro_batches
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32))
    if slices == 1:
        grads, loss, clipped_count, gap = _accumulate(trainable, frozen, reference, trajectory, advantages, init,
                                                      denominator, model=model, decode=decode, rl=rl)
    else:
        if rows % slices:
            raise ConfigError(f"rl.update_micro_batches={slices} does not divide the update's {rows} rows")
        # [B, ...] -> [n, B/n, ...] with slice c = rows c::n: a reshape of each device's own rows.
        split = lambda x: jnp.swapaxes(x.reshape((rows // slices, slices) + x.shape[1:]), 0, 1)  # noqa: E731

        def body(carry, part):
            part_trajectory, part_advantages = part
            return _accumulate(trainable, frozen, reference, part_trajectory, part_advantages, carry, denominator,
                               model=model, decode=decode, rl=rl), None

        (grads, loss, clipped_count, gap), _ = jax.lax.scan(body, init, jax.tree.map(split, (trajectory, advantages)))
    metrics = {"clip_fraction": clipped_count / jnp.maximum(jnp.sum(trajectory.num_steps), 1), "logp_gap": gap}
    return grads, loss, metrics


def _accumulate(trainable: Params, frozen: Params, reference: Params | None, trajectory: Trajectory,
                advantages: jax.Array, init, denominator: float, *, model: ModelConfig, decode: DecodeConfig,
                rl: RLConfig):
    """`init` (gradients, loss, clipped steps, gap) plus those of `trajectory`'s rows, one denoising
    step at a time up to their largest NFE."""

    def step_loss(trainable, k, ref_logp):
        logp = replay_step_logp(policy.merge_params(trainable, frozen), trajectory, k, model, decode)
        old = jax.lax.stop_gradient(logp) if rl.num_iterations == 1 else trajectory.step_logps[:, k]
        taken = k < trajectory.num_steps
        loss, clipped = clipped_step_loss(logp, old, advantages, taken, rl, ref_logp)
        return jnp.sum(loss) / denominator, (logp, clipped, taken)

    def body(k, carry):
        grads, loss_sum, clipped_count, gap = carry
        ref_logp = None if reference is None else replay_step_logp(reference, trajectory, k, model, decode)
        (loss, (logp, clipped, taken)), step_grads = jax.value_and_grad(step_loss, has_aux=True)(
            trainable, k, ref_logp)
        grads = jax.tree.map(lambda total, g: total + g.astype(jnp.float32), grads, step_grads)
        step_gap = jnp.max(jnp.where(taken, jnp.abs(logp - trajectory.step_logps[:, k]), 0.0))
        return grads, loss_sum + loss, clipped_count + jnp.sum(clipped), jnp.maximum(gap, step_gap)

    return jax.lax.fori_loop(0, jnp.max(trajectory.num_steps), body, init)
