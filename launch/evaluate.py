r"""Evaluates a model on a task: accuracy, NFE, tokens per forward and tokens/s over rules, sweeps and seeds.

    python launch/evaluate.py --model=HF_DIR_OR_WORKDIR --task=gsm8k \
        --data=/path/to/gsm8k/test.jsonl --out=/tmp/eval \
        --rules=planner_bernoulli,factor,threshold,low_confidence \
        --factors=0.5,0.8,1.0,1.2,1.5 --thresholds=0.9 --seeds=42,123,456,789,1000 \
        --gen_length=256 --block_length=32

`--model` is an HF LLaDA (+ planner) directory or a training workdir of `launch/train.py`,
`pretrain.py` or `init_planner.py` (its latest checkpoint; the tokenizer comes from the HF
directory the run started from, or a pretrain workdir's `tokenizer/`). `--config` instead takes a
config file's `model` section (random weights unless `model.path` is set; smoke tests), with
`--tokenizer` for a text task. The sweep of each rule: `--factors` for `factor` and the planner
rules, `--thresholds` for `threshold`, `--steps` for `low_confidence` / `random` (empty: the
rule's default, one token per step). One compile serves a rule's whole `--factors` /
`--thresholds` / `--steps` sweep (the knobs are traced). `--task_option=KEY=VALUE` passes a task
option (`--task=mbpp --task_option=split=test`: MBPP's benchmark task ids 11-510).
Outputs (see `dultra_jax.evaluation`): samples.jsonl, summary.json, summary.csv and pareto.png in
`--out`.

Multi-host: run one process per host with the same flags, plus either
`--coordinator_address=HOST0:PORT --num_processes=N --process_id=I` or nothing on a multi-host
TPU VM / Slurm / Open MPI job (as `launch/train.py`). Each process feeds and scores its rows of
every batch; process 0 writes `--out` (on a shared file system or its own disk) and prints the table.
"""

from __future__ import annotations

import json
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from dultra_jax import distributed
from dultra_jax.config import CACHE_MODES, ConfigError
from dultra_jax.data.sources import DataError
from dultra_jax.interop.safetensors_io import CheckpointError
from dultra_jax.sharding import ShardingError

_MODEL = flags.DEFINE_string("model", None, "HF LLaDA directory or training workdir.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file whose `model` section is evaluated "
                                          "(random weights unless model.path is set).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer directory (default: the model's directory).")
_TASK = flags.DEFINE_string("task", "gsm8k", "Task name (dultra_jax.data.tasks).")
_DATA = flags.DEFINE_string("data", None, "Records: a file, a directory with {split} files, or tfds:NAME:SPLIT.",
                            required=True)
_SPLIT = flags.DEFINE_string("split", None, "Split of --data.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory (tfds: paths).")
_LIMIT = flags.DEFINE_integer("limit", None, "Evaluate only the first N records.")
_TASK_OPTIONS = flags.DEFINE_multi_string("task_option", [], "A task option as KEY=VALUE, repeatable; the value "
                                          "is read as JSON when it parses, else as a string (mbpp: split=test, "
                                          "the benchmark's task ids 11-510).")
_MODE = flags.DEFINE_enum("mode", "non-thinking", ["thinking", "non-thinking"],
                          "Prompt mode (non-thinking: the reference evaluation prompt).")
_RULES = flags.DEFINE_list("rules", ["planner_bernoulli"], "Unmasking rules to evaluate.")
_FACTORS = flags.DEFINE_list("factors", ["0.5", "0.8", "1.0", "1.2", "1.5"],
                             "Sweep of the factor rule and the planner rules.")
_THRESHOLDS = flags.DEFINE_list("thresholds", ["0.9"], "Sweep of the threshold rule.")
_STEPS = flags.DEFINE_list("steps", [], "Sweep of low_confidence / random total steps (empty: gen_length).")
_SEEDS = flags.DEFINE_list("seeds", ["42", "123", "456", "789", "1000"], "Decoding seeds.")
_GEN_LENGTH = flags.DEFINE_integer("gen_length", 256, "Generated tokens per prompt.")
_BLOCK_LENGTH = flags.DEFINE_integer("block_length", 32, "Semi-autoregressive block length.")
_PROMPT_LENGTH = flags.DEFINE_integer("prompt_length", 512, "Prompt width (longer prompts keep their end).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Rows per rollout.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Token temperature (0 = argmax).")
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, "Step budget (default gen_length).")
_CACHE = flags.DEFINE_enum("cache", "none", list(CACHE_MODES),
                           "Block KV cache (none is exact; prefix / dual reuse keys/values within a block).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Compute and parameter dtype (default: bfloat16 for --model, the config's for --config).")
_INIT_SEED = flags.DEFINE_integer("init_seed", 0, "Initialisation seed of random weights (--config).")
_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.")
_DISTRIBUTED = distributed.define_launcher_flags()


def _numbers(flag, kind):
    try:
        return [kind(v) for v in flag.value]
    except ValueError:
        raise ConfigError(f"--{flag.name}={','.join(flag.value)}: not a list of {kind.__name__} values") from None


def _task_options() -> dict:
    options = {}
    for item in _TASK_OPTIONS.value:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--task_option={item}: expected KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def _rules_and_sweeps():
    from dultra_jax.evaluation import SWEEP_KEYS, sweep_settings

    sweeps = {"factor": _numbers(_FACTORS, float), "threshold": _numbers(_THRESHOLDS, float),
              "steps": _numbers(_STEPS, int) or [None], "entropy_bound": [None], None: [None]}
    unknown = [r for r in _RULES.value if r not in SWEEP_KEYS]
    if unknown or not _RULES.value:
        raise ConfigError(f"--rules: unknown rule(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                          f"use one of {', '.join(SWEEP_KEYS)}")
    rules = {rule: sweeps[SWEEP_KEYS[rule]] for rule in _RULES.value}
    sweep_settings(rules)
    return rules


def _load_model(mesh):
    from dultra_jax.models.build import load_model_source
    from dultra_jax.models.build import build_model

    if _CONFIG.value is not None:
        section = _CONFIG.value.model
        if _DTYPE.value is not None:
            section.dtype = section.param_dtype = _DTYPE.value
        params, model = build_model(section, mesh=mesh, seed=_INIT_SEED.value)
        return params, model, section.get("path")
    dtype = _DTYPE.value or "bfloat16"
    try:
        return load_model_source(_MODEL.value, mesh=mesh, dtype=dtype, param_dtype=dtype)
    except (CheckpointError, ConfigError) as e:
        raise type(e)(f"--model: {e}") from None


def _tokenizer(source_dir):
    from dultra_jax.data.tokenizer import load_tokenizer

    directory = _TOKENIZER.value or source_dir
    if _TOKENIZER.value is not None and not os.path.isdir(_TOKENIZER.value):
        raise CheckpointError(f"--tokenizer={_TOKENIZER.value}: no such directory")
    if directory is None or not any(os.path.exists(os.path.join(directory, f)) for f in (
            "tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        if _TOKENIZER.value is not None:
            raise CheckpointError(f"--tokenizer={directory}: no tokenizer files in it")
        logging.warning("no tokenizer (%s): prompts must be token ids and completions are rendered as ids",
                        directory)
        return None
    return load_tokenizer(directory)


def main(argv):
    del argv
    from dultra_jax.data.tasks import get_task, load_task_records

    try:
        # Before anything touches a JAX backend: the devices of all processes form the mesh.
        distributed.initialize_from_flags(_DISTRIBUTED)
        if (_MODEL.value is None) == (_CONFIG.value is None):
            raise ConfigError("give exactly one of --model=HF_DIR_OR_WORKDIR and --config=CONFIG_FILE")
        rules = _rules_and_sweeps()
        if _MODEL.value is not None:
            from dultra_jax.models.build import model_source_kind
            try:
                model_source_kind(_MODEL.value)  # fail before reading any data
            except CheckpointError as e:
                raise CheckpointError(f"--model: {e}") from None
        seeds = _numbers(_SEEDS, int)
        try:
            task = get_task(_TASK.value, mode=_MODE.value, **_task_options())
        except ValueError as e:
            raise ConfigError(f"--task / --task_option: {e}") from None
        if not _DATA.value.startswith("tfds:") and "{split}" not in _DATA.value and not os.path.exists(_DATA.value):
            raise DataError(f"--data={_DATA.value}: no such file or directory")
        try:
            records = load_task_records(task, _DATA.value, _SPLIT.value, data_dir=_DATA_DIR.value, limit=_LIMIT.value)
        except DataError as e:
            raise DataError(f"--data: {e}") from None

        from dultra_jax.evaluation import evaluate
        from dultra_jax.sharding import make_mesh

        mesh = make_mesh()
        distributed.connect_cpu_collectives(mesh)  # multi-process CPU only: before the processes drift apart
        params, model, source_dir = _load_model(mesh)
        tokenizer = _tokenizer(source_dir)
        summary = evaluate(params, model, tokenizer, records, task, rules_and_sweeps=rules, seeds=seeds,
                           gen_length=_GEN_LENGTH.value, block_length=_BLOCK_LENGTH.value,
                           prompt_length=_PROMPT_LENGTH.value, batch_size=_BATCH_SIZE.value,
                           temperature=_TEMPERATURE.value, max_steps=_MAX_STEPS.value, out_dir=_OUT.value,
                           progress=_PROGRESS.value, mode=_MODE.value, mesh=mesh,
                           decode_overrides={"cache": _CACHE.value})
    except (ConfigError, CheckpointError, ShardingError, DataError, distributed.DistributedError) as e:
        raise SystemExit(f"evaluate.py: error: {e}") from None

    if jax.process_index() != 0:  # every process holds the same summary
        return

    print(f"{summary['task']}: {summary['num_records']} records x {len(summary['seeds'])} seed(s), "
          f"gen {summary['gen_length']}, block {summary['block_length']}")
    print(f"{'rule':<20} {'knob':>16} {'accuracy':>16} {'NFE':>8} {'TPF':>6} {'TPF*':>6} {'tok/s':>9}")
    for row in summary["rows"]:
        knob = "" if row["sweep_key"] is None else f"{row['sweep_key']}={row['sweep_value']:g}"
        stderr = row["accuracy_stderr"]
        acc = f"{row['accuracy']:.2f}" + ("" if stderr is None else f" +- {stderr:.2f}")
        print(f"{row['rule']:<20} {knob:>16} {acc:>16} {row['nfe']:>8.2f} {row['tpf']:>6.2f} "
              f"{row['tpf_non_eos']:>6.2f} {row['tokens_per_s'] or 0:>9.1f}")
    print("TPF* = non-EOS tokens per forward; outputs: " + ", ".join(sorted(summary["files"].values())))


if __name__ == "__main__":
    app.run(main)
