"""Train state, optimiser, parameter groups and the GRPO update step.

The update replays every recorded denoising step with gradients. It takes `value_and_grad` of
one step's loss *inside* a `lax.fori_loop` over the steps and accumulates float32 gradients, so
peak memory is that of one forward + backward whatever the number of steps, and steps beyond
the batch's largest NFE are never computed.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from dultra_jax.config import DecodeConfig, ModelConfig, OptimConfig, RLConfig
from dultra_jax.decoding.rollout import Trajectory
from dultra_jax.models.policy import Params
from dultra_jax.rl.grpo import clipped_step_loss
from dultra_jax.rl.logprob import replay_step_logp

PLANNER_KEY = "planner"


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


def partition_params(params: Params, train: str) -> tuple[Params, Params]:
    """Splits parameters into `(trainable, frozen)` by group: "all", "planner" or "backbone"."""
    planner = {k: v for k, v in params.items() if k == PLANNER_KEY}
    backbone = {k: v for k, v in params.items() if k != PLANNER_KEY}
    if train == "all":
        return dict(params), {}
    if train == "planner":
        if not planner:
            raise ValueError("optim.train='planner' but the model has no planner head")
        return planner, backbone
    return backbone, planner


def merge_params(trainable: Params, frozen: Params) -> Params:
    return {**frozen, **trainable}


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
    steps = [optax.clip_by_global_norm(optim.grad_clip),
             optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                         weight_decay=optim.weight_decay, mask=lambda tree: jax.tree.map(lambda x: x.ndim > 1, tree))]
    if optim.backbone_lr_scale != 1.0:  # AdamW's step is linear in the rate: scaling it scales the rate
        backbone = lambda tree: {k: jax.tree.map(lambda _: k != PLANNER_KEY, v) for k, v in tree.items()}  # noqa: E731
        steps.append(optax.masked(optax.scale(optim.backbone_lr_scale), backbone))
    return optax.chain(*steps)


def create_train_state(params: Params, tx: optax.GradientTransformation, optim: OptimConfig, rl: RLConfig,
                       rng: jax.Array) -> TrainState:
    """A fresh state; jit it to keep the parameters' shardings for the optimiser state."""
    trainable, frozen = partition_params(params, optim.train)
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                      opt_state=tx.init(trainable), rng=jax.random.key_data(rng),
                      reference=params if rl.beta > 0 else None)


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


def grpo_update(state: TrainState, trajectory: Trajectory, advantages: jax.Array, *, model: ModelConfig,
                decode: DecodeConfig, rl: RLConfig, tx: optax.GradientTransformation):
    """One optimiser update from a batch of trajectories.

    Args:
      trajectory: `B` rows from the rollout (its `step_logps` are the "old" log-probs when
        `rl.num_iterations > 1`, and the reference for the `logp_gap` metric).
      advantages: `[B]` float32.
    Returns:
      `(new_state, metrics)`: scalars `loss`, `grad_norm`, `clip_fraction`, `logp_gap` (max
      |rollout - replayed| step log-prob), `skipped` (non-finite loss or gradient: no update).
    """
    rows, gen_length = trajectory.tokens.shape
    denominator = float(rows * gen_length)  # the reference divides by rows and by Lg

    def step_loss(trainable, k, ref_logp):
        logp = replay_step_logp(merge_params(trainable, state.frozen), trajectory, k, model, decode)
        old = jax.lax.stop_gradient(logp) if rl.num_iterations == 1 else trajectory.step_logps[:, k]
        taken = k < trajectory.num_steps
        loss, clipped = clipped_step_loss(logp, old, advantages, taken, rl, ref_logp)
        return jnp.sum(loss) / denominator, (logp, clipped, taken)

    def body(k, carry):
        grads, loss_sum, clipped_count, gap = carry
        ref_logp = None
        if state.reference is not None:
            ref_logp = replay_step_logp(state.reference, trajectory, k, model, decode)
        (loss, (logp, clipped, taken)), step_grads = jax.value_and_grad(step_loss, has_aux=True)(
            state.trainable, k, ref_logp)
        grads = jax.tree.map(lambda total, g: total + g.astype(jnp.float32), grads, step_grads)
        step_gap = jnp.max(jnp.where(taken, jnp.abs(logp - trajectory.step_logps[:, k]), 0.0))
        return grads, loss_sum + loss, clipped_count + jnp.sum(clipped), jnp.maximum(gap, step_gap)

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.trainable)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32))
    grads, loss, clipped_count, gap = jax.lax.fori_loop(0, jnp.max(trajectory.num_steps), body, init)

    new_state, grad_norm, finite = apply_update(state, grads, loss, tx)
    metrics = {"loss": loss, "grad_norm": grad_norm, "logp_gap": gap, "skipped": ~finite,
               "clip_fraction": clipped_count / jnp.maximum(jnp.sum(trajectory.num_steps), 1)}
    return new_state, metrics
