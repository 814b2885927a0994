"""GRPO training: data -> G rollouts per prompt -> rewards -> advantages -> sharded update, as a
step function of the training scaffold (`training.loop`), then the final comparison.

`train(config, workdir)` is the whole job; `launch/train.py` only parses flags and calls it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import ml_collections
import numpy as np

from dultra_jax.config import ConfigError, GRPOConfig, from_config
from dultra_jax.hub import resolve_optional
from dultra_jax.interop.build import build_model, model_config
from dultra_jax.rl.grpo import compute_advantages
from dultra_jax.sharding import all_rows, check_batch, check_groups_stay_whole, global_rows, local_rows
from dultra_jax.training import final_eval
from dultra_jax.training.data_setup import TrainData
from dultra_jax.training.loop import setup, train_loop
from dultra_jax.training.programs import grpo_programs, resolve_prompts_per_step
from dultra_jax.training.state import TrainState, learning_rate_schedule, step_key

log = logging.getLogger(__name__)

PROGRESS_KEYS = ("loss", "reward_mean", "accuracy", "nfe_mean", "tokens_per_forward", "logp_gap")


def repeat_rows(batch: dict[str, np.ndarray], group_size: int) -> dict[str, np.ndarray]:
    """Each prompt's row G times in a row: `[P, ...] -> [P*G, ...]` (groups are consecutive)."""
    return {k: np.repeat(v, group_size, axis=0) for k, v in batch.items()}


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


def check_prompts_per_step(cfg: GRPOConfig) -> None:
    """`data.prompts_per_step` against the processes (before the data pipeline is built on it)."""
    prompts = cfg.data.prompts_per_step
    if prompts < 1 or prompts % jax.process_count():
        raise ConfigError(f"data.prompts_per_step={prompts} must be a positive multiple of the "
                          f"{jax.process_count()} process(es): each process rolls out whole groups")


def check_mesh(cfg: GRPOConfig):
    """Start-up checks of the batch against the processes and the mesh."""
    prompts = cfg.data.prompts_per_step
    rows = prompts * cfg.rl.group_size
    rows_name = f"batch rows = data.prompts_per_step ({prompts}) * rl.group_size ({cfg.rl.group_size})"

    def check(mesh) -> None:
        check_batch(rows_name, rows, mesh)
        check_groups_stay_whole(rows_name, rows, cfg.rl.group_size, mesh)
        if cfg.final_eval is not None:  # at start-up, not after training
            final_eval.batch_rows(cfg.final_eval.batch_size, mesh)

    return check


def resolve_model_paths(cfg: GRPOConfig) -> tuple[GRPOConfig, dict[str, dict[str, str]]]:
    """`cfg` with its model paths (`model.path`, `data.tokenizer`, `rewards.teacher_path`) as local
    directories (`hub.resolve_model_dir`: a hub id becomes its cached snapshot), and
    `{key: {"id", "dir"}}` for each hub id among them (what checkpoints record)."""
    given = {"model.path": cfg.model.get("path"), "data.tokenizer": cfg.data.tokenizer,
             "rewards.teacher_path": cfg.rewards.teacher_path if cfg.rewards.uses_teacher else None}
    resolved = {key: resolve_optional(path, key) for key, path in given.items()}
    sources = {key: {"id": given[key], "dir": resolved[key]} for key in given if resolved[key] != given[key]}
    cfg = dataclasses.replace(
        cfg, model={**cfg.model, **({"path": resolved["model.path"]} if given["model.path"] else {})},
        data=dataclasses.replace(cfg.data, tokenizer=resolved["data.tokenizer"]),
        rewards=dataclasses.replace(cfg.rewards, teacher_path=resolved["rewards.teacher_path"] or
                                    cfg.rewards.teacher_path))
    return cfg, sources


def train(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
    """Runs (or resumes) GRPO training in `workdir`; returns this run's metric rows."""
    # Everything a user can get wrong is checked before a weight is read: the config, the model's
    # config.json, the records, the tokenizer and the rewards (the teacher's config and tokenizer).
    cfg = resolve_prompts_per_step(from_config(GRPOConfig, config), jax.device_count())
    cfg, sources = resolve_model_paths(cfg)
    check_prompts_per_step(cfg)
    decode, model = cfg.decode, model_config(cfg.model)
    decode.check_model(model)
    data = TrainData(cfg.data, cfg.rewards, model, decode, seed=cfg.seed, model_path=cfg.model.get("path"))
    plan = final_eval.check(cfg.final_eval, data.task) if cfg.final_eval is not None else None
    heldout = final_eval.heldout_records(cfg.eval, data.task)
    # Then the policy's weights, then the teacher's.
    run = setup(config, workdir, model_section=cfg.model, mesh=cfg.mesh, optim=cfg.optim,
                total_steps=cfg.total_steps, seed=cfg.seed, updates_per_step=cfg.rl.num_iterations,
                keep_reference=cfg.rl.beta > 0, check_mesh=check_mesh(cfg))
    if sources:  # each checkpoint records which snapshot a hub id named
        run = dataclasses.replace(run, config_json={**run.config_json, "sources": sources})
    mesh, model = run.mesh, run.model
    data.load_teacher(mesh)

    programs = grpo_programs(run.programs, decode, cfg.rl)
    update, old_logps = programs.update, programs.old_logps
    schedule = learning_rate_schedule(cfg.optim, cfg.total_steps)  # per training step, for the log

    def step_fn(state: TrainState, step: int):
        # Each process holds its own rows (whole groups); arrays are assembled globally.
        batch = repeat_rows(data.next_batch(), cfg.rl.group_size)
        trajectory = programs.rollout(state.params, global_rows(batch["prompt_tokens"], mesh),
                                      global_rows(batch["prompt_valid"], mesh), step_key(state))
        cache_gap = None
        if old_logps is not None:
            trajectory, cache_gap = old_logps(state.params, trajectory)
        local = local_rows(trajectory, mesh)
        total, parts = data.rewards(batch, local)
        advantages = compute_advantages(global_rows(total.astype(np.float32), mesh), cfg.rl)
        for _ in range(cfg.rl.num_iterations):
            state, update_metrics = update(state, trajectory, advantages)
        # Rewards stay per process (host work on its own rows); their means are over all rows.
        num_steps, total, parts = all_rows((local.num_steps, total, parts), mesh)
        metrics = {**step_metrics(num_steps, local.tokens.shape[1], total, parts, update_metrics,
                                  data.accuracy_part),
                   "learning_rate": float(schedule(step))}
        if cache_gap is not None:  # the rollout-vs-replay gap, measured before the old log-probs were replaced
            metrics["logp_gap"] = float(cache_gap)
        return state, metrics

    evaluate = final_eval.heldout_evaluator(cfg.eval, heldout, model, data.tokenizer, data.task, decode,
                                            data.stop_ids, workdir, mesh=mesh, reward_options=data.options)
    state, history = train_loop(run, step_fn, total_steps=cfg.total_steps, checkpoint=cfg.checkpoint, name="train",
                                progress_keys=PROGRESS_KEYS, data=data, evaluate=evaluate,
                                evaluate_every=cfg.eval.every, keep_best="eval_objective" if evaluate else None)
    if cfg.final_eval is not None:
        initial, _ = build_model(cfg.model, mesh=mesh, seed=cfg.seed)
        final_eval.compare(cfg.final_eval, {"initial": initial, "trained": state.params}, model, data.tokenizer,
                           data.task, decode, data.stop_ids, workdir, mesh=mesh, plan=plan)
    return history
