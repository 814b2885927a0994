"""`fill_correct`: the demo task's check (`dultra_jax.data.fill.check_answer`): every copy copied,
every free letter one of a-d, every `##` pair two different letters of e-h."""

import numpy as np

from dultra_jax.data.fill import check_answer
from dultra_jax.rewards.registry import RewardInputs, register


@register("fill_correct")
def fill_correct(inputs: RewardInputs) -> np.ndarray:
    """`[B]` 1.0 where the completion fills the template `example["answer"]` correctly, else 0.0."""
    return np.array([float(check_answer(c, str(e["answer"]))) for c, e in zip(inputs.completions, inputs.examples)],
                    np.float32)
