"""What the two SFT trainers (masked-diffusion pre-training, planner initialisation) share beyond
the training scaffold: their data (a generator task's fixed-shape rows, or chat records), the
jitted batch step, held-out decoding accuracy (periodic and final), the HF export and the summary
file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from dultra_jax.config import SCHEDULED_RULES, ConfigError, DecodeConfig, ModelConfig, SFTConfig, SFTDataConfig
from dultra_jax.data.chat import ChatBatches, ChatEncoder, chat_rows, check_chat_template, load_chat_records
from dultra_jax.data.sft import SFTData, SFTTask, encode_rows, task_rows
from dultra_jax.data.tokenizer import decode_completion, load_tokenizer
from dultra_jax.hub import resolve_model_dir
from dultra_jax.decoding.rollout import rollout
from dultra_jax.interop.hf_llada import export_hf
from dultra_jax.models.policy import Params
from dultra_jax.sharding import check_batch, global_batch, local_rows, process_row_range
from dultra_jax.training import programs
from dultra_jax.training.loop import Run
from dultra_jax.training.state import TrainState

log = logging.getLogger(__name__)


def with_task_defaults(data: SFTDataConfig, task: SFTTask) -> SFTDataConfig:
    """`data` with the row widths (and block length) it leaves at None taken from the task."""
    defaults = {"prompt_length": task.prompt_length, "response_length": task.response_length,
                "block_length": task.block_length}
    return dataclasses.replace(data, **{k: v for k, v in defaults.items()
                                        if hasattr(data, k) and getattr(data, k) is None})


def check_batch_size(data: SFTDataConfig) -> Callable:
    """The `setup` start-up check: `data.batch_size` rows split evenly over the mesh."""
    return lambda mesh: check_batch(f"data.batch_size ({data.batch_size})", data.batch_size, mesh)


def training_rows(task: SFTTask, data: SFTDataConfig, model: ModelConfig, seed: int,
                  keys: Sequence[str] = ("tokens", "valid", "response")) -> SFTData:
    """The resumable shuffle over the encoded rows of `data`'s problems (entries `keys`)."""
    _, rows = task_rows(task, data.split, data.num_examples, data.start, data.prompt_length, data.response_length,
                        model)
    return SFTData({k: rows[k] for k in keys}, data.batch_size, seed)


# ------------------------------------------------------------------------------ chat data


@dataclasses.dataclass
class ChatSource:
    """The chat records and tokenizer of an SFT run, opened and checked before any weights load."""

    records: Sequence[dict]
    tokenizer: Any
    tokenizer_dir: str


def open_chat_data(data: SFTDataConfig, model_path: str | None) -> ChatSource:
    """Reads (and checks) `data.path`'s records and loads the tokenizer (`data.tokenizer`, else
    `model.path`: a directory or hub id) with its chat template; errors name the file, record and
    field. Reads no weights."""
    if not (data.tokenizer or model_path):
        raise ConfigError("data.task='chat' renders records with a tokenizer: set data.tokenizer or model.path")
    key = "data.tokenizer" if data.tokenizer else "model.path"
    tokenizer_dir = resolve_model_dir(data.tokenizer or model_path, key)
    tokenizer = load_tokenizer(tokenizer_dir, key=key)
    check_chat_template(tokenizer, tokenizer_dir)
    records = load_chat_records(data.path, data.split, data_dir=data.data_dir, limit=data.limit)
    log.info("chat data: %d records of split %s at %s, rendered with the chat template of %s", len(records),
             data.split, data.path, tokenizer_dir)
    return ChatSource(records=records, tokenizer=tokenizer, tokenizer_dir=tokenizer_dir)


def chat_encoder(source: ChatSource, data: SFTDataConfig, model: ModelConfig) -> ChatEncoder:
    """Rows `data.sequence_length` wide, filled with the model's EOS; the width must fit the model."""
    if data.sequence_length > model.max_sequence_length:
        raise ConfigError(f"data.sequence_length={data.sequence_length} exceeds "
                          f"model.max_sequence_length={model.max_sequence_length}")
    if len(source.tokenizer) > model.vocab_size:
        raise ConfigError(f"the tokenizer in {source.tokenizer_dir} has {len(source.tokenizer)} tokens, more than "
                          f"model.vocab_size={model.vocab_size}")
    return ChatEncoder(source.tokenizer, sequence_length=data.sequence_length, eos_id=model.eos_token_id,
                       strip_think=data.strip_think, path=data.path)


def chat_batches(source: ChatSource, data: SFTDataConfig, model: ModelConfig, seed: int) -> ChatBatches:
    """This process's shuffled training batches of chat rows, resumable from their state."""
    return ChatBatches(source.records, chat_encoder(source, data, model), batch_size=data.batch_size,
                       seed=seed if data.shuffle_seed is None else data.shuffle_seed,
                       process_index=jax.process_index(), process_count=jax.process_count())


def chat_heldout_rows(source: ChatSource, cfg: SFTConfig, model: ModelConfig, num_rows: int,
                      keys: Sequence[str]) -> SFTData:
    """The first `num_rows` records of `eval.split` at `eval.path` (None: `data.path`), encoded in
    order, as fixed batches of `data.batch_size` rows."""
    path = cfg.eval.path or cfg.data.path
    records = load_chat_records(path, cfg.eval.split, data_dir=cfg.data.data_dir, limit=num_rows)
    encoder = chat_encoder(source, dataclasses.replace(cfg.data, path=path), model)
    rows = chat_rows(records, encoder, num_rows)
    return SFTData({k: rows[k] for k in keys}, cfg.data.batch_size, cfg.seed)


def stream_step(update: Callable, data: ChatBatches, run: Run, keys: Sequence[str]) -> Callable:
    """The scaffold's step function over a checkpointed stream: this process's rows of its next
    batch (entries `keys`)."""
    return lambda state, step: update(state, global_batch({k: v for k, v in data.next_batch().items() if k in keys},
                                                          run.mesh))


# ------------------------------------------------------------------------------ the step


def jit_batch_update(update: Callable, run: Run) -> Callable:
    """`update(state, batch)` jitted with the state's shardings, rows over ('data', 'fsdp'), and
    the state donated."""
    return programs.batch_update(update, run.programs)


def batch_step(update: Callable, data: SFTData, run: Run) -> Callable:
    """The scaffold's step function of an SFT trainer: this process's rows of batch `step`."""
    return lambda state, step: update(state, global_batch(data.local_batch(step), run.mesh))


# ------------------------------------------------------------------------------ decoding eval


def decode_accuracy(params: Params, model: ModelConfig, task: SFTTask, problems: Sequence[dict],
                    decode: DecodeConfig, batch_size: int, mesh, seed: int = 0, num_samples: int = 5) -> dict:
    """Held-out accuracy of `decode` on `problems`, with NFE and a few samples.

    Decodes in fixed batches of `batch_size` rows (the last padded with filler rows that are not
    scored); batch `j` uses `fold_in(key(seed), j)`. `tokens_per_forward` counts every generated
    position (EOS padding included) per NFE.
    """
    began = time.perf_counter()
    encoded = [task.encode(task.tokenizer, p)[0] for p in problems]
    rows = encode_rows([(p, []) for p in encoded], decode.prompt_length, 0, model.pad_token_id, model.eos_token_id)
    mine = process_row_range(mesh, batch_size)
    correct, nfe, samples = [], [], []
    for j, first in enumerate(range(0, len(problems), batch_size)):
        idx = np.arange(first, first + batch_size)
        real = idx < len(problems)
        idx = np.where(real, idx, 0)
        prompts = global_batch({"tokens": rows["tokens"][idx][mine], "valid": rows["valid"][idx][mine]}, mesh)
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


def eval_decode_config(rule: str, cfg: SFTConfig, task: SFTTask, model: ModelConfig) -> DecodeConfig:
    """The held-out decoding of `rule`: greedy tokens on the task's own canvas (its prompt
    length, whatever `data.prompt_length` trained with: RoPE is relative and padding keys are
    masked, so left padding does not change the model's outputs) and blocks."""
    steps = cfg.eval.steps if rule in SCHEDULED_RULES else None
    decode = DecodeConfig(rule=rule, prompt_length=max(task.prompt_length, cfg.data.prompt_length),
                          gen_length=cfg.data.response_length, block_length=cfg.eval.block_length or task.block_length,
                          temperature=0.0, steps=steps, eos_token_id=model.eos_token_id)
    decode.check_model(model)
    return decode


def _eval_batch_size(cfg: SFTConfig) -> int:
    return cfg.eval.batch_size or cfg.data.batch_size


def periodic_decode_eval(model: ModelConfig, task: SFTTask, cfg: SFTConfig, mesh) -> Callable[[TrainState, int], dict] | None:
    """The `train_loop` evaluation: the first eval rule's accuracy and NFE on the first
    `eval.every_examples` eval problems (None when `eval.every` is 0 or there is no rule)."""
    num = min(cfg.eval.every_examples, cfg.eval.num_examples)
    if not cfg.eval.every or not cfg.eval.rules or num <= 0:
        return None
    rule = cfg.eval.rules[0]
    problems = task.make_problems(cfg.eval.split, num, cfg.eval.start)
    decode = eval_decode_config(rule, cfg, task, model)

    def evaluate(state: TrainState, step: int) -> dict[str, float]:
        result = decode_accuracy(state.params, model, task, problems, decode, _eval_batch_size(cfg), mesh,
                                 seed=cfg.seed, num_samples=0)
        return {f"eval_{rule}_accuracy": result["accuracy"], f"eval_{rule}_nfe": result["nfe_mean"]}

    return evaluate


def run_decode_eval(params: Params, model: ModelConfig, task: SFTTask, cfg: SFTConfig, mesh, name: str) -> list[dict]:
    """`decode_accuracy` for each rule of `eval.rules` on the eval split (logged)."""
    if cfg.eval.num_examples <= 0 or not cfg.eval.rules:
        return []
    problems = task.make_problems(cfg.eval.split, cfg.eval.num_examples, cfg.eval.start)
    batch_size = _eval_batch_size(cfg)
    check_batch(f"eval.batch_size ({batch_size})", batch_size, mesh)
    results = []
    for rule in cfg.eval.rules:
        result = decode_accuracy(params, model, task, problems, eval_decode_config(rule, cfg, task, model),
                                 batch_size, mesh, seed=cfg.seed)
        log.info("%s eval %s on %d %s problems: accuracy %.4f nfe %.2f tokens/forward %.2f (%.1fs)", name, rule,
                 result["num_examples"], cfg.eval.split, result["accuracy"], result["nfe_mean"],
                 result["tokens_per_forward"], result["wall_s"])
        results.append(result)
    return results


def export(params: Params, model: ModelConfig, cfg: SFTConfig, workdir: str, source_dir: str) -> str:
    """Writes the trained model as an HF directory (`export_dir`, default `workdir/hf`) with the
    tokenizer files of `source_dir`; returns its path."""
    export_dir = cfg.export_dir or os.path.join(workdir, "hf")
    export_hf(params, model, export_dir, dtype=cfg.export_dtype, source_dir=source_dir, overwrite=True)
    return export_dir


def write_json(path: str, value: Any) -> None:
    """`value` as indented JSON at `path` (process 0; written whole, then renamed into place)."""
    if jax.process_index() != 0:
        return
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2, default=lambda x: x.item() if hasattr(x, "item") else str(x))
        f.write("\n")
    os.replace(path + ".tmp", path)


def check_row_widths(data: SFTDataConfig, task: SFTTask, model: ModelConfig) -> None:
    """The rows must fit the model, and a prompt width other than the task's is only exact when
    padding keys are masked."""
    length = data.prompt_length + data.response_length
    if length > model.max_sequence_length:
        raise ConfigError(f"data.prompt_length + data.response_length = {length} exceeds "
                          f"model.max_sequence_length={model.max_sequence_length}")
    if data.prompt_length != task.prompt_length and not model.mask_padding:
        raise ConfigError(f"data.prompt_length={data.prompt_length} differs from the {task.name} task's "
                          f"{task.prompt_length}, which is only exact with model.mask_padding=True")
