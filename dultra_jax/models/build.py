"""Parameters for a `model` config section: loaded from `model.path` (HF) or randomly initialised."""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import jax
from jax.sharding import Mesh

from dultra_jax.config import ModelConfig, model_config_from_dict
from dultra_jax.interop.hf_llada import load_hf
from dultra_jax.interop.safetensors_io import INDEX_FILE, SINGLE_FILE, CheckpointError
from dultra_jax.models import policy
from dultra_jax.sharding import param_shardings

log = logging.getLogger(__name__)

# Fields of the model section that a checkpoint does not fix: they always come from the config.
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat", "mask_padding")


def build_model(model_cfg: Mapping[str, Any], *, mesh: Mesh | None = None, seed: int = 0):
    """`(params, ModelConfig)` for a `model` config section.

    With `path` set, the HF directory's `config.json` fixes the architecture (the section's shape
    fields are ignored) and the planner is loaded, or freshly initialised when the directory has
    none and the section asks for one. Without `path`, parameters are randomly initialised from
    `seed` with the section's shapes. With a mesh, parameters are created sharded.
    """
    model_cfg = dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
    path = model_cfg.get("path")
    config = model_config_from_dict(model_cfg)  # validates every key, also when loading
    if path:
        runtime = {k: getattr(config, k) for k in RUNTIME_FIELDS}
        params, config, _ = load_hf(path, mesh=mesh, with_planner=config.has_planner,
                                    planner_rng=jax.random.key(seed), **runtime)
        log.info("loaded %s (%d layers, d_model %d, planner: %s)", path, config.n_layers, config.d_model,
                 config.has_planner)
        return params, config
    shardings = param_shardings(policy.abstract_params(config), mesh) if mesh is not None else None
    params = jax.jit(policy.init_params, static_argnums=0, out_shardings=shardings)(config, jax.random.key(seed))
    log.info("randomly initialised a %d-layer, d_model %d model (seed %d)", config.n_layers, config.d_model, seed)
    return params, config


def is_hf_dir(path: str) -> bool:
    """An HF model directory: config.json plus model.safetensors or a shard index."""
    return (os.path.isfile(os.path.join(path, "config.json"))
            and (os.path.isfile(os.path.join(path, SINGLE_FILE)) or os.path.isfile(os.path.join(path, INDEX_FILE))))


def is_workdir(path: str) -> bool:
    """A workdir of `launch/train.py`, `pretrain.py` or `init_planner.py` (or its `checkpoints` directory)."""
    return os.path.isdir(path) and (os.path.isdir(os.path.join(path, "checkpoints"))
                                    or any(name.isdigit() for name in os.listdir(path)))


def model_source_kind(path: str) -> str:
    """What `path` holds, `"hf"` or `"workdir"`, without reading weights; CheckpointError naming
    `path` when it is neither."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if is_hf_dir(path):
        return "hf"
    if is_workdir(path):
        return "workdir"
    raise CheckpointError(f"{path} is neither an HF model directory (config.json and {SINGLE_FILE} or "
                          f"{INDEX_FILE}) nor a training workdir with checkpoints")


def load_model_source(path: str, *, mesh=None, dtype: str | None = None,
                      param_dtype: str | None = None) -> tuple[Any, ModelConfig, str | None]:
    """`(params, ModelConfig, source_dir)` of an HF LLaDA directory or a training workdir.

    Args:
      path: an HF directory (config.json + safetensors), or a workdir of `launch/train.py`,
        `pretrain.py` or `init_planner.py` (its latest Orbax checkpoint, restored with the config
        saved beside it; `grpo_trainer.restore_params`).
      mesh: parameters are placed with their `sharding.param_shardings` on it (None: default device
        for an HF directory, all devices on 'fsdp' for a workdir).
      dtype, param_dtype: compute and storage dtypes (None: float32 for an HF directory, the
        checkpoint's own for a workdir).
    Returns:
      `source_dir`: the directory with the tokenizer (the directory itself, a pretrain workdir's
      `tokenizer/`, or the HF directory the training run started from; None when it had none).
    Raises:
      CheckpointError naming `path` when it is missing or neither kind of source.
    """
    if model_source_kind(path) == "hf":
        params, config, _ = load_hf(path, mesh=mesh, dtype=dtype or "float32", param_dtype=param_dtype or "float32")
        return params, config, path
    from dultra_jax.training.grpo_trainer import restore_params
    params, config, source_dir = restore_params(path, mesh=mesh)
    if param_dtype is not None and param_dtype != config.param_dtype:
        config = config.replace(param_dtype=param_dtype)
        params = jax.tree.map(lambda x: x.astype(config.weight_dtype), params)
    if dtype is not None:
        config = config.replace(dtype=dtype)
    return params, config, source_dir
