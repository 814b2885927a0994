"""The grain input pipeline: shuffle by seed, tokenise, left-pad / truncate, batch, shard by process.

    it = make_train_iterator(records, task, tokenizer, prompt_length=512, batch_size=8, seed=42,
                             process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(it)
    state = it.get_state()          # what the trainer checkpoints (a small dict)
    it.set_state(state)             # resumes exactly there

`batch_size` is the GLOBAL number of prompts per step (`P` over all processes, as big_vision's
`batch_size`); each process yields `batch_size // process_count` rows: its part of one global
batch. Every process builds the same shuffled stream (same seed) and takes the contiguous part
`[process_index*Pl, (process_index+1)*Pl)` of each global batch, so the processes' rows are disjoint
and, in process order, are exactly the batches of a single process.

A batch (per process, `Pl = batch_size // process_count` rows):
  prompt_tokens     int32 [Pl, Lp]  prompt ids, left-padded with `pad_id`, truncated to the LAST Lp
  prompt_valid      bool  [Pl, Lp]  True on real prompt tokens
  prompt_truncated  bool  [Pl]      the prompt was longer than Lp (its start was dropped)
  index             int64 [Pl]      index of the row's record in `records`
  row_valid         bool  [Pl]      False on evaluation padding rows (always True in training)
  prompt_text       object [Pl]     the rendered prompt text (chat template applied)
  prompt_messages   object [Pl]     JSON of the chat messages (or of the plain prompt text), so a
                                    distillation teacher can render them with ITS chat template
  answer, ...       object [Pl]     `task.example_fields(record)` (str), e.g. tests, entry_point

Truncation keeps the end of the prompt (the question and the assistant header), like TRL's
`max_prompt_length`. Truncated prompts are logged (the first one, then at counts 2, 4, 8, ...) and
counted in a `TruncationCounter` (`truncation_counter(iterator)`).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from dultra_jax.data import tokenizer as tok
from dultra_jax.data.sources import DataError, IndexedSource
from dultra_jax.data.tasks import Task

logger = logging.getLogger(__name__)

NUMERIC_KEYS = ("prompt_tokens", "prompt_valid", "prompt_truncated", "index", "row_valid")


class TruncationCounter:
    """Counts prompts longer than `prompt_length` (thread-safe); logs the 1st, 2nd, 4th, 8th, ..."""

    def __init__(self, prompt_length: int):
        self.prompt_length = prompt_length
        self.truncated = 0
        self.encoded = 0
        self._lock = threading.Lock()

    def record(self, index: int, length: int) -> bool:
        truncated = length > self.prompt_length
        with self._lock:
            self.encoded += 1
            if truncated:
                self.truncated += 1
                n = self.truncated
        if truncated and (n & (n - 1)) == 0:
            logger.warning("prompt of record %d has %d tokens > prompt_length %d: kept its last %d tokens "
                           "(%d of %d encoded prompts truncated so far)",
                           index, length, self.prompt_length, self.prompt_length, n, self.encoded)
        return truncated

    def __repr__(self) -> str:
        return f"TruncationCounter({self.truncated} of {self.encoded} prompts > {self.prompt_length} tokens)"


def resolve_pad_id(tokenizer, pad_id: int | None) -> int:
    """`pad_id` if given, else the tokenizer's pad token, else its EOS (LLaDA pads with EOS)."""
    if pad_id is not None:
        return int(pad_id)
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None) if tokenizer is not None else None
        if value is not None:
            return int(value)
    raise ValueError("no pad id: pass pad_id= (the tokenizer is None or has no pad / eos token)")


class PromptEncoder:
    """`(index, record) -> example dict` (unbatched): renders, tokenises, truncates and left-pads."""

    def __init__(self, task: Task, tokenizer, *, prompt_length: int, mode: str | None = None,
                 pad_id: int | None = None, counter: TruncationCounter | None = None):
        if prompt_length <= 0:
            raise ValueError(f"prompt_length must be positive, got {prompt_length}")
        self.task = task
        self.tokenizer = tokenizer
        self.prompt_length = int(prompt_length)
        self.mode = mode or task.mode
        self.pad_id = resolve_pad_id(tokenizer, pad_id)
        self.counter = counter or TruncationCounter(self.prompt_length)

    def prompt_ids(self, record: Mapping[str, Any]) -> tuple[list[int], str, str]:
        """(ids, rendered text, JSON of the prompt) of one record, before truncation."""
        prompt = self.task.build_prompt(record, self.mode)
        messages_json = json.dumps(prompt, ensure_ascii=False)
        if "prompt_ids" in record:
            ids = [int(i) for i in record["prompt_ids"]]
            return ids, tok.render_prompt(self.tokenizer, prompt), messages_json
        if self.tokenizer is None:
            raise DataError(f"task {self.task.name!r}: a record needs field 'prompt_ids' when there is no "
                            f"tokenizer (it has {sorted(record)})")
        text = tok.render_prompt(self.tokenizer, prompt)
        return tok.encode_text(self.tokenizer, text), text, messages_json

    def __call__(self, item: tuple[int, Mapping[str, Any]]) -> dict[str, Any]:
        index, record = item
        ids, text, messages_json = self.prompt_ids(record)
        lp = self.prompt_length
        truncated = self.counter.record(index, len(ids))
        ids = ids[-lp:]
        tokens = np.full((lp,), self.pad_id, np.int32)
        valid = np.zeros((lp,), np.bool_)
        if ids:
            tokens[lp - len(ids):] = ids
            valid[lp - len(ids):] = True
        out = {"prompt_tokens": tokens, "prompt_valid": valid, "prompt_truncated": np.bool_(truncated),
               "index": np.int64(index), "row_valid": np.bool_(True), "prompt_text": text,
               "prompt_messages": messages_json}
        for key, value in self.task.example_fields(record).items():
            if key in out:
                raise ValueError(f"task {self.task.name!r}: example field {key!r} clashes with a batch key")
            out[key] = str(value)
        return out


def collate(examples: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Stack numeric fields; string fields become object arrays `[P]`."""
    batch: dict[str, np.ndarray] = {}
    for key in examples[0]:
        values = [e[key] for e in examples]
        if key in NUMERIC_KEYS or isinstance(values[0], (np.ndarray, np.generic)):
            batch[key] = np.stack(values)
        else:
            arr = np.empty((len(values),), dtype=object)
            arr[:] = values
            batch[key] = arr
    return batch


def _selected_source(records: Sequence[Mapping[str, Any]], task: Task) -> IndexedSource:
    if len(records) == 0:
        raise DataError(f"task {task.name!r}: no records")
    if task.filter_fn is None:
        return IndexedSource(records)
    keep = task.select(records)
    if not keep:
        raise DataError(f"task {task.name!r}: none of the {len(records)} records is usable (options "
                        f"{dict(task.options)})")
    return IndexedSource(records, keep)


def _local_batch(batch_size: int, process_index: int, process_count: int) -> int:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} (global prompts per step) must be a positive multiple of "
                         f"process_count {process_count}")
    return batch_size // process_count


def shuffled_batches(source: Sequence, encode, *, batch_size: int, seed: int, process_index: int = 0,
                     process_count: int = 1, num_epochs: int | None = None, what: str = "data") -> grain.MapDataset:
    """This process's batches of a shuffled, repeated stream of encoded examples.

    `source` is random-access (`IndexedSource` gives `(index, record)` pairs); `encode` maps one
    element to a dict of fields that `collate` stacks. Every process builds the same stream (same
    seed) and takes its contiguous part of each global batch of `batch_size` rows, so the
    processes' rows are disjoint and, in process order, equal a single process's batches.
    `num_epochs` None repeats forever; otherwise the final partial global batch is dropped.
    """
    local = _local_batch(batch_size, process_index, process_count)
    ds = grain.MapDataset.source(source).shuffle(seed=int(seed) % 2**32).repeat(num_epochs)
    if num_epochs is not None:
        usable = (len(ds) // batch_size) * batch_size       # whole global batches only
        if usable == 0:
            raise DataError(f"{what}: {len(ds)} examples x epochs is less than one batch of {batch_size}")
        ds = ds[:usable]
    # Chunks of `local` consecutive rows, chunk c going to process c % process_count: global batch j
    # is then rows [j*batch_size, (j+1)*batch_size) of the stream in process order, exactly a single
    # process's batch j. The map and batch are lazy, so a process encodes only its own rows.
    ds = ds.map(encode).batch(local, drop_remainder=True, batch_fn=collate)
    return ds[process_index::process_count]


def make_train_dataset(records: Sequence[Mapping[str, Any]], task: Task, tokenizer, *, prompt_length: int,
                       batch_size: int, seed: int, mode: str | None = None, process_index: int = 0,
                       process_count: int = 1, num_epochs: int | None = None, pad_id: int | None = None,
                       counter: TruncationCounter | None = None) -> grain.MapDataset:
    """The batched, process-sharded `grain.MapDataset` behind `make_train_iterator`."""
    source = _selected_source(records, task)
    encoder = PromptEncoder(task, tokenizer, prompt_length=prompt_length, mode=mode, pad_id=pad_id,
                            counter=counter)
    return shuffled_batches(source, encoder, batch_size=batch_size, seed=seed, process_index=process_index,
                            process_count=process_count, num_epochs=num_epochs, what=f"task {task.name!r}")


def make_train_iterator(records: Sequence[Mapping[str, Any]], task: Task, tokenizer, *, prompt_length: int,
                        batch_size: int, seed: int, mode: str | None = None, process_index: int = 0,
                        process_count: int = 1, num_epochs: int | None = None, pad_id: int | None = None,
                        read_threads: int = 0, prefetch: int = 4) -> grain.DatasetIterator:
    """A checkpointable iterator of training batches (module doc for the batch layout).

    Args:
      records: a random-access sequence of records (a list from `load_records`, or `open_source`).
      task: its `build_prompt` / `example_fields` make each row; `task.select` picks the records used.
      tokenizer: a HF tokenizer, or None when records carry `prompt_ids` (then pass `pad_id`).
      prompt_length: `Lp`; longer prompts keep their last `Lp` tokens.
      batch_size: GLOBAL prompts per step; each process yields `batch_size // process_count`.
      seed: the shuffle seed (each epoch is reshuffled from it).
      mode: prompt mode; None uses the task's.
      num_epochs: None repeats forever; otherwise the stream ends after that many epochs (the final
        partial global batch is dropped, so every process yields the same number of batches).
      pad_id: padding id; default the tokenizer's pad (else EOS) id.
      read_threads / prefetch: grain `ReadOptions`; 0 threads encodes in the consuming thread.

    Returns:
      a `grain.DatasetIterator`; `get_state()` / `set_state()` round-trip exactly. Its truncation
      counter is `truncation_counter(iterator)`.
    """
    counter = TruncationCounter(prompt_length)
    ds = make_train_dataset(records, task, tokenizer, prompt_length=prompt_length, batch_size=batch_size,
                            seed=seed, mode=mode, process_index=process_index, process_count=process_count,
                            num_epochs=num_epochs, pad_id=pad_id, counter=counter)
    options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
    iterator = iter(ds.to_iter_dataset(options))
    try:
        iterator.truncation_counter = counter
    except AttributeError:  # pragma: no cover - an iterator class with __slots__
        _COUNTERS[id(iterator)] = counter
    return iterator


_COUNTERS: dict[int, TruncationCounter] = {}


class CheckpointedBatches:
    """Batches from a grain iterator (`self.iterator`, set by the subclass) with a checkpointable
    position: `get_state()` / `set_state()` round-trip exactly (`training.loop.train_loop`
    checkpoints them; a None state, a run without one, leaves the iterator at its start)."""

    iterator: Any

    def next_batch(self) -> dict[str, np.ndarray]:
        return next(self.iterator)

    def get_state(self) -> dict:
        return self.iterator.get_state()

    def set_state(self, state: dict | None) -> None:
        if state is not None:
            self.iterator.set_state(state)


def truncation_counter(iterator) -> TruncationCounter:
    """The `TruncationCounter` of an iterator made by `make_train_iterator`."""
    counter = getattr(iterator, "truncation_counter", None) or _COUNTERS.get(id(iterator))
    if counter is None:
        raise ValueError("not an iterator made by make_train_iterator")
    return counter


def num_eval_batches(num_records: int, batch_size: int) -> int:
    return -(-num_records // batch_size)


def make_eval_batches(records: Sequence[Mapping[str, Any]], task: Task, tokenizer, *, prompt_length: int,
                      batch_size: int, mode: str | None = None, pad_id: int | None = None,
                      process_index: int = 0, process_count: int = 1,
                      counter: TruncationCounter | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Batches of every (task-selected) record in order, for evaluation.

    Global batch j holds records `j*batch_size ... (j+1)*batch_size - 1`; the last one is filled up
    by repeating its last real row, with `row_valid` False on the filler. Each process yields its
    contiguous part `[process_index*Pl, (process_index+1)*Pl)` of every global batch, so all
    processes yield the same number of batches.
    """
    local = _local_batch(batch_size, process_index, process_count)
    source = _selected_source(records, task)
    encoder = PromptEncoder(task, tokenizer, prompt_length=prompt_length, mode=mode, pad_id=pad_id,
                            counter=counter)
    n = len(source)
    for j in range(num_eval_batches(n, batch_size)):
        lo = j * batch_size + process_index * local
        rows = []
        for k in range(lo, lo + local):
            example = encoder(source[min(k, n - 1)])
            if k >= n:
                example["row_valid"] = np.bool_(False)
            rows.append(example)
        yield collate(rows)
