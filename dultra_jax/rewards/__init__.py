"""Rewards for GRPO: named parts, weighted and summed, each returned separately for logging.

Registered parts (`REWARDS`; each `fn(inputs: RewardInputs, **options) -> [B] float32`, NaN where a
part does not apply to a row):

| name | value | module |
|---|---|---|
| `exact_match` | 1 if `completion.strip() == str(example["answer"]).strip()` else 0 | here |
| `math_correct` | 2 / 0: final answer vs `example["answer"]` (math-verify + fallback) | `math` |
| `math_format` | 0.25 .. 1: `<answer>` tag and `\\boxed` inside | `fmt` |
| `think_format` | 0.5 if both `<think>` and `</think>` appear | `fmt` |
| `code_correct` | 1 all tests pass, -0.05 runtime error (also timeout / crash), else 0 (sandboxed) | `code` |
| `code_fence` | 0 .. 1: code fence format | `fmt` |
| `arithmetic_correct` | 1 / 0: strict integer after `####` (the embedded demo task) | `arithmetic` |
| `fill_correct` | 1 / 0: the completion fills the template in `example["answer"]` (the embedded demo task) | `fill` |
| `step_penalty` | `-(NFE)/50` | `speed` |
| `distill` | mean teacher log-prob of the completion (needs a `Teacher`) | `distill` |

`compute_rewards(inputs, weights, options)` returns `(total, parts)`; see `registry`.
"""

import numpy as np

from dultra_jax.rewards.registry import REWARDS, RewardFn, RewardInputs, compute_rewards, get_reward, register
from dultra_jax.rewards import arithmetic, code, distill, fill, fmt, math, speed  # noqa: E402,F401  (register the parts)
from dultra_jax.rewards.code import CodeResult, check_program, check_programs, extract_program
from dultra_jax.rewards.distill import Teacher
from dultra_jax.rewards.math import extract_answer, is_correct


@register("exact_match")
def exact_match(inputs: RewardInputs) -> np.ndarray:
    """1.0 if the stripped completion equals `str(example["answer"]).strip()`, else 0; NaN for rows
    without an answer."""
    out = np.full((inputs.batch_size,), np.nan, np.float32)
    for i, (completion, example) in enumerate(zip(inputs.completions, inputs.examples)):
        if example.get("answer") is not None:
            out[i] = 1.0 if completion.strip() == str(example["answer"]).strip() else 0.0
    return out


__all__ = ["code", "distill", "fmt", "math", "speed", "REWARDS", "RewardFn", "RewardInputs", "compute_rewards", "get_reward", "register", "CodeResult",
           "check_program", "check_programs", "extract_program", "Teacher", "extract_answer", "is_correct",
           "exact_match"]
