r"""Evaluates a model on a task: accuracy, NFE, tokens per forward and tokens/s over rules, sweeps and seeds.

    python launch/evaluate.py --model=HF_DIR_OR_WORKDIR --task=gsm8k \
        --data=/path/to/gsm8k/test.jsonl --out=/tmp/eval \
        --rules=planner_bernoulli,factor,threshold,low_confidence \
        --factors=0.5,0.8,1.0,1.2,1.5 --thresholds=0.9 --seeds=42,123,456,789,1000 \
        --gen_length=256 --block_length=32

`--model` is an HF LLaDA (+ planner) directory or a training workdir of `launch/train.py`,
`pretrain.py` or `init_planner.py` (its latest checkpoint; the tokenizer comes from the HF
directory the run started from, or a pretrain workdir's `tokenizer/`). `--config` instead takes a
config file's `model` section (random weights unless `model.path` or `--model`, an HF directory,
is set; smoke tests), with `--tokenizer` for a text task.

An evaluation config (`configs/eval/*.py`, one row of the paper's tables: a `model.path` and an
`evaluate` section, `config.EvalRunConfig`) sets every flag below from its fields; a flag given
on the command line still wins:

    python launch/evaluate.py --config=configs/eval/dultra_math_b128.py:gsm8k \
        --config.model.path=sengi/dUltra-math-b128 --config.evaluate.data=/path/to/gsm8k/test.jsonl

Scoring (`--scoring`, default by task): `official` extracts and compares answers as the official
evaluation does (gsm8k, math500, humaneval, mbpp), `strict` as the training rewards do; each
sample in samples.jsonl records the extracted answer and the rule that extracted it. Speed: the
summary's `tokens_per_s` is the batched throughput; `--speed_records=N` also decodes the first N
records one at a time (batch 1, as the paper reports speed) and adds per-sample tokens/s and TPF
over all tokens and over effective (non-special) tokens; `--batch_size=1` gives them from the
evaluation itself.

The sweep of each rule: `--factors` for `factor` and the planner rules, `--thresholds` for
`threshold`, `--steps` for `low_confidence` /
`random`, `--entropy_bounds` for `entropy_bound` (empty: the rule's default; for `--steps`, one
token per step). One compile serves a rule's whole sweep (the knobs are traced). `--eoser`
(EOS early rejection, with `--eoser_gamma_min`) applies to every rule evaluated, which must then
be confidence rules. `--task_option=KEY=VALUE` passes a task option (`--task=mbpp
--task_option=split=test`: MBPP's benchmark task ids 11-510).
Outputs (see `dultra_jax.evaluation`): samples.jsonl, summary.json, summary.csv and pareto.png in
`--out`.

Multi-host: run one process per host with the same flags, plus either
`--coordinator_address=HOST0:PORT --num_processes=N --process_id=I` or nothing on a multi-host
TPU VM / Slurm / Open MPI job (as `launch/train.py`). Each process feeds and scores its rows of
every batch; process 0 writes `--out` (on a shared file system or its own disk) and prints the table.
"""

from __future__ import annotations

import jax
from absl import flags
from ml_collections import config_flags

from dultra_jax import cli, distributed
from dultra_jax.config import EVAL_SCORINGS, ConfigError, EvalRunConfig, from_config
from dultra_jax.evaluation import summary_table
from dultra_jax.model_source import evaluate_source
from dultra_jax.model_source import eoser_fields

_MODEL = flags.DEFINE_string("model", None, "HF LLaDA directory, its hub id (GSAI-ML/LLaDA-8B-Instruct[@REVISION], read "
                             "from the HF cache; HF_HUB_OFFLINE=1: cache only) or training workdir.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file whose `model` section is evaluated "
                                          "(random weights unless model.path is set).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer directory or hub id (default: the model's "
                                  "directory).")
_TASK = flags.DEFINE_string("task", "gsm8k", "Task name (dultra_jax.data.tasks).")
_DATA = flags.DEFINE_string("data", None, "Records: a file, a directory with {split} files, or tfds:NAME:SPLIT "
                            "(required unless an evaluation config sets evaluate.data).")
_SPLIT = flags.DEFINE_string("split", None, "Split of --data.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory (tfds: paths).")
_LIMIT = flags.DEFINE_integer("limit", None, "Evaluate only the first N records.")
_TASK_OPTIONS = cli.DEFINE_key_values("task_option", "A task option as KEY=VALUE, repeatable; the value is read as "
                                      "JSON when it parses, else as a string (mbpp: split=test, the benchmark's "
                                      "task ids 11-510).")
_MODE = flags.DEFINE_enum("mode", "non-thinking", ["thinking", "non-thinking"],
                          "Prompt mode (non-thinking: the reference evaluation prompt).")
_RULES = flags.DEFINE_list("rules", ["planner_bernoulli"], "Unmasking rules to evaluate.")
_FACTORS = cli.DEFINE_number_list("factors", [0.5, 0.8, 1.0, 1.2, 1.5], "Sweep of the factor rule and the planner "
                                  "rules.")
_THRESHOLDS = cli.DEFINE_number_list("thresholds", [0.9], "Sweep of the threshold rule.")
_STEPS = cli.DEFINE_number_list("steps", [], "Sweep of low_confidence / random total steps (empty: gen_length).",
                                kind=int)
_ENTROPY_BOUNDS = cli.DEFINE_number_list("entropy_bounds", [], "Sweep of the entropy_bound rule's budget in nats "
                                         "(empty: its default, 1).")
_SEEDS = cli.DEFINE_number_list("seeds", [42, 123, 456, 789, 1000], "Decoding seeds.", kind=int)
_GEN_LENGTH = flags.DEFINE_integer("gen_length", 256, "Generated tokens per prompt.")
_BLOCK_LENGTH = flags.DEFINE_integer("block_length", 32, "Semi-autoregressive block length.")
_PROMPT_LENGTH = flags.DEFINE_integer("prompt_length", 512, "Prompt width (longer prompts keep their end).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Rows per rollout.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Token temperature (0 = argmax).")
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, "Step budget (default gen_length).")
_CACHE, _CACHE_REFRESH = cli.DEFINE_cache_flags()
_EOSER = flags.DEFINE_bool("eoser", False, "EOS early rejection (confidence rules).")
_EOSER_GAMMA_MIN = flags.DEFINE_float("eoser_gamma_min", None, "EOSER's starting factor on EOS confidence "
                                      "(default 0.4; needs --eoser).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Compute and parameter dtype (default: bfloat16 for --model, the config's for --config).")
_INIT_SEED = flags.DEFINE_integer("init_seed", 0, "Initialisation seed of random weights (--config).")
_OUT = flags.DEFINE_string("out", None, "Output directory (required unless an evaluation config sets evaluate.out).")
_SCORING = flags.DEFINE_enum("scoring", None, list(EVAL_SCORINGS), "Answer extraction and comparison (default: "
                             "official for gsm8k, math500, humaneval and mbpp, strict otherwise).")
_SPEED_RECORDS = flags.DEFINE_integer("speed_records", 0, "Also time this many records decoded one at a time "
                                      "(batch 1) per setting (-1: all).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.")
_DISTRIBUTED = distributed.define_launcher_flags()

FLAG_NAMES = {
    **cli.decode_flag_names("gen_length", "block_length", "prompt_length", "temperature", "max_steps", "cache",
                            "cache_refresh", "eoser", "eoser_gamma_min", rule="rules", factor="factors", threshold="thresholds",
                            steps="steps", entropy_bound="entropy_bounds"),
    "model": "--model", "config": "--config", "tokenizer": "--tokenizer", "task": "--task",
    "task_options": "--task_option", "data": "--data", "rules": "--rules", "seeds": "--seeds",
    "batch_size": "--batch_size", "model.dtype": "--dtype", "model.param_dtype": "--dtype",
    "scoring": "--scoring", "speed_records": "--speed_records", "out_dir": "--out",
}

# EvalRunConfig field -> the flag that overrides it when given on the command line.
_EVAL_FLAGS = {"task": _TASK, "data": _DATA, "split": _SPLIT, "limit": _LIMIT, "mode": _MODE, "rules": _RULES,
               "factors": _FACTORS, "thresholds": _THRESHOLDS, "steps": _STEPS, "entropy_bounds": _ENTROPY_BOUNDS,
               "seeds": _SEEDS, "gen_length": _GEN_LENGTH, "block_length": _BLOCK_LENGTH,
               "prompt_length": _PROMPT_LENGTH, "batch_size": _BATCH_SIZE, "temperature": _TEMPERATURE,
               "max_steps": _MAX_STEPS, "cache": _CACHE, "cache_refresh": _CACHE_REFRESH, "scoring": _SCORING, "speed_records": _SPEED_RECORDS,
               "dtype": _DTYPE, "out": _OUT}


def _settings() -> tuple[str | None, dict | None, dict]:
    """`(model, config model section, the evaluation's settings)` from the flags, or from an
    evaluation config's `evaluate` section with the flags given on the command line on top."""
    config = _CONFIG.value
    if config is None or "evaluate" not in config:
        values = {name: holder.value for name, holder in _EVAL_FLAGS.items()}
        values["task_options"] = dict(_TASK_OPTIONS.value)
        return _MODEL.value, None if config is None else config.model, values
    run = from_config(EvalRunConfig, config.evaluate, "evaluate.")
    values = {field: getattr(run, field) for field in _EVAL_FLAGS}
    values.update({name: holder.value for name, holder in _EVAL_FLAGS.items() if flags.FLAGS[holder.name].present})
    values["task_options"] = {**dict(run.task_options or {}), **dict(_TASK_OPTIONS.value)}
    model = _MODEL.value or (config.model.get("path") if "model" in config else None)
    if not model:
        raise ConfigError("config.model.path is not set: pass --config.model.path=HF_DIR_OR_WORKDIR (or --model)")
    return model, None, values


def main() -> None:
    model, config, v = _settings()
    for name, flag in (("data", "--data"), ("out", "--out")):
        if not v[name]:
            raise ConfigError(f"{flag} is required (or evaluate.{name} in an evaluation config)")
    summary = evaluate_source(
        model=model, config=config, tokenizer=_TOKENIZER.value,
        dtype=v["dtype"], init_seed=_INIT_SEED.value, task=v["task"], task_options=v["task_options"],
        mode=v["mode"], data=v["data"], split=v["split"], data_dir=_DATA_DIR.value, limit=v["limit"],
        rules=list(v["rules"]), sweeps={"factor": list(v["factors"]), "threshold": list(v["thresholds"]),
                                        "steps": list(v["steps"]), "entropy_bound": list(v["entropy_bounds"])},
        seeds=list(v["seeds"]), gen_length=v["gen_length"], block_length=v["block_length"],
        prompt_length=v["prompt_length"], batch_size=v["batch_size"], temperature=v["temperature"],
        max_steps=v["max_steps"], out_dir=v["out"], progress=_PROGRESS.value, scoring=v["scoring"],
        speed_records=v["speed_records"],
        decode_overrides={"cache": v["cache"], "cache_refresh": v["cache_refresh"], **eoser_fields(_EOSER.value, _EOSER_GAMMA_MIN.value)})
    if jax.process_index() == 0:  # every process holds the same summary
        print(summary_table(summary, params=model or "config"))


if __name__ == "__main__":
    cli.run(main, distributed_flags=_DISTRIBUTED, flag_names=FLAG_NAMES)
