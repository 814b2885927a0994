"""Model sources: the parameters of an HF directory or of a training workdir's latest checkpoint,
whichever trainer wrote it (`launch/train.py`, `pretrain.py`, `init_planner.py`)."""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import ml_collections

from dultra_jax import checkpoint as ckpt_lib
from dultra_jax.config import ConfigError, ModelConfig, OptimConfig, from_config, model_config_from_dict
from dultra_jax.hub import parse_hub_id, resolve_model_dir
from dultra_jax.interop.hf_llada import load_hf
from dultra_jax.interop.safetensors_io import INDEX_FILE, SINGLE_FILE, CheckpointError
from dultra_jax.models import policy
from dultra_jax.interop.build import build_model, is_hf_dir
from dultra_jax.sharding import make_mesh
from dultra_jax.training.state import checkpointed, create_state, make_optimizer, merge_params, partition_params, \
    state_shardings

log = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"  # in a pretrain workdir: the task's tokenizer files, beside `checkpoints/`


def is_workdir(path: str) -> bool:
    """A training workdir (or its `checkpoints` directory)."""
    return os.path.isdir(path) and (os.path.isdir(os.path.join(path, "checkpoints"))
                                    or any(name.isdigit() for name in os.listdir(path)))


def resolve_source(path: str, key: str = "model") -> str:
    """The local path of a model source: `path` itself when it exists or does not read as a hub
    id (a missing local path is left for `model_source_kind` to name), else the HF-cache snapshot
    of the hub id (`hub.resolve_model_dir`; ConfigError `KEY='ID': ...` when it does not resolve)."""
    if os.path.exists(path) or parse_hub_id(path) is None:
        return path
    return resolve_model_dir(path, key)


def model_source_kind(path: str) -> str:
    """What `path` (a local path or hub id, `resolve_source`) holds, `"hf"` or `"workdir"`,
    without reading weights; CheckpointError naming `path` when it is neither."""
    path = resolve_source(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if is_hf_dir(path):
        return "hf"
    if is_workdir(path):
        return "workdir"
    raise CheckpointError(f"{path} is neither an HF model directory (config.json and {SINGLE_FILE} or "
                          f"{INDEX_FILE}) nor a training workdir with checkpoints")


def restore_params(workdir: str, mesh=None) -> tuple[Any, ModelConfig, str | None]:
    """`(params, ModelConfig, source_dir)` from the latest checkpoint of a training workdir.

    The checkpoint's own config (saved with it) rebuilds the abstract train state; the trained
    group is restored with the shardings of `mesh` (default: all local devices on 'fsdp'), and
    the frozen rest (a planner run's backbone), which checkpoints leave out, is loaded again from
    the run's model source, as a resume does. `source_dir` is where the tokenizer is: a pretrain
    workdir's `tokenizer/`, else the run's `model.path` (None when neither exists).
    """
    directory = os.path.join(workdir, "checkpoints") if os.path.isdir(os.path.join(workdir, "checkpoints")) else workdir
    if not os.path.isdir(directory):
        raise ConfigError(f"{workdir} is neither a training workdir nor a checkpoint directory")
    mesh = mesh if mesh is not None else make_mesh()
    checkpointer = ckpt_lib.Checkpointer(directory, async_save=False)
    try:
        step = checkpointer.latest_step()
        if step is None:
            raise ConfigError(f"no training checkpoint in {directory}")
        saved = checkpointer.read_config(step)
        config = ml_collections.ConfigDict(saved["config"])
        model = model_config_from_dict(saved["model"])
        optim = from_config(OptimConfig, config.get("optim"), "optim.")
        seed = int(config.get("seed", 0))
        tx = make_optimizer(optim, int(config.total_steps))
        abstract = jax.eval_shape(lambda p: checkpointed(create_state(p, tx, optim.train, seed)),
                                  policy.abstract_params(model))
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                              state_shardings(abstract, tx, mesh))
        state, _, _ = checkpointer.restore(step, target)
    finally:
        checkpointer.close()
    log.info("restored step %d from %s", step, directory)
    model_section = config.model.to_dict()
    params = state.trainable
    if optim.train != "all":
        source, _ = build_model(model_section, mesh=mesh, seed=seed)
        params = merge_params(state.trainable, partition_params(source, optim.train)[1])
    tokenizer_dir = os.path.join(os.path.dirname(os.path.abspath(directory)), TOKENIZER_DIR)
    if os.path.isdir(tokenizer_dir):
        return params, model, tokenizer_dir
    return params, model, _source_dir(model_section.get("path"))


def _source_dir(path: str | None) -> str | None:
    """The run's `model.path` as a local directory for its tokenizer; None (with a warning) when a
    hub id no longer resolves here, since only the tokenizer needs it."""
    if not path:
        return None
    try:
        return resolve_source(path, "model.path")
    except ConfigError as e:
        log.warning("the training run's tokenizer is not available: %s", e)
        return None


def load_model_source(path: str, *, mesh=None, dtype: str | None = None,
                      param_dtype: str | None = None) -> tuple[Any, ModelConfig, str | None]:
    """`(params, ModelConfig, source_dir)` of an HF LLaDA directory or a training workdir.

    Args:
      path: an HF directory (config.json + safetensors) or the hub id of one (`resolve_source`),
        or a workdir of `launch/train.py`, `pretrain.py` or `init_planner.py` (`restore_params`).
      mesh: parameters are placed with their `sharding.param_shardings` on it (None: default device
        for an HF directory, all devices on 'fsdp' for a workdir).
      dtype, param_dtype: compute and storage dtypes (None: float32 for an HF directory, the
        checkpoint's own for a workdir).
    Returns:
      `source_dir`: the directory with the tokenizer (the directory itself, a pretrain workdir's
      `tokenizer/`, or the HF directory the training run started from; None when it had none).
    Raises:
      CheckpointError naming `path` when it is missing or neither kind of source; ConfigError
      for a hub id that does not resolve.
    """
    path = resolve_source(path)
    if model_source_kind(path) == "hf":
        params, config, _ = load_hf(path, mesh=mesh, dtype=dtype or "float32", param_dtype=param_dtype or "float32")
        return params, config, path
    params, config, source_dir = restore_params(path, mesh=mesh)
    if param_dtype is not None and param_dtype != config.param_dtype:
        config = config.replace(param_dtype=param_dtype)
        params = jax.tree.map(lambda x: x.astype(config.weight_dtype), params)
    if dtype is not None:
        config = config.replace(dtype=dtype)
    return params, config, source_dir
