"""Import an HF Qwen2 / Llama causal LM (`config.json` + safetensors) as autoregressive teacher params.

The conversion is one table, `teacher_tensor_map(config)`, of `TensorMap` rows; PyTorch
`Linear.weight` is `[out, in]`, our kernels are `[in, out]`. Per-layer entries (`{i}` in the HF
name) are stacked along a leading `[n_layers]` axis when the config scans its layers. Every
expected tensor is checked (present, right shape) and every checkpoint tensor must be consumed,
before anything is placed on a device.

With a mesh, each leaf is built with `jax.make_array_from_callback`, so a device only reads its
own shard from the memory-mapped files (never the whole checkpoint in host memory). With
`memory_kind="pinned_host"` the shards land in host memory instead of the chips' (an offloaded
teacher, `rewards.teacher_offload`), each still placed by its device's sharding.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from dultra_jax.hub import resolve_model_dir
from dultra_jax.interop.safetensors_io import open_checkpoint
from dultra_jax.interop.tables import TensorMap, expand_layers, leaf_shapes, load_tensors, read_hf_config, validate
from dultra_jax.models.teacher import Params, TeacherConfig, teacher_abstract_params, teacher_config_from_hf
from dultra_jax.sharding import param_shardings

# Per-layer tensors: (HF suffix after `model.layers.{i}.`, our sub-path, transpose?).
_LAYER = (
    ("input_layernorm.weight", "input_layernorm/weight", False),
    ("self_attn.q_proj.weight", "q_proj/kernel", True),
    ("self_attn.q_proj.bias", "q_proj/bias", False),
    ("self_attn.k_proj.weight", "k_proj/kernel", True),
    ("self_attn.k_proj.bias", "k_proj/bias", False),
    ("self_attn.v_proj.weight", "v_proj/kernel", True),
    ("self_attn.v_proj.bias", "v_proj/bias", False),
    ("self_attn.o_proj.weight", "o_proj/kernel", True),
    ("self_attn.o_proj.bias", "o_proj/bias", False),
    ("post_attention_layernorm.weight", "post_attention_layernorm/weight", False),
    ("mlp.gate_proj.weight", "gate_proj/kernel", True),
    ("mlp.up_proj.weight", "up_proj/kernel", True),
    ("mlp.down_proj.weight", "down_proj/kernel", True),
)
_GLOBAL = (
    ("model.embed_tokens.weight", "embed_tokens/embedding", False),
    ("model.norm.weight", "norm/weight", False),
    ("lm_head.weight", "lm_head/kernel", True),
)


def teacher_tensor_map(config: TeacherConfig) -> list[TensorMap]:
    """The mapping table for `config`: rows whose parameter the family lacks (biases, a tied
    `lm_head`) are left out."""
    shapes = leaf_shapes(teacher_abstract_params(config))
    rows = [TensorMap(hf, ours, None, t) for hf, ours, t in _GLOBAL]
    rows += expand_layers(_LAYER, config.num_hidden_layers, config.scan_layers, "model.layers.", "layers")
    return [row for row in rows if row.path in shapes]


def _ignorable(name: str, config: TeacherConfig) -> bool:
    """Checkpoint tensors that carry no information for us."""
    # Tied checkpoints may still store a copy of the embedding as lm_head; older Llama exports
    # saved the RoPE inverse frequencies as buffers.
    return (name == "lm_head.weight" and config.tie_word_embeddings) or name.endswith(".rotary_emb.inv_freq")


def teacher_config(hf_dir: str, *, dtype: str = "float32", param_dtype: str | None = None,
                   scan_layers: bool = True, key: str = "hf_dir") -> TeacherConfig:
    """The `TeacherConfig` that `load_teacher` returns, from `config.json` alone (no weights read);
    `hf_dir` may be a hub id (`hub.resolve_model_dir`, `key` naming it in errors)."""
    hf_dir = resolve_model_dir(hf_dir, key)
    return teacher_config_from_hf(read_hf_config(hf_dir), dtype=dtype, param_dtype=param_dtype or dtype,
                                  scan_layers=scan_layers)


def load_teacher(hf_dir: str, *, dtype: str = "float32", param_dtype: str | None = None,
                 mesh: Mesh | None = None, shardings: Any = None, scan_layers: bool = True,
                 memory_kind: str | None = None) -> tuple[Params, TeacherConfig]:
    """Loads an HF `Qwen2ForCausalLM` / `LlamaForCausalLM` directory as teacher parameters.

    Args:
      hf_dir: directory with `config.json` and `model.safetensors` or sharded files plus
        `model.safetensors.index.json`, or a hub id of one (`hub.resolve_model_dir`).
      dtype: compute dtype name; `param_dtype` (default: `dtype`) is the storage dtype.
      mesh: place each leaf with its `sharding.param_shardings` sharding on this mesh (each
        device reads only its shard).
      shardings: optional pytree of `jax.sharding.Sharding`s with the params' structure; overrides
        the rules (and `mesh`).
      scan_layers: stack layers into `[n_layers, ...]` leaves (else `layers/{i}/...`).
      memory_kind: where the leaves live: None (the devices' memory) or a memory kind of the
        devices, e.g. "pinned_host" (host memory, for a teacher offloaded between scorings);
        applied to every sharding, so each shard is read straight into that memory.
    Returns:
      `(params, config)`: params a nested dict of `jax.Array`s of `param_dtype`.
    Raises:
      CheckpointError: missing `config.json` / checkpoint files (path), missing or unexpected tensor
        (name), shape mismatch (name, expected and found shapes).
      ConfigError: unsupported `config.json` values (key and value), a hub id that does not
        resolve; ShardingError: a dim that does not divide its mesh axis.
    """
    hf_dir = resolve_model_dir(hf_dir, "hf_dir")
    config = teacher_config(hf_dir, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers)
    abstract = teacher_abstract_params(config)
    table = teacher_tensor_map(config)
    ckpt = open_checkpoint(hf_dir)
    validate(ckpt, table, leaf_shapes(abstract), ignore=lambda name: _ignorable(name, config))
    if shardings is None and mesh is not None:
        shardings = param_shardings(abstract, mesh)
    if memory_kind is not None:
        if shardings is None:  # `load_tensors`' default place, in the requested memory
            shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0], memory_kind=memory_kind),
                                     abstract)
        else:
            shardings = jax.tree.map(lambda sharding: sharding.with_memory_kind(memory_kind), shardings)
    params = load_tensors(ckpt, table, abstract, shardings, np.dtype(config.weight_dtype))
    return params, config
