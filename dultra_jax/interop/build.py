"""Parameters for a `model` config section: loaded from `model.path` (HF) or randomly initialised."""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import jax
from jax.sharding import Mesh

from dultra_jax.config import model_config_from_dict
from dultra_jax.interop.hf_llada import load_hf
from dultra_jax.interop.safetensors_io import INDEX_FILE, SINGLE_FILE
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
