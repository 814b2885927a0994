"""The one training scaffold: every trainer (GRPO, masked-diffusion SFT, planner initialisation)
is a step function plus its data, run by `setup` and `train_loop`.

    run = setup(config, workdir, model_section=..., mesh=..., optim=..., total_steps=..., seed=...)
    ...  # the trainer's data and its jitted step (run.model, run.mesh, run.tx, run.shardings)
    state, history = train_loop(run, step_fn, total_steps=..., checkpoint=..., log_every=..., name=...)

`setup` is the shared preamble: the workdir, the mesh and the CPU collectives, the model, the
optimiser, and the initial train state created sharded (`eval_shape` -> shardings -> `jit`).
`train_loop` owns what happens around the steps: resume from the latest checkpoint (the trained
group, the optimiser state, the step, the rng and the data iterator), logging of window means to
`metrics.jsonl` / TensorBoard and a progress line, periodic evaluation, checkpoints every
`checkpoint.every` steps and at the end, and closing the writers on the way out.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Callable, Mapping, Protocol

import jax
import ml_collections
import optax
from jax.sharding import Mesh

from dultra_jax import checkpoint as ckpt_lib
from dultra_jax import distributed
from dultra_jax.config import CheckpointConfig, MeshConfig, ModelConfig, OptimConfig, model_config_to_dict
from dultra_jax.metrics import MetricsWriter, mean_metrics
from dultra_jax.interop.build import build_model
from dultra_jax.sharding import check_same_on_all_processes, describe, make_mesh
from dultra_jax.training.programs import StatePrograms, state_programs
from dultra_jax.training.state import TrainState, checkpointed

log = logging.getLogger(__name__)

StepFn = Callable[[TrainState, int], tuple[TrainState, Mapping[str, Any]]]


class DataState(Protocol):
    """A data source whose position is checkpointed (a grain iterator's state)."""

    def get_state(self) -> dict: ...

    def set_state(self, state: dict | None) -> None: ...


@dataclasses.dataclass(frozen=True)
class Run:
    """What `setup` prepared.

    Attributes:
      workdir: the run directory; mesh: the device mesh; model: the model's static config.
      tx: the optimiser; state: the initial train state, sharded; shardings: the state's shardings
        (for the trainer's jitted step); config_json: what each checkpoint saves beside the state.
      programs: the state's programs (`training.programs`), which the trainer's programs build on.
    """

    workdir: str
    mesh: Mesh
    model: ModelConfig
    tx: optax.GradientTransformation
    state: TrainState
    shardings: TrainState
    config_json: dict
    programs: StatePrograms


def setup(config: ml_collections.ConfigDict, workdir: str, *, model_section: Mapping[str, Any], mesh: MeshConfig,
          optim: OptimConfig, total_steps: int, seed: int, updates_per_step: int = 1, keep_reference: bool = False,
          check_mesh: Callable[[Mesh], None] | None = None) -> Run:
    """The preamble every trainer shares.

    Args:
      config: the run's whole config, saved with every checkpoint (a resume warns about changes).
      model_section: the `model` section (`interop.build.build_model`).
      updates_per_step: optimiser updates per training step (the schedule counts steps).
      keep_reference: keep the initial parameters in the state as the frozen KL reference.
      check_mesh: start-up checks of batch sizes against the mesh, before the model is built.
    """
    ckpt_lib.make_workdir(workdir)
    device_mesh = make_mesh(**dataclasses.asdict(mesh))
    distributed.connect_cpu_collectives(device_mesh)  # multi-process CPU only: before the processes drift apart
    log.info("%s", describe(device_mesh))
    if check_mesh is not None:
        check_mesh(device_mesh)
    params, model = build_model(model_section, mesh=device_mesh, seed=seed)
    programs = state_programs(model, device_mesh, optim, total_steps=total_steps, seed=seed,
                              updates_per_step=updates_per_step, keep_reference=keep_reference, params_shape=params)
    state = programs.init(params)
    config_json = {"config": config.to_dict(), "model": model_config_to_dict(model)}
    return Run(workdir, device_mesh, model, programs.tx, state, programs.shardings, config_json, programs)


def itstime(step: int, every: int, total_steps: int | None = None) -> bool:
    """Whether periodic work is due after `step` steps: every `every` (0: never), and at the end
    when `total_steps` is given."""
    return (every > 0 and step % every == 0) or step == total_steps


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def progress_line(name: str, step: int, total_steps: int, row: Mapping[str, Any], keys: tuple[str, ...],
                  seconds_per_step: float, includes_compile: bool) -> str:
    """`name step 20/200: loss 0.12 reward_mean 0.51 ... | 1.03 s/step, ETA 3m05s`, with the
    metrics named as in `metrics.jsonl`; the first window's time is marked as including
    compilation."""
    metrics = " ".join(f"{k} {row[k]:.4g}" for k in keys if k in row)
    timing = f"{seconds_per_step:.2f} s/step" + (" (incl. compilation)" if includes_compile else "")
    if step < total_steps and not includes_compile:
        timing += f", ETA {_duration(seconds_per_step * (total_steps - step))}"
    return f"{name} step {step}/{total_steps}: {metrics} | {timing}"


BEST_DIR = "best"          # in a workdir: the checkpoint(s) of the best evaluation so far
BEST_FILE = "best.json"    # ... and which step it is: {"step", "metric", "value", "checkpoint"}


def read_best(workdir: str) -> dict | None:
    """`WORKDIR/best.json` (None when no evaluation has been kept)."""
    path = os.path.join(workdir, BEST_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _keep_best(run: Run, state: TrainState, step: int, metric: str, value: float) -> None:
    """Saves `state` under `WORKDIR/best/` (the two latest bests are kept, so the step that
    `best.json` names always exists, also after a kill between the two writes), then names it."""
    keeper = ckpt_lib.Checkpointer(os.path.join(run.workdir, BEST_DIR), keep=2, async_save=False)
    try:
        keeper.save(step, checkpointed(state), None, run.config_json)
    finally:
        keeper.close()
    if jax.process_index() == 0:
        path = os.path.join(run.workdir, BEST_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump({"step": step, "metric": metric, "value": value,
                       "checkpoint": os.path.join(BEST_DIR, str(step))}, f, indent=2)
        os.replace(path + ".tmp", path)


def train_loop(run: Run, step_fn: StepFn, *, total_steps: int, checkpoint: CheckpointConfig, name: str,
               log_every: int = 1, progress_keys: tuple[str, ...] = ("loss",), data: DataState | None = None,
               evaluate: Callable[[TrainState, int], dict[str, float]] | None = None,
               evaluate_every: int = 0, keep_best: str | None = None) -> tuple[TrainState, list[dict]]:
    """Runs (or resumes) `step_fn` from the latest checkpoint of `run.workdir` to `total_steps`.

    Args:
      step_fn: `(state, step) -> (state, metrics)`: one training step; `metrics` are scalars
        (device or host) including `loss` and `skipped` (a non-finite update).
      log_every: metrics are the means over this many steps (`metrics.mean_metrics`), logged
        with `step_time_s` (seconds per step over the window).
      progress_keys: the metrics the progress line shows.
      data: a data source whose state is checkpointed and restored (None: the data is a pure
        function of the step).
      evaluate: `(state, step) -> scalars` joined to the logged row every `evaluate_every` steps
        (a multiple of `log_every`; not after the last step, which the trainer evaluates itself,
        unless `keep_best` is set).
      keep_best: a key of the evaluation's scalars; the state with its highest value so far is
        saved under `WORKDIR/best/` and named in `WORKDIR/best.json` (read back on resume).
    Returns:
      `(final state, this run's logged rows)`.
    """
    state = run.state
    checkpointer = ckpt_lib.Checkpointer(os.path.join(run.workdir, "checkpoints"), keep=checkpoint.keep,
                                         async_save=checkpoint.async_save)
    start = checkpointer.latest_step() or 0
    if start:
        ckpt_lib.warn_config_changes(start, checkpointer.read_config(start), run.config_json)  # before a shape error
        restored, data_state, _ = checkpointer.restore(start, ckpt_lib.abstract_like(checkpointed(state)))
        state = restored.replace(frozen=state.frozen, reference=state.reference)
        if data is not None:
            data.set_state(data_state)
        log.info("%s: resumed from step %d in %s", name, start, checkpointer.directory)
    best = read_best(run.workdir) if keep_best is not None else None
    best_value = best["value"] if best is not None and best["step"] <= start else -math.inf
    writer = MetricsWriter(run.workdir, start)
    history, pending = [], []
    last = time.perf_counter()
    compiled = False
    try:
        for step in range(start, total_steps):
            state, metrics = step_fn(state, step)
            pending.append(metrics)
            done = step + 1
            if itstime(done, log_every, total_steps):
                row = {"step": done, **mean_metrics(pending)}  # waits for the window's steps
                now = time.perf_counter()
                row["step_time_s"] = (now - last) / len(pending)
                pending = []
                if (evaluate is not None and itstime(done, evaluate_every)
                        and (done != total_steps or keep_best is not None)):
                    row.update(evaluate(state, done))
                    if keep_best is not None and row[keep_best] > best_value:
                        best_value = row[keep_best]
                        _keep_best(run, state, done, keep_best, best_value)
                        log.info("%s: step %d is the best so far (%s %.4g), kept in %s", name, done, keep_best,
                                 best_value, os.path.join(run.workdir, BEST_DIR))
                writer.write(row)
                history.append(row)
                log.log(logging.INFO if writer.enabled else logging.DEBUG,  # results: process 0 only
                        "%s", progress_line(name, done, total_steps, row, progress_keys, row["step_time_s"],
                                            includes_compile=not compiled))
                compiled = True
                if row["skipped"]:
                    log.warning("%s: %d update(s) skipped for a non-finite loss or gradient", name, row["skipped"])
                last = time.perf_counter()
            if itstime(done, checkpoint.every, total_steps):
                if bool(jax.device_get(metrics["skipped"])):
                    log.warning("%s: step %d not checkpointed after a skipped update", name, done)
                    continue
                data_state = data.get_state() if data is not None else None
                check_same_on_all_processes(data_state, "the data iterator state")
                checkpointer.save(done, checkpointed(state), data_state, run.config_json)
    finally:
        checkpointer.close()
        writer.close()
    return state, history
