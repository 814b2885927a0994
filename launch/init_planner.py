r"""Planner initialisation (`dultra_jax/training/planner_init.py`): train a fresh dUltra planner on a
frozen backbone to imitate the Fast-dLLM factor rule, and export an HF directory with it.

    python launch/init_planner.py --config=configs/planner_init.py --workdir=DIR \
        [--config.model.path=BASE_HF_DIR] [--config.x.y=value ...]
    python launch/init_planner.py --config=configs/planner_init_8b.py --workdir=DIR \
        --config.model.path=Zigeng/dParallel-LLaDA-8B-instruct --config.data.path=CHAT_DATA

The data is the embedded generator of `configs/planner_init.py` or, with `data.task="chat"`
(`configs/planner_init_8b.py`), chat records at `data.path`: a JSONL, JSON or Parquet file, a
directory of split files (`data.split`, comma-separated for several) or `tfds:NAME:SPLIT`, each
record a `messages` list (`role`, `content`) or `prompt` and `response` strings
(`dultra_jax/data/chat.py`).

`model.path` is an HF directory or a hub id (`GSAI-ML/LLaDA-8B-Instruct`, optionally `@REVISION`),
read from the HF cache (`HF_HUB_CACHE`; with `HF_HUB_OFFLINE=1` the cache only, else missing
files are downloaded).

Resumes from the latest checkpoint in `DIR/checkpoints`; writes `DIR/metrics.jsonl`, the HF
directory (`export_dir`, default `DIR/hf`) and `DIR/planner_init_eval.json`.

Multi-host: one process per host with the same `--workdir` and the multi-process flags of
`launch/train.py` (`--coordinator_address`, `--num_processes`, `--process_id`, or a detected
TPU / Slurm / Open MPI environment). `data.batch_size` is the GLOBAL batch; process 0 writes the
metrics, the JSON summary and the HF directory.
"""

from absl import flags
from ml_collections import config_flags

from dultra_jax import cli, distributed
from dultra_jax.training.planner_init import init_planner

_CONFIG = config_flags.DEFINE_config_file("config", None, "Planner-initialisation config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, export).", required=True)
_DISTRIBUTED = distributed.define_launcher_flags()


def main() -> None:
    init_planner(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    cli.run(main, distributed_flags=_DISTRIBUTED)
