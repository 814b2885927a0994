"""LLaDA supervised fine-tuning (masked diffusion), used to pre-train the demo's base model.

A training row is `[prompt (left-padded to Lp) | response (Lr, EOS-padded)]`. Per row we draw
`t ~ U(eps, 1)` (`t = (1 - eps) u + eps`, `u ~ U(0, 1)`: LLaDA's `p_mask`), replace each response
token by `[MASK]` independently with probability `t` (the prompt is never masked), and score

    loss = mean over rows of  sum_{masked i} CE(logits_i, x_i) / t  /  #response tokens of the row

which is LLaDA's SFT objective: its guidelines divide by the answer length (EOS padding
included) and average over rows. The EOS padding is part of the answer, so the model learns to
fill the tail of a generation with EOS.

`pretrain(config, workdir)` is the whole job (`launch/pretrain.py` parses flags and calls it):
fixed-shape batches from a deterministic, resumable shuffle of a generator task's training
examples (`data.sft`) or of chat records (`data.chat`: `[prompt | response | EOS fill]` rows, the
prompt never masked), a jitted, sharded, donated AdamW step run by the training scaffold
(`training.loop`), an HF export of the backbone with the task's tokenizer files, and a held-out
accuracy check with `low_confidence` decoding for generator tasks (`training.sft`). The config is
`config.PretrainConfig` (`configs/demo_pretrain.py`: `model.planner` None, `optim.train` "all").

Outputs in `workdir`: `checkpoints/`, `metrics.jsonl`, `tensorboard/`, `pretrain_eval.json`,
`tokenizer/` (the run's tokenizer files, written at start-up so that a mid-run checkpoint is a
complete model source for export and evaluation), and the HF directory.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.experimental import multihost_utils

from dultra_jax.config import MASK_EPS, ModelConfig, PretrainConfig, from_config
from dultra_jax.data.sft import get_sft_task
from dultra_jax.interop.build import model_config
from dultra_jax.models import policy
from dultra_jax.training import sft
from dultra_jax.training.loop import setup, train_loop
from dultra_jax.training.restore import TOKENIZER_DIR
from dultra_jax.training.state import TrainState, apply_gradients, merge_params, step_key

log = logging.getLogger(__name__)

Params = policy.Params
Batch = dict[str, jax.Array]

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


# ------------------------------------------------------------------------------ the trainer


def mdlm_update(state: TrainState, batch: Batch, *, model: ModelConfig, tx: optax.GradientTransformation,
                eps: float = MASK_EPS):
    """One SFT step: fresh corruption from the step key, AdamW on the trainable group."""
    rng = step_key(state)
    loss_fn = lambda trainable: mdlm_loss(merge_params(trainable, state.frozen), batch, rng, model, eps)  # noqa: E731
    return apply_gradients(state, loss_fn, tx)


def save_workdir_tokenizer(save: Callable[[str], Any], workdir: str) -> str:
    """Writes the run's tokenizer files (`save(directory)`) to `workdir/tokenizer` (process 0,
    renamed into place when complete; kept when present, so a resume leaves it alone) and returns
    that path. Every process waits until it is there."""
    directory = os.path.join(workdir, TOKENIZER_DIR)
    if jax.process_index() == 0 and not os.path.isdir(directory):
        tmp = tempfile.mkdtemp(prefix=".tokenizer-", dir=workdir)
        save(tmp)
        os.replace(tmp, directory)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"tokenizer {os.path.abspath(directory)}")
    return directory


ROW_KEYS = ("tokens", "valid", "response")


def pretrain(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) masked-diffusion SFT of a LLaDA backbone in `workdir`, exports it as an
    HF directory with the run's tokenizer, and scores held-out decoding (generator tasks).

    The data is a generator task's rows or chat records (`data.task="chat"`, read and checked
    before the weights load; their stream position is checkpointed with the state).

    Returns `{"history": metric rows, "export_dir": path, "eval": [per-rule results],
    "train_time_s": seconds}`.
    """
    cfg = from_config(PretrainConfig, config)
    chat, task = None, None
    if cfg.data.is_chat:  # the data, tokenizer and row widths are checked before any weight is read
        chat = sft.open_chat_data(cfg.data, cfg.model.get("path"))
        sft.chat_encoder(chat, cfg.data, model_config(cfg.model))
    else:
        task = get_sft_task(cfg.data.task)
        cfg = dataclasses.replace(cfg, data=sft.with_task_defaults(cfg.data, task))
    run = setup(config, workdir, model_section=cfg.model, mesh=cfg.mesh, optim=cfg.optim,
                total_steps=cfg.total_steps, seed=cfg.seed, check_mesh=sft.check_batch_size(cfg.data))
    model = run.model
    update = sft.jit_batch_update(lambda s, b: mdlm_update(s, b, model=model, tx=run.tx, eps=cfg.mask_eps), run)
    if chat is not None:
        data = sft.chat_batches(chat, cfg.data, model, cfg.seed)
        step_fn, stream = sft.stream_step(update, data, run, ROW_KEYS), data
        tokenizer_dir = save_workdir_tokenizer(chat.tokenizer.save_pretrained, workdir)
        log.info("pretrain: %d chat records, rows of %d tokens, batch %d, %d steps (%.2f epochs)", data.size,
                 cfg.data.sequence_length, data.batch_size, cfg.total_steps,
                 cfg.total_steps * data.batch_size / data.size)
    else:
        task.check_model(model)
        sft.check_row_widths(cfg.data, task, model)
        tokenizer_dir = save_workdir_tokenizer(task.save_tokenizer, workdir)
        data = sft.training_rows(task, cfg.data, model, cfg.seed)
        step_fn, stream = sft.batch_step(update, data, run), None
        log.info("pretrain: %d %s examples, batch %d, %d steps (%.1f epochs)", data.size, task.name,
                 data.batch_size, cfg.total_steps, cfg.total_steps * data.batch_size / data.size)

    began = time.perf_counter()
    state, history = train_loop(run, step_fn, total_steps=cfg.total_steps, checkpoint=cfg.checkpoint,
                                name="pretrain", log_every=cfg.log_every,
                                progress_keys=("loss", "masked_ce", "masked_accuracy"), data=stream,
                                evaluate=sft.periodic_decode_eval(model, task, cfg, run.mesh),
                                evaluate_every=cfg.eval.every)
    train_time = time.perf_counter() - began

    export_dir = sft.export(state.params, model, cfg, workdir, tokenizer_dir)
    log.info("pretrain: exported the backbone and tokenizer to %s", export_dir)
    results = sft.run_decode_eval(state.params, model, task, cfg, run.mesh, "pretrain")
    summary = {"steps": cfg.total_steps, "train_time_s": train_time, "export_dir": export_dir,
               "final_loss": history[-1]["loss"] if history else None, "eval": results}
    if chat is not None:
        summary["rows_truncated"] = data.encoder.num_truncated
        summary["rows_encoded"] = data.encoder.num_encoded
    sft.write_json(os.path.join(workdir, "pretrain_eval.json"), summary)
    return {"history": history, "export_dir": export_dir, "eval": results, "train_time_s": train_time}
