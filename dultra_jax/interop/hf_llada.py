"""LLaDA (+ dUltra planner) <-> HF safetensors directories, through one mapping table.

`tensor_map(config)` lists every HF tensor with our parameter path, its layer index when layers
are stacked, and whether it is a transposed linear weight (PyTorch `[out, in]` vs our
`[in, out]`). `load_hf` and `export_hf` both read that one table, and both validate the whole
shape table before touching data.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from typing import Any

import jax
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from dultra_jax.config import ConfigError, ModelConfig, PlannerConfig, parse_dtype
from dultra_jax.interop.safetensors_io import (INDEX_FILE, SINGLE_FILE, CheckpointError, open_checkpoint,
                                               plan_shards, save_file)
from dultra_jax.interop.tables import (TensorMap, expand_layers, hf_shape, leaf_shapes, load_tensors, names_list,
                                       read_hf_config, validate)
from dultra_jax.models import policy
from dultra_jax.sharding import param_shardings, path_str

log = logging.getLogger(__name__)

# Per-block tensors: (HF suffix, our sub-path, transposed linear weight?).
_BLOCK = (
    ("attn_norm.weight", "attn_norm/weight", False),
    ("q_proj.weight", "q_proj/kernel", True),
    ("k_proj.weight", "k_proj/kernel", True),
    ("v_proj.weight", "v_proj/kernel", True),
    ("attn_out.weight", "attn_out/kernel", True),
    ("ff_norm.weight", "ff_norm/weight", False),
    ("ff_proj.weight", "ff_proj/kernel", True),
    ("up_proj.weight", "up_proj/kernel", True),
    ("ff_out.weight", "ff_out/kernel", True),
)
_BACKBONE = (
    ("model.transformer.wte.weight", "wte/embedding", False),
    ("model.transformer.ln_f.weight", "ln_f/weight", False),
    ("model.transformer.ff_out.weight", "ff_out/kernel", True),
)
_PLANNER = (
    ("time_embedding.mlp.0.weight", "planner/time_embedding/mlp_0/kernel", True),
    ("time_embedding.mlp.0.bias", "planner/time_embedding/mlp_0/bias", False),
    ("time_embedding.mlp.2.weight", "planner/time_embedding/mlp_2/kernel", True),
    ("time_embedding.mlp.2.bias", "planner/time_embedding/mlp_2/bias", False),
    ("norm_out_1.modulation.weight", "planner/norm_out_1/modulation/kernel", True),
    ("norm_out_1.modulation.bias", "planner/norm_out_1/modulation/bias", False),
    ("norm_out_2.modulation.weight", "planner/norm_out_2/modulation/kernel", True),
    ("norm_out_2.modulation.bias", "planner/norm_out_2/modulation/bias", False),
    ("mask_embedding.weight", "planner/mask_embedding/embedding", False),
    ("mask_linear.weight", "planner/mask_linear/kernel", True),
    ("mask_linear.bias", "planner/mask_linear/bias", False),
)
_PLANNER_PREFIXES = ("mask_head.", "time_embedding.", "norm_out_1.", "norm_out_2.", "mask_embedding.",
                     "mask_linear.", "block_embedding.")
# config.json fields of the dUltra planner (docs/algorithm.md section 1.4).
_PLANNER_FIELDS = {"num_head_layers": 1, "use_adaln": True, "use_mask_embeddings": True,
                   "use_block_embeddings": False}
# Tokenizer and remote-code files that travel with an export.
_COPIED = re.compile(r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|merges\.txt|"
                     r"chat_template.*|generation_config\.json|.*\.py)$")


def tensor_map(config: ModelConfig) -> list[TensorMap]:
    """The mapping table for `config` (backbone, and the planner when the config has one)."""
    entries = [TensorMap(hf, ours, None, t) for hf, ours, t in _BACKBONE]
    entries += expand_layers(_BLOCK, config.n_layers, config.scan_layers, "model.transformer.blocks.", "blocks")
    if config.has_planner:
        entries += expand_layers(_BLOCK, 1, False, "mask_head.", "planner/mask_head")
        entries += [TensorMap(hf, ours, None, t) for hf, ours, t in _PLANNER]
    return entries


# ----------------------------------------------------------------------------------- config.json


# (field, required value) pairs for the LLaDA variants we implement.
_REQUIRED = {
    "block_type": "llama", "layer_norm_type": "rms", "activation_type": "silu", "weight_tying": False,
    "include_bias": False, "include_qkv_bias": False, "alibi": False, "rope": True, "scale_logits": False,
    "attention_layer_norm": False, "input_emb_norm": False, "bias_for_layer_norm": False,
    "layer_norm_with_affine": True, "use_adaln": True, "use_mask_embeddings": True,
    "use_block_embeddings": False, "rope_scaling": None, "clip_qkv": None,
}


def model_config_from_hf(hf: dict[str, Any], *, with_planner: bool, **overrides) -> ModelConfig:
    """`ModelConfig` from an HF LLaDA `config.json` dict; unsupported values raise `ConfigError`.

    `overrides` set fields that are not part of the checkpoint (dtype, param_dtype, scan_layers,
    remat, remat_policy, mask_padding).
    """
    for key, required in _REQUIRED.items():
        if key in hf and hf[key] != required and not (required is False and hf[key] is None):
            raise ConfigError(f"config.json: {key}={hf[key]!r} is not supported (expected {required!r})")
    if hf.get("num_head_layers", 1) != 1:
        raise ConfigError(f"config.json: num_head_layers={hf['num_head_layers']!r} is not supported (expected 1)")
    try:
        d_model, n_heads = hf["d_model"], hf["n_heads"]
        vocab = max(hf["vocab_size"], hf.get("embedding_size") or 0)
        mlp = hf.get("mlp_hidden_size") or hf["mlp_ratio"] * d_model
        fields = dict(
            vocab_size=vocab, d_model=d_model, n_layers=hf["n_layers"], n_heads=n_heads,
            n_kv_heads=hf.get("n_kv_heads") or n_heads, mlp_hidden_size=mlp,
            rope_theta=float(hf.get("rope_theta", 10000.0)), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            max_sequence_length=hf.get("max_sequence_length", 4096), mask_token_id=hf["mask_token_id"],
            eos_token_id=hf.get("eos_token_id", 126081), pad_token_id=hf.get("pad_token_id", 126081),
        )
    except KeyError as e:
        raise ConfigError(f"config.json: required field {e.args[0]!r} is missing") from None
    eot = hf.get("eot_token_id", 126348)
    fields["eot_token_id"] = eot if eot is not None and eot < vocab else None
    fields["planner"] = PlannerConfig() if with_planner else None
    fields.update(overrides)
    return ModelConfig(**fields)


# LLaDA's modelling code lives in its hub repository (transformers has no LLaDA), so a config.json
# written without a source directory refers to that code by `repo--module.Class`, the form that
# transformers resolves with `trust_remote_code=True`. A planner checkpoint loads its backbone this
# way; the planner keys need dUltra's `LLaDOUModelLM`.
_LLADA_CODE_REPO = "GSAI-ML/LLaDA-8B-Instruct"
_LLADA_AUTO_MAP = {
    "AutoConfig": f"{_LLADA_CODE_REPO}--configuration_llada.LLaDAConfig",
    "AutoModel": f"{_LLADA_CODE_REPO}--modeling_llada.LLaDAModelLM",
    "AutoModelForCausalLM": f"{_LLADA_CODE_REPO}--modeling_llada.LLaDAModelLM",
}


def _tokenizer_vocab_size(base: dict[str, Any] | None, config: ModelConfig) -> int:
    """`vocab_size` to write: the source's (the tokenizer's, which may be below the padded
    `embedding_size` that the model owns) while it still fits the embedding, else the embedding's."""
    source = (base or {}).get("vocab_size")
    return source if isinstance(source, int) and 0 < source <= config.vocab_size else config.vocab_size


def hf_config_for(config: ModelConfig, base: dict[str, Any] | None = None, dtype: str = "bfloat16") -> dict:
    """`config.json` for `config`: every field of `base` that we do not own is carried through."""
    out = dict(base or {"model_type": "llada", "architectures": ["LLaDAModelLM"], "auto_map": _LLADA_AUTO_MAP,
                        "block_type": "llama", "layer_norm_type": "rms", "activation_type": "silu",
                        "weight_tying": False, "include_bias": False, "include_qkv_bias": False, "alibi": False,
                        "rope": True, "rope_full_precision": True, "scale_logits": False,
                        "layer_norm_with_affine": True, "bias_for_layer_norm": False, "attention_layer_norm": False,
                        "input_emb_norm": False, "use_cache": False})
    out.update(d_model=config.d_model, n_layers=config.n_layers, n_heads=config.n_heads,
               n_kv_heads=config.n_kv_heads, mlp_hidden_size=config.mlp_hidden_size,
               vocab_size=_tokenizer_vocab_size(base, config), embedding_size=config.vocab_size,
               rope_theta=config.rope_theta, rms_norm_eps=config.rms_norm_eps,
               max_sequence_length=config.max_sequence_length, mask_token_id=config.mask_token_id,
               eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, torch_dtype=dtype)
    if config.eot_token_id is not None:
        out["eot_token_id"] = config.eot_token_id
    if config.has_planner:
        out.update(_PLANNER_FIELDS)
        out["architectures"] = ["LLaDOUModelLM"]
    else:
        for key in _PLANNER_FIELDS:
            out.pop(key, None)
        if out.get("architectures") == ["LLaDOUModelLM"]:
            out["architectures"] = ["LLaDAModelLM"]
    return out


# ----------------------------------------------------------------------------------------- load


# `torch_dtype` (or transformers 5's `dtype`) values of config.json -> our dtype names.
_TORCH_DTYPES = {"float32": "float32", "float": "float32", "bfloat16": "bfloat16", "float16": "float16",
                 "half": "float16"}


def checkpoint_dtype(directory: str) -> str | None:
    """The dtype an HF directory's weights are meant to run in: its config.json's `torch_dtype`
    (`dtype` in transformers 5) as a `ModelConfig` dtype name, or None when it names none.
    CheckpointError for an unreadable config.json or a dtype we cannot run."""
    hf = read_hf_config(directory)
    value = hf.get("torch_dtype", hf.get("dtype"))
    if value is None or value == "auto":
        return None
    name = str(value).removeprefix("torch.")
    if name not in _TORCH_DTYPES:
        raise CheckpointError(f"{os.path.join(directory, 'config.json')}: torch_dtype={value!r} is not one of "
                              f"{', '.join(sorted(set(_TORCH_DTYPES)))}")
    return _TORCH_DTYPES[name]


def _is_planner_tensor(name: str) -> bool:
    return name.startswith(_PLANNER_PREFIXES)


def load_hf(directory: str, *, mesh: Mesh | None = None, with_planner: bool | None = None,
            planner_rng: jax.Array | None = None, dtype: str = "float32", param_dtype: str = "float32",
            scan_layers: bool = True, remat: bool = False, remat_policy: str = "nothing_saveable",
            mask_padding: bool = True):
    """Reads an HF LLaDA directory into `(params, config, hf_config)`.

    Args:
      directory: holds `config.json` and `model.safetensors` or shards with an index.
      mesh: each parameter is placed with its `sharding.param_shardings` sharding on this mesh,
        each device reading only its own slice from the memory-mapped files; None places
        everything on the default device.
      with_planner: None loads the planner iff the checkpoint has its tensors; True requires it
        (or initialises a fresh one from `planner_rng`); False ignores planner tensors.
      dtype, param_dtype, scan_layers, remat, remat_policy, mask_padding: `ModelConfig` fields.
    Raises:
      CheckpointError naming the missing / unexpected tensor, or the tensor with both shapes;
      ConfigError naming an unsupported config.json key and value.
    """
    hf = read_hf_config(directory)
    ckpt = open_checkpoint(directory)
    present = set(ckpt.keys())
    has_planner_tensors = any(_is_planner_tensor(n) for n in present)
    init_planner = False
    if with_planner is None:
        with_planner = has_planner_tensors
    elif with_planner and not has_planner_tensors and planner_rng is not None:
        init_planner = True
    config = model_config_from_hf(hf, with_planner=with_planner, dtype=dtype, param_dtype=param_dtype,
                                  scan_layers=scan_layers, remat=remat, remat_policy=remat_policy,
                                  mask_padding=mask_padding)
    table = [e for e in tensor_map(config) if not (init_planner and e.path.startswith("planner/"))]
    abstract = policy.abstract_params(config)
    validate(ckpt, table, leaf_shapes(abstract),
             ignore=lambda name: _is_planner_tensor(name) and not with_planner)
    shardings = param_shardings(abstract, mesh) if mesh is not None else None
    params = load_tensors(ckpt, table, abstract, shardings, np.dtype(parse_dtype(param_dtype, "param_dtype")))
    if init_planner:
        log.info("%s has no planner tensors: initialising a fresh planner head", directory)
        # Only the planner leaves are outputs, so XLA never materialises a random backbone.
        init_planner_params = jax.jit(lambda rng: policy.init_params(config, rng)["planner"],
                                      out_shardings=None if shardings is None else shardings["planner"])
        params["planner"] = init_planner_params(planner_rng)
    return params, config, hf


# --------------------------------------------------------------------------------------- export


def parse_size(size: int | str | None) -> int | None:
    """`5GB` / `500MB` / `200KB` (powers of 10), `5GiB` / `500MiB` (powers of 2) or bytes -> bytes
    (HF's `max_shard_size` convention)."""
    if size is None or isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not match:
        raise ConfigError(f"max_shard_size={size!r} is not a size such as '5GB' or '500MB'")
    unit = (match.group(2) or "B").upper()
    return int(float(match.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
                                         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit])


def export_hf(params, config: ModelConfig, out_dir: str, *, dtype: str = "bfloat16",
              max_shard_size: int | str | None = "5GB", source_dir: str | None = None,
              hf_config: dict[str, Any] | None = None, overwrite: bool = False) -> str:
    """Writes `params` as an HF LLaDA (+ dUltra planner) directory; returns `out_dir`.

    Args:
      dtype: storage dtype of the tensors ("bfloat16", "float32", "float16").
      max_shard_size: bytes or "5GB"; more than one shard writes `model-0000i-of-0000N` files
        plus `model.safetensors.index.json`.
      source_dir: the HF directory the model came from: its `config.json` fields that we do not
        own are carried through, and its tokenizer / remote-code files are copied (a directory
        without `config.json`, such as a pretrain workdir's `tokenizer/`, gives only its files).
      hf_config: base `config.json` dict when there is no source directory.
      overwrite: replace an existing, non-empty `out_dir`.
    Everything is validated first (`check_export_params`, `check_export_dir`, the shard plan);
    the directory is then assembled under a temporary name and renamed into place when complete
    (`_write_export`). In a multi-process run every process must call this (tensors sharded over
    other processes are gathered collectively); process 0 writes, and all return once the
    directory is in place, or all raise if process 0 could not write it (its own error there, a
    CheckpointError elsewhere).
    Raises:
      CheckpointError naming a parameter that does not fit `config`, or `out_dir`.
    """
    np_dtype = storage_dtype(dtype)
    if source_dir is not None and hf_config is None and os.path.exists(os.path.join(source_dir, "config.json")):
        hf_config = read_hf_config(source_dir)
    table, flat = check_export_params(params, config)
    check_export_dir(out_dir, overwrite)
    shapes = leaf_shapes(policy.abstract_params(config))
    sizes = [(e.hf_name, int(np.prod(hf_shape(e, shapes[e.path]))) * np_dtype.itemsize) for e in table]
    shards = plan_shards(sizes, parse_size(max_shard_size))
    _write_export(flat, table, shards, np_dtype, out_dir, hf_config_for(config, hf_config, dtype), source_dir)
    return out_dir


# Validation.


def storage_dtype(dtype: str) -> np.dtype:
    """The numpy dtype of an export dtype name (bfloat16 through ml_dtypes)."""
    return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(parse_dtype(dtype, "dtype"))


def check_export_params(params, config: ModelConfig) -> tuple[list[TensorMap], dict[str, Any]]:
    """`(mapping table, {parameter path: leaf})` once every parameter of `config` is present with
    its shape and nothing else is; CheckpointError naming the parameter otherwise."""
    table = tensor_map(config)
    shapes = leaf_shapes(policy.abstract_params(config))
    flat = {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    for e in table:
        if e.path not in flat:
            raise CheckpointError(f"parameter {e.path} (for {e.hf_name}) is missing from the params")
        if tuple(flat[e.path].shape) != shapes[e.path]:
            raise CheckpointError(f"parameter {e.path} has shape {list(flat[e.path].shape)}, "
                                  f"expected {list(shapes[e.path])} for config {config}")
    extra = set(flat) - {e.path for e in table}
    if extra:
        raise CheckpointError(f"parameter(s) {names_list(extra)} have no HF name for this config")
    return table, flat


def check_export_dir(out_dir: str, overwrite: bool = False) -> None:
    """An export may go to `out_dir`: it is absent, an empty directory, or (with `overwrite`) a
    directory. CheckpointError `out_dir=...: ...` otherwise (argument names in backquotes, which
    the launchers turn into their flags)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CheckpointError(f"out_dir={out_dir}: exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise CheckpointError(f"out_dir={out_dir}: the export directory exists and is not empty (pass "
                              f"`overwrite=True` to replace it)")
    parent = os.path.dirname(os.path.abspath(out_dir))
    ancestor = parent
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise CheckpointError(f"out_dir={out_dir}: {ancestor} is not a directory")


# Conversion and writing.


def _write_export(flat: dict[str, Any], table: list[TensorMap], shards: list[list[str]], np_dtype: np.dtype,
                  out_dir: str, hf_json: dict[str, Any], source_dir: str | None) -> None:
    """Converts the tensors shard by shard (`_fetch`: every process takes part in the gathers)
    and has process 0 write them, the index, config.json and the source's files into a temporary
    directory that replaces `out_dir` when complete.

    The writer's first error is held, not raised, until the end: the other processes keep
    calling the gathers of `_fetch`, so the writer must too, and then they all learn of it
    instead of waiting for it at the final barrier.
    """
    writer = _Process0Writer(os.path.dirname(os.path.abspath(out_dir)))
    try:
        writer.run(writer.start)
        by_name = {e.hf_name: e for e in table}
        weight_map, total = {}, 0
        for k, names in enumerate(shards):
            file = SINGLE_FILE if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {n: _fetch(flat[by_name[n].path], by_name[n], np_dtype) for n in names}
            writer.run(lambda: save_file(tensors, os.path.join(writer.tmp, file)))
            total += sum(t.nbytes for t in tensors.values())
            weight_map.update({n: file for n in names})
        writer.run(lambda: _finish_export(writer.tmp, out_dir, len(shards) > 1, weight_map, total, hf_json,
                                          source_dir))
    except BaseException:
        writer.discard()
        raise
    if writer.failure is not None:
        writer.discard()
    if jax.process_count() > 1:  # all return once process 0 has renamed the directory into place, or failed
        written = bool(multihost_utils.broadcast_one_to_all(np.int32(writer.failure is None)))
        if not written and not writer.active:
            raise CheckpointError(f"export to {out_dir} failed on process 0, the writer (its log has the error)")
    if writer.failure is not None:
        raise writer.failure


class _Process0Writer:
    """Runs the writing steps of an export on process 0 only, into a temporary directory beside
    the target, keeping the first error (`failure`) instead of raising it."""

    def __init__(self, parent: str):
        self.parent = parent
        self.active = jax.process_index() == 0
        self.failure: Exception | None = None
        self.tmp: str | None = None

    def run(self, step) -> None:
        if self.active and self.failure is None:
            try:
                step()
            except Exception as e:  # raised by `_write_export`, once every process knows
                self.failure = e

    def start(self) -> None:
        os.makedirs(self.parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=".export-", dir=self.parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the export from other users

    def discard(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _finish_export(tmp: str, out_dir: str, sharded: bool, weight_map: dict[str, str], total: int,
                   hf_config: dict[str, Any], source_dir: str | None) -> None:
    """The index, config.json and the source's tokenizer files into `tmp`, then `tmp` -> `out_dir`."""
    if sharded:
        with open(os.path.join(tmp, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    if source_dir is not None:
        for file in sorted(os.listdir(source_dir)):
            if _COPIED.match(file) and os.path.isfile(os.path.join(source_dir, file)):
                shutil.copy2(os.path.join(source_dir, file), os.path.join(tmp, file))
    # The old directory is renamed aside, not deleted, before the new one moves in: a crash
    # between the two renames leaves both copies whole on disk, and a failed move puts it back.
    old = f"{tmp}.old" if os.path.exists(out_dir) else None
    if old is not None:
        os.rename(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.rename(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fetch(leaf: jax.Array, entry: TensorMap, dtype: np.dtype) -> np.ndarray:
    """One HF tensor on the host: a single layer of a stacked leaf is sliced on device first;
    a tensor with shards on other processes is all-gathered (a collective: every process calls)."""
    array = leaf[entry.layer] if entry.layer is not None else leaf
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        array = multihost_utils.process_allgather(array, tiled=True)
    array = np.asarray(jax.device_get(array)).astype(dtype)
    return np.ascontiguousarray(array.T if entry.transpose else array)
