"""`arithmetic_correct`: the demo task's strict answer check (an integer after `####`).

Stricter than `math_correct` on purpose: math-verify would also accept an expression after the
marker (`####40+2` for 42), which a policy could learn to copy from the prompt instead of computing.
"""

import numpy as np

from dultra_jax.data.arithmetic import check_answer
from dultra_jax.rewards.registry import RewardInputs, register


@register("arithmetic_correct")
def arithmetic_correct(inputs: RewardInputs) -> np.ndarray:
    """`[B]` 1.0 where the completion's final answer equals `example["answer"]`, else 0.0."""
    return np.array([float(check_answer(c, str(e["answer"]))) for c, e in zip(inputs.completions, inputs.examples)],
                    np.float32)
