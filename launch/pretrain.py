r"""Masked-diffusion SFT (LLaDA's loss) of a backbone: the demo's base model from scratch, or LLaDA SFT on chat data.

    python launch/pretrain.py --config=configs/demo_pretrain.py --workdir=DIR [--config.x.y=value ...]
    python launch/pretrain.py --config=configs/sft_8b.py --workdir=DIR \
        --config.model.path=GSAI-ML/LLaDA-8B-Base --config.data.path=CHAT_DATA

The data is an embedded generator (`configs/demo_pretrain.py`) or, with `data.task="chat"`
(`configs/sft_8b.py`), chat records at `data.path` (a file, a directory of split files or
`tfds:NAME:SPLIT`; `messages` or `prompt`/`response` records, `dultra_jax/data/chat.py`): only
response tokens, EOS fill included, are masked and scored.

Resumes from the latest checkpoint in `DIR/checkpoints`; writes `DIR/metrics.jsonl`, the HF
directory (`export_dir`, default `DIR/hf`, with the tokenizer) and `DIR/pretrain_eval.json`.

Multi-host: one process per host with the same `--workdir` and the multi-process flags of
`launch/train.py` (`--coordinator_address`, `--num_processes`, `--process_id`, or a detected
TPU / Slurm / Open MPI environment). `data.batch_size` is the GLOBAL batch; process 0 writes the
metrics, the JSON summary and the HF directory.
"""

from absl import flags
from ml_collections import config_flags

from dultra_jax import cli, distributed
from dultra_jax.training.mdlm_sft import pretrain

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pre-training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, export).", required=True)
_DISTRIBUTED = distributed.define_launcher_flags()


def main() -> None:
    pretrain(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    cli.run(main, distributed_flags=_DISTRIBUTED)
