"""GRPO on GSM8K as the reference dUltra setup (README "Deliberate differences from the reference").

    python launch/train.py --config=configs/math.py --workdir=DIR \
        --config.model.path=/path/to/LLaDA-8B-Instruct --config.data.path=/path/to/gsm8k/train.jsonl

LLaDA-8B-Instruct (+ planner, freshly initialised when the directory has none), G = 12 rollouts
per prompt, lr 5e-6 constant, AdamW(0.9, 0.99, wd 0.1), grad clip 1.0, gen 256, block 32, token
temperature 0.1, C = 0, epsilons 0.2 / 1.0, no KL. Rewards: math correctness, format, think tags,
step penalty, and distillation from Qwen2.5-Math-7B-Instruct (weight 1.0), as the reference
always adds it: `rewards.teacher_path` (an HF directory or hub id) names the teacher.
`--config=configs/math.py:nodistill` trains without the teacher (`rewards.distill=False`).
The think-tag reward goes with the thinking prompts: `--config.data.mode=non-thinking` also takes
`--config.rewards.weights.think_format=0`.
"""

import ml_collections

from configs import common
from dultra_jax.config import ConfigError


TEACHER = "Qwen/Qwen2.5-Math-7B-Instruct"


def get_config(arg=None):
    """`arg`: None (the reference recipe, distillation on) or "nodistill"."""
    if arg not in (None, "", "nodistill"):
        raise ConfigError(f"configs/math.py takes no argument or 'nodistill', got {arg!r}")
    distill = arg != "nodistill"
    return ml_collections.ConfigDict(dict(
        model=common.llada_8b_model(),
        decode=common.decode(temperature=0.1),
        rl=common.rl(),
        optim=common.optim(),
        data=dict(task="gsm8k", path=ml_collections.FieldReference(None, field_type=str), split=None, mode="thinking",
                  prompts_per_step=-1, shuffle_seed=42),
        rewards=common.rewards(
            weights={"math_correct": 1.0, "math_format": 1.0, "think_format": 0.5, "step_penalty": 0.1},
            distill=distill, teacher_path=ml_collections.FieldReference(TEACHER if distill else None, field_type=str),
            teacher_weight=1.0),
        mesh=common.mesh(),
        checkpoint=common.checkpoint(every=400, keep=3),
        total_steps=4800,
        seed=42,
    ))
