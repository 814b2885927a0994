r"""Exports a model to an HF LLaDA (+ dUltra planner) safetensors directory for PyTorch.

    python launch/export.py --model=SOURCE --out=OUT_DIR [--dtype=bfloat16] [--max_shard_size=5GB]
                            [--overwrite]

SOURCE is an HF directory (config.json + model.safetensors or shards with an index), or a
training workdir of `launch/train.py` (its latest Orbax checkpoint). The config.json fields that
we do not own and the tokenizer / remote-code files of the HF directory (for a workdir: the one
the run started from, if any) are carried through.
"""

from __future__ import annotations

import os
from typing import Any

from absl import app, flags, logging

from dultra_jax.config import ConfigError, ModelConfig
from dultra_jax.interop.hf_llada import export_hf, load_hf
from dultra_jax.interop.safetensors_io import INDEX_FILE, SINGLE_FILE, CheckpointError
from dultra_jax.sharding import ShardingError, make_mesh

_MODEL = flags.DEFINE_string("model", None, "Source: an HF LLaDA directory or a training workdir.",
                             required=True)
_OUT = flags.DEFINE_string("out", None, "Output HF directory.", required=True)
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32", "float16"],
                           "Storage dtype of the exported tensors.")
_MAX_SHARD_SIZE = flags.DEFINE_string("max_shard_size", "5GB", "Largest shard file, e.g. 5GB, 500MB, 20KB.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty output directory.")
_SHARD = flags.DEFINE_bool("shard", True, "Shard parameters over all devices while loading.")


def is_hf_dir(path: str) -> bool:
    """An HF model directory: config.json plus model.safetensors or a shard index."""
    return (os.path.isfile(os.path.join(path, "config.json"))
            and (os.path.isfile(os.path.join(path, SINGLE_FILE)) or os.path.isfile(os.path.join(path, INDEX_FILE))))


def load_source(flag_value: str, *, param_dtype: str = "float32",
                mesh=None) -> tuple[Any, ModelConfig, str | None]:
    """Loads the export source named by `--model`: `(params, config, source_dir)`.

    `source_dir` is the HF directory whose config fields and tokenizer files the export carries
    through (None for a source without one).
    """
    if not os.path.exists(flag_value):
        raise CheckpointError(f"--model={flag_value}: no such file or directory")
    if is_hf_dir(flag_value):
        params, config, _ = load_hf(flag_value, mesh=mesh, dtype=param_dtype, param_dtype=param_dtype)
        return params, config, flag_value
    if os.path.isdir(os.path.join(flag_value, "checkpoints")) or any(
            name.isdigit() for name in os.listdir(flag_value)):
        # A training workdir (or its checkpoints directory): the latest step's parameters, and the
        # HF directory the run started from (if any) for config fields and tokenizer files.
        from dultra_jax.training.grpo_trainer import restore_params
        params, config, source_dir = restore_params(flag_value, mesh=mesh)
        return params, config, source_dir
    raise CheckpointError(
        f"--model={flag_value} is neither an HF model directory (config.json and {SINGLE_FILE} or "
        f"{INDEX_FILE}) nor a training workdir with checkpoints")


def main(argv):
    del argv
    try:
        mesh = make_mesh() if _SHARD.value else None
        # Load straight into the export dtype: the same round-to-nearest cast export_hf would do.
        params, config, source_dir = load_source(_MODEL.value, param_dtype=_DTYPE.value, mesh=mesh)
        out = export_hf(params, config, _OUT.value, dtype=_DTYPE.value, max_shard_size=_MAX_SHARD_SIZE.value,
                        source_dir=source_dir, overwrite=_OVERWRITE.value)
    except (CheckpointError, ConfigError, ShardingError) as e:
        raise SystemExit(f"export.py: error: {e}") from None
    files = sorted(os.listdir(out))
    logging.info("exported %s (%d layers, d_model %d, planner %s) as %s to %s: %s", _MODEL.value,
                 config.n_layers, config.d_model, config.has_planner, _DTYPE.value, out, ", ".join(files))


if __name__ == "__main__":
    app.run(main)
