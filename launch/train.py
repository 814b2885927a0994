r"""GRPO training of a LLaDA backbone and its dUltra planner head.

    python launch/train.py --config=configs/math.py --workdir=DIR [--config.x.y=value ...]

Resumes automatically from the latest checkpoint in `DIR/checkpoints`. Metrics go to
`DIR/metrics.jsonl` and `DIR/tensorboard`.
"""

from absl import app, flags
from ml_collections import config_flags

from dultra_jax.config import ConfigError
from dultra_jax.interop.safetensors_io import CheckpointError
from dultra_jax.sharding import ShardingError
from dultra_jax.training.grpo_trainer import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).", required=True)


def _quiet_orbax() -> None:
    """Orbax logs every file rename at INFO through absl; keep its warnings only."""
    import logging

    class _Filter(logging.Filter):
        def filter(self, record):
            return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname

    logging.getLogger("absl").addFilter(_Filter())


def main(argv):
    del argv
    _quiet_orbax()
    try:
        train(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, CheckpointError, ShardingError) as e:
        raise SystemExit(f"train.py: error: {e}") from None


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
