"""Parameters for a `model` config section: loaded from `model.path` (an HF directory or hub id) or
randomly initialised; and the section's `ModelConfig` alone (`model_config`: config.json, no weights),
which start-up checks use before any weight is read."""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import jax
from jax.sharding import Mesh

from dultra_jax.config import ModelConfig, model_config_from_dict
from dultra_jax.hub import resolve_model_dir
from dultra_jax.interop.hf_llada import load_hf, model_config_from_hf
from dultra_jax.interop.safetensors_io import INDEX_FILE, SINGLE_FILE
from dultra_jax.interop.tables import read_hf_config
from dultra_jax.models import policy
from dultra_jax.sharding import param_shardings

log = logging.getLogger(__name__)

# Fields of the model section that a checkpoint does not fix: they always come from the config.
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat", "remat_policy", "mask_padding")


def _section(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    return dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)


def model_config(model_cfg: Mapping[str, Any], *, key: str = "model.path") -> ModelConfig:
    """The `ModelConfig` that `build_model` returns for the same section, without reading a weight.

    With `path` set (a directory or hub id, resolved with `hub.resolve_model_dir`; `key` names it
    in errors), only the directory's `config.json` is read; without it, the section's own fields.
    Raises ConfigError naming a bad key or path, CheckpointError naming an unreadable config.json.
    """
    section = _section(model_cfg)
    config = model_config_from_dict(section)  # validates every key, also when loading
    if not section.get("path"):
        return config
    path = resolve_model_dir(section["path"], key)
    runtime = {k: getattr(config, k) for k in RUNTIME_FIELDS}
    return model_config_from_hf(read_hf_config(path), with_planner=config.has_planner, **runtime)


def build_model(model_cfg: Mapping[str, Any], *, mesh: Mesh | None = None, seed: int = 0,
                key: str = "model.path"):
    """`(params, ModelConfig)` for a `model` config section.

    With `path` set (a directory or a hub id, `hub.resolve_model_dir`; `key` names it in errors),
    the HF directory's `config.json` fixes the architecture (the section's shape fields are
    ignored) and the planner is loaded, or freshly initialised when the directory has none and the
    section asks for one. Without `path`, parameters are randomly initialised from `seed` with the
    section's shapes. With a mesh, parameters are created sharded.
    """
    model_cfg = _section(model_cfg)
    path = model_cfg.get("path")
    config = model_config_from_dict(model_cfg)  # validates every key, also when loading
    if path:
        path = resolve_model_dir(path, key)
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
    """An HF model directory: config.json plus model.safetensors or a shard index (a local path;
    resolve a hub id first with `hub.resolve_model_dir`)."""
    return (os.path.isfile(os.path.join(path, "config.json"))
            and (os.path.isfile(os.path.join(path, SINGLE_FILE)) or os.path.isfile(os.path.join(path, INDEX_FILE))))
