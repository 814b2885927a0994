"""Multi-process start-up: `jax.distributed.initialize` from flags or the cluster environment.

One JAX process runs per host (TPU VM worker, GPU node, or, in tests, a CPU process with fake
devices). `initialize` must run before anything touches a JAX backend; afterwards `jax.devices()`
lists every process's devices, so `sharding.make_mesh()` builds the global mesh, and each process
feeds only its own rows (`grain` sharded by `jax.process_index()`).

When it initialises, in order:

1. Explicit arguments (the launchers' `--coordinator_address`, `--num_processes`,
   `--process_id`, optionally `--local_device_ids`): all three of the first must be given, and
   `num_processes == 1` is a plain single-process run (nothing to initialise).
2. `mode="auto"` (the default) and a multi-process cluster environment found in the
   environment variables that JAX's own cluster detection reads (`cluster_from_env`):
   multi-host Cloud TPU (`TPU_WORKER_HOSTNAMES` / `TPU_PROCESS_ADDRESSES` with more than one
   host, or `MEGASCALE_COORDINATOR_ADDRESS` for multislice), Slurm with `SLURM_NTASKS > 1`, or
   Open MPI (`OMPI_MCA_orte_hnp_uri`). Then `jax.distributed.initialize()` is called with no
   arguments and JAX fills everything in.
3. `mode="on"`: always `jax.distributed.initialize()` with JAX's detection, for environments
   whose settings live outside the process environment (a GCE TPU pod reads its worker list from
   the metadata server).

`mode="off"` never initialises. Anything else is a single process and nothing happens.

On CPU (tests, debugging), cross-process collectives go through gloo over TCP: JAX 0.10's default,
switched back on if it was switched off (`jax_cpu_collectives_implementation=None`), because
otherwise every cross-process computation fails at run time. Gloo connects a group of devices at
the group's first collective and gives up when a peer is more than 30 s late (XLA's fixed
`Gloo context initialization failed: ... GetKeyValue() timed out ... 30s`); once connected, a
group waits far longer (minutes). Processes drift apart by more than that: on CPU the persistent
compilation cache key includes the process's own topology fingerprint, so process 0 loads a
program from the cache in a second while process 1 compiles it for a minute (for the same
reason `jax_share_binary_between_hosts` deadlocks on CPU, so it stays off). Hence
`connect_cpu_collectives`: it runs one tiny collective per device group while the processes are
still in lockstep (right after start-up), and `initialize` and the trainer call it. TPU and GPU
interconnects have no such deadline; there it does nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import os
from typing import Mapping, Sequence

import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from dultra_jax.errors import DistributedError  # re-exported; errors.py holds every user error

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")


def cluster_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The multi-process environment the variables describe (`"tpu"`, `"slurm"`, `"openmpi"`), or None.

    Only environments with more than one process count: a single-host TPU VM or a one-task Slurm
    job is a single process and needs no coordinator.
    """
    environ = os.environ if environ is None else environ
    hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1 or environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    if "SLURM_JOB_ID" in environ and _int_or_zero(environ.get("SLURM_NTASKS")) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in environ:
        return "openmpi"
    return None


def _int_or_zero(value: str | None) -> int:
    try:
        return int(value) if value is not None else 0
    except ValueError:
        return 0


def check_flags(coordinator_address: str | None, num_processes: int | None, process_id: int | None,
                local_device_ids: Sequence[int] | None, mode: str = "auto") -> bool:
    """Validates the explicit settings; True when they ask for an explicit multi-process start.

    Raises:
      DistributedError naming the flag: a partial set of the three flags, `process_id` outside
      `[0, num_processes)`, a malformed `host:port`, negative or repeated local device ids, an
      unknown `mode`, or flags together with `mode="off"`.
    """
    if mode not in MODES:
        raise DistributedError(f"--distributed={mode!r} is not one of {', '.join(MODES)}")
    given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
             "--process_id": process_id}
    if all(v is None for v in given.values()):
        if local_device_ids is not None and mode == "off":
            raise DistributedError("--local_device_ids needs a multi-process run, but --distributed=off")
        return False
    if mode == "off":
        named = ", ".join(k for k, v in given.items() if v is not None)
        raise DistributedError(f"{named} given with --distributed=off")
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise DistributedError(f"a multi-process run needs --coordinator_address, --num_processes and --process_id "
                               f"together; missing {', '.join(missing)}")
    if num_processes < 1:
        raise DistributedError(f"--num_processes={num_processes} must be >= 1")
    if not 0 <= process_id < num_processes:
        raise DistributedError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(f"--coordinator_address={coordinator_address!r} must be host:port "
                               f"(the address of process 0 and a free port)")
    if local_device_ids is not None:
        ids = list(local_device_ids)
        if not ids or any(int(i) < 0 for i in ids) or len(set(ids)) != len(ids):
            raise DistributedError(f"--local_device_ids={','.join(map(str, ids))} must be distinct non-negative ids")
    return num_processes > 1


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | None = None,
               mode: str = "auto", environ: Mapping[str, str] | None = None) -> bool:
    """Joins this process to a multi-process JAX run when asked (module doc); call it first.

    Args:
      coordinator_address: `host:port` of process 0's coordinator service (every process passes
        the same); num_processes: how many processes; process_id: this one's index in
        `[0, num_processes)`. Give all three or none.
      local_device_ids: restricts this process to these local devices (e.g. one GPU per process).
      mode: `"auto"` (flags or a detected cluster), `"on"` (always, JAX detects the cluster) or
        `"off"` (never).
      environ: the environment to inspect (default `os.environ`); a parameter for tests.

    Returns:
      True when `jax.distributed` was initialised by this call or before, else False.
    """
    explicit = check_flags(coordinator_address, num_processes, process_id, local_device_ids, mode)
    if jax.distributed.is_initialized():
        log.info("jax.distributed is already initialised (process %d of %d)", jax.process_index(),
                 jax.process_count())
        return True
    if explicit:
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
        source = f"flags (coordinator {coordinator_address})"
    elif num_processes == 1 or mode == "off":
        return False
    elif mode == "on":
        kwargs, source = {}, "JAX's cluster detection"
    elif (cluster := cluster_from_env(environ)) is not None:
        kwargs, source = {}, f"the {cluster} environment"
    else:
        if local_device_ids is not None:
            raise DistributedError("--local_device_ids needs a multi-process run: give --coordinator_address, "
                                   "--num_processes and --process_id, or --distributed=on in a cluster")
        return False
    if local_device_ids is not None:
        kwargs["local_device_ids"] = [int(i) for i in local_device_ids]
    _enable_cpu_collectives()
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed initialised from %s: process %d of %d, %d local / %d global devices", source,
             jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
    connect_cpu_collectives()
    return True


@dataclasses.dataclass(frozen=True)
class LauncherFlags:
    """The multi-process flags of a launcher (`define_launcher_flags`)."""

    coordinator_address: flags.FlagHolder
    num_processes: flags.FlagHolder
    process_id: flags.FlagHolder
    local_device_ids: flags.FlagHolder
    mode: flags.FlagHolder


def define_launcher_flags() -> LauncherFlags:
    """Defines `--coordinator_address`, `--num_processes`, `--process_id`, `--local_device_ids` and
    `--distributed` (absl flags, once per program: the launchers call it at import)."""
    return LauncherFlags(
        coordinator_address=flags.DEFINE_string(
            "coordinator_address", None,
            "Multi-process: host:port of process 0's coordinator (same on every process)."),
        num_processes=flags.DEFINE_integer("num_processes", None, "Multi-process: the number of processes."),
        process_id=flags.DEFINE_integer("process_id", None,
                                        "Multi-process: this process's index in [0, num_processes)."),
        local_device_ids=flags.DEFINE_list("local_device_ids", None,
                                           "Multi-process: the local devices this process uses (default all)."),
        mode=flags.DEFINE_enum("distributed", "auto", MODES,
                               "auto: initialise jax.distributed from the flags above or a detected multi-host "
                               "TPU/Slurm/Open MPI environment; on: always (JAX detects the cluster); off: never."))


def initialize_from_flags(launcher_flags: LauncherFlags) -> bool:
    """`initialize` with a launcher's parsed flags; call it before anything touches a JAX backend."""
    local_ids = launcher_flags.local_device_ids.value
    if local_ids is not None and not all(i.strip().isdigit() for i in local_ids):
        raise DistributedError(f"--local_device_ids={','.join(local_ids)} must be integers")
    return initialize(launcher_flags.coordinator_address.value, launcher_flags.num_processes.value,
                      launcher_flags.process_id.value, None if local_ids is None else [int(i) for i in local_ids],
                      mode=launcher_flags.mode.value)


def _enable_cpu_collectives() -> None:
    """Cross-process collectives on CPU go through gloo (TCP) unless another implementation was chosen.

    The CPU client reads this setting when it is created, i.e. after `initialize`, so it has to be
    set before the first backend use. It does nothing for TPU/GPU backends.
    """
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        log.info("CPU collectives: gloo")


def connect_cpu_collectives(mesh: Mesh | None = None) -> None:
    """Connects gloo's device groups now, while the processes are in lockstep (module doc).

    Runs `multihost_utils.sync_global_devices` (its per-local-device process groups are those of
    every `multihost_utils` barrier, broadcast and host-local gather, which Orbax uses) and one
    `psum` over every combination of `mesh`'s axes (default: one axis over all devices), which
    covers the groups of the collectives XLA emits for arrays sharded on that mesh. A no-op for
    one process or a non-CPU backend. All processes must call it at the same point.
    """
    if jax.process_count() == 1 or jax.default_backend() != "cpu":
        return
    multihost_utils.sync_global_devices("dultra_jax.distributed.connect")
    if mesh is None:
        mesh = jax.make_mesh((jax.device_count(),), ("devices",), axis_types=(AxisType.Auto,))
    names = [name for name in mesh.axis_names if mesh.shape[name] > 1]
    for count in range(len(names), 0, -1):
        for axes in itertools.combinations(names, count):
            size = math.prod(mesh.shape[name] for name in axes)
            ones = jax.make_array_from_callback((size,), NamedSharding(mesh, P(axes)),
                                                lambda index, n=size: np.ones((n,), np.int32)[index])
            psum = jax.shard_map(functools.partial(jax.lax.psum, axis_name=axes), mesh=mesh, in_specs=P(axes),
                                 out_specs=P())
            total = int(np.asarray(jax.jit(psum)(ones))[0])
            if total != size:
                raise RuntimeError(f"a psum over mesh axes {axes} ({size} devices) gave {total}: "
                                   "CPU collectives are broken")
    log.info("CPU collectives connected for mesh %s", dict(mesh.shape))
