r"""Planner initialisation (`dultra_jax/training/planner_sft.py`): train a fresh dUltra planner on a
frozen backbone to imitate the Fast-dLLM factor rule, and export an HF directory with it.

    python launch/init_planner.py --config=configs/planner_init.py --workdir=DIR \
        [--config.model.path=BASE_HF_DIR] [--config.x.y=value ...]

Resumes from the latest checkpoint in `DIR/checkpoints`; writes `DIR/metrics.jsonl`, the HF
directory (`export_dir`, default `DIR/hf`) and `DIR/planner_init_eval.json`.

Multi-host: one process per host with the same `--workdir` and the multi-process flags of
`launch/train.py` (`--coordinator_address`, `--num_processes`, `--process_id`, or a detected
TPU / Slurm / Open MPI environment). `data.batch_size` is the GLOBAL batch; process 0 writes the
metrics, the JSON summary and the HF directory.
"""

from absl import app, flags
from ml_collections import config_flags

from dultra_jax import distributed
from dultra_jax.checkpoint import quiet_orbax_logs
from dultra_jax.config import ConfigError
from dultra_jax.interop.safetensors_io import CheckpointError
from dultra_jax.sharding import ShardingError
from dultra_jax.training.planner_sft import init_planner

_CONFIG = config_flags.DEFINE_config_file("config", None, "Planner-initialisation config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, export).", required=True)
_DISTRIBUTED = distributed.define_launcher_flags()


def main(argv):
    del argv
    quiet_orbax_logs()
    try:
        distributed.initialize_from_flags(_DISTRIBUTED)  # before anything touches a JAX backend
        init_planner(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, CheckpointError, ShardingError, distributed.DistributedError) as e:
        raise SystemExit(f"init_planner.py: error: {e}") from None


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
