r"""Masked-diffusion SFT (LLaDA's loss) of a backbone, e.g. the demo's base model from scratch.

    python launch/pretrain.py --config=configs/demo_pretrain.py --workdir=DIR [--config.x.y=value ...]

Resumes from the latest checkpoint in `DIR/checkpoints`; writes `DIR/metrics.jsonl`, the HF
directory (`export_dir`, default `DIR/hf`, with the tokenizer) and `DIR/pretrain_eval.json`.
"""

from absl import app, flags
from ml_collections import config_flags

from dultra_jax.checkpoint import quiet_orbax_logs
from dultra_jax.config import ConfigError
from dultra_jax.interop.safetensors_io import CheckpointError
from dultra_jax.sharding import ShardingError
from dultra_jax.training.mdlm_sft import pretrain

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pre-training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, export).", required=True)


def main(argv):
    del argv
    quiet_orbax_logs()
    try:
        pretrain(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, CheckpointError, ShardingError) as e:
        raise SystemExit(f"pretrain.py: error: {e}") from None


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
