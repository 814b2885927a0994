r"""Exports a model to an HF LLaDA (+ dUltra planner) safetensors directory for PyTorch.

    python launch/export.py --model=SOURCE --out=OUT_DIR [--dtype=bfloat16] [--max_shard_size=5GB]
                            [--overwrite]

SOURCE is an HF directory (config.json + model.safetensors or shards with an index), or a
training workdir of `launch/train.py`, `pretrain.py` or `init_planner.py` (its latest Orbax
checkpoint). The config.json fields that we do not own and the tokenizer / remote-code files of
the HF directory (for a workdir: the one the run started from, if any; a pretrain workdir's own
`tokenizer/`) are carried through.
"""

from __future__ import annotations

import os
from absl import app, flags, logging

from dultra_jax.config import ConfigError
from dultra_jax.interop.hf_llada import export_hf
from dultra_jax.interop.safetensors_io import CheckpointError
from dultra_jax.models.build import load_model_source
from dultra_jax.sharding import ShardingError, make_mesh

_MODEL = flags.DEFINE_string("model", None, "Source: an HF LLaDA directory or a training workdir.",
                             required=True)
_OUT = flags.DEFINE_string("out", None, "Output HF directory.", required=True)
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32", "float16"],
                           "Storage dtype of the exported tensors.")
_MAX_SHARD_SIZE = flags.DEFINE_string("max_shard_size", "5GB", "Largest shard file, e.g. 5GB, 500MB, 20KB.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty output directory.")
_SHARD = flags.DEFINE_bool("shard", True, "Shard parameters over all devices while loading.")


def main(argv):
    del argv
    try:
        mesh = make_mesh() if _SHARD.value else None
        # Load straight into the export dtype: the same round-to-nearest cast export_hf would do.
        params, config, source_dir = load_model_source(_MODEL.value, mesh=mesh, dtype=_DTYPE.value,
                                                       param_dtype=_DTYPE.value)
        out = export_hf(params, config, _OUT.value, dtype=_DTYPE.value, max_shard_size=_MAX_SHARD_SIZE.value,
                        source_dir=source_dir, overwrite=_OVERWRITE.value)
    except (CheckpointError, ConfigError, ShardingError) as e:
        raise SystemExit(f"export.py: error: {e}") from None
    files = sorted(os.listdir(out))
    logging.info("exported %s (%d layers, d_model %d, planner %s) as %s to %s: %s", _MODEL.value,
                 config.n_layers, config.d_model, config.has_planner, _DTYPE.value, out, ", ".join(files))


if __name__ == "__main__":
    app.run(main)
