r"""GRPO training of a LLaDA backbone and its dUltra planner head.

    python launch/train.py --config=configs/math.py --workdir=DIR [--config.x.y=value ...]

Resumes automatically from the latest checkpoint in `DIR/checkpoints`. Metrics go to
`DIR/metrics.jsonl` and `DIR/tensorboard`.

Multi-host: run one process per host with the same `--workdir` (a shared file system: Orbax
writes each checkpoint from all processes, metrics come from process 0) and either

    --coordinator_address=HOST0:PORT --num_processes=N --process_id=I

or nothing at all on a multi-host TPU VM / Slurm / Open MPI job, whose environment JAX reads
(`--distributed=on` forces JAX's detection, e.g. a GCE TPU pod; `--distributed=off` never
initialises). `--config.data.prompts_per_step` is the GLOBAL number of prompts per step.
"""

from absl import app, flags
from ml_collections import config_flags

from dultra_jax import distributed
from dultra_jax.checkpoint import quiet_orbax_logs
from dultra_jax.config import ConfigError
from dultra_jax.interop.safetensors_io import CheckpointError
from dultra_jax.sharding import ShardingError
from dultra_jax.training.grpo_trainer import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).", required=True)
_DISTRIBUTED = distributed.define_launcher_flags()


def main(argv):
    del argv
    quiet_orbax_logs()
    try:
        # Before anything touches a JAX backend: the devices of all processes form the mesh.
        distributed.initialize_from_flags(_DISTRIBUTED)
        train(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, CheckpointError, ShardingError, distributed.DistributedError) as e:
        raise SystemExit(f"train.py: error: {e}") from None


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
