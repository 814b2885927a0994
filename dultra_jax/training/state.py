"""Train state, parameter groups, optimiser, the state's shardings and the optimiser step that
every trainer shares (`apply_update`, `apply_gradients`)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dultra_jax.config import OptimConfig
from dultra_jax.models.policy import PLANNER_KEY, Params, merge_params, partition_params
from dultra_jax.sharding import param_shardings



@struct.dataclass
class TrainState:
    """Everything the update changes, as one pytree (checkpointed whole).

    Attributes:
      step: scalar int32 updates applied so far (skipped non-finite updates included).
      trainable: the parameter group being trained; `frozen` the rest (no optimiser state).
      opt_state: optax state of `trainable` only.
      rng: `uint32[2]` raw PRNG key data (rollout sampling), advanced once per step.
      reference: frozen initial policy for the KL term, or None when `rl.beta == 0`.
    """

    step: jax.Array
    trainable: Params
    frozen: Params
    opt_state: Any
    rng: jax.Array
    reference: Params | None = None

    @property
    def params(self) -> Params:
        return merge_params(self.trainable, self.frozen)


def learning_rate_schedule(optim: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0, then constant, cosine or linear decay to `min_learning_rate`."""
    warmup = optim.warmup_steps
    decay_steps = max(total_steps - warmup, 1)
    main = {
        "constant": optax.constant_schedule(optim.learning_rate),
        "cosine": optax.cosine_decay_schedule(optim.learning_rate, decay_steps,
                                              alpha=optim.min_learning_rate / optim.learning_rate),
        "linear": optax.linear_schedule(optim.learning_rate, optim.min_learning_rate, decay_steps),
    }[optim.schedule]
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, optim.learning_rate, warmup), main], [warmup])


def make_optimizer(optim: OptimConfig, total_steps: int, updates_per_step: int = 1) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW; norms and biases (1-D leaves) get no weight decay.

    The schedule counts training steps (`total_steps`, `optim.warmup_steps`); with
    `updates_per_step` > 1 (GRPO's `rl.num_iterations`) each of a step's updates uses that step's
    rate, where optax's own count would run the schedule that many times too fast.
    """
    per_step = learning_rate_schedule(optim, total_steps)
    schedule = per_step if updates_per_step == 1 else (lambda count: per_step(count // updates_per_step))
    adamw = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                        weight_decay=optim.weight_decay, mask=lambda tree: jax.tree.map(lambda x: x.ndim > 1, tree))
    if optim.moment_dtype is not None:
        adamw = stored_in(adamw, jnp.dtype(optim.moment_dtype))
    steps = [optax.clip_by_global_norm(optim.grad_clip), adamw]
    if optim.backbone_lr_scale != 1.0:  # AdamW's step is linear in the rate: scaling it scales the rate
        backbone = lambda tree: {k: jax.tree.map(lambda _: k != PLANNER_KEY, v) for k, v in tree.items()}  # noqa: E731
        steps.append(optax.masked(optax.scale(optim.backbone_lr_scale), backbone))
    return optax.chain(*steps)


def stored_in(inner: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
    """`inner` with its floating-point state (Adam's moments) stored in `dtype` between steps and
    computed in float32 within one: the memory of the state at `dtype`, the arithmetic unchanged
    but for the rounding of the stored moments."""
    def cast(tree, to):
        return jax.tree.map(lambda x: x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def init(params):
        return cast(inner.init(params), dtype)

    def update(updates, state, params=None):
        updates, state = inner.update(updates, cast(state, jnp.float32), params)
        return updates, cast(state, dtype)

    return optax.GradientTransformation(init, update)


def create_state(params: Params, tx: optax.GradientTransformation, train: str, seed: int,
                 keep_reference: bool = False) -> TrainState:
    """A fresh `TrainState` training the parameter group `train` ("all", "planner", "backbone"),
    with `params` as the frozen KL reference when `keep_reference`; jit it with
    `state_shardings` to place the optimiser moments like the parameters."""
    trainable, frozen = partition_params(params, train)
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                      opt_state=tx.init(trainable), rng=jax.random.key_data(jax.random.key(seed)),
                      reference=params if keep_reference else None)


def state_shardings(state: TrainState, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """Shardings of every state leaf: parameter rules for parameters and their optimiser
    moments, replicated for counters and the rng."""
    replicated = NamedSharding(mesh, P())
    trainable = param_shardings(state.trainable, mesh)
    opt_state = optax.tree_map_params(tx, lambda _, sharding: sharding, state.opt_state, trainable,
                                      transform_non_params=lambda _: replicated,
                                      is_leaf=lambda x: isinstance(x, NamedSharding))
    return TrainState(step=replicated, trainable=trainable, frozen=param_shardings(state.frozen, mesh),
                      opt_state=opt_state, rng=replicated,
                      reference=None if state.reference is None else param_shardings(state.reference, mesh))


def checkpointed(state: TrainState) -> TrainState:
    """What a checkpoint holds: the trained group, the optimiser state, the step and the rng.
    The frozen group and the KL reference are the run's initial parameters, rebuilt from the
    model source on resume (an 8B backbone is not rewritten with every planner checkpoint)."""
    return state.replace(frozen={}, reference=None)


def step_key(state: TrainState) -> jax.Array:
    """The step's random key: the run's key folded with the step, so a resumed run draws what an
    uninterrupted one would (rollout sampling, SFT corruption)."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def apply_update(state: TrainState, grads: Params, loss: jax.Array, tx: optax.GradientTransformation):
    """The optimiser step on `state.trainable`, skipped (state kept, step counted) when the loss or
    the gradient is not finite. Returns `(new_state, grad_norm, finite)`."""
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o).astype(o.dtype), new, old)  # noqa: E731
    new_state = state.replace(step=state.step + 1, trainable=keep(trainable, state.trainable),
                              opt_state=keep(opt_state, state.opt_state))
    return new_state, grad_norm, finite


def apply_gradients(state: TrainState, loss_fn: Callable[[Params], tuple[jax.Array, dict]],
                    tx: optax.GradientTransformation):
    """One optimiser step on `state.trainable` with `loss_fn(trainable) -> (loss, metrics)`.

    Returns `(new_state, metrics)` with `loss`, `grad_norm` and `skipped` added (see
    `apply_update`).
    """
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
    new_state, grad_norm, finite = apply_update(state, grads, loss, tx)
    return new_state, {"loss": loss, "grad_norm": grad_norm, "skipped": ~finite, **metrics}
