"""The dUltra-coding backbone without its planner: the Fast-dLLM factor rule (factor 1, greedy, no
KV cache, 0-shot) on the dUltra checkpoints, as the reference's `eval_coding/eval_no_planner.sh`.
The argument is `TASK` or `TASK,BLOCK`: block 32 for `sengi/dUltra-coding` (the default), 128 for
`sengi/dUltra-coding-b128`.

    python launch/evaluate.py --config=configs/eval/dultra_backbone_factor.py:humaneval,128 \
        --config.model.path=sengi/dUltra-coding-b128 --config.evaluate.data=/path/to/humaneval/test.jsonl

See `configs/eval/base.py`.
"""

from configs.eval import base
from dultra_jax.config import ConfigError


def get_config(arg=None):
    task, _, block = (arg or "").partition(",")
    task = base.check_task("dultra_backbone_factor", task or None, base.CODE_TASKS + base.MATH_TASKS)
    if block not in ("", "32", "128"):
        raise ConfigError(f"configs/eval/dultra_backbone_factor.py: block {block!r} is not 32 or 128 "
                          "(argument TASK or TASK,BLOCK)")
    block_length = int(block or 32)
    return base.eval_config(f"dultra_backbone_factor_b{block_length}", task, rules=("factor",), factors=(1.0,),
                            block_length=block_length)
