"""GRPO pieces: group advantages and the clipped per-step ratio loss.

Losses return `(sum, denominator)`-style pieces so that accumulating them step by step inside the
replay loop gives exactly the mean over the whole batch.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from dultra_jax.config import RLConfig

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
