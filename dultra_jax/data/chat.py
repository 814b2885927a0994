"""Chat records for the SFT trainers (LLaDA SFT and planner initialisation on real data).

A record is a conversation, in one of two schemas:

  - `messages`: an OpenAI-style list of `{"role", "content"}` turns (the Nemotron-Post-Training
    schema; its other fields, `uuid`, `license`, `category`, `reasoning`, ..., are ignored);
  - `prompt` and `response` strings, with an optional `system` string.

The last turn must be the assistant's: it is the response; every turn before it is the prompt.
Rendered with the tokenizer's own chat template, as the reference's `planner/data.py` does:

    prompt   = apply_chat_template(turns[:-1], add_generation_prompt=True)
    response = what the template adds for the last turn (its content and the end-of-turn token)

A row is `[prompt | response | EOS fill]`, `sequence_length` tokens wide, the prompt starting at
position 0 (the reference's right padding; every position is attended, EOS fill included, so the
model learns to end a generation with EOS). A row longer than `sequence_length` is cut at its end,
as the reference's `truncation=True`: the response loses its tail, and a prompt that fills the row
leaves no response position (the row then carries no loss). Cut rows are counted and logged.

`strip_think` removes `<think>...</think>` spans from the response (the reference's
`_delete_thinking`) and the blank lines they leave at its start.

Errors are `DataError`s naming the record (`file:LINE` for JSONL, else `file (record N)`) and
the field (`messages[2].role`).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from dultra_jax.data.pipeline import CheckpointedBatches, collate, shuffled_batches
from dultra_jax.data.sources import TFDS_PREFIX, DataError, IndexedSource, load_records, open_tfds, record_location

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
_THINK = re.compile(r"<think>.*?</think>", flags=re.DOTALL)


def strip_thinking(text: str) -> str:
    """`text` without its `<think>...</think>` spans and the whitespace they leave at its start."""
    stripped = _THINK.sub("", text)
    return stripped.lstrip() if stripped != text else stripped


def chat_turns(record: Mapping[str, Any], where: str) -> list[dict[str, str]]:
    """The conversation of a record as `[{"role", "content"}, ...]`, ending with the assistant's
    turn (module doc); `DataError` naming `where` and the field otherwise."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a JSON object (a dict of fields), got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, (list, tuple)) or not messages:
            raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} turns, "
                            f"got {type(messages).__name__}")
        turns = []
        for i, turn in enumerate(messages):
            if not isinstance(turn, Mapping):
                raise DataError(f"{where}: field messages[{i}] must be an object with 'role' and 'content', "
                                f"got {type(turn).__name__}")
            for key in ("role", "content"):
                if key not in turn:
                    raise DataError(f"{where}: field messages[{i}] has no {key!r}")
            role, content = turn["role"], turn["content"]
            if role not in ROLES:
                raise DataError(f"{where}: field messages[{i}].role is {role!r}; known roles: {', '.join(ROLES)}")
            if not isinstance(content, str):
                raise DataError(f"{where}: field messages[{i}].content must be a string, got {type(content).__name__}")
            turns.append({"role": role, "content": content})
    elif "prompt" in record and "response" in record:
        for key in ("prompt", "response", "system"):
            if key in record and record[key] is not None and not isinstance(record[key], str):
                raise DataError(f"{where}: field {key!r} must be a string, got {type(record[key]).__name__}")
        system = record.get("system")
        turns = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    else:
        have = ", ".join(sorted(map(str, record.keys()))[:20])
        raise DataError(f"{where}: missing field 'messages' (or 'prompt' and 'response'); the record has: {have}")
    if turns[-1]["role"] != "assistant":
        raise DataError(f"{where}: field messages[{len(turns) - 1}].role is {turns[-1]['role']!r}; the last turn "
                        f"must be the assistant's (it is the response)")
    if len(turns) < 2:
        raise DataError(f"{where}: field 'messages' holds only the assistant's turn; a prompt turn must come first")
    return turns


def check_chat_template(tokenizer, tokenizer_dir: str) -> None:
    """Chat records need the tokenizer's chat template; `DataError` naming the directory."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"the tokenizer in {tokenizer_dir} has no chat template (`chat_template` in "
                        f"tokenizer_config.json or chat_template.jinja); chat records are rendered with it")


class ChatEncoder:
    """`(index, record)` -> a fixed-width row (module doc):

      tokens         int32 [L]  `[prompt | response | eos_id ...]`
      valid          bool  [L]  all True (EOS fill is attended, as in LLaDA's SFT)
      response       bool  [L]  the positions after the prompt (response and EOS fill): what SFT masks
      prompt_length  int32 []   the prompt's width in the row (`L` when the prompt fills it)
      truncated      bool  []   the conversation was longer than `L`
      index          int64 []   the record's index in the source
    """

    def __init__(self, tokenizer, *, sequence_length: int, eos_id: int, strip_think: bool = False,
                 path: str = "", line_numbers: Sequence[int] | None = None):
        self.tokenizer = tokenizer
        self.sequence_length = sequence_length
        self.eos_id = int(eos_id)
        self.strip_think = strip_think
        self.path = path
        self.line_numbers = line_numbers
        self._lock = threading.Lock()
        self.num_encoded = 0
        self.num_truncated = 0

    def texts(self, turns: Sequence[Mapping[str, str]]) -> tuple[str, str]:
        """`(prompt, response)` text of a conversation rendered with the chat template."""
        turns = [dict(t) for t in turns]
        if self.strip_think:
            turns[-1]["content"] = strip_thinking(turns[-1]["content"])
        template = self.tokenizer.apply_chat_template
        prompt = template(turns[:-1], add_generation_prompt=True, tokenize=False)
        whole = template(turns, tokenize=False)
        if whole.startswith(prompt):
            return prompt, whole[len(prompt):]
        # A template that rewrites earlier turns once an answer follows (e.g. drops their
        # reasoning): the answer's content then closes with the end-of-turn token itself.
        end = self.tokenizer.eos_token or ""
        return prompt, turns[-1]["content"] + end

    def encode(self, record: Mapping[str, Any], where: str) -> dict[str, Any]:
        prompt, response = self.texts(chat_turns(record, where))
        encode = lambda text: self.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        prompt_ids, response_ids = encode(prompt), encode(response)
        length = self.sequence_length
        ids = (list(prompt_ids) + list(response_ids))[:length]
        tokens = np.full((length,), self.eos_id, np.int32)
        tokens[:len(ids)] = ids
        prompt_length = min(len(prompt_ids), length)
        truncated = len(prompt_ids) + len(response_ids) > length
        self._count(truncated, where, len(prompt_ids) + len(response_ids))
        return {"tokens": tokens, "valid": np.ones((length,), bool),
                "response": np.arange(length) >= prompt_length, "prompt_length": np.int32(prompt_length),
                "truncated": np.bool_(truncated)}

    def __call__(self, item: tuple[int, Mapping[str, Any]]) -> dict[str, Any]:
        index, record = item
        row = self.encode(record, record_location(self.path, index, self.line_numbers))
        row["index"] = np.int64(index)
        return row

    def _count(self, truncated: bool, where: str, length: int) -> None:
        with self._lock:
            self.num_encoded += 1
            if truncated:
                self.num_truncated += 1
                n = self.num_truncated
                if n & (n - 1) == 0:  # the first, then at counts 2, 4, 8, ...
                    logger.info("chat data: %d of %d rows cut to %d tokens so far (latest: %s, %d tokens)", n,
                                self.num_encoded, self.sequence_length, where, length)


def split_names(split: str | None) -> list[str | None]:
    """`"math, code"` -> `["math", "code"]` (several splits are read one after the other)."""
    if split is None:
        return [None]
    names = [s.strip() for s in str(split).split(",") if s.strip()]
    return names or [None]


def load_chat_records(path: str, split: str | None = None, *, data_dir: str | None = None,
                      limit: int | None = None) -> Sequence[Mapping[str, Any]]:
    """The records of `split` (comma-separated: several splits, concatenated) at `path`.

    Local files are read whole and every record is checked (`chat_turns`) before anything else
    happens, so a bad record is reported at start-up with its line; a TFDS split is opened lazily
    and its records are checked as they are encoded.
    """
    if path.startswith(TFDS_PREFIX):
        sources = [open_tfds(path, s, data_dir=data_dir) for s in split_names(split)]
        return sources[0] if len(sources) == 1 else _Concatenated(sources)
    records: list[Mapping[str, Any]] = []
    for s in split_names(split):
        records.extend(load_records(path, s, limit=limit, validate=lambda r, where: chat_turns(r, where)))
    return records[:limit] if limit is not None else records


class _Concatenated(Sequence):
    """Random access over several sources, one after the other."""

    def __init__(self, sources: Sequence[Sequence]):
        self.sources = list(sources)
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int):
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.sources[k][index - int(self.offsets[k])]


class ChatBatches(CheckpointedBatches):
    """Shuffled, repeated batches of chat rows for the SFT trainers, with a checkpointable
    position: `next_batch()` gives this process's rows of the next global batch (`ChatEncoder`'s
    fields, `[batch_size // process_count, ...]` each); `get_state()` / `set_state()` round-trip
    exactly (the grain iterator's state; `training.loop.train_loop` checkpoints it)."""

    def __init__(self, records: Sequence[Mapping[str, Any]], encoder: ChatEncoder, *, batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1, read_threads: int = 0, prefetch: int = 2):
        if len(records) == 0:
            raise DataError(f"{encoder.path}: no chat records")
        self.encoder = encoder
        self.size = len(records)
        self.batch_size = batch_size
        ds = shuffled_batches(IndexedSource(records), encoder, batch_size=batch_size, seed=seed,
                              process_index=process_index, process_count=process_count, what=encoder.path)
        options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
        self.iterator = iter(ds.to_iter_dataset(options))


def chat_rows(records: Sequence[Mapping[str, Any]], encoder: ChatEncoder, num_rows: int) -> dict[str, np.ndarray]:
    """The first `num_rows` records encoded in order (held-out rows): `{field: [N, ...]}`."""
    if num_rows > len(records):
        raise DataError(f"{encoder.path}: {num_rows} held-out rows asked for, the split has {len(records)} records")
    return collate([encoder((i, records[i])) for i in range(num_rows)])
