r"""GRPO training of a LLaDA backbone and its dUltra planner head.

    python launch/train.py --config=configs/math.py --workdir=DIR [--config.x.y=value ...]

`model.path`, `rewards.teacher_path` and `data.tokenizer` are HF directories or hub ids
(`GSAI-ML/LLaDA-8B-Instruct`, optionally `@REVISION`), read from the HF cache (`HF_HUB_CACHE`; with
`HF_HUB_OFFLINE=1` the cache only, else missing files are downloaded). The config, the model's
config.json, the data, the tokenizer and the rewards are checked before any weight is read.

Resumes automatically from the latest checkpoint in `DIR/checkpoints`. Metrics go to
`DIR/metrics.jsonl` and `DIR/tensorboard`.

Multi-host: run one process per host with the same `--workdir` (a shared file system: Orbax
writes each checkpoint from all processes, metrics come from process 0) and either

    --coordinator_address=HOST0:PORT --num_processes=N --process_id=I

or nothing at all on a multi-host TPU VM / Slurm / Open MPI job, whose environment JAX reads
(`--distributed=on` forces JAX's detection, e.g. a GCE TPU pod; `--distributed=off` never
initialises). `--config.data.prompts_per_step` is the GLOBAL number of prompts per step.

A mistake in the flags, the config or its inputs ends with one line, `train.py: error: ...`, and
exit status 2 (`dultra_jax.cli`).
"""

from absl import flags
from ml_collections import config_flags

from dultra_jax import cli, distributed
from dultra_jax.training.grpo import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).", required=True)
_DISTRIBUTED = distributed.define_launcher_flags()


def main() -> None:
    train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    cli.run(main, distributed_flags=_DISTRIBUTED)
