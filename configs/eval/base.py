"""What the evaluation configs share: the paper's protocol (gen 256, temperature 0, 0-shot,
`official` scoring, the benchmark chosen by the config argument) and the one builder.

Every row file takes the benchmark as its argument (`--config=configs/eval/ROW.py:gsm8k`) and
needs two overrides: `--config.model.path` (the checkpoint: an HF directory or hub id, or a
training workdir) and `--config.evaluate.data` (the benchmark's records: a JSONL / Parquet file or
directory, no default can exist offline). Outputs go to `eval_results/ROW_TASK` unless
`--config.evaluate.out` says otherwise; any other `evaluate` field can be overridden the same way.
"""

import ml_collections

from dultra_jax.config import ConfigError, EvalRunConfig, as_config_dict

MATH_TASKS = ("gsm8k", "math500")
CODE_TASKS = ("humaneval", "mbpp")
PAPER_FACTORS = (0.5, 0.8, 1.0, 1.2, 1.5)   # the paper's factor sweep (baselines and planner)
PAPER_SEEDS = (42, 123, 456, 789, 1000)    # the reference's seed sweep of the planner's Bernoulli draws
# Records timed one at a time per setting (the paper reports speed per sample at batch 1); the
# accuracy itself is decoded in batches of `BATCH_SIZE` (rows do not interact).
SPEED_RECORDS = 100
BATCH_SIZE = 16


def check_task(row: str, arg, tasks) -> str:
    """The benchmark named by the config argument, one of `tasks`."""
    if arg not in tasks:
        raise ConfigError(f"configs/eval/{row}.py takes the benchmark as its argument, one of "
                          f"{', '.join(tasks)} (e.g. --config=configs/eval/{row}.py:{tasks[0]}); got {arg!r}")
    return arg


def eval_config(row: str, task: str, *, rules, block_length: int, factors=PAPER_FACTORS, seeds=(42,),
                shots: int = 0, **evaluate) -> ml_collections.ConfigDict:
    """`{model: {path}, evaluate: EvalRunConfig}` for one row on one benchmark. `shots` > 0 is
    MBPP's few-shot context (the baselines' coding runs); MBPP is scored on its test split."""
    task_options = {}
    if task == "mbpp":
        task_options = {"split": "test", "shots": shots}
    prompt_length = 1024 if shots else 512   # three MBPP examples and the question fit in 1024 tokens
    section = as_config_dict(
        EvalRunConfig, task=task, task_options=task_options, rules=tuple(rules), factors=tuple(factors),
        seeds=tuple(seeds), gen_length=256, block_length=block_length, prompt_length=prompt_length,
        batch_size=BATCH_SIZE, temperature=0.0, cache="none", cache_refresh="auto", scoring="official", speed_records=SPEED_RECORDS,
        mode="non-thinking", out=f"eval_results/{row}_{task}", **evaluate)
    return ml_collections.ConfigDict(dict(
        model=dict(path=ml_collections.FieldReference(None, field_type=str)),
        evaluate=section))
