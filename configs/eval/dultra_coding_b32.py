"""dUltra-coding (block 32): the planner's Bernoulli unmasking, factor 1, five seeds.

    python launch/evaluate.py --config=configs/eval/dultra_coding_b32.py:humaneval \
        --config.model.path=sengi/dUltra-coding --config.evaluate.data=/path/to/humaneval/test.jsonl

The reference's evaluation of its released checkpoint (`eval_math/run_eval.sh`,
`eval_coding/eval_coding.sh`: mode "training", factor 1.0, gen 256, 0-shot, batch 1), over the
seed sweep of `run_dultra_coding_math_seed_sweep.sh`; `--factors=0.5,0.8,1.0,1.2,1.5`
gives the factor sweep instead. The argument is the benchmark; see `configs/eval/base.py`.
"""

from configs.eval import base


def get_config(arg=None):
    task = base.check_task("dultra_coding_b32", arg, base.MATH_TASKS + base.CODE_TASKS)
    return base.eval_config("dultra_coding_b32", task, rules=("planner_bernoulli",), factors=(1.0,),
                            seeds=base.PAPER_SEEDS, block_length=32)
