"""Table-driven checkpoint conversion shared by the LLaDA and teacher loaders.

A model's conversion is a list of `TensorMap`s (HF tensor name <-> our parameter path, the layer
index inside a stacked leaf, whether the HF tensor is a transposed PyTorch `Linear.weight`).
`load_tensors` validates the whole table against a checkpoint before reading anything and then
builds each leaf with `jax.make_array_from_callback`, so each device reads only its own slice of
the memory-mapped files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterable

import jax
import numpy as np
from jax.sharding import Sharding, SingleDeviceSharding

from dultra_jax.interop.safetensors_io import Checkpoint, CheckpointError
from dultra_jax.sharding import path_str


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One HF tensor: `hf_name` <-> parameter `path` (layer `layer` of a stacked leaf if set)."""

    hf_name: str
    path: str
    layer: int | None
    transpose: bool


def expand_layers(entries: Iterable[tuple[str, str, bool]], n_layers: int, stacked: bool,
                  hf_prefix: str, our_prefix: str) -> list[TensorMap]:
    """Per-layer table rows: `{hf_prefix}{i}.{suffix}` <-> `our_prefix/{sub}` (stacked) or `.../{i}/{sub}`."""
    rows = []
    for i in range(n_layers):
        for hf, ours, transpose in entries:
            path = f"{our_prefix}/{ours}" if stacked else f"{our_prefix}/{i}/{ours}"
            rows.append(TensorMap(f"{hf_prefix}{i}.{hf}", path, i if stacked else None, transpose))
    return rows


def hf_shape(entry: TensorMap, leaf_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor's shape given our leaf's shape."""
    shape = leaf_shape[1:] if entry.layer is not None else leaf_shape
    return tuple(reversed(shape)) if entry.transpose else tuple(shape)


def leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """`{"blocks/q_proj/kernel": shape}` for a (possibly abstract) parameter pytree."""
    return {path_str(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def read_hf_config(directory: str) -> dict[str, Any]:
    """`config.json` of an HF directory; a missing or malformed file raises naming its path."""
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def names_list(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def validate(ckpt: Checkpoint, table: list[TensorMap], shapes: dict[str, tuple[int, ...]],
             ignore: Callable[[str], bool] = lambda name: False) -> None:
    """Raises `CheckpointError` for a missing tensor, an unexpected tensor, or a wrong shape."""
    where = ckpt.directory
    expected = {e.hf_name for e in table}
    missing = expected - set(ckpt.keys())
    if missing:
        raise CheckpointError(f"{where}: missing tensor(s) {names_list(missing)}")
    unexpected = {n for n in ckpt.keys() if n not in expected and not ignore(n)}
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensor(s) {names_list(unexpected)}")
    for e in table:
        want = hf_shape(e, shapes[e.path])
        if ckpt.shape(e.hf_name) != want:
            raise CheckpointError(f"{where}: tensor {e.hf_name} has shape {list(ckpt.shape(e.hf_name))}, "
                                  f"expected {list(want)} for parameter {e.path}")


def load_tensors(ckpt: Checkpoint, table: list[TensorMap], abstract: Any, shardings: Any | None,
                 dtype: np.dtype) -> Any:
    """Builds the leaves of `abstract` that `table` covers (others stay None).

    Each leaf is made by `jax.make_array_from_callback` with its sharding from `shardings`
    (default: the first device), reading only the requested slice and converting it to `dtype`.
    """
    by_path: dict[str, list[TensorMap]] = {}
    for e in table:
        by_path.setdefault(e.path, []).append(e)
    if shardings is None:
        shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), abstract)

    def place(path, leaf, sharding: Sharding):
        entries = by_path.get(path_str(path))
        if entries is None:
            return None
        entries = sorted(entries, key=lambda e: -1 if e.layer is None else e.layer)
        return jax.make_array_from_callback(tuple(leaf.shape), sharding,
                                            lambda index: read_slice(ckpt, entries, index, dtype))

    return jax.tree_util.tree_map_with_path(place, abstract, shardings)


def read_slice(ckpt: Checkpoint, entries: list[TensorMap], index: tuple[slice, ...], dtype: np.dtype) -> np.ndarray:
    """Reads `index` of one leaf from its HF tensor(s) (`entries` sorted by layer when stacked)."""
    index = tuple(index)

    def one(entry: TensorMap, sub_index) -> np.ndarray:
        array = ckpt.get(entry.hf_name)  # a memory-mapped view: slicing reads only what it touches
        if entry.transpose:
            array = array.T
        # A copy, never a view of the mapped pages (the CPU backend may alias host buffers).
        return np.array(array[tuple(sub_index)], dtype=dtype)

    if entries[0].layer is None:
        return one(entries[0], index)
    layer_index, rest = (index[0], index[1:]) if index else (slice(None), ())
    return np.stack([one(e, rest) for e in entries[layer_index]])
