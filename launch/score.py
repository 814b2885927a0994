r"""Logit checker: raw policy outputs of an HF LLaDA (+ planner) directory on given token ids.

    python launch/score.py --model=HF_DIR --tokens=TOKENS.json --out=OUT.npz [--dtype=float32]

TOKENS.json is a JSON list of equal-length token-id lists. OUT.npz holds `tokens [B, L]`,
`token_logits [B, L, V]` float32 (raw: the [MASK] logit is not suppressed) and, when the
checkpoint has a planner, `unmask_logits [B, L]` with candidates = positions holding the mask id.
Compare against the PyTorch model's logits on the same ids.
"""

from __future__ import annotations

from absl import app, flags, logging

from dultra_jax.config import ConfigError
from dultra_jax.interop.hf_llada import load_hf
from dultra_jax.interop.logit_check import TokensError, read_tokens, save_scores, score_tokens, summarize
from dultra_jax.interop.safetensors_io import CheckpointError
from dultra_jax.sharding import ShardingError, make_mesh

_MODEL = flags.DEFINE_string("model", None, "HF LLaDA directory (config.json + safetensors).", required=True)
_TOKENS = flags.DEFINE_string("tokens", None, "JSON list of equal-length token-id lists.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output .npz path.", required=True)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                           "Compute and parameter dtype.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Rows per forward pass (default: all at once).")
_PRECISION = flags.DEFINE_enum("matmul_precision", "highest", ["highest", "high", "default"],
                               "jax.default_matmul_precision for the forward pass.")
_SHARD = flags.DEFINE_bool("shard", True, "Shard parameters over all devices (fsdp mesh axis).")


def main(argv):
    del argv
    try:
        # Shapes first (cheap, before any weights are read), ids against the vocabulary below.
        tokens = read_tokens(_TOKENS.value)
        mesh = make_mesh() if _SHARD.value else None
        params, config, _ = load_hf(_MODEL.value, mesh=mesh, dtype=_DTYPE.value, param_dtype=_DTYPE.value)
        tokens = read_tokens(_TOKENS.value, vocab_size=config.vocab_size)
        scores = score_tokens(params, config, tokens, batch_size=_BATCH_SIZE.value,
                              precision=_PRECISION.value)
    except (TokensError, CheckpointError, ConfigError, ShardingError) as e:
        raise SystemExit(f"score.py: error: {e}") from None
    save_scores(_OUT.value, scores)
    logging.info("%s: %s -> %s", _MODEL.value, summarize(scores, config), _OUT.value)


if __name__ == "__main__":
    app.run(main)
