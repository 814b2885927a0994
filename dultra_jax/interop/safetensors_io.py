"""A small, lazy safetensors reader and a streaming writer, bfloat16 included.

`safetensors.numpy` cannot hold bfloat16 (numpy has no such dtype), and loading a whole 16 GB
checkpoint into host memory to slice it per device is what we must avoid. The format is simple
(8-byte little-endian header size, a JSON header, raw little-endian bytes), so we memory-map each
file and hand out views: slicing a tensor reads only the pages that the slice touches.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

from dultra_jax.errors import CheckpointError  # re-exported; errors.py holds every user error

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsFile:
    """One `.safetensors` file, memory-mapped; tensors are numpy views (read-only)."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                (header_size,) = struct.unpack("<Q", f.read(8))
                if header_size > os.path.getsize(path) - 8:  # not a safetensors file (or cut short)
                    raise CheckpointError(f"safetensors file {path}: its header size {header_size} exceeds the "
                                          f"file ({os.path.getsize(path)} bytes)")
                header = json.loads(f.read(header_size))
        except (OSError, struct.error, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._entries = header
        self._data_start = 8 + header_size
        self._mmap = None
        for name, entry in header.items():
            self._check_entry(name, entry)
        end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
        if self._data_start + end > os.path.getsize(path):
            raise CheckpointError(f"safetensors file {path} is truncated: its header needs "
                                  f"{self._data_start + end} bytes, the file has {os.path.getsize(path)}")

    def _check_entry(self, name: str, entry) -> None:
        """A header entry whose byte range does not hold its shape and dtype is refused up front,
        not found later inside a reshape."""
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            shape = [int(n) for n in entry["shape"]]
            code = entry["dtype"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"safetensors file {self.path}: tensor {name} has a malformed header entry "
                                  f"{entry!r}") from None
        if code not in _DTYPES:  # reported by `dtype()` if the tensor is ever read
            return
        need = int(np.prod(shape, dtype=np.int64)) * _DTYPES[code].itemsize
        if not 0 <= begin <= end or end - begin != need:
            raise CheckpointError(f"safetensors file {self.path}: tensor {name} ({code} {shape}) needs {need} "
                                  f"bytes, its data_offsets {[begin, end]} give {end - begin}")

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        code = self._entries[name]["dtype"]
        if code not in _DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {code}")
        return _DTYPES[code]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy view of the mapped file."""
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = self._entries[name]["data_offsets"]
        raw = self._mmap[self._data_start + begin:self._data_start + end]
        return raw.view(self.dtype(name)).reshape(self.shape(name))


class Checkpoint:
    """All tensors of an HF directory: `model.safetensors`, or shards listed by the index file.

    A directory with both reads `model.safetensors`, as transformers does, so that JAX and PyTorch
    load the same weights.
    """

    def __init__(self, directory: str):
        self.directory = directory
        index_path = os.path.join(directory, INDEX_FILE)
        single_path = os.path.join(directory, SINGLE_FILE)
        if os.path.exists(single_path):
            files = None
        elif os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, KeyError, json.JSONDecodeError) as e:
                raise CheckpointError(f"cannot read index {index_path}: {e!r}") from None
            files = {name: os.path.join(directory, shard) for name, shard in weight_map.items()}
        else:
            raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}")
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, SafetensorsFile] = {}
        for path in sorted(set(files.values())) if files else [single_path]:
            if not os.path.exists(path):
                raise CheckpointError(f"checkpoint shard {path} listed in {index_path} does not exist")
            self._files[path] = SafetensorsFile(path)
        if files:
            for name, path in files.items():
                if name not in self._files[path].keys():
                    raise CheckpointError(f"tensor {name} is listed in {index_path} but missing from {path}")
                self._where[name] = self._files[path]
        else:
            self._where = {name: self._files[single_path] for name in self._files[single_path].keys()}

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._where[name].dtype(name)

    def get(self, name: str) -> np.ndarray:
        return self._where[name].get(name)


def open_checkpoint(directory: str) -> Checkpoint:
    """Opens an HF safetensors checkpoint directory lazily (nothing is read until `get`)."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    return Checkpoint(directory)


def _header(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    entries, offset = {"__metadata__": dict(metadata)}, 0
    for name, array in tensors.items():
        dtype = np.dtype(array.dtype)
        if dtype not in _NAMES:
            raise CheckpointError(f"tensor {name} has dtype {dtype}, which safetensors cannot store")
        entries[name] = {"dtype": _NAMES[dtype], "shape": list(array.shape),
                         "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the spec aligns the data start to 8 bytes
    return struct.pack("<Q", len(header)) + header


def save_file(tensors: Mapping[str, np.ndarray], path: str, metadata: Mapping[str, str] | None = None) -> None:
    """Writes `tensors` (name -> numpy array) to `path` atomically (temporary file + rename)."""
    tensors = {name: np.ascontiguousarray(array) for name, array in tensors.items()}
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(_header(tensors, metadata or {"format": "pt"}))
        for array in tensors.values():
            f.write(array.view(np.uint8).reshape(-1).data if array.size else b"")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def plan_shards(sizes: Iterable[tuple[str, int]], max_shard_bytes: int | None) -> list[list[str]]:
    """Groups tensor names into shards of at most `max_shard_bytes` (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if max_shard_bytes is not None and shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards
