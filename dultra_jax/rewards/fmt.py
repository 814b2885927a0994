"""Format rewards (reference dUltra, `reward_func.py` / `math500_utils.py`).

- `math_format_score` (`boxed_and_answer_tags_format_reward`): 0.5 x ([an `<answer>` tag] + (1 if
  `\\boxed` appears in the answer span, else 0.5)), in [0.25, 1]. The answer span is the text
  between the first `<answer>` and the next `</answer>` (or the end of the text), or the whole text
  when there is no `<answer>` tag. As in the reference code, the opening tag is what counts.
- `think_format_score` (`soft_format_reward_func`): 0.5 if both `<think>` and `</think>` appear.
- `code_fence_score` (`codefence_reward_func`): +0.25 any ``` fence, +0.25 a ```python fence (case
  insensitive), +0.25 at least two fences, +0.25 if nothing but whitespace follows the last fence,
  else -0.001 per trailing character (at most 200); clipped to [0, 1]; 0 for an empty text.
"""

from __future__ import annotations

import numpy as np

from dultra_jax.rewards.registry import RewardInputs, register


def math_format_score(text: str) -> float:
    reward = 0.0
    if "<answer>" in text:
        span = text.split("<answer>", 1)[1].split("</answer>", 1)[0]
        reward += 1.0
    else:
        span = text
    reward += 1.0 if "\\boxed" in span else 0.5
    return 0.5 * reward


def think_format_score(text: str) -> float:
    return 0.5 if ("<think>" in text and "</think>" in text) else 0.0


def code_fence_score(text: str) -> float:
    if not text:
        return 0.0
    score = 0.0
    if "```" in text:
        score += 0.25
    if "```python" in text.lower():
        score += 0.25
    if text.count("```") >= 2:
        score += 0.25
    stripped = text.strip()
    last = stripped.rfind("```")
    suffix = stripped[last + 3:].strip() if last != -1 else ""
    if not suffix:
        score += 0.25
    else:
        score -= min(len(suffix), 200) * 0.001
    return max(0.0, min(1.0, score))


def _per_row(inputs: RewardInputs, fn) -> np.ndarray:
    return np.asarray([fn(c) for c in inputs.completions], np.float32).reshape(-1)


@register("math_format")
def math_format(inputs: RewardInputs) -> np.ndarray:
    """`math_format_score` per row (0.25 .. 1.0)."""
    return _per_row(inputs, math_format_score)


@register("think_format")
def think_format(inputs: RewardInputs) -> np.ndarray:
    """`think_format_score` per row (0 or 0.5)."""
    return _per_row(inputs, think_format_score)


@register("code_fence")
def code_fence(inputs: RewardInputs) -> np.ndarray:
    """`code_fence_score` per row (0 .. 1)."""
    return _per_row(inputs, code_fence_score)
