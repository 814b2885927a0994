"""Supervised rows for the SFT trainers (masked-diffusion pre-training, planner initialisation):
the tasks they train on, fixed-shape `[prompt | response]` rows, and a resumable shuffle.

An SFT task is one of the embedded generators (`arithmetic`, `fill`): problems with a `prompt`
and an `answer`, their encoding, a checker and the tokenizer files.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from dultra_jax.config import ConfigError, ModelConfig
from dultra_jax.data import arithmetic as A
from dultra_jax.data import fill as F


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
    return SFTTask(encode_batch=_arithmetic_encode_batch, name="arithmetic", tokenizer=A.build_tokenizer(), make_problems=A.make_problems,
                   encode=A.encode_example, check=A.check_answer, save_tokenizer=A.build_tokenizer,
                   mask_token=A.MASK_TOKEN, prompt_length=A.PROMPT_LENGTH, response_length=A.GEN_LENGTH,
                   block_length=A.BLOCK_LENGTH)


def _fill_task() -> SFTTask:
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


def task_rows(task: SFTTask, split: str, num_examples: int, start: int, prompt_length: int, response_length: int,
              model: ModelConfig) -> tuple[list[dict], dict[str, np.ndarray]]:
    """`(problems, encoded rows)` of problems `[start, start + num_examples)` of `split`, with
    rows `prompt_length + response_length` wide (`encode_rows`)."""
    problems = task.make_problems(split, num_examples, start)
    rows = encode_rows(task.encode_many(problems), prompt_length, response_length, model.pad_token_id,
                       model.eos_token_id)
    return problems, rows
