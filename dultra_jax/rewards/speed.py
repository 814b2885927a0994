"""Speed reward: the step penalty `-(NFE of the row) / 50` (reference `gen_step_reward`, mode "sum").

NFE counts the denoising steps in which the row revealed at least one token (the rollout's
`num_steps`).
"""

from __future__ import annotations

import numpy as np

from dultra_jax.rewards.registry import RewardInputs, register


def step_penalty_values(num_steps, scale: float = 50.0) -> np.ndarray:
    """`-num_steps / scale` as float32 `[B]`."""
    if not scale > 0:
        raise ValueError(f"step_penalty scale={scale!r} must be positive")
    return (-np.asarray(num_steps, np.float64).reshape(-1) / scale).astype(np.float32)


@register("step_penalty")
def step_penalty(inputs: RewardInputs, *, scale: float = 50.0) -> np.ndarray:
    """`-(NFE of the row) / scale` (scale 50)."""
    return step_penalty_values(inputs.num_steps, scale)
