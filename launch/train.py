r"""GRPO training of a LLaDA backbone and its dUltra planner head.

    python launch/train.py --config=configs/math.py --workdir=DIR [--config.x.y=value ...]

Resumes automatically from the latest checkpoint in `DIR/checkpoints`. Metrics go to
`DIR/metrics.jsonl` and `DIR/tensorboard`.
"""

from absl import app, flags
from ml_collections import config_flags

from dultra_jax.checkpoint import quiet_orbax_logs
from dultra_jax.config import ConfigError
from dultra_jax.interop.safetensors_io import CheckpointError
from dultra_jax.sharding import ShardingError
from dultra_jax.training.grpo_trainer import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).", required=True)


def main(argv):
    del argv
    quiet_orbax_logs()
    try:
        train(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, CheckpointError, ShardingError) as e:
        raise SystemExit(f"train.py: error: {e}") from None


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
