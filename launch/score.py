r"""Logit checker: raw policy outputs of an HF LLaDA (+ planner) directory on given token ids.

    python launch/score.py --model=HF_DIR --tokens=TOKENS.json --out=OUT.npz [--dtype=float32]
    python launch/score.py --model=HF_DIR --tokens='[[9, 12, 7]]' --out=OUT.npz

`--tokens` is a JSON file (or inline JSON, as `launch/sample.py --prompt_ids`) holding a list of
equal-length token-id lists; `--model` may also be a training workdir. OUT.npz holds
`tokens [B, L]`, `token_logits [B, L, V]` float32 (raw: the [MASK] logit is not suppressed) and,
when the checkpoint has a planner, `unmask_logits [B, L]` with candidates = positions holding the
mask id. Compare against the PyTorch model's logits on the same ids.
"""

from __future__ import annotations

from absl import flags, logging

from dultra_jax import cli
from dultra_jax.interop.logit_check import summarize
from dultra_jax.model_source import score_source

_MODEL = flags.DEFINE_string("model", None, "HF LLaDA directory (config.json + safetensors), its hub id "
                             "(ORG/NAME[@REVISION], from the HF cache) or training workdir.",
                             required=True)
_TOKENS = flags.DEFINE_string("tokens", None, "JSON file (or inline JSON) with equal-length token-id lists.",
                              required=True)
_OUT = flags.DEFINE_string("out", None, "Output .npz path.", required=True)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                           "Compute and parameter dtype.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Rows per forward pass (default: all at once).")
_PRECISION = flags.DEFINE_enum("matmul_precision", "highest", ["highest", "high", "default"],
                               "jax.default_matmul_precision for the forward pass.")
_SHARD = flags.DEFINE_bool("shard", True, "Shard parameters over all devices (fsdp mesh axis).")

FLAG_NAMES = {"model": "--model", "tokens": "--tokens", "dtype": "--dtype", "model.dtype": "--dtype"}


def main() -> None:
    scores, config = score_source(model=_MODEL.value, tokens=_TOKENS.value, out=_OUT.value, dtype=_DTYPE.value,
                                  batch_size=_BATCH_SIZE.value, precision=_PRECISION.value, shard=_SHARD.value)
    logging.info("%s: %s -> %s", _MODEL.value, summarize(scores, config), _OUT.value)


if __name__ == "__main__":
    cli.run(main, flag_names=FLAG_NAMES)
