r"""Masked-diffusion SFT (LLaDA's loss) of a backbone, e.g. the demo's base model from scratch.

    python launch/pretrain.py --config=configs/demo_pretrain.py --workdir=DIR [--config.x.y=value ...]

Resumes from the latest checkpoint in `DIR/checkpoints`; writes `DIR/metrics.jsonl`, the HF
directory (`export_dir`, default `DIR/hf`, with the tokenizer) and `DIR/pretrain_eval.json`.
"""

import logging

from absl import app, flags
from ml_collections import config_flags

from dultra_jax.config import ConfigError
from dultra_jax.interop.safetensors_io import CheckpointError
from dultra_jax.sharding import ShardingError
from dultra_jax.training.mdlm_sft import pretrain

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pre-training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, export).", required=True)


def _quiet_orbax() -> None:
    """Orbax logs every file rename at INFO through absl; keep its warnings only."""

    class _Filter(logging.Filter):
        def filter(self, record):
            return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname

    logging.getLogger("absl").addFilter(_Filter())


def main(argv):
    del argv
    _quiet_orbax()
    try:
        pretrain(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, CheckpointError, ShardingError) as e:
        raise SystemExit(f"pretrain.py: error: {e}") from None


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
