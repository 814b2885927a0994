"""GRPO on code (APPS-style tasks, MBPP by default here) as the reference coding setup.

    python launch/train.py --config=configs/code.py --workdir=DIR --config.model.path=/path/to/LLaDA-8B-Instruct \
        --config.data.path=/path/to/mbpp/mbpp.jsonl

As `configs/math.py` but token temperature 0.5 and the code rewards: tests passing in the
sandbox (weight 3), code-fence format, step penalty (+ distillation with a teacher).
"""

import ml_collections

from configs import common


def get_config(arg=None):
    del arg
    return ml_collections.ConfigDict(dict(
        model=common.llada_8b_model(),
        decode=common.decode(temperature=0.5),
        rl=common.rl(),
        optim=common.optim(),
        # MBPP's train task ids (601-974; its test ids 11-510 are what the benchmark reports)
        data=dict(task="mbpp", task_options={"split": "train"}, path=ml_collections.FieldReference(None, field_type=str), split=None,
                  mode="non-thinking", prompts_per_step=1, shuffle_seed=42),
        rewards=dict(weights={"code_correct": 3.0, "code_fence": 1.0, "step_penalty": 0.1},
                     teacher_path=ml_collections.FieldReference(None, field_type=str), teacher_weight=1.0),
        mesh=common.mesh(),
        checkpoint=common.checkpoint(every=400, keep=3),
        total_steps=4800,
        seed=42,
    ))
