"""Import an HF Qwen2 / Llama causal LM (`config.json` + safetensors) as autoregressive teacher params.

The conversion is one table, `TEACHER_TABLE`, of `(HF name pattern, our path, transpose?)`; PyTorch
`Linear.weight` is `[out, in]`, our kernels are `[in, out]`. Per-layer entries (`{i}` in the HF
name) are stacked along a leading `[n_layers]` axis when the config scans its layers. Every
expected tensor is checked (present, right shape) and every checkpoint tensor must be consumed,
before anything is placed on a device.

With a mesh, each leaf is built with `jax.make_array_from_callback`, so a device only reads its
own shard from the memory-mapped files (never the whole checkpoint in host memory).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dultra_jax.config import ConfigError
from dultra_jax.interop.safetensors_io import CheckpointError, open_checkpoint
from dultra_jax.models.teacher import Params, TeacherConfig, teacher_abstract_params, teacher_config_from_hf

Path = tuple[Any, ...]

# (HF name pattern, our path with "layers/" for per-layer leaves, transpose a 2-D weight?)
TEACHER_TABLE: tuple[tuple[str, str, bool], ...] = (
    ("model.embed_tokens.weight", "embed_tokens/embedding", False),
    ("model.layers.{i}.input_layernorm.weight", "layers/input_layernorm/weight", False),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers/q_proj/kernel", True),
    ("model.layers.{i}.self_attn.q_proj.bias", "layers/q_proj/bias", False),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers/k_proj/kernel", True),
    ("model.layers.{i}.self_attn.k_proj.bias", "layers/k_proj/bias", False),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers/v_proj/kernel", True),
    ("model.layers.{i}.self_attn.v_proj.bias", "layers/v_proj/bias", False),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers/o_proj/kernel", True),
    ("model.layers.{i}.self_attn.o_proj.bias", "layers/o_proj/bias", False),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers/post_attention_layernorm/weight", False),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers/gate_proj/kernel", True),
    ("model.layers.{i}.mlp.up_proj.weight", "layers/up_proj/kernel", True),
    ("model.layers.{i}.mlp.down_proj.weight", "layers/down_proj/kernel", True),
    ("model.norm.weight", "norm/weight", False),
    ("lm_head.weight", "lm_head/kernel", True),
)

CONFIG_FILE = "config.json"


def _ignorable(name: str, config: TeacherConfig) -> bool:
    """Checkpoint tensors that carry no information for us."""
    # Tied checkpoints may still store a copy of the embedding as lm_head; older Llama exports
    # saved the RoPE inverse frequencies as buffers.
    return (name == "lm_head.weight" and config.tie_word_embeddings) or name.endswith(".rotary_emb.inv_freq")


# --------------------------------------------------------------------------------------------------
# Sharding rules

_RULES = {
    "q_proj": ("fsdp", "tensor"), "k_proj": ("fsdp", "tensor"), "v_proj": ("fsdp", "tensor"),
    "gate_proj": ("fsdp", "tensor"), "up_proj": ("fsdp", "tensor"), "lm_head": ("fsdp", "tensor"),
    "o_proj": ("tensor", "fsdp"), "down_proj": ("tensor", "fsdp"),
    "embed_tokens": ("tensor", "fsdp"),
}


def teacher_partition_spec(path: Path, ndim: int) -> P:
    """PartitionSpec of the leaf at `path` (e.g. `("layers", "q_proj", "kernel")`) with `ndim` dims.

    2-D kernels and the embedding are split over `fsdp` and `tensor`; norms and biases are
    replicated. A stacked-layer leaf has one more dim than its rule: its layer axis is unsplit.
    """
    module, leaf = str(path[-2]), str(path[-1])
    rule = _RULES.get(module) if leaf in ("kernel", "embedding") else None
    if rule is None:
        return P()
    extra = ndim - len(rule)
    if extra < 0:
        raise ValueError(f"parameter {'/'.join(map(str, path))} has {ndim} dims; its rule {rule} needs {len(rule)}")
    return P(*([None] * extra), *rule)


def _checked_sharding(mesh: Mesh, path: Path, shape: tuple[int, ...]) -> NamedSharding:
    """`NamedSharding` from the rules; axes the mesh lacks are dropped; indivisible dims raise."""
    spec = teacher_partition_spec(path, len(shape))
    names = []
    for dim, axis in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axis is not None and axis not in mesh.shape:
            axis = None
        if axis is not None and shape[dim] % mesh.shape[axis]:
            raise ConfigError(
                f"teacher parameter {'/'.join(map(str, path))} dim {dim} of size {shape[dim]} is not "
                f"divisible by mesh axis {axis!r} of size {mesh.shape[axis]}")
        names.append(axis)
    return NamedSharding(mesh, P(*names))


# --------------------------------------------------------------------------------------------------
# Loading


def _flatten(tree: dict, prefix: Path = ()) -> Iterator[tuple[Path, Any]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _set(tree: dict, path: Path, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def read_hf_config(hf_dir: str) -> dict:
    """The `config.json` of `hf_dir` as a dict; a missing or malformed file raises naming its path."""
    path = os.path.join(hf_dir, CONFIG_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"missing {path}") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def _plan(config: TeacherConfig, abstract: Params) -> dict[Path, tuple[list[str], bool, tuple[int, ...]]]:
    """Our leaf path -> (HF names, one per stacked layer or a single one; transpose; leaf shape)."""
    leaves = dict(_flatten(abstract))
    plan = {}
    for hf_pattern, our_path, transpose in TEACHER_TABLE:
        parts = tuple(our_path.split("/"))
        if "{i}" not in hf_pattern:
            targets = [(parts, [hf_pattern])]
        elif config.scan_layers:
            targets = [(parts, [hf_pattern.format(i=i) for i in range(config.num_hidden_layers)])]
        else:
            targets = [((parts[0], i) + parts[1:], [hf_pattern.format(i=i)])
                       for i in range(config.num_hidden_layers)]
        for path, names in targets:
            if path in leaves:  # absent: a bias this family lacks, or lm_head of a tied model
                plan[path] = (names, transpose, tuple(leaves[path].shape))
    uncovered = sorted("/".join(map(str, p)) for p in set(leaves) - set(plan))
    if uncovered:  # the table and the model disagree: a bug here, not in the checkpoint
        raise AssertionError(f"TEACHER_TABLE has no entry for parameter(s) {uncovered}")
    return plan


def _stacked(config: TeacherConfig, path: Path) -> bool:
    return config.scan_layers and path[0] == "layers"


def _validate(ckpt, config: TeacherConfig, plan, hf_dir: str) -> None:
    """Every expected tensor present with the right shape, and no unexpected tensor."""
    expected = set()
    for path, (names, transpose, shape) in plan.items():
        per_tensor = shape[1:] if _stacked(config, path) else shape
        hf_shape = tuple(reversed(per_tensor)) if transpose else tuple(per_tensor)
        for name in names:
            expected.add(name)
            if name not in ckpt:
                raise CheckpointError(f"{hf_dir}: missing tensor {name} (expected shape {list(hf_shape)})")
            found = tuple(ckpt.shape(name))
            if found != hf_shape:
                raise CheckpointError(
                    f"{hf_dir}: tensor {name} has shape {list(found)}, expected {list(hf_shape)}")
    unexpected = sorted(n for n in ckpt.keys() if n not in expected and not _ignorable(n, config))
    if unexpected:
        raise CheckpointError(f"{hf_dir}: unexpected tensor(s) {', '.join(unexpected)} "
                              f"(not part of a {config.family} teacher with this config.json)")


def _reader(ckpt, names: list[str], transpose: bool, stacked: bool, dtype) -> Callable:
    """`read(index) -> np.ndarray`: the leaf, or the part of it selected by `index` (tuple of slices)."""

    def one(name: str, index: tuple) -> np.ndarray:
        tensor = ckpt.get(name)  # a memory-mapped view: slicing reads only what it touches
        if transpose:
            tensor = tensor.T
        # A copy, never a view: the CPU backend may alias host buffers, and these are mmap pages.
        return np.array(tensor[index], dtype=dtype)

    def read(index: tuple = ()) -> np.ndarray:
        index = tuple(index)
        if not stacked:
            return one(names[0], index)
        layer_index, rest = (index[0], index[1:]) if index else (slice(None), ())
        return np.stack([one(names[i], rest) for i in range(len(names))[layer_index]])

    return read


def load_teacher(hf_dir: str, *, dtype: str = "float32", param_dtype: str | None = None,
                 mesh: Mesh | None = None, shardings: Any = None,
                 scan_layers: bool = True) -> tuple[Params, TeacherConfig]:
    """Loads an HF `Qwen2ForCausalLM` / `LlamaForCausalLM` directory as teacher parameters.

    Args:
      hf_dir: directory with `config.json` and `model.safetensors` or sharded files plus
        `model.safetensors.index.json`.
      dtype: compute dtype name; `param_dtype` (default: `dtype`) is the storage dtype.
      mesh: place each leaf sharded by `teacher_partition_spec` on this mesh (each device reads
        only its shard).
      shardings: optional pytree of `jax.sharding.Sharding`s with the params' structure; overrides
        the rules (and `mesh`).
      scan_layers: stack layers into `[n_layers, ...]` leaves (else `layers/{i}/...`).
    Returns:
      `(params, config)`: params a nested dict of `jax.Array`s of `param_dtype`.
    Raises:
      CheckpointError: missing `config.json` / checkpoint files (path), missing or unexpected tensor
        (name), shape mismatch (name, expected and found shapes).
      ConfigError: unsupported `config.json` values (key and value), indivisible sharded dims.
    """
    hf_config = read_hf_config(hf_dir)
    config = teacher_config_from_hf(hf_config, dtype=dtype, param_dtype=param_dtype or dtype,
                                    scan_layers=scan_layers)
    abstract = teacher_abstract_params(config)
    plan = _plan(config, abstract)
    ckpt = open_checkpoint(hf_dir)
    _validate(ckpt, config, plan, hf_dir)

    np_dtype = np.dtype(config.weight_dtype)
    given = dict(_flatten(shardings)) if shardings is not None else None
    params: Params = {}
    for path, (names, transpose, shape) in plan.items():
        read = _reader(ckpt, names, transpose, _stacked(config, path), np_dtype)
        if given is not None:
            if path not in given:
                raise ConfigError(f"shardings has no entry for teacher parameter {'/'.join(map(str, path))}")
            sharding = given[path]
        elif mesh is not None:
            sharding = _checked_sharding(mesh, path, shape)
        else:
            sharding = None
        if sharding is None:
            value = jnp.asarray(read(), dtype=config.weight_dtype)
        else:
            value = jax.make_array_from_callback(shape, sharding, read)
        _set(params, path, value)
    return params, config
