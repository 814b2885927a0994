"""The one builder of a run's programs: from a model config, an optimiser config and a mesh, the
train state's shardings and every jitted program a trainer executes, each also lowerable from
abstract shapes (`jax.ShapeDtypeStruct`s with shardings, no weights loaded).

    state = state_programs(model, mesh, optim, total_steps=..., seed=...)   # tx, shardings, init
    grpo = grpo_programs(state, decode, rl)      # rollout, exact old log-probs, the GRPO update
    update = batch_update(step_fn, state)        # an SFT / planner-init step (`(state, batch)`)
    lowered = grpo.lower(rows)                   # {program name: jax.stages.Lowered}

The trainers (`training.loop.setup`, `training.grpo`, `training.sft`), the benchmarks and the
ahead-of-time compile check (`training.compile_check`) all build their programs here, so what a
compile check measures is what training runs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dultra_jax.config import ConfigError, DecodeConfig, GRPOConfig, MeshConfig, ModelConfig, OptimConfig, RLConfig
from dultra_jax.decoding import rules
from dultra_jax.decoding.rollout import Trajectory, rollout, rollout_jit
from dultra_jax.models import policy
from dultra_jax.rl.grpo import exact_old_logps, grpo_gradients, old_logps_need_replay
from dultra_jax.sharding import batch_sharding, mesh_sizes, param_shardings
from dultra_jax.training.state import TrainState, apply_update, create_state, make_optimizer, state_shardings


def with_shardings(shapes: Any, shardings: Any) -> Any:
    """`ShapeDtypeStruct`s of `shapes` (arrays or structs) carrying the matching `shardings`."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def on_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """`fn` traced with `mesh` as the context mesh, so the models' activation constraints
    (`sharding.constrain`) apply whoever calls the jitted program."""
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return traced


def abstract_params(model: ModelConfig, mesh: Mesh) -> policy.Params:
    """The parameters as sharded `ShapeDtypeStruct`s (the parameter rules of `sharding.py`)."""
    shapes = policy.abstract_params(model)
    return with_shardings(shapes, param_shardings(shapes, mesh))


def abstract_rows(mesh: Mesh, shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
    """A `[rows, ...]` batch array as a `ShapeDtypeStruct` with rows over `('data', 'fsdp')`."""
    return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=batch_sharding(mesh, len(shape)))


# ------------------------------------------------------------------------------ the train state


@dataclasses.dataclass(frozen=True)
class StatePrograms:
    """The optimiser and the train state of a run.

    Attributes:
      mesh, model: the device mesh and the model's static config.
      tx: the optimiser; shardings: a `TrainState` of `NamedSharding`s (parameters and moments
        by the parameter rules, counters and the rng replicated).
      abstract: the train state as sharded `ShapeDtypeStruct`s (what the programs are lowered on).
      init: `params -> TrainState`, jitted to create the state directly in `shardings`.
    """

    mesh: Mesh
    model: ModelConfig
    tx: optax.GradientTransformation
    shardings: TrainState
    abstract: TrainState
    init: Callable[[policy.Params], TrainState]


def state_programs(model: ModelConfig, mesh: Mesh, optim: OptimConfig, *, total_steps: int, seed: int,
                   updates_per_step: int = 1, keep_reference: bool = False,
                   params_shape: policy.Params | None = None) -> StatePrograms:
    """The optimiser (`state.make_optimizer`) and the state's shardings, from shapes only.

    Args:
      updates_per_step: optimiser updates per training step (the schedule counts steps).
      keep_reference: keep the initial parameters in the state as the frozen KL reference.
      params_shape: the parameters' shapes when they differ from `policy.abstract_params(model)`
        (arrays or structs; only shapes and dtypes are read).
    """
    tx = make_optimizer(optim, total_steps, updates_per_step=updates_per_step)
    make_state = functools.partial(create_state, tx=tx, train=optim.train, seed=seed, keep_reference=keep_reference)
    shapes = policy.abstract_params(model) if params_shape is None else params_shape
    abstract = jax.eval_shape(make_state, shapes)
    shardings = state_shardings(abstract, tx, mesh)
    return StatePrograms(mesh=mesh, model=model, tx=tx, shardings=shardings,
                         abstract=with_shardings(abstract, shardings),
                         init=jax.jit(make_state, out_shardings=shardings))


def batch_update(update: Callable[[TrainState, Any], tuple[TrainState, dict]], state: StatePrograms) -> Callable:
    """An SFT-style step `update(state, batch) -> (state, metrics)` jitted with the state's
    shardings, the batch's rows over `('data', 'fsdp')` (leaves `[B, ...]` of any rank >= 1: chat
    rows carry `prompt_length [B]`), the state donated."""
    return jax.jit(on_mesh(update, state.mesh), in_shardings=(state.shardings, batch_sharding(state.mesh, 1)),
                   out_shardings=(state.shardings, None), donate_argnums=(0,))


def lower_batch_update(jitted: Callable, state: StatePrograms, batch_shapes: dict[str, tuple[tuple[int, ...], Any]]):
    """`jitted.lower` on the abstract state and a batch `{name: (shape, dtype)}` of rows."""
    batch = {k: abstract_rows(state.mesh, shape, dtype) for k, (shape, dtype) in batch_shapes.items()}
    return jitted.lower(state.abstract, batch)


# ------------------------------------------------------------------------------------ GRPO

PER_DEVICE = -1  # `data.prompts_per_step`: one prompt (G rows) per device of the batch axes


def batch_width(mesh: MeshConfig, num_devices: int) -> int:
    """Devices along the batch axes (`data * fsdp`) of the mesh `mesh` builds on `num_devices`."""
    data, fsdp, _ = mesh_sizes(mesh.data, mesh.fsdp, mesh.tensor, num_devices)
    return data * fsdp


def resolve_prompts_per_step(cfg: GRPOConfig, num_devices: int) -> GRPOConfig:
    """`cfg` with `data.prompts_per_step = -1` resolved to one prompt per device of the batch
    axes (the reference runs one prompt of G rows per GPU), so one config runs on 1, 4, 8, 16 or
    more chips. A fixed value whose rows do not split over the batch axes is refused with the
    settings that would.
    """
    width = batch_width(cfg.mesh, num_devices)
    prompts, group = cfg.data.prompts_per_step, cfg.rl.group_size
    if prompts == PER_DEVICE:
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, prompts_per_step=width))
    if prompts >= 1 and (prompts * group) % width:
        step = width // math.gcd(group, width)
        raise ConfigError(
            f"batch rows = data.prompts_per_step ({prompts}) * rl.group_size ({group}) = {prompts * group} do not "
            f"split over the {width} devices of the mesh's batch axes (data x fsdp); set "
            f"--config.data.prompts_per_step=-1 (one prompt per device: {width} x {group} rows) or a multiple of {step}")
    return cfg



def grpo_update(state: TrainState, trajectory: Trajectory, advantages: jax.Array, *, model: ModelConfig,
                decode: DecodeConfig, rl: RLConfig, tx: optax.GradientTransformation):
    """One optimiser update from a batch of trajectories (`rl.grpo.grpo_gradients`).

    Returns `(new_state, metrics)`: scalars `loss`, `grad_norm`, `clip_fraction`, `logp_gap` (max
    |rollout - replayed| step log-prob), `skipped` (non-finite loss or gradient: no update).
    """
    grads, loss, metrics = grpo_gradients(state.trainable, state.frozen, state.reference, trajectory, advantages,
                                          model=model, decode=decode, rl=rl)
    new_state, grad_norm, finite = apply_update(state, grads, loss, tx)
    return new_state, {"loss": loss, "grad_norm": grad_norm, "skipped": ~finite, **metrics}


@dataclasses.dataclass(frozen=True)
class GRPOPrograms:
    """The programs of one GRPO step, in the order a step runs them.

    Attributes:
      state: the `StatePrograms` they share.
      decode, rl: the rollout's and the objective's configs.
      update: `(state, trajectory, advantages [B]) -> (state, metrics)`, state donated.
      old_logps: `(params, trajectory) -> (trajectory, gap)` (exact old log-probs before several
        updates on a cached rollout's batch) or None when the run does not need them.
    """

    state: StatePrograms
    decode: DecodeConfig
    rl: RLConfig
    update: Callable
    old_logps: Callable | None

    def rollout(self, params: policy.Params, prompt_tokens, prompt_valid, rng: jax.Array) -> Trajectory:
        """`decoding.rollout.rollout` (one jitted program) traced on the run's mesh."""
        with jax.set_mesh(self.state.mesh):
            return rollout(params, prompt_tokens, prompt_valid, rng, self.decode, self.state.model)

    def abstract_prompts(self, rows: int) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
        """`(prompt_tokens [B, Lp] int32, prompt_valid [B, Lp] bool)` as the rollout takes them."""
        shape = (rows, self.decode.prompt_length)
        return abstract_rows(self.state.mesh, shape, jnp.int32), abstract_rows(self.state.mesh, shape, jnp.bool_)

    def _rollout_args(self, rows: int):
        params = self.state.abstract.params
        replicated = NamedSharding(self.state.mesh, P())
        key = jax.eval_shape(lambda: jax.random.key(0))
        knobs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x), sharding=replicated),
                             rules.Knobs.of(self.decode))
        return (params, *self.abstract_prompts(rows), jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated),
                knobs)

    def abstract_trajectory(self, rows: int) -> Trajectory:
        """The rollout's `Trajectory` for `rows` rows as `ShapeDtypeStruct`s, rows sharded."""
        static = dict(model=self.state.model, config=self.decode.without_knobs())
        with jax.set_mesh(self.state.mesh):
            shapes = jax.eval_shape(functools.partial(rollout_jit, **static), *self._rollout_args(rows))
        return jax.tree.map(lambda s: abstract_rows(self.state.mesh, s.shape, s.dtype), shapes)

    def lower_rollout(self, rows: int):
        """The rollout's one program for `rows` prompts, lowered on abstract inputs."""
        with jax.set_mesh(self.state.mesh):
            return rollout_jit.lower(*self._rollout_args(rows), model=self.state.model,
                                     config=self.decode.without_knobs())

    def lower(self, rows: int) -> dict[str, Any]:
        """Every program of a step with `rows` rows, lowered on abstract inputs:
        `{"rollout", "old_logps" (when needed), "grpo_update"}` -> `jax.stages.Lowered`."""
        lowered = {"rollout": self.lower_rollout(rows)}
        trajectory = self.abstract_trajectory(rows)
        if self.old_logps is not None:
            lowered["old_logps"] = self.old_logps.lower(self.state.abstract.params, trajectory)
        advantages = abstract_rows(self.state.mesh, (rows,), jnp.float32)
        lowered["grpo_update"] = self.update.lower(self.state.abstract, trajectory, advantages)
        return lowered


def grpo_programs(state: StatePrograms, decode: DecodeConfig, rl: RLConfig) -> GRPOPrograms:
    """The GRPO step's programs on `state`'s mesh and optimiser (the rollout itself is
    `decoding.rollout.rollout`'s one jitted program)."""
    model = state.model
    update = jax.jit(on_mesh(functools.partial(grpo_update, model=model, decode=decode, rl=rl, tx=state.tx),
                             state.mesh), out_shardings=(state.shardings, None), donate_argnums=(0,))
    old_logps = (jax.jit(on_mesh(functools.partial(exact_old_logps, model=model, config=decode), state.mesh))
                 if old_logps_need_replay(decode, rl.num_iterations) else None)
    return GRPOPrograms(state=state, decode=decode, rl=rl, update=update, old_logps=old_logps)
