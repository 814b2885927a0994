"""LLaDA supervised fine-tuning (masked diffusion), used to pre-train the demo's base model.

A training row is `[prompt (left-padded to Lp) | response (Lr, EOS-padded)]`. Per row we draw
`t ~ U(eps, 1)` (`t = (1 - eps) u + eps`, `u ~ U(0, 1)`: LLaDA's `p_mask`), replace each response
token by `[MASK]` independently with probability `t` (the prompt is never masked), and score

    loss = mean over rows of  sum_{masked i} CE(logits_i, x_i) / t  /  #response tokens of the row

which is LLaDA's SFT objective: its guidelines divide by the answer length (EOS padding
included) and average over rows. The EOS padding is part of the answer, so the model learns to
fill the tail of a generation with EOS.

`pretrain(config, workdir)` is the whole job (`launch/pretrain.py` parses flags and calls it):
fixed-shape batches from a deterministic, resumable shuffle of the task's training examples, a
jitted, sharded, donated AdamW step, Orbax checkpoints with resume, an HF export of the backbone
with the task's tokenizer files, and a held-out accuracy check with `low_confidence` decoding.
The data, loop and evaluation helpers here are shared with `planner_sft`.

Config (`configs/demo_pretrain.py`):
  model          a model section (`planner` must be None; `path` set continues from an HF dir)
  optim          `OptimConfig` fields (`train` must be "all")
  data           task ("arithmetic"), split, num_examples, start, batch_size, prompt_length,
                 response_length
  eval           split, num_examples, start, batch_size, rules (decoding rules to score),
                 steps (`low_confidence` / `random` total steps; None = one token per step),
                 block_length (None = the task's)
  mesh, checkpoint (every, keep, async_save), total_steps, seed, log_every
  mask_eps       the `eps` of `t ~ U(eps, 1)`
  export_dir     the HF directory written at the end (None: `workdir/hf`); export_dtype
Outputs in `workdir`: `checkpoints/`, `metrics.jsonl`, `tensorboard/`, `pretrain_eval.json`,
`tokenizer/` (the task's tokenizer files, written at start-up so that a mid-run checkpoint is a
complete model source for export and evaluation), and the HF directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from dultra_jax import checkpoint as ckpt_lib
from dultra_jax import distributed
from dultra_jax.config import (SCHEDULED_RULES, CheckpointConfig, ConfigError, DecodeConfig, MeshConfig,
                               ModelConfig, OptimConfig, dataclass_from_dict, model_config_to_dict)
from dultra_jax.models import policy
from dultra_jax.models.build import build_model
from dultra_jax.sharding import batch_sharding, check_batch, make_mesh, process_row_range
from dultra_jax.training.state import TrainState, apply_update, make_optimizer, merge_params, partition_params

log = logging.getLogger(__name__)

Params = policy.Params
Batch = dict[str, jax.Array]

MASK_EPS = 1e-3

DATA_KEYS = {"task", "split", "num_examples", "start", "batch_size", "prompt_length", "response_length"}
EVAL_KEYS = {"split", "num_examples", "start", "batch_size", "rules", "steps", "block_length", "every",
             "every_examples"}
CHECKPOINT_DEFAULTS = {"every": 500, "keep": 2}  # an SFT step is cheap beside a GRPO step
COMMON_KEYS = {"model", "optim", "data", "eval", "mesh", "checkpoint", "total_steps", "seed", "log_every",
               "export_dir", "export_dtype"}
PRETRAIN_KEYS = COMMON_KEYS | {"mask_eps"}
TOKENIZER_DIR = "tokenizer"  # in a pretrain workdir: the task's tokenizer files


# ------------------------------------------------------------------------------------ the loss


def corrupt(tokens: jax.Array, response: jax.Array, rng: jax.Array, mask_id: int, eps: float = MASK_EPS):
    """LLaDA's forward (noising) process on the response.

    Args:
      tokens: `[B, L]` int32 clean tokens; response: `[B, L]` bool, the maskable positions.
    Returns:
      `(noisy [B, L]` with `mask_id` at masked positions, `is_masked [B, L]` bool,
      `p_mask [B]` float32, the row's masking probability `t` in `[eps, 1]`).
    """
    t_key, m_key = jax.random.split(rng)
    p_mask = (1.0 - eps) * jax.random.uniform(t_key, (tokens.shape[0],), jnp.float32) + eps
    is_masked = response & (jax.random.uniform(m_key, tokens.shape, jnp.float32) < p_mask[:, None])
    return jnp.where(is_masked, mask_id, tokens), is_masked, p_mask


def masked_diffusion_loss(token_logits: jax.Array, targets: jax.Array, is_masked: jax.Array, p_mask: jax.Array,
                          response: jax.Array):
    """LLaDA's SFT loss from the logits.

    Args:
      token_logits: `[B, L, V]` raw logits (no mask suppression, as LLaDA's SFT).
      targets: `[B, L]` clean tokens; is_masked, response: `[B, L]` bool; p_mask: `[B]`.
    Returns:
      `(loss` scalar, `ce [B, L]` per-position cross-entropy in nats).
    """
    logp = jax.nn.log_softmax(token_logits.astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    answer_length = jnp.maximum(jnp.sum(response, axis=-1), 1).astype(jnp.float32)
    per_row = jnp.sum(jnp.where(is_masked, ce, 0.0), axis=-1) / p_mask / answer_length
    return jnp.mean(per_row), ce


def mdlm_loss(params: Params, batch: Batch, rng: jax.Array, model: ModelConfig, eps: float = MASK_EPS):
    """`(loss, metrics)` of a batch `{tokens, valid, response}` (`[B, L]` each) under a fresh
    corruption drawn from `rng`."""
    noisy, is_masked, p_mask = corrupt(batch["tokens"], batch["response"], rng, model.mask_token_id, eps)
    token_logits, _ = policy.forward(params, noisy, model, valid=batch["valid"])
    loss, ce = masked_diffusion_loss(token_logits, batch["tokens"], is_masked, p_mask, batch["response"])
    num_masked = jnp.maximum(jnp.sum(is_masked), 1)
    correct = jnp.argmax(token_logits, axis=-1) == batch["tokens"]
    metrics = {"masked_ce": jnp.sum(jnp.where(is_masked, ce, 0.0)) / num_masked,
               "masked_accuracy": jnp.sum(is_masked & correct) / num_masked}
    return loss, metrics


# ------------------------------------------------------------------------------ train state


def create_state(params: Params, tx: optax.GradientTransformation, train: str, seed: int) -> TrainState:
    """A fresh `TrainState` training the parameter group `train` ("all", "planner", "backbone");
    jit it with the state's shardings to place the optimiser moments like the parameters."""
    trainable, frozen = partition_params(params, train)
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                      opt_state=tx.init(trainable), rng=jax.random.key_data(jax.random.key(seed)), reference=None)


def step_key(state: TrainState) -> jax.Array:
    """The step's key: the run's key folded with the step (so a resumed run draws the same)."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def apply_gradients(state: TrainState, loss_fn: Callable[[Params], tuple[jax.Array, dict]],
                    tx: optax.GradientTransformation):
    """One optimiser step on `state.trainable` with `loss_fn(trainable) -> (loss, metrics)`.

    A non-finite loss or gradient skips the update (the step counter still advances).
    Returns `(new_state, metrics)` with `loss`, `grad_norm` and `skipped` added.
    """
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
    new_state, grad_norm, finite = apply_update(state, grads, loss, tx)
    return new_state, {"loss": loss, "grad_norm": grad_norm, "skipped": ~finite, **metrics}


def mdlm_update(state: TrainState, batch: Batch, *, model: ModelConfig, tx: optax.GradientTransformation,
                eps: float = MASK_EPS):
    """One SFT step: fresh corruption from the step key, AdamW on the trainable group."""
    rng = step_key(state)
    loss_fn = lambda trainable: mdlm_loss(merge_params(trainable, state.frozen), batch, rng, model, eps)  # noqa: E731
    return apply_gradients(state, loss_fn, tx)


def jit_update(update: Callable, state_shardings: TrainState, mesh) -> Callable:
    """`update(state, batch)` jitted with the state's shardings, rows over ('data', 'fsdp'), and
    the state donated."""
    rows = batch_sharding(mesh, 2)
    return jax.jit(update, in_shardings=(state_shardings, rows), out_shardings=(state_shardings, None),
                   donate_argnums=(0,))


# ---------------------------------------------------------------------------------------- data


@dataclasses.dataclass
class SFTTask:
    """What the SFT trainers need from a task: problems, their encoding, a checker and the
    tokenizer files. Problems are dicts with at least `prompt` and `answer`."""

    name: str
    tokenizer: Any
    make_problems: Callable[[str, int, int], list[dict]]
    encode: Callable[[Any, dict], tuple[list[int], list[int]]]
    check: Callable[[str, str], bool]
    save_tokenizer: Callable[[str], Any]
    mask_token: str
    prompt_length: int
    response_length: int
    block_length: int
    encode_batch: Callable[[Any, Sequence[dict]], list[tuple[list[int], list[int]]]] | None = None

    def encode_many(self, problems: Sequence[dict]) -> list[tuple[list[int], list[int]]]:
        """`encode` of every problem (through the task's batched encoder when it has one)."""
        if self.encode_batch is not None:
            return self.encode_batch(self.tokenizer, problems)
        return [self.encode(self.tokenizer, p) for p in problems]

    def check_model(self, model: ModelConfig) -> None:
        """The model's special ids must be the tokenizer's (errors name the key)."""
        mask_id = self.tokenizer.convert_tokens_to_ids(self.mask_token)
        if model.mask_token_id != mask_id:
            raise ConfigError(f"model.mask_token_id={model.mask_token_id} but the {self.name} tokenizer's "
                              f"{self.mask_token} is id {mask_id}")
        if model.eos_token_id != self.tokenizer.eos_token_id:
            raise ConfigError(f"model.eos_token_id={model.eos_token_id} but the {self.name} tokenizer's EOS "
                              f"is id {self.tokenizer.eos_token_id}")
        if len(self.tokenizer) > model.vocab_size:
            raise ConfigError(f"model.vocab_size={model.vocab_size} is smaller than the {self.name} "
                              f"tokenizer's {len(self.tokenizer)} tokens")


def _arithmetic_encode_batch(tokenizer, problems: Sequence[dict]) -> list[tuple[list[int], list[int]]]:
    """`arithmetic.encode_example` of many problems with two batched tokenizer calls (the
    per-example call dominates data preparation); the padding and length checks are
    `encode_example`'s, applied to each row."""
    from dultra_jax.data import arithmetic as A

    if not problems:
        return []
    prompts = tokenizer([str(p["prompt"]) for p in problems], add_special_tokens=False)["input_ids"]
    solutions = tokenizer([str(p["solution"]) for p in problems], add_special_tokens=False)["input_ids"]
    out = []
    for problem, prompt, solution in zip(problems, prompts, solutions):
        if len(prompt) > A.PROMPT_LENGTH or len(solution) >= A.GEN_LENGTH:
            out.append(A.encode_example(tokenizer, problem))  # raises encode_example's error
            continue
        out.append((list(prompt), list(solution) + [int(tokenizer.eos_token_id)] * (A.GEN_LENGTH - len(solution))))
    return out


def _arithmetic_task() -> SFTTask:
    from dultra_jax.data import arithmetic as A

    return SFTTask(encode_batch=_arithmetic_encode_batch, name="arithmetic", tokenizer=A.build_tokenizer(), make_problems=A.make_problems,
                   encode=A.encode_example, check=A.check_answer, save_tokenizer=A.build_tokenizer,
                   mask_token=A.MASK_TOKEN, prompt_length=A.PROMPT_LENGTH, response_length=A.GEN_LENGTH,
                   block_length=A.BLOCK_LENGTH)


def _fill_task() -> SFTTask:
    from dultra_jax.data import fill as F

    return SFTTask(name="fill", tokenizer=F.build_tokenizer(), make_problems=F.make_problems,
                   encode=F.encode_example, check=F.check_answer, save_tokenizer=F.build_tokenizer,
                   mask_token=F.MASK_TOKEN, prompt_length=F.PROMPT_LENGTH, response_length=F.GEN_LENGTH,
                   block_length=F.BLOCK_LENGTH)


SFT_TASKS: dict[str, Callable[[], SFTTask]] = {"arithmetic": _arithmetic_task, "fill": _fill_task}


def get_sft_task(name: str) -> SFTTask:
    if name not in SFT_TASKS:
        raise ConfigError(f"data.task={name!r} is not an SFT task; use one of {', '.join(sorted(SFT_TASKS))}")
    return SFT_TASKS[name]()


def encode_rows(examples: Sequence[tuple[Sequence[int], Sequence[int]]], prompt_length: int, response_length: int,
                pad_id: int, eos_id: int) -> dict[str, np.ndarray]:
    """Fixed-shape rows `[prompt left-padded to Lp | response EOS-padded to Lr]`.

    Returns numpy `{tokens [N, L] int32, valid [N, L] bool (False on prompt padding),
    response [N, L] bool}` with `L = Lp + Lr`. Too-long prompts or responses raise `ConfigError`.
    """
    n, length = len(examples), prompt_length + response_length
    tokens = np.full((n, length), pad_id, np.int32)
    valid = np.ones((n, length), bool)
    for i, (prompt, response) in enumerate(examples):
        if len(prompt) > prompt_length or len(response) > response_length:
            raise ConfigError(f"example {i} has a {len(prompt)}-token prompt and a {len(response)}-token response; "
                              f"data.prompt_length={prompt_length}, data.response_length={response_length}")
        tokens[i, prompt_length - len(prompt):prompt_length] = prompt
        valid[i, :prompt_length - len(prompt)] = False
        tokens[i, prompt_length:prompt_length + len(response)] = response
        tokens[i, prompt_length + len(response):] = eos_id
    response_mask = np.zeros((n, length), bool)
    response_mask[:, prompt_length:] = True
    return {"tokens": tokens, "valid": valid, "response": response_mask}


class SFTData:
    """Fixed-shape batches over encoded rows, reshuffled every epoch.

    Batch `k` is a pure function of `(seed, k)`: epoch `e` visits the rows in the order
    `default_rng([seed, e]).permutation(N)`, and batch `k` takes global positions
    `k*B .. (k+1)*B - 1` of that sequence, so resuming at step `k` needs no iterator state.
    Each process takes its contiguous share of the rows (`local_batch`).
    """

    def __init__(self, rows: Mapping[str, np.ndarray], batch_size: int, seed: int):
        self.rows = dict(rows)
        self.size = len(next(iter(self.rows.values())))
        if self.size == 0:
            raise ConfigError("data.num_examples gives no training rows")
        self.batch_size = batch_size
        self.seed = seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.size)
        return self._perms[epoch]

    def indices(self, step: int) -> np.ndarray:
        pos = step * self.batch_size + np.arange(self.batch_size)
        epoch, offset = np.divmod(pos, self.size)
        return np.array([self._perm(int(e))[o] for e, o in zip(epoch, offset)])

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The global batch of `step`: `{name: [B, ...]}`."""
        idx = self.indices(step)
        return {k: v[idx] for k, v in self.rows.items()}

    def local_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the global batch of `step`."""
        share = self.batch_size // jax.process_count()
        start = jax.process_index() * share
        return {k: v[start:start + share] for k, v in self.batch(step).items()}


def global_batch(local: Mapping[str, np.ndarray], mesh) -> Batch:
    """Per-process rows as global arrays sharded over ('data', 'fsdp')."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v) for k, v in local.items()}


def task_rows(task: SFTTask, section: Mapping[str, Any], model: ModelConfig) -> tuple[list[dict], dict]:
    """`(problems, encoded rows)` of a data / eval section's split."""
    problems = task.make_problems(section["split"], int(section["num_examples"]), int(section.get("start", 0)))
    examples = task.encode_many(problems)
    rows = encode_rows(examples, int(section["prompt_length"]), int(section["response_length"]),
                       model.pad_token_id, model.eos_token_id)
    return problems, rows


# ---------------------------------------------------------------------------------- the config


@dataclasses.dataclass(frozen=True)
class SFTRun:
    """The validated view of an SFT config (pre-training or planner initialisation)."""

    model_section: dict
    optim: OptimConfig
    data: dict
    eval: dict
    mesh: MeshConfig
    checkpoint: CheckpointConfig
    total_steps: int
    seed: int
    log_every: int
    export_dir: str | None
    export_dtype: str
    extra: dict


def _section(config, key: str, known: set[str], defaults: Mapping[str, Any]) -> dict:
    value = config.get(key, None)
    section = dict(value.to_dict() if hasattr(value, "to_dict") else (value or {}))
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(key + '.' + k for k in unknown)}; "
                          f"known: {', '.join(sorted(known))}")
    return {**defaults, **section}


def sft_run_config(config: ml_collections.ConfigDict, *, top_keys: set[str], data_keys: set[str],
                   eval_keys: set[str], task: SFTTask | None = None) -> SFTRun:
    """Validates an SFT `ConfigDict` at start-up; errors name the key."""
    unknown = set(config.keys()) - top_keys
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(top_keys))}")
    missing = {"model", "data", "total_steps"} - set(config.keys())
    if missing:
        raise ConfigError(f"config is missing {', '.join(sorted(missing))}")
    if int(config.total_steps) < 0:
        raise ConfigError(f"total_steps={config.total_steps} must be >= 0")
    data_defaults = {"split": "train", "start": 0, "num_examples": 10000}
    if task is not None:
        data_defaults.update(prompt_length=task.prompt_length, response_length=task.response_length,
                             block_length=task.block_length)
    data = _section(config, "data", data_keys, data_defaults)
    for key in ("batch_size", "num_examples", "prompt_length", "response_length"):
        if key in data_keys and (not isinstance(data.get(key), int) or data[key] <= 0):
            raise ConfigError(f"data.{key}={data.get(key)!r} must be a positive integer")
    eval_defaults = {"split": "heldout", "start": 0, "num_examples": 0, "batch_size": data["batch_size"],
                     "rules": (), "steps": None, "block_length": None, "every": 0,
                     "every_examples": 128}
    evaluation = _section(config, "eval", eval_keys, eval_defaults)
    export_dtype = str(config.get("export_dtype", "float32"))
    if export_dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"export_dtype={export_dtype!r} must be float32, bfloat16 or float16")
    log_every = int(config.get("log_every", 50))
    if log_every <= 0:
        raise ConfigError(f"log_every={log_every} must be positive")
    every = int(evaluation.get("every") or 0)
    if every < 0 or (every and every % log_every):
        raise ConfigError(f"eval.every={every} must be 0 (off) or a multiple of log_every={log_every}")
    checkpoint = dataclass_from_dict(CheckpointConfig, {**CHECKPOINT_DEFAULTS, **config.get("checkpoint", {})},
                                     "checkpoint.")
    if checkpoint.every % log_every:  # a resume would log a row that averages only part of its window
        raise ConfigError(f"checkpoint.every={checkpoint.every} must be a multiple of log_every={log_every}")
    extra = {k: config[k] for k in top_keys - COMMON_KEYS if k in config}
    return SFTRun(
        model_section=config.model.to_dict(),
        optim=dataclass_from_dict(OptimConfig, config.get("optim", {}), "optim."),
        data=data, eval=evaluation,
        mesh=dataclass_from_dict(MeshConfig, config.get("mesh", {}), "mesh."),
        checkpoint=checkpoint,
        total_steps=int(config.total_steps),
        seed=int(config.get("seed", 0)), log_every=log_every, export_dir=config.get("export_dir", None),
        export_dtype=export_dtype, extra=extra)


# ------------------------------------------------------------------------------------ the loop


def _mean_metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    host = jax.device_get(list(rows))
    out = {k: float(np.mean([np.asarray(r[k], np.float64) for r in host])) for k in host[0] if k != "skipped"}
    out["skipped"] = int(sum(int(np.asarray(r["skipped"])) for r in host))
    return out


def run_training(state: TrainState, update: Callable, data: SFTData, run: SFTRun, workdir: str, mesh,
                 config_json: dict, name: str,
                 evaluate: Callable[[TrainState], dict[str, float]] | None = None) -> tuple[TrainState, list[dict]]:
    """The shared SFT loop: batches -> `update` -> logged means every `log_every` steps ->
    Orbax checkpoints every `checkpoint.every` steps and at the end; resumes from the latest.
    With `evaluate`, its scalars join the logged row every `eval.every` steps (not the last:
    the caller evaluates the final state itself).

    Only `step`, the trainable parameters, the optimiser state and the rng are checkpointed: the
    frozen group (the planner trainer's backbone) is rebuilt from the model source on resume.
    Returns `(final state, this run's metric rows)`.
    """
    from dultra_jax.training.grpo_trainer import MetricsWriter

    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=run.checkpoint.keep,
                                         async_save=run.checkpoint.async_save)
    frozen = state.frozen
    start = checkpointer.latest_step() or 0
    if start:
        ckpt_lib.warn_config_changes(start, checkpointer.read_config(start), config_json)  # before a shape error
        restored, _, _ = checkpointer.restore(start, ckpt_lib.abstract_like(state.replace(frozen={})))
        state = restored.replace(frozen=frozen)
        log.info("%s: resumed from step %d in %s", name, start, checkpointer.directory)
    writer = MetricsWriter(workdir, start)
    history, pending = [], []
    began = last = time.perf_counter()
    try:
        for step in range(start, run.total_steps):
            state, metrics = update(state, global_batch(data.local_batch(step), mesh))
            pending.append(metrics)
            done = step + 1
            if done % run.log_every == 0 or done == run.total_steps:
                means = _mean_metrics(pending)  # waits for the steps to finish
                now = time.perf_counter()
                row = {"step": done, **means, "step_time_s": (now - last) / len(pending), "elapsed_s": now - began}
                pending = []
                every = int(run.eval.get("every") or 0)
                if evaluate is not None and every and done % every == 0 and done != run.total_steps:
                    row.update(evaluate(state))
                last = time.perf_counter()
                writer.write(row)
                history.append(row)
                log.info("%s step %d/%d %s", name, done, run.total_steps,
                         " ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("step",)))
                if row["skipped"]:
                    log.warning("%s: %d update(s) skipped for a non-finite loss or gradient", name, row["skipped"])
            if done % run.checkpoint.every == 0 or done == run.total_steps:
                checkpointer.save(done, state.replace(frozen={}), {"step": done}, config_json)
    finally:
        checkpointer.close()
        writer.close()
    return state, history


# ------------------------------------------------------------------------------ decoding eval


def decode_accuracy(params: Params, model: ModelConfig, task: SFTTask, problems: Sequence[dict],
                    decode: DecodeConfig, batch_size: int, mesh, seed: int = 0, num_samples: int = 5) -> dict:
    """Held-out accuracy of `decode` on `problems`, with NFE and a few samples.

    Decodes in fixed batches of `batch_size` rows (the last padded with filler rows that are not
    scored); batch `j` uses `fold_in(key(seed), j)`. `tokens_per_forward` counts every generated
    position (EOS padding included) per NFE.
    """
    from dultra_jax.data.tokenizer import decode_completion
    from dultra_jax.decoding.rollout import rollout
    from dultra_jax.training.grpo_trainer import local_rows

    began = time.perf_counter()
    encoded = [task.encode(task.tokenizer, p)[0] for p in problems]
    rows = encode_rows([(p, []) for p in encoded], decode.prompt_length, 0, model.pad_token_id, model.eos_token_id)
    mine = process_row_range(mesh, batch_size)
    correct, nfe, samples = [], [], []
    for j, first in enumerate(range(0, len(problems), batch_size)):
        idx = np.arange(first, first + batch_size)
        real = idx < len(problems)
        idx = np.where(real, idx, 0)
        local = {"tokens": rows["tokens"][idx][mine], "valid": rows["valid"][idx][mine]}
        prompts = global_batch(local, mesh)
        trajectory = rollout(params, prompts["tokens"], prompts["valid"], jax.random.fold_in(jax.random.key(seed), j),
                             decode, model)
        out = local_rows(trajectory, mesh)
        for r, i in enumerate(idx[mine]):
            if not real[mine][r]:
                continue
            completion = decode_completion(task.tokenizer, out.tokens[r], (model.eos_token_id,))
            ok = bool(task.check(completion, problems[i]["answer"]))
            correct.append(ok)
            nfe.append(int(out.num_steps[r]))
            if len(samples) < num_samples:
                samples.append({"prompt": problems[i]["prompt"], "completion": completion,
                                "answer": problems[i]["answer"], "correct": ok, "nfe": int(out.num_steps[r])})
    totals = np.array([sum(correct), len(correct), sum(nfe)], np.float64)
    if jax.process_count() > 1:
        totals = np.sum(multihost_utils.process_allgather(totals), axis=0)
    n = max(int(totals[1]), 1)
    nfe_mean = totals[2] / n
    return {"rule": decode.rule, "accuracy": totals[0] / n, "num_examples": int(totals[1]), "nfe_mean": nfe_mean,
            "tokens_per_forward": decode.gen_length / max(nfe_mean, 1e-9), "wall_s": time.perf_counter() - began,
            "samples": samples}


def eval_decode_config(rule: str, run: SFTRun, task: SFTTask, model: ModelConfig) -> DecodeConfig:
    """The held-out decoding of `rule`: greedy tokens on the task's own canvas (its prompt
    length, whatever `data.prompt_length` trained with: RoPE is relative and padding keys are
    masked, so left padding does not change the model's outputs) and blocks."""
    steps = run.eval.get("steps") if rule in SCHEDULED_RULES else None
    decode = DecodeConfig(rule=rule, prompt_length=max(task.prompt_length, int(run.data["prompt_length"])),
                          gen_length=int(run.data["response_length"]),
                          block_length=int(run.eval.get("block_length") or task.block_length), temperature=0.0,
                          steps=steps, eos_token_id=model.eos_token_id)
    decode.check_model(model)
    return decode


def periodic_decode_eval(model: ModelConfig, task: SFTTask, run: SFTRun, mesh) -> Callable[[TrainState], dict] | None:
    """The `run_training` callback: the first eval rule's accuracy and NFE on the first
    `eval.every_examples` eval problems (None when `eval.every` is 0 or there is no rule)."""
    num = min(int(run.eval["every_examples"]), int(run.eval["num_examples"]))
    if not int(run.eval.get("every") or 0) or not run.eval["rules"] or num <= 0:
        return None
    rule = run.eval["rules"][0]
    problems = task.make_problems(run.eval["split"], num, int(run.eval["start"]))
    decode = eval_decode_config(rule, run, task, model)

    def evaluate(state: TrainState) -> dict[str, float]:
        result = decode_accuracy(state.params, model, task, problems, decode, int(run.eval["batch_size"]), mesh,
                                 seed=run.seed, num_samples=0)
        return {f"eval_{rule}_accuracy": result["accuracy"], f"eval_{rule}_nfe": result["nfe_mean"]}

    return evaluate


def run_decode_eval(params: Params, model: ModelConfig, task: SFTTask, run: SFTRun, mesh, name: str) -> list[dict]:
    """`decode_accuracy` for each rule of `eval.rules` on the eval split (logged)."""
    num = int(run.eval["num_examples"])
    if num <= 0 or not run.eval["rules"]:
        return []
    problems = task.make_problems(run.eval["split"], num, int(run.eval["start"]))
    batch_size = int(run.eval["batch_size"])
    check_batch(f"eval.batch_size ({batch_size})", batch_size, mesh)
    results = []
    for rule in run.eval["rules"]:
        result = decode_accuracy(params, model, task, problems, eval_decode_config(rule, run, task, model),
                                 batch_size, mesh, seed=run.seed)
        log.info("%s eval %s on %d %s problems: accuracy %.4f nfe %.2f tokens/forward %.2f (%.1fs)", name, rule,
                 result["num_examples"], run.eval["split"], result["accuracy"], result["nfe_mean"],
                 result["tokens_per_forward"], result["wall_s"])
        results.append(result)
    return results


def write_json(path: str, value: Any) -> None:
    if jax.process_index() != 0:
        return
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2, default=lambda x: x.item() if hasattr(x, "item") else str(x))
        f.write("\n")
    os.replace(path + ".tmp", path)


def state_shardings_for(state: TrainState, tx: optax.GradientTransformation, mesh) -> TrainState:
    from dultra_jax.training.grpo_trainer import state_shardings

    return state_shardings(state, tx, mesh)


# ---------------------------------------------------------------------------------- pretrain


def save_workdir_tokenizer(task: SFTTask, workdir: str) -> str:
    """Writes the task's tokenizer files to `workdir/tokenizer` (process 0, renamed into place when
    complete; kept when present, so a resume leaves it alone) and returns that path. Every process
    waits until it is there."""
    directory = os.path.join(workdir, TOKENIZER_DIR)
    if jax.process_index() == 0 and not os.path.isdir(directory):
        tmp = tempfile.mkdtemp(prefix=".tokenizer-", dir=workdir)
        task.save_tokenizer(tmp)
        os.replace(tmp, directory)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"tokenizer {os.path.abspath(directory)}")
    return directory


def pretrain(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) masked-diffusion SFT of a LLaDA backbone in `workdir`, exports it as an
    HF directory with the task's tokenizer, and scores held-out decoding.

    Returns `{"history": metric rows, "export_dir": path, "eval": [per-rule results],
    "train_time_s": seconds}`.
    """
    task = get_sft_task(str(config.data.get("task", "arithmetic")))
    run = sft_run_config(config, top_keys=PRETRAIN_KEYS, data_keys=DATA_KEYS, eval_keys=EVAL_KEYS, task=task)
    eps = float(run.extra.get("mask_eps", MASK_EPS))
    if not 0 < eps < 1:
        raise ConfigError(f"mask_eps={eps} must be in (0, 1)")
    if run.optim.train != "all":
        raise ConfigError(f"optim.train={run.optim.train!r}: pre-training trains the whole backbone ('all')")
    if run.model_section.get("planner") is not None:
        raise ConfigError("model.planner must be None for pre-training (the planner is initialised by "
                          "launch/init_planner.py afterwards)")
    ckpt_lib.make_workdir(workdir)
    mesh = make_mesh(**dataclasses.asdict(run.mesh))
    distributed.connect_cpu_collectives(mesh)  # multi-process CPU only: before the processes drift apart
    check_batch(f"data.batch_size ({run.data['batch_size']})", int(run.data["batch_size"]), mesh)

    params, model = build_model(run.model_section, mesh=mesh, seed=run.seed)
    task.check_model(model)
    tokenizer_dir = save_workdir_tokenizer(task, workdir)
    length = int(run.data["prompt_length"]) + int(run.data["response_length"])
    if length > model.max_sequence_length:
        raise ConfigError(f"data.prompt_length + data.response_length = {length} exceeds "
                          f"model.max_sequence_length={model.max_sequence_length}")
    if int(run.data["prompt_length"]) != task.prompt_length and not model.mask_padding:
        raise ConfigError(f"data.prompt_length={run.data['prompt_length']} differs from the {task.name} task's "
                          f"{task.prompt_length}, which is only exact with model.mask_padding=True")
    _, rows = task_rows(task, run.data, model)
    data = SFTData(rows, int(run.data["batch_size"]), run.seed)
    log.info("pretrain: %d %s examples, batch %d, %d steps (%.1f epochs)", data.size, task.name, data.batch_size,
             run.total_steps, run.total_steps * data.batch_size / data.size)

    tx = make_optimizer(run.optim, run.total_steps)
    make_state = lambda p: create_state(p, tx, "all", run.seed)  # noqa: E731
    shardings = state_shardings_for(jax.eval_shape(make_state, params), tx, mesh)
    state = jax.jit(make_state, out_shardings=shardings)(params)
    del params
    update = jit_update(lambda s, b: mdlm_update(s, b, model=model, tx=tx, eps=eps), shardings, mesh)

    began = time.perf_counter()
    config_json = {"config": config.to_dict(), "model": model_config_to_dict(model)}
    state, history = run_training(state, update, data, run, workdir, mesh, config_json, "pretrain",
                                  evaluate=periodic_decode_eval(model, task, run, mesh))
    train_time = time.perf_counter() - began

    params = state.params
    export_dir = run.export_dir or os.path.join(workdir, "hf")
    from dultra_jax.interop.hf_llada import export_hf

    export_hf(params, model, export_dir, dtype=run.export_dtype, source_dir=tokenizer_dir, overwrite=True)
    log.info("pretrain: exported the backbone and tokenizer to %s", export_dir)

    results = run_decode_eval(params, model, task, run, mesh, "pretrain")
    summary = {"steps": run.total_steps, "train_time_s": train_time, "export_dir": export_dir,
               "final_loss": history[-1]["loss"] if history else None, "eval": results}
    write_json(os.path.join(workdir, "pretrain_eval.json"), summary)
    return {"history": history, "export_dir": export_dir, "eval": results, "train_time_s": train_time}
