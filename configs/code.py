"""GRPO on APPS as the reference coding run (dUltra-coding).

    python launch/train.py --config=configs/code.py --workdir=DIR --config.model.path=/path/to/LLaDA-8B-Instruct \
        --config.data.path=/path/to/apps/train.jsonl

The data are codeparrot/apps records (its `train.jsonl`, or a split in array_record TFDS form:
`tfds:NAME:train`), of which the introductory call-based problems (`fn_name` in `input_output`)
are kept, as the reference does. `--config.data.path` has no default.

As the reference's APPS runs (chinsengi/dUltra-os `diffu_grpo/diffu_grpo_train.py` dataset
"apps", `sbatch_scripts/run.sh` and `grpo_exp.sh`): non-thinking prompts, token temperature 0.5,
gen 256, block 32 (`:b128` for the dUltra-coding-b128 setting), G = 12, lr 5e-6 constant, and the
rewards: tests passing (weight 3; every test case run in the sandbox with a 10 s limit: 1 if all
pass, -0.05 on a runtime error or timeout that is not a syntax error, else 0), code-fence format
(1), step penalty (0.1) and distillation from Qwen2.5-Coder-7B-Instruct (1), which the reference
always adds.

Variants (comma-separated, big_vision style `--config=configs/code.py:nodistill,b128`):
  nodistill  no distillation reward (no teacher is loaded);
  b128       semi-AR blocks of 128 tokens.
"""

import ml_collections

from configs import common
from dultra_jax.config import ConfigError

CODE_TEACHER = "Qwen/Qwen2.5-Coder-7B-Instruct"  # the reference's coding teacher (a hub id)
VARIANTS = ("nodistill", "b128")


def get_config(arg=None):
    """`arg`: None (the reference recipe) or comma-separated `VARIANTS`."""
    variants = [v for v in (arg or "").split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ConfigError(f"configs/code.py: unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    distill = "nodistill" not in variants
    return ml_collections.ConfigDict(dict(
        model=common.llada_8b_model(),
        decode=common.decode(temperature=0.5, block_length=128 if "b128" in variants else 32),
        rl=common.rl(),
        optim=common.optim(),
        data=dict(task="apps", task_options={"difficulties": ("introductory",), "require_fn_name": True},
                  path=ml_collections.FieldReference(None, field_type=str), split=None, mode="non-thinking",
                  prompts_per_step=-1, shuffle_seed=42),  # one prompt of G rows per device, as the reference per GPU
        rewards=common.rewards(
            weights={"code_correct": 3.0, "code_fence": 1.0, "step_penalty": 0.1}, distill=distill,
            teacher_path=ml_collections.FieldReference(CODE_TEACHER if distill else None, field_type=str),
            teacher_weight=1.0),
        mesh=common.mesh(),
        checkpoint=common.checkpoint(every=400, keep=3),
        total_steps=4800,
        seed=42,
    ))
