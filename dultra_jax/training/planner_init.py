"""Planner initialisation: supervised imitation of the Fast-dLLM factor rule.

The backbone is frozen; only `params["planner"]` trains. From an SFT row `[prompt | solution +
EOS padding]` each step builds a partially decoded canvas:

* the current block, by `data.corruption`:
  - `"span"` (default; the reference's `dLLMDataCollator`): two positions uniform in
    `[Lp, L - 1)`, sorted, give a span `[b0, b1)` of at least `block_length` tokens anywhere in
    the answer (`b0 = min(lo, L - block_length)`, `b1 = max(hi, b0 + block_length)`);
  - `"aligned"`: one of the response's `Lr // block_length` blocks (`Lp + b * block_length`),
    uniformly: exactly the blocks the rollout decodes, so that no planner input straddles two
    blocks as none does at inference;
* `t ~ U(0, 1)`; `n = max(1, ceil(t * block size))` of the block's positions, chosen uniformly,
  are masked, and so is *every* position after the block;
* candidates = the block's masked positions (the suffix is not a candidate);
* targets = the `factor` rule's decisions (f = `factor`, default 1) on the frozen backbone's
  greedy predictions for the candidates: confidence = max softmax probability with the mask
  logit at -inf. The rule is `dultra_jax.decoding.rules.select` with `rule="factor"` on a
  `StepView` of block-local arrays, the very function the rollout uses;
* planner inputs: the backbone's `h_last` of the canvas, `t_plan = 1 - #mask / #valid` over the
  whole canvas (`policy.planner_timestep`, inside `planner_apply`) and the candidates;
* loss = `BCEWithLogits(pos_weight = #neg / #pos)` averaged over the batch's candidates (plain
  BCE when one class is empty).

The backbone forward runs outside `value_and_grad` on the frozen parameters (the reference's
`no_grad`), so no backward pass ever touches the backbone. Defaults as the reference: AdamW lr
1e-5, cosine, weight decay 0.01, gradient clipping 1.0.

`init_planner(config, workdir)` is the whole job (`launch/init_planner.py`): load the base HF
directory (`model.path`) with a fresh planner, train, log loss and agreement (accuracy, precision
and recall of `sigmoid(logit) > 0.5` against the targets), measure held-out agreement and
decoding, and export an HF directory with the planner (the base directory's tokenizer files
travel with it). The config is `config.PlannerInitConfig` (`configs/planner_init.py`).

Outputs in `workdir`: `checkpoints/` (planner + optimiser only), `metrics.jsonl`, `tensorboard/`,
`planner_init_eval.json` and the HF directory (default `workdir/hf`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from dultra_jax.config import CORRUPTIONS, ConfigError, DecodeConfig, ModelConfig, PlannerInitConfig, from_config
from dultra_jax.data.sft import SFTTask, get_sft_task
from dultra_jax.decoding import rules
from dultra_jax.hub import resolve_model_dir
from dultra_jax.interop.build import model_config
from dultra_jax.models import policy
from dultra_jax.sharding import global_batch
from dultra_jax.training import sft
from dultra_jax.training.loop import setup, train_loop
from dultra_jax.training.state import TrainState, apply_gradients, merge_params, step_key

log = logging.getLogger(__name__)

Params = policy.Params

@struct.dataclass
class PlannerExample:
    """One corrupted batch with its targets.

    Attributes:
      canvas: `[B, L]` int32 with `mask_id` at masked positions; valid: `[B, L]` bool.
      positions: `[B, Lb]` int32 canvas positions of each row's current block (`Lb` = `block_length`
        for aligned blocks; for spans, the whole response `Lr`, the candidates marking the span).
      candidates: `[B, Lb]` bool, the block's masked positions; in_block: `[B, L]` the same on the canvas.
      targets: `[B, Lb]` bool, the factor rule's reveal decisions (False off the candidates).
      confidence: `[B, Lb]` float32 greedy confidence of the backbone.
      h_last: `[B, L, D]` the frozen backbone's final hidden states (the planner's input).
    """

    canvas: jax.Array
    valid: jax.Array
    positions: jax.Array
    candidates: jax.Array
    in_block: jax.Array
    targets: jax.Array
    confidence: jax.Array
    h_last: jax.Array


def target_rule(decode: DecodeConfig) -> DecodeConfig:
    """The factor-rule config the targets use (greedy tokens, `f = decode.factor`)."""
    if decode.rule != "factor":
        raise ValueError(f"planner targets use the factor rule, got {decode.rule!r}")
    return decode


def corrupt_block(tokens: jax.Array, rng: jax.Array, *, prompt_length: int, block_length: int, num_blocks: int,
                  mask_id: int):
    """Masks part of a random aligned block of the response and everything after it.

    Args:
      tokens: `[B, L]` clean rows `[prompt (Lp) | response (num_blocks * block_length)]`.
    Returns:
      `(canvas [B, L], positions [B, Lb]`, `candidates [B, Lb]` bool, `in_block [B, L]` bool).
    """
    batch, length = tokens.shape
    b_key, t_key, u_key = jax.random.split(rng, 3)
    block = jax.random.randint(b_key, (batch,), 0, num_blocks)
    t = jax.random.uniform(t_key, (batch,), jnp.float32)
    n = jnp.maximum(1, jnp.ceil(t * block_length)).astype(jnp.int32)
    order = jnp.argsort(jax.random.uniform(u_key, (batch, block_length)), axis=-1)
    rank = jnp.argsort(order, axis=-1)  # a uniformly random permutation of 0..Lb-1 per row
    candidates = rank < n[:, None]
    start = prompt_length + block * block_length
    positions = (start[:, None] + jnp.arange(block_length)[None, :]).astype(jnp.int32)
    pos = jnp.arange(length)[None, :]
    rel = pos - start[:, None]
    inside = (rel >= 0) & (rel < block_length)
    in_block = inside & jnp.take_along_axis(candidates, jnp.clip(rel, 0, block_length - 1), axis=-1)
    is_masked = in_block | (rel >= block_length)
    return jnp.where(is_masked, mask_id, tokens), positions, candidates, in_block


def span_canvas(tokens: jax.Array, ends: jax.Array, t: jax.Array, scores: jax.Array, *, prompt_length: int,
                block_length: int, mask_id: int, starts: jax.Array | None = None):
    """The reference's corruption (`dLLMDataCollator`, `mask_type="random"`) from given draws.

    Args:
      tokens: `[B, L]` clean rows `[prompt (Lp) | response (Lr)]`.
      ends: `[B, 2]` int positions drawn in `[start, L - 1)`; sorted, they give the span
        `[b0, b1)` with `b0 = min(lo, L - block_length)` and `b1 = max(hi, b0 + block_length)`.
      t: `[B]` in `[0, 1)`: `n = max(1, ceil(t * (b1 - b0)))` of the span's positions are masked,
        those with the smallest `scores` `[B, L - Lp]` (uniform draws over the positions from Lp on).
      starts: `[B]` int, each row's first response position (chat rows, whose prompts differ in
        width; `Lp` is then 0); None: every row's response starts at `Lp`. The span never starts
        before it (the reference's `min(lo, L - 32)` could reach into a long prompt), and a row
        with at most 2 response positions gets no span, as the reference skips it.
    Returns:
      `(canvas [B, L], positions [B, L - Lp]`, `candidates [B, L - Lp]` bool, `in_block [B, L]`
      bool); every position from `b1` on is masked too, and is no candidate.
    """
    batch, length = tokens.shape
    b0 = jnp.minimum(jnp.min(ends, axis=-1), length - block_length)
    if starts is not None:
        b0 = jnp.maximum(b0, starts)
    b1 = jnp.maximum(jnp.max(ends, axis=-1), b0 + block_length)
    if starts is not None:
        b1 = jnp.where(length - starts <= 2, length, b1)  # no span, nothing masked
        b0 = jnp.where(length - starts <= 2, length, b0)
    n = jnp.maximum(1, jnp.ceil(t * (b1 - b0))).astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(prompt_length, length, dtype=jnp.int32), (batch, length - prompt_length))
    in_span = (positions >= b0[:, None]) & (positions < b1[:, None])
    rank = jnp.argsort(jnp.argsort(jnp.where(in_span, scores, jnp.inf), axis=-1), axis=-1)
    candidates = in_span & (rank < n[:, None])
    in_block = jnp.concatenate([jnp.zeros((batch, prompt_length), bool), candidates], axis=1)
    is_masked = in_block | (jnp.arange(length)[None, :] >= b1[:, None])
    return jnp.where(is_masked, mask_id, tokens), positions, candidates, in_block


def corrupt_span(tokens: jax.Array, rng: jax.Array, *, prompt_length: int, block_length: int, mask_id: int,
                 starts: jax.Array | None = None):
    """`span_canvas` with the reference's random draws: two positions uniform in `[start, L - 1)`
    (`start` = `starts` per row, else `Lp`), `t ~ U(0, 1)`, and a uniformly random choice of the
    masked positions."""
    batch, length = tokens.shape
    e_key, t_key, u_key = jax.random.split(rng, 3)
    low = prompt_length if starts is None else jnp.minimum(starts, length - 2)[:, None]
    ends = jax.random.randint(e_key, (batch, 2), low, length - 1)
    t = jax.random.uniform(t_key, (batch,), jnp.float32)
    scores = jax.random.uniform(u_key, (batch, length - prompt_length))
    return span_canvas(tokens, ends, t, scores, prompt_length=prompt_length, block_length=block_length,
                       mask_id=mask_id, starts=starts)


def factor_targets(token_logits: jax.Array, candidates: jax.Array, decode: DecodeConfig):
    """The factor rule's decisions on block-local logits.

    Args:
      token_logits: `[B, Lb, V]` float32 with the mask logit at -inf; candidates: `[B, Lb]` bool.
    Returns:
      `(targets [B, Lb]` bool, `confidence [B, Lb]` float32).
    """
    x0 = jnp.argmax(token_logits, axis=-1).astype(jnp.int32)
    confidence = jnp.take_along_axis(jax.nn.softmax(token_logits, axis=-1), x0[..., None], axis=-1)[..., 0]
    rule = target_rule(decode)
    view = rules.StepView(token_logits=token_logits, x0=x0, confidence=confidence, unmask_probs=None,
                          candidates=candidates, block_step=jnp.zeros(candidates.shape[:1], jnp.int32),
                          knobs=rules.Knobs.of(rule))
    # The factor rule is deterministic; the key is unused.
    return rules.select(view, jax.random.key(0), rule), confidence


def planner_example(params: Params, batch: dict[str, jax.Array], rng: jax.Array, model: ModelConfig,
                    decode: DecodeConfig, corruption: str = "span") -> PlannerExample:
    """Corrupts `batch` (`{tokens, valid}`), runs the frozen backbone, and labels the candidates.

    `decode` fixes `prompt_length`, `gen_length`, `block_length` and the factor (`rule="factor"`);
    `corruption` is `"span"` (`corrupt_span`, the reference) or `"aligned"` (`corrupt_block`).
    Chat rows carry `batch["prompt_length"]` `[B]` (each prompt's width): their spans start after
    it, every position is a possible candidate, and only `decode`'s block length and factor count.
    Only the backbone of `params` is read (any planner entry is ignored), under `stop_gradient`:
    nothing here is differentiated.
    """
    backbone = jax.lax.stop_gradient({k: v for k, v in params.items() if k != policy.PLANNER_KEY})
    if "prompt_length" in batch:
        canvas, positions, candidates, in_block = corrupt_span(
            batch["tokens"], rng, prompt_length=0, block_length=decode.block_length, mask_id=model.mask_token_id,
            starts=batch["prompt_length"])
    elif corruption == "span":
        canvas, positions, candidates, in_block = corrupt_span(
            batch["tokens"], rng, prompt_length=decode.prompt_length, block_length=decode.block_length,
            mask_id=model.mask_token_id)
    elif corruption == "aligned":
        canvas, positions, candidates, in_block = corrupt_block(
            batch["tokens"], rng, prompt_length=decode.prompt_length, block_length=decode.block_length,
            num_blocks=decode.num_blocks, mask_id=model.mask_token_id)
    else:
        raise ValueError(f"corruption={corruption!r} is not one of {CORRUPTIONS}")
    token_logits, h_last = policy.forward(backbone, canvas, model.replace(planner=None), valid=batch["valid"],
                                          logit_positions=positions)
    token_logits = policy.suppress_mask_logit(token_logits.astype(jnp.float32), model.mask_token_id)
    targets, confidence = factor_targets(token_logits, candidates, decode)
    return PlannerExample(canvas=canvas, valid=batch["valid"], positions=positions, candidates=candidates,
                          in_block=in_block, targets=targets, confidence=confidence,
                          h_last=jax.lax.stop_gradient(h_last))


def planner_bce(unmask_logits: jax.Array, targets: jax.Array, candidates: jax.Array):
    """`BCEWithLogits(pos_weight = #neg / #pos)` averaged over the candidates.

    `pos_weight` is computed over the whole (global) batch, 1 when either class is empty.
    Returns `(loss, pos_weight)`.
    """
    y = targets.astype(jnp.float32)
    num_pos = jnp.sum(candidates & targets)
    num_neg = jnp.sum(candidates & ~targets)
    pos_weight = jnp.where((num_pos > 0) & (num_neg > 0), num_neg / jnp.maximum(num_pos, 1), 1.0).astype(jnp.float32)
    z = unmask_logits.astype(jnp.float32)
    per = -(pos_weight * y * jax.nn.log_sigmoid(z) + (1.0 - y) * jax.nn.log_sigmoid(-z))
    loss = jnp.sum(jnp.where(candidates, per, 0.0)) / jnp.maximum(jnp.sum(candidates), 1)
    return loss, pos_weight


def agreement(unmask_logits: jax.Array, targets: jax.Array, candidates: jax.Array) -> dict[str, jax.Array]:
    """Accuracy, precision and recall of `sigmoid(logit) > 0.5` against the targets over the
    candidates, and the true and predicted positive rates."""
    pred = unmask_logits > 0
    tp = jnp.sum(candidates & pred & targets)
    fp = jnp.sum(candidates & pred & ~targets)
    fn = jnp.sum(candidates & ~pred & targets)
    n = jnp.maximum(jnp.sum(candidates), 1)
    return {"accuracy": jnp.sum(candidates & (pred == targets)) / n,
            "precision": tp / jnp.maximum(tp + fp, 1), "recall": tp / jnp.maximum(tp + fn, 1),
            "positive_rate": jnp.sum(candidates & targets) / n, "predicted_rate": jnp.sum(candidates & pred) / n}


def planner_logits(params: Params, example: PlannerExample, model: ModelConfig) -> jax.Array:
    """The planner's unmask logits at the block positions: `[B, Lb]` float32."""
    logits = policy.planner_apply(params, example.h_last, example.canvas, example.in_block, model,
                                  valid=example.valid)
    return policy.gather_positions(logits, example.positions)


def planner_update(state: TrainState, batch: dict[str, jax.Array], *, model: ModelConfig, decode: DecodeConfig,
                   tx: optax.GradientTransformation, corruption: str = "span"):
    """One planner step: the example from the frozen backbone, then BCE on the planner only."""
    example = planner_example(state.frozen, batch, step_key(state), model, decode, corruption)

    def loss_fn(trainable):
        z = planner_logits(merge_params(trainable, state.frozen), example, model)
        loss, pos_weight = planner_bce(z, example.targets, example.candidates)
        return loss, {"pos_weight": pos_weight, **agreement(z, example.targets, example.candidates)}

    return apply_gradients(state, loss_fn, tx)


def planner_eval(params: Params, batch: dict[str, jax.Array], rng: jax.Array, *, model: ModelConfig,
                 decode: DecodeConfig, corruption: str = "span") -> dict[str, jax.Array]:
    """Loss and agreement on one batch, no update."""
    example = planner_example(params, batch, rng, model, decode, corruption)
    z = planner_logits(params, example, model)
    loss, pos_weight = planner_bce(z, example.targets, example.candidates)
    return {"loss": loss, "pos_weight": pos_weight, **agreement(z, example.targets, example.candidates)}


def heldout_agreement(params: Params, model: ModelConfig, heldout: sft.SFTData | None, cfg: PlannerInitConfig,
                      decode: DecodeConfig, mesh) -> dict[str, float] | None:
    """Mean loss and agreement over the batches of `heldout` (None: not measured)."""
    if heldout is None:
        return None
    evaluate = jax.jit(lambda p, b, k: planner_eval(p, b, k, model=model, decode=decode,
                                                    corruption=cfg.data.corruption))
    key = jax.random.key(cfg.seed + 1)
    metrics = [evaluate(params, global_batch(heldout.local_batch(j), mesh), jax.random.fold_in(key, j))
               for j in range(heldout.size // heldout.batch_size)]
    host = jax.device_get(metrics)
    return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


ROW_KEYS = ("tokens", "valid")
CHAT_ROW_KEYS = ("tokens", "valid", "prompt_length")


def _heldout_rows(cfg: PlannerInitConfig, model: ModelConfig, task: SFTTask | None,
                  chat: sft.ChatSource | None) -> sft.SFTData | None:
    """`eval.agreement_batches` batches of held-out rows (None when 0)."""
    batches = cfg.eval.agreement_batches
    if batches <= 0:
        return None
    if chat is not None:
        return sft.chat_heldout_rows(chat, cfg, model, batches * cfg.data.batch_size, CHAT_ROW_KEYS)
    section = dataclasses.replace(cfg.data, split=cfg.eval.split, start=cfg.eval.start,
                                  num_examples=batches * cfg.data.batch_size)
    return sft.training_rows(task, section, model, cfg.seed, keys=ROW_KEYS)


def target_decode(cfg: PlannerInitConfig) -> DecodeConfig:
    """The factor rule whose decisions the planner imitates, on the rows' canvas. Chat rows have
    no fixed prompt width: their canvas here is one block after a one-token prompt, of which
    only the block length (the shortest span) and the factor are read."""
    if cfg.data.is_chat:
        return DecodeConfig(rule="factor", prompt_length=1, gen_length=cfg.data.block_length,
                            block_length=cfg.data.block_length, temperature=0.0, factor=cfg.factor)
    return DecodeConfig(rule="factor", prompt_length=cfg.data.prompt_length, gen_length=cfg.data.response_length,
                        block_length=cfg.data.block_length, temperature=0.0, factor=cfg.factor)


def init_planner(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) planner initialisation in `workdir` and exports an HF directory with the
    planner.

    The data is a generator task's rows or chat records (`data.task="chat"`, read and checked
    before the weights load; their stream position is checkpointed with the state).

    Returns `{"history", "export_dir", "agreement" (held-out), "eval" (decoding), "train_time_s"}`.
    """
    cfg = from_config(PlannerInitConfig, config)
    base_dir = resolve_model_dir(cfg.model["path"], "model.path")
    chat, task = None, None
    if cfg.data.is_chat:  # the data, tokenizer and row widths are checked before any weight is read
        chat = sft.open_chat_data(cfg.data, base_dir)
        sft.chat_encoder(chat, cfg.data, model_config(cfg.model))
    else:
        task = get_sft_task(cfg.data.task)
        cfg = dataclasses.replace(cfg, data=sft.with_task_defaults(cfg.data, task))
        if cfg.data.response_length % cfg.data.block_length:
            raise ConfigError(f"data.response_length={cfg.data.response_length} is not a multiple of "
                              f"data.block_length={cfg.data.block_length}")
    run = setup(config, workdir, model_section=cfg.model, mesh=cfg.mesh, optim=cfg.optim,
                total_steps=cfg.total_steps, seed=cfg.seed, check_mesh=sft.check_batch_size(cfg.data))
    model = run.model
    decode = target_decode(cfg)
    decode.check_model(model)
    update = sft.jit_batch_update(lambda s, b: planner_update(s, b, model=model, decode=decode, tx=run.tx,
                                                              corruption=cfg.data.corruption), run)
    if chat is not None:
        data = sft.chat_batches(chat, cfg.data, model, cfg.seed)
        step_fn, stream = sft.stream_step(update, data, run, CHAT_ROW_KEYS), data
        described = f"{data.size} chat records in rows of {cfg.data.sequence_length} tokens"
    else:
        task.check_model(model)
        data = sft.training_rows(task, cfg.data, model, cfg.seed, keys=ROW_KEYS)
        step_fn, stream = sft.batch_step(update, data, run), None
        described = f"{data.size} {task.name} examples"
    heldout = _heldout_rows(cfg, model, task, chat)  # read before training: a bad eval file fails now
    log.info("init_planner: base %s, %s, batch %d, %d steps", base_dir, described, data.batch_size, cfg.total_steps)

    began = time.perf_counter()
    state, history = train_loop(run, step_fn, total_steps=cfg.total_steps, checkpoint=cfg.checkpoint,
                                name="init_planner", log_every=cfg.log_every,
                                progress_keys=("loss", "accuracy", "precision", "recall"), data=stream)
    train_time = time.perf_counter() - began

    params = state.params
    export_dir = sft.export(params, model, cfg, workdir, chat.tokenizer_dir if chat is not None else base_dir)
    log.info("init_planner: exported the model with its planner to %s", export_dir)
    agreement_heldout = heldout_agreement(params, model, heldout, cfg, decode, run.mesh)
    if agreement_heldout is not None:
        log.info("init_planner held-out agreement: %s",
                 " ".join(f"{k} {v:.4g}" for k, v in agreement_heldout.items()))
    results = sft.run_decode_eval(params, model, task, cfg, run.mesh, "init_planner")
    summary = {"steps": cfg.total_steps, "train_time_s": train_time, "base_dir": base_dir, "export_dir": export_dir,
               "final_train_metrics": history[-1] if history else None, "heldout_agreement": agreement_heldout,
               "eval": results}
    sft.write_json(os.path.join(workdir, "planner_init_eval.json"), summary)
    return {"history": history, "export_dir": export_dir, "agreement": agreement_heldout, "eval": results,
            "train_time_s": train_time}
