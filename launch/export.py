r"""Exports a model to an HF LLaDA (+ dUltra planner) safetensors directory for PyTorch.

    python launch/export.py --model=SOURCE --out=OUT_DIR [--dtype=bfloat16] [--max_shard_size=5GB]
                            [--overwrite]

SOURCE is an HF directory (config.json + model.safetensors or shards with an index), or a
training workdir of `launch/train.py`, `pretrain.py` or `init_planner.py` (its latest Orbax
checkpoint). The config.json fields that we do not own and the tokenizer / remote-code files of
the HF directory (for a workdir: the one the run started from, if any; a pretrain workdir's own
`tokenizer/`) are carried through. `--out` must be absent or an empty directory unless
`--overwrite` (the export replaces it once complete).
"""

from __future__ import annotations

import os

from absl import flags, logging

from dultra_jax import cli
from dultra_jax.model_source import export_source

_MODEL = flags.DEFINE_string("model", None, "Source: an HF LLaDA directory, its hub id "
                             "(ORG/NAME[@REVISION], from the HF cache) or a training workdir.",
                             required=True)
_OUT = flags.DEFINE_string("out", None, "Output HF directory.", required=True)
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32", "float16"],
                           "Storage dtype of the exported tensors.")
_MAX_SHARD_SIZE = flags.DEFINE_string("max_shard_size", "5GB", "Largest shard file, e.g. 5GB, 500MB, 20KB.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty output directory.")
_SHARD = flags.DEFINE_bool("shard", True, "Shard parameters over all devices while loading.")

FLAG_NAMES = {"model": "--model", "out_dir": "--out", "overwrite": "--overwrite", "max_shard_size": "--max_shard_size",
              "dtype": "--dtype"}


def main() -> None:
    out, config = export_source(model=_MODEL.value, out=_OUT.value, dtype=_DTYPE.value,
                                max_shard_size=_MAX_SHARD_SIZE.value, overwrite=_OVERWRITE.value, shard=_SHARD.value)
    logging.info("exported %s (%d layers, d_model %d, planner %s) as %s to %s: %s", _MODEL.value, config.n_layers,
                 config.d_model, config.has_planner, _DTYPE.value, out, ", ".join(sorted(os.listdir(out))))


if __name__ == "__main__":
    cli.run(main, flag_names=FLAG_NAMES)
