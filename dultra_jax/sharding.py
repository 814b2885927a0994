"""Mesh construction and parameter / batch shardings from path rules.

One mesh with axes `('data', 'fsdp', 'tensor')` serves every scale: parameters are sharded over
'fsdp' (ZeRO-3 style) and 'tensor' (Megatron style) and replicated over 'data'; batches are
sharded over `('data', 'fsdp')`. Shardings come from regex rules on the parameter path
(`blocks/q_proj/kernel`); stacked layer axes get a leading `None`.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from dultra_jax.errors import ShardingError  # re-exported; errors.py holds every user error

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


# First match wins. Specs name the trailing dims; leading (stacked-layer) dims are unsharded.
PARAM_RULES: tuple[tuple[str, tuple[Any, ...]], ...] = (
    # LLaDA backbone and planner. The LM head `ff_out` [D, V] sits at the top level; the MLP's
    # `ff_out` [F, D] sits inside a block.
    (r"^ff_out/kernel$", ("fsdp", "tensor")),
    (r"(^|/)wte/embedding$", ("tensor", "fsdp")),
    (r"(^|/)(q_proj|k_proj|v_proj|ff_proj|up_proj)/kernel$", ("fsdp", "tensor")),
    (r"(^|/)(attn_out|ff_out)/kernel$", ("tensor", "fsdp")),
    (r"(^|/)(modulation|mlp_0|mlp_2)/kernel$", ("fsdp", "tensor")),
    (r"(^|/)mask_embedding/embedding$", (None, "fsdp")),
    (r"(^|/)mask_linear/kernel$", ("fsdp", None)),
    # Autoregressive teacher (HF Qwen2 / Llama names).
    (r"(^|/)embed_tokens/embedding$", ("tensor", "fsdp")),
    (r"(^|/)lm_head/kernel$", ("fsdp", "tensor")),
    (r"(^|/)(gate_proj)/kernel$", ("fsdp", "tensor")),
    (r"(^|/)(o_proj|down_proj)/kernel$", ("tensor", "fsdp")),
)


def mesh_sizes(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """`(data, fsdp, tensor)` with the one -1 (if any) resolved to the rest of `num_devices`;
    ShardingError naming the sizes when they do not make `num_devices`."""
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ShardingError(f"mesh sizes {dict(zip(AXES, sizes))}: at most one may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ShardingError(f"mesh sizes {dict(zip(AXES, sizes))} do not divide {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ShardingError(f"mesh sizes {dict(zip(AXES, sizes))} multiply to {int(np.prod(sizes))}, "
                            f"but there are {num_devices} devices")
    return tuple(sizes)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `('data', 'fsdp', 'tensor')` mesh with Auto axis types; one size may be -1 (the rest).

    With devices of several processes (hosts), each process's devices form one block of the
    batch axes (`host_contiguous_grid`), so a process's rows are one range whatever the batch.
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_sizes(data, fsdp, tensor, len(devices))
    axis_types = (AxisType.Auto,) * 3
    if len({d.process_index for d in devices}) > 1:
        return Mesh(host_contiguous_grid(sizes, devices), AXES, axis_types=axis_types)
    return jax.make_mesh(sizes, AXES, axis_types=axis_types, devices=devices)


def host_contiguous_grid(sizes: tuple[int, int, int], devices: Sequence[Any],
                         process_of: Callable[[Any], int] = lambda device: device.process_index) -> np.ndarray:
    """Devices as a `[data, fsdp, tensor]` array in which each process's devices are one block.

    Processes tile the batch axes, 'data' first (as DCN x ICI hybrid meshes do): with `n`
    processes, `gcd(data, n)` of them along 'data' and the rest along 'fsdp'; within a process its
    devices keep their physical (ICI-aware) order. Row `r` of a batch sharded over
    `('data', 'fsdp')` then belongs to process `r // (rows / n)`, so a process's rows, and
    GRPO's groups, stay contiguous for any batch that divides the mesh. `process_of` maps a device
    to its process (a parameter for tests).
    """
    by_process: dict[int, list] = {}
    for device in devices:
        by_process.setdefault(process_of(device), []).append(device)
    count = len(by_process)
    data_hosts = math.gcd(sizes[0], count)
    fsdp_hosts = count // data_hosts
    local = (sizes[0] // data_hosts, sizes[1] // fsdp_hosts if sizes[1] % fsdp_hosts == 0 else 0, sizes[2])
    per_process = {len(v) for v in by_process.values()}
    if local[1] == 0 or per_process != {int(np.prod(local))}:
        raise ShardingError(f"mesh sizes {dict(zip(AXES, sizes))} cannot give each of the {count} processes "
                            f"({sorted(per_process)} devices each) one block of the batch axes: make mesh.data * "
                            f"mesh.fsdp a multiple of {count} and mesh.tensor at most the devices of one process")
    grid = np.empty(sizes, dtype=object)
    for index, process in enumerate(sorted(by_process)):
        own = sorted(by_process[process], key=lambda d: getattr(d, "id", 0))
        try:  # the ICI-aware order within the host (real TPU devices)
            block = mesh_utils.create_device_mesh(local, own, allow_split_physical_axes=True)
        except Exception:  # noqa: BLE001 (CPU or simulated devices: their id order)
            block = np.array(own, dtype=object).reshape(local)
        i, j = divmod(index, fsdp_hosts)
        grid[i * local[0]:(i + 1) * local[0], j * local[1]:(j + 1) * local[1], :] = block
    return grid


def constrain(x: jax.Array, *spec: Any) -> jax.Array:
    """Pins an activation's sharding (`lax.with_sharding_constraint`) to `spec` on the mesh in
    context (`jax.set_mesh` / `sharding.use_abstract_mesh`, as `training.programs` sets it); a
    no-op without one or without this project's axes. A mesh axis that does not divide its dim
    is left out (the dim replicated there), so every batch size still traces.

    Without it XLA carries the FSDP sharding of the parameters (over D) into the hidden states
    and keeps the batch whole on every device: `[B, L, F]` MLP buffers and `[B, L, V]` logits
    per chip instead of per batch shard.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(AXES) <= set(mesh.axis_names):
        return x
    dims = tuple(axis if axis is not None and size % _axis_size(mesh, axis) == 0 else None
                 for size, axis in zip(x.shape, spec + (None,) * (x.ndim - len(spec))))
    return jax.lax.with_sharding_constraint(x, P(*dims))


def describe(mesh: Mesh) -> str:
    """One line for start-up logs: backend, devices, processes and the mesh's axis sizes, e.g.
    `cpu: 8 devices (TFRT_CPU) in 1 process, mesh data=1 fsdp=8 tensor=1`."""
    devices = mesh.devices.flat[0]
    axes = " ".join(f"{name}={size}" for name, size in mesh.shape.items())
    return (f"{jax.default_backend()}: {mesh.devices.size} device(s) ({devices.device_kind}) in "
            f"{jax.process_count()} process(es), mesh {axes}")


def path_str(path: Sequence[Any]) -> str:
    """`('blocks', 0, 'q_proj', 'kernel')` or a jax key path -> `'blocks/0/q_proj/kernel'`."""
    parts = []
    for key in path:
        key = getattr(key, "key", getattr(key, "idx", getattr(key, "name", key)))
        parts.append(str(key))
    return "/".join(parts)


def _axis_size(mesh: Mesh, axis) -> int:
    names = axis if isinstance(axis, tuple) else (axis,)
    return int(np.prod([mesh.shape[n] for n in names]))


def check_divisible(name: str, shape: Sequence[int], spec: P, mesh: Mesh) -> None:
    """Raises `ShardingError` naming `name`, the dim and the mesh axis if `spec` does not fit."""
    for dim, (size, axis) in enumerate(zip(shape, spec)):
        if axis is not None and size % _axis_size(mesh, axis):
            raise ShardingError(
                f"{name}: dim {dim} of shape {tuple(shape)} has size {size}, which is not divisible by "
                f"mesh axis {axis!r} of size {_axis_size(mesh, axis)}")


def param_partition_spec(path: str, ndim: int) -> P:
    """The `PartitionSpec` of a parameter from `PARAM_RULES` (replicated if no rule matches)."""
    for pattern, spec in PARAM_RULES:
        if re.search(pattern, path):
            if len(spec) > ndim:
                break
            return P(*((None,) * (ndim - len(spec)) + tuple(spec)))
    return P()


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """`NamedSharding` pytree for a parameter (or `ShapeDtypeStruct`) pytree, divisibility checked."""
    def one(path, leaf):
        name = path_str(path)
        spec = param_partition_spec(name, len(leaf.shape))
        check_divisible(f"parameter {name}", leaf.shape, spec, mesh)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, params)


def batch_devices(mesh: Mesh) -> int:
    """How many ways the batch axes `('data', 'fsdp')` split a batch's rows."""
    return _axis_size(mesh, BATCH_AXES)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Rows over `('data', 'fsdp')`, other dims replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def check_batch(name: str, batch_size: int, mesh: Mesh) -> None:
    """Start-up check that `batch_size` rows split evenly over `('data', 'fsdp')`."""
    check_divisible(name, (batch_size,), P(BATCH_AXES), mesh)


def process_row_range(mesh: Mesh, rows: int) -> slice:
    """The rows of a `[rows, ...]` batch sharded by `batch_sharding(mesh)` that this process's
    devices hold, as one `slice`: the part of the batch this process feeds
    (`jax.make_array_from_process_local_data`). Raises `ShardingError` when they are not one
    range (a mesh that interleaves processes' rows)."""
    spans = sorted({index[0].indices(rows)[:2]
                    for index in batch_sharding(mesh, 1).addressable_devices_indices_map((rows,)).values()})
    if any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
        raise ShardingError(f"process {jax.process_index()} holds rows {spans} of a {rows}-row batch: not one range")
    return slice(spans[0][0], spans[-1][1])


def check_groups_stay_whole(name: str, rows: int, group_size: int, mesh: Mesh,
                            process_of: Callable[[jax.Device], int] = lambda device: device.process_index) -> None:
    """Start-up check that every group of `group_size` consecutive rows of a process's batch stays
    consecutive in the global row order, which the group statistics of GRPO assume.

    A process's rows fill its devices' row blocks in the order of their global index. When a
    process's blocks form one range (single host; hosts in mesh order) any group stays whole;
    when the mesh interleaves processes, a group must not straddle two blocks, so each device
    must hold whole groups. `process_of` maps a device to its process (a parameter for tests).
    """
    blocks: dict[int, set[tuple[int, int]]] = {}
    for device, index in batch_sharding(mesh, 1).devices_indices_map((rows,)).items():
        start, stop, _ = index[0].indices(rows)
        blocks.setdefault(process_of(device), set()).add((start, stop))
    interleaved = [p for p, own in blocks.items()
                   if any(a[1] != b[0] for a, b in zip(sorted(own), sorted(own)[1:]))]
    per_device = rows // batch_devices(mesh)
    if interleaved and per_device % group_size:
        raise ShardingError(f"{name}: the mesh interleaves the rows of process(es) {sorted(interleaved)} with other "
                            f"processes' rows, so each device's {per_device} rows must be whole groups of "
                            f"{group_size}; change the batch or the mesh so that rows per device are a multiple of "
                            f"{group_size}")


# ------------------------------------------------------------------- rows across processes
# Each process holds its own rows of a batch (`process_row_range`); these helpers move rows
# between host numpy arrays and row-sharded global arrays.


def global_rows(local: np.ndarray, mesh: Mesh) -> jax.Array:
    """This process's rows `[B_local, ...]` as its part of a global array sharded by rows."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh, local.ndim), local)


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """`global_rows` of every entry of a dict of per-process rows."""
    return {k: global_rows(v, mesh) for k, v in local.items()}


def local_rows(tree: Any, mesh: Mesh) -> Any:
    """The rows of row-sharded global arrays that this process holds, as host numpy arrays."""
    def one(x):
        local = multihost_utils.global_array_to_host_local_array(x, mesh, P(BATCH_AXES, *([None] * (x.ndim - 1))))
        return np.asarray(local)

    return jax.tree.map(one, tree)


def all_rows(tree: Any, mesh: Mesh) -> Any:
    """Every process's host rows in global row order: leaves `[B_local, ...] -> [B, ...]`.

    Metrics that average over rows (rewards, accuracy, NFE) must see the whole batch, not only
    process 0's rows. The rows travel as raw bytes (`uint8 [B_local, row bytes]`) through a
    row-sharded global array that is then replicated, so float64 rewards, NaN and bools arrive
    bit for bit and in the rollout's row order: the means equal a single process's exactly.
    With one process the tree is returned unchanged.
    """
    if jax.process_count() == 1:
        return tree

    def one(x):
        x = np.ascontiguousarray(x)
        raw = x.reshape(x.shape[0], -1).view(np.uint8)
        full = multihost_utils.process_allgather(global_rows(raw, mesh), tiled=True)
        return np.ascontiguousarray(full).view(x.dtype).reshape((-1,) + x.shape[1:])

    return jax.tree.map(one, tree)


def check_same_on_all_processes(value: Any, what: str) -> None:
    """Raises if a JSON-able host value differs between processes (a no-op for one process).

    Orbax's `JsonSave` writes only process 0's copy and every process restores that copy, which is
    right only when all processes hold the same value (the grain iterator's state is a batch
    index, advanced in lockstep).
    """
    if jax.process_count() == 1:
        return
    digest = np.uint32(zlib.crc32(json.dumps(value, sort_keys=True).encode()))
    digests = multihost_utils.process_allgather(digest)
    if len(set(digests.tolist())) != 1:
        raise RuntimeError(f"{what} differs between processes ({value!r} on process {jax.process_index()}); "
                           f"a checkpoint holds one copy")
