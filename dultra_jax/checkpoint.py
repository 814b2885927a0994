"""Training checkpoints with Orbax: train state + data-iterator state + config, one step per dir.

Orbax writes each step into a temporary directory and renames it into place when complete, so a
crash or kill mid-save leaves the previous step as the latest good one. Saves are asynchronous
(the next training step overlaps the write); `keep` bounds how many steps stay on disk.
Restoring takes an abstract target whose leaves carry the shardings of *this* run's mesh, so a
checkpoint written on one mesh shape restores onto another.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from dultra_jax.errors import CheckpointError

log = logging.getLogger(__name__)


def make_workdir(workdir: str) -> str:
    """Creates a run's local working directory. A URL (`gs://...`) is refused by name: the
    metrics, TensorBoard and `os`-level checks would otherwise turn it into a local `gs:/` path,
    one per host. Mount the bucket (gcsfuse) and pass the mount point instead."""
    if "://" in workdir:
        raise CheckpointError(f"workdir {workdir} is a URL; give a local or mounted path (for a bucket, "
                              f"its gcsfuse mount point)")
    os.makedirs(workdir, exist_ok=True)
    return workdir


class Checkpointer:
    """`CheckpointManager` wrapper for items `state` (pytree), `data` and `config` (JSON)."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        if keep < 1:  # Orbax would delete each step as it lands
            raise CheckpointError(f"keep={keep} checkpoints: at least 1 is needed to resume")
        self.directory = os.path.abspath(make_workdir(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict | None, config: dict) -> None:
        """Starts saving `step` (returns before the write finishes when async)."""
        items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
        if data_state is not None:
            items["data"] = ocp.args.JsonSave(data_state)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        log.info("checkpoint: saving step %d to %s", step, self.directory)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict | None, dict]:
        """`(state, data_state, config)` of `step`; `abstract_state` leaves are
        `jax.ShapeDtypeStruct`s with the target shardings."""
        items = {"state": ocp.args.StandardRestore(abstract_state), "config": ocp.args.JsonRestore()}
        has_data = os.path.isdir(os.path.join(self.directory, str(step), "data"))
        if has_data:
            items["data"] = ocp.args.JsonRestore()
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except ValueError as e:  # Orbax's shape error names neither the array nor the checkpoint
            mismatch = self._shape_mismatch(step, abstract_state)
            if mismatch:
                raise CheckpointError(mismatch) from e
            raise
        return restored["state"], restored["data"] if has_data else None, restored["config"]

    def _shape_mismatch(self, step: int, abstract_state: Any) -> str | None:
        """A message naming the first array whose stored shape differs from `abstract_state`'s."""
        directory = os.path.join(self.directory, str(step), "state")
        stored = ocp.StandardCheckpointer().metadata(directory).item_metadata
        shapes = {_path_key(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_flatten_with_path(stored)[0]
                  if hasattr(leaf, "shape")}
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
            have = shapes.get(_path_key(path))
            if have is not None and have != tuple(leaf.shape):
                return (f"checkpoint {directory}: {'/'.join(_path_key(path))} is stored with shape {list(have)}, but "
                        f"this run's is {list(leaf.shape)} (a model setting differs from the run that wrote it)")
        return None

    def read_config(self, step: int) -> dict:
        """The config JSON saved with `step` (no arrays are read)."""
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _path_key(path) -> tuple[str, ...]:
    """A pytree path as names, the same for a restore target (attributes, named tuples) and
    Orbax's stored metadata (dicts)."""
    return tuple(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)


def config_changes(saved: dict, current: dict) -> list[str]:
    """`"key: saved -> current"` for every leaf that differs between two JSON config trees
    (dotted keys; `current` is compared as JSON stores it, so tuples equal lists)."""

    def diff(a: Any, b: Any, key: str) -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            return [change for k in sorted(set(a) | set(b), key=str)
                    for change in diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{key}.{k}" if key else str(k))]
        return [] if a == b else [f"{key}: {a!r} -> {b!r}"]

    return diff(saved, json.loads(json.dumps(current)), "")


def warn_config_changes(step: int, saved: dict, current: dict) -> None:
    """Logs a warning naming each setting of this run that differs from the checkpoint it resumes
    from (a changed `total_steps` also reshapes the learning-rate schedule from here on)."""
    changes = config_changes(saved, current)
    if changes:
        log.warning("resuming step %d with %d setting(s) changed since that checkpoint; the run continues with the "
                    "new values: %s", step, len(changes), "; ".join(changes))


def abstract_like(tree: Any) -> Any:
    """`ShapeDtypeStruct`s (with shardings) of a concrete pytree, as a restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def quiet_orbax_logs() -> None:
    """Orbax logs every file rename at INFO through absl: keep only its warnings (launchers)."""

    class _OrbaxWarningsOnly(logging.Filter):
        def filter(self, record):
            return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname

    logging.getLogger("absl").addFilter(_OrbaxWarningsOnly())
