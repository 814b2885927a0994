"""The reward registry: named reward parts, weighted and summed (NaN parts ignored, like `nansum`)."""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import numpy as np


@dataclasses.dataclass
class RewardInputs:
    """What every reward part sees for a batch of `B` rows.

    Attributes:
      completions: decoded generated text per row, EOS / padding already stripped.
      examples: per row, the task example's fields (`answer`, `tests`, `entry_point`, ...).
      num_steps: `[B]` int, the NFE of each row.
      prompts: the user prompt text per row (needed by `distill`).
    """

    completions: list[str]
    examples: list[dict]
    num_steps: np.ndarray
    prompts: list[str] | None = None

    def __post_init__(self):
        self.num_steps = np.asarray(self.num_steps).reshape(-1)
        n = len(self.completions)
        if len(self.examples) != n or self.num_steps.shape[0] != n:
            raise ValueError(f"RewardInputs: {n} completions, {len(self.examples)} examples and "
                             f"{self.num_steps.shape[0]} num_steps must agree")
        if self.prompts is not None and len(self.prompts) != n:
            raise ValueError(f"RewardInputs: {n} completions but {len(self.prompts)} prompts")

    @property
    def batch_size(self) -> int:
        return len(self.completions)


RewardFn = Callable[..., np.ndarray]
REWARDS: dict[str, RewardFn] = {}


def register(name: str):
    """Decorator: `@register("name")` adds `fn(inputs: RewardInputs, **options) -> [B] float32`."""

    def wrap(fn: RewardFn) -> RewardFn:
        if name in REWARDS and REWARDS[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = fn
        return fn

    return wrap


def get_reward(name: str) -> RewardFn:
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; known rewards: {sorted(REWARDS)}") from None


def compute_rewards(inputs: RewardInputs, weights: Mapping[str, float],
                    options: Mapping[str, Mapping] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Every named part and their weighted sum.

    Args:
      inputs: the batch.
      weights: `{name: weight}`; each named part is computed (also with weight 0, for logging).
      options: `{name: {option: value}}` keyword arguments for the parts.
    Returns:
      `(total [B] float32, {name: part [B] float32})`: parts unweighted; `total = sum_j w_j r_j`
      where NaN entries (a part that does not apply to a row) count as 0.
    Raises:
      ValueError: an unknown name in `weights` or `options` (the message lists the known ones), or
        a part that returns the wrong shape.
    """
    options = dict(options or {})
    for name in list(weights) + list(options):
        get_reward(name)
    b = inputs.batch_size
    total = np.zeros((b,), np.float64)
    parts: dict[str, np.ndarray] = {}
    for name, weight in weights.items():
        values = np.asarray(get_reward(name)(inputs, **dict(options.get(name) or {})), np.float32)
        if values.shape != (b,):
            raise ValueError(f"reward {name!r} returned shape {values.shape}; expected ({b},)")
        parts[name] = values
        weighted = float(weight) * values.astype(np.float64)
        total += np.where(np.isnan(weighted), 0.0, weighted)
    return total.astype(np.float32), parts
