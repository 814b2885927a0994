"""Replay of a trajectory: the per-step action log-probs under (possibly new) parameters.

A row's canvas before its step k is "revealed iff unmask_step < k" (tokens never change once
revealed), the step's action is "reveal the positions with unmask_step == k, with the final
tokens", and its log-probability comes from `rollout.action_log_prob`: the very function the
rollout used, so replay with the rollout's parameters reproduces `step_logps`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dultra_jax.config import DecodeConfig, ModelConfig
from dultra_jax.decoding.rollout import Trajectory, action_log_prob, canvas_before_step, evaluate_block
from dultra_jax.models import policy


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
