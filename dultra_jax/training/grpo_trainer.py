"""The GRPO training loop: data -> G rollouts per prompt -> rewards ->
advantages -> sharded update -> metrics -> Orbax checkpoint, resumable from the latest step.

`train(config, workdir)` is the whole job; `launch/train.py` only parses flags and calls it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import zlib
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from dultra_jax import checkpoint as ckpt_lib
from dultra_jax import distributed
from dultra_jax.config import (CheckpointConfig, ConfigError, DecodeConfig, MeshConfig, OptimConfig, RLConfig,
                               dataclass_from_dict, decode_config_from_dict, model_config_from_dict,
                               model_config_to_dict)
from dultra_jax.decoding.rollout import rollout
from dultra_jax.models import policy
from dultra_jax.models.build import build_model
from dultra_jax.rl.grpo import compute_advantages
from dultra_jax.rl.logprob import exact_old_logps, old_logps_need_replay
from dultra_jax.sharding import (BATCH_AXES, batch_sharding, check_batch, check_groups_stay_whole, make_mesh,
                                 param_shardings)
from dultra_jax.training.state import (TrainState, create_train_state, grpo_update, learning_rate_schedule,
                                       make_optimizer, merge_params, partition_params)

log = logging.getLogger(__name__)

TOP_LEVEL_KEYS = {"model", "decode", "rl", "optim", "data", "rewards", "mesh", "checkpoint", "total_steps", "seed",
                  "final_eval"}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The validated view of a training config."""

    model_section: dict
    decode: DecodeConfig
    rl: RLConfig
    optim: OptimConfig
    data: dict
    rewards: dict
    mesh: MeshConfig
    checkpoint: CheckpointConfig
    total_steps: int
    seed: int


def run_config(config: ml_collections.ConfigDict) -> RunConfig:
    """Validates a training `ConfigDict` at start-up; errors name the key."""
    unknown = set(config.keys()) - TOP_LEVEL_KEYS
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(TOP_LEVEL_KEYS))}")
    missing = {"model", "decode", "data", "total_steps"} - set(config.keys())
    if missing:
        raise ConfigError(f"config is missing {', '.join(sorted(missing))}")
    if config.total_steps < 0:
        raise ConfigError(f"total_steps={config.total_steps} must be >= 0")
    return RunConfig(
        model_section=config.model.to_dict(), decode=decode_config_from_dict(config.decode),
        rl=dataclass_from_dict(RLConfig, config.get("rl", {}), "rl."),
        optim=dataclass_from_dict(OptimConfig, config.get("optim", {}), "optim."),
        data=config.data.to_dict(), rewards=config.get("rewards", ml_collections.ConfigDict()).to_dict(),
        mesh=dataclass_from_dict(MeshConfig, config.get("mesh", {}), "mesh."),
        checkpoint=dataclass_from_dict(CheckpointConfig, config.get("checkpoint", {}), "checkpoint."),
        total_steps=int(config.total_steps),
        seed=int(config.get("seed", 0)))


def state_shardings(state: TrainState, tx: optax.GradientTransformation, mesh) -> TrainState:
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


class MetricsWriter:
    """`metrics.jsonl` (one object per step) and TensorBoard scalars; only process 0 writes."""

    def __init__(self, workdir: str, resume_step: int):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tensorboard = None
        if not self.enabled:
            return
        # Rows written after the checkpoint we resume from are replaced by the rerun of those steps.
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
            with open(self.path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(self.path + ".tmp", self.path)
        from tensorboardX import SummaryWriter
        self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(key, value, row["step"])
        self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def repeat_rows(batch: dict[str, np.ndarray], group_size: int) -> dict[str, np.ndarray]:
    """Each prompt's row G times in a row: `[P, ...] -> [P*G, ...]` (groups are consecutive)."""
    return {k: np.repeat(v, group_size, axis=0) for k, v in batch.items()}


def global_rows(local: np.ndarray, mesh) -> jax.Array:
    """This process's rows `[B_local, ...]` as its part of a global array sharded by rows."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh, local.ndim), local)


def local_rows(tree, mesh):
    """The rows of row-sharded global arrays that this process holds, as host numpy arrays."""
    def one(x):
        local = multihost_utils.global_array_to_host_local_array(x, mesh, P(BATCH_AXES, *([None] * (x.ndim - 1))))
        return np.asarray(local)

    return jax.tree.map(one, tree)


def rollout_key(state: TrainState) -> jax.Array:
    """The step's rollout key: the run's key folded with the step (restored with the state)."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def all_rows(tree, mesh):
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


def step_metrics(num_steps: np.ndarray, gen_length: int, total: np.ndarray, parts: dict[str, np.ndarray],
                 update: dict, accuracy_part: str | None) -> dict[str, Any]:
    """One metrics row from the whole batch (all processes' rows).

    Args:
      num_steps: `[B]` NFE of every row; gen_length: `Lg`; total: `[B]` rewards;
      parts: `{name: [B]}` reward components (NaN where a part does not apply);
      update: the (replicated) scalars of `grpo_update`; accuracy_part: the part whose positive
        value means correct, if any.
    """
    nfe = np.asarray(num_steps)
    row = {"loss": float(update["loss"]), "reward_mean": float(np.mean(total)),
           **{f"reward_{name}": float(np.nanmean(value)) for name, value in parts.items()},
           "nfe_mean": float(nfe.mean()), "tokens_per_forward": float(gen_length * len(nfe) / max(nfe.sum(), 1)),
           "clip_fraction": float(update["clip_fraction"]), "logp_gap": float(update["logp_gap"]),
           "grad_norm": float(update["grad_norm"]), "skipped": bool(update["skipped"])}
    if accuracy_part is not None and accuracy_part in parts:
        row["accuracy"] = float(np.mean(parts[accuracy_part] > 0))
    return row


def train(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
    """Runs (or resumes) GRPO training in `workdir`; returns this run's metric rows."""
    # Imported here: the data and reward stacks pull in tokenizers and math-verify.
    from dultra_jax.training.data_setup import TrainData

    run = run_config(config)
    ckpt_lib.make_workdir(workdir)
    mesh = make_mesh(**dataclasses.asdict(run.mesh))
    distributed.connect_cpu_collectives(mesh)  # multi-process CPU only: before the processes drift apart
    prompts_per_step = int(run.data.get("prompts_per_step", 1))
    if prompts_per_step < 1 or prompts_per_step % jax.process_count():
        raise ConfigError(f"data.prompts_per_step={prompts_per_step} must be a positive multiple of the "
                          f"{jax.process_count()} process(es): each process rolls out whole groups")
    rows = prompts_per_step * run.rl.group_size
    rows_name = f"batch rows = data.prompts_per_step ({prompts_per_step}) * rl.group_size ({run.rl.group_size})"
    check_batch(rows_name, rows, mesh)
    check_groups_stay_whole(rows_name, rows, run.rl.group_size, mesh)
    if config.get("final_eval"):  # at start-up, not after training
        from dultra_jax.training import final_eval
        final_eval.batch_rows(int(config.final_eval.get("batch_size", final_eval.BATCH_SIZE)), mesh)

    params, model = build_model(run.model_section, mesh=mesh, seed=run.seed)
    decode = run.decode
    decode.check_model(model)
    data = TrainData(run.data, run.rewards, model, decode, prompts_per_step, seed=run.seed,
                     model_path=run.model_section.get("path"))
    if config.get("final_eval"):
        final_plan = final_eval.check(config.final_eval.to_dict(), data.task)

    tx = make_optimizer(run.optim, run.total_steps, updates_per_step=run.rl.num_iterations)
    schedule = learning_rate_schedule(run.optim, run.total_steps)  # per training step, for the log
    make_state = lambda p: create_train_state(p, tx, run.optim, run.rl, jax.random.key(run.seed))  # noqa: E731
    shardings = state_shardings(jax.eval_shape(make_state, params), tx, mesh)
    state = jax.jit(make_state, out_shardings=shardings)(params)
    del params
    update = jax.jit(lambda s, t, a: grpo_update(s, t, a, model=model, decode=decode, rl=run.rl, tx=tx),
                     out_shardings=(shardings, None), donate_argnums=(0,))
    old_logps = (jax.jit(lambda p, t: exact_old_logps(p, t, model, decode))
                 if old_logps_need_replay(decode, run.rl.num_iterations) else None)

    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=run.checkpoint.keep,
                                         async_save=run.checkpoint.async_save)
    config_json = {"config": config.to_dict(), "model": model_config_to_dict(model)}  # saved with each step
    start = checkpointer.latest_step() or 0
    if start:
        ckpt_lib.warn_config_changes(start, checkpointer.read_config(start), config_json)  # before a shape error
        state, data_state, _ = checkpointer.restore(start, ckpt_lib.abstract_like(state))
        data.set_state(data_state)
        log.info("resumed from step %d in %s", start, checkpointer.directory)
    writer = MetricsWriter(workdir, start)
    history = []
    try:
        for step in range(start, run.total_steps):
            began = time.perf_counter()
            # Each process holds its own rows (whole groups); arrays are assembled globally.
            batch = repeat_rows(data.next_batch(), run.rl.group_size)
            trajectory = rollout(state.params, global_rows(batch["prompt_tokens"], mesh),
                                 global_rows(batch["prompt_valid"], mesh), rollout_key(state), decode, model)
            cache_gap = None
            if old_logps is not None:
                trajectory, cache_gap = old_logps(state.params, trajectory)
            local = local_rows(trajectory, mesh)
            total, parts = data.rewards(batch, local)
            advantages = compute_advantages(global_rows(total.astype(np.float32), mesh), run.rl)
            for _ in range(run.rl.num_iterations):
                state, update_metrics = update(state, trajectory, advantages)
            # Rewards stay per process (host work on its own rows); their means are over all rows.
            num_steps, total, parts = all_rows((local.num_steps, total, parts), mesh)
            row = {"step": step + 1, **step_metrics(num_steps, local.tokens.shape[1], total, parts, update_metrics,
                                                    data.accuracy_part),
                   "learning_rate": float(schedule(step)), "step_time_s": time.perf_counter() - began}
            if cache_gap is not None:  # the rollout-vs-replay gap, measured before the old log-probs were replaced
                row["logp_gap"] = float(cache_gap)
            if row["skipped"]:
                log.warning("step %d: non-finite loss or gradient; the update was skipped", step + 1)
            writer.write(row)
            history.append(row)
            log.log(logging.INFO if writer.enabled else logging.DEBUG,  # results: process 0 only
                    "step %d/%d loss %.4g reward %.3f nfe %.1f tpf %.2f gap %.2g %.2fs", step + 1, run.total_steps,
                    row["loss"], row["reward_mean"], row["nfe_mean"], row["tokens_per_forward"], row["logp_gap"],
                    row["step_time_s"])
            due = (step + 1) % run.checkpoint.every == 0 or step + 1 == run.total_steps
            if due and row["skipped"]:
                log.warning("step %d: not checkpointed after a skipped update", step + 1)
            elif due:
                data_state = data.get_state()
                check_same_on_all_processes(data_state, "the data iterator state")
                checkpointer.save(step + 1, state, data_state, config_json)
    finally:
        checkpointer.close()
        writer.close()
    if config.get("final_eval"):
        initial, _ = build_model(run.model_section, mesh=mesh, seed=run.seed)
        final_eval.compare(config.final_eval.to_dict(), {"initial": initial, "trained": state.params}, model,
                           data.tokenizer, data.task, decode, data.stop_ids, workdir, mesh=mesh, plan=final_plan)
    return history


def restore_params(workdir: str, mesh=None):
    """`(params, ModelConfig, source_dir)` from the latest training checkpoint of `workdir`.

    The checkpoint's own config (saved with it) rebuilds the abstract train state; parameters
    are restored with the shardings of `mesh` (default: all local devices on 'fsdp'). Workdirs of
    `launch/train.py` hold the whole state; those of `launch/pretrain.py` and
    `launch/init_planner.py` hold only the trained group, and the frozen rest (init_planner's
    backbone) is loaded again from the run's `model.path`, as their resume does. `source_dir`
    is where the tokenizer is: a pretrain workdir's `tokenizer/`, else the run's `model.path`
    (None when neither exists).
    """
    directory = os.path.join(workdir, "checkpoints") if os.path.isdir(os.path.join(workdir, "checkpoints")) else workdir
    if not os.path.isdir(directory):
        raise ConfigError(f"{workdir} is neither a training workdir nor a checkpoint directory")
    mesh = mesh if mesh is not None else make_mesh()
    checkpointer = ckpt_lib.Checkpointer(directory, async_save=False)
    try:
        step = checkpointer.latest_step()
        if step is None:
            raise ConfigError(f"no training checkpoint in {directory}")
        saved = checkpointer.read_config(step)
        config = ml_collections.ConfigDict(saved["config"])
        model = model_config_from_dict(saved["model"])
        grpo = "rl" in config  # else an SFT run, whose checkpoints leave out the frozen group
        if grpo:
            run = run_config(config)
            model_section, optim, total_steps = run.model_section, run.optim, run.total_steps
        else:  # the same keys, read the way `mdlm_sft.sft_run_config` reads them
            from dultra_jax.training import mdlm_sft
            model_section, total_steps = config.model.to_dict(), int(config.total_steps)
            optim = dataclass_from_dict(OptimConfig, config.get("optim", {}), "optim.")
        tx = make_optimizer(optim, total_steps)
        if grpo:
            make_state = lambda p: create_train_state(p, tx, optim, run.rl, jax.random.key(0))  # noqa: E731
        else:
            make_state = lambda p: mdlm_sft.create_state(p, tx, optim.train, 0).replace(frozen={})  # noqa: E731
        abstract = jax.eval_shape(make_state, policy.abstract_params(model))
        shardings = state_shardings(abstract, tx, mesh)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        state, _, _ = checkpointer.restore(step, target)
    finally:
        checkpointer.close()
    log.info("restored step %d from %s", step, directory)
    params = state.params
    if grpo:
        return params, model, model_section.get("path")
    if optim.train != "all":
        source, _ = build_model(model_section, mesh=mesh, seed=int(config.get("seed", 0)))
        params = merge_params(state.trainable, partition_params(source, optim.train)[1])
    # A pretrain run's task tokenizer, beside `checkpoints/` (also when `workdir` named that folder).
    tokenizer_dir = os.path.join(os.path.dirname(os.path.abspath(directory)), mdlm_sft.TOKENIZER_DIR)
    return params, model, tokenizer_dir if os.path.isdir(tokenizer_dir) else model_section.get("path")
