"""Distillation reward: the mean log-probability of the completion under an autoregressive teacher.

The teacher (a Qwen2 / Llama causal LM, e.g. Qwen2.5-Math-7B-Instruct) reads the prompt rendered
with *its own* chat template (a user turn, optionally after a system turn, with the assistant header
appended) followed by the completion re-tokenised by *its own* tokenizer. The reward of a row is
`sum_j log p_teacher(c_j | prompt, c_<j) / max(n, 1)` over the `n` completion tokens (length
normalised; 0 for an empty completion), as in the reference `verifier_reward`.

Scoring is one jitted call per chunk of rows (`dultra_jax.models.teacher.score_jit`). Prompts are
left-padded and completions right-padded to multiples of `length_bucket` tokens, and the number of
rows to a multiple of `row_bucket`, so batches of similar size reuse one compiled program.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from dultra_jax.data.tokenizer import load_tokenizer
from dultra_jax.hub import resolve_model_dir
from dultra_jax.interop.hf_teacher import load_teacher, teacher_config
from dultra_jax.models.teacher import score_jit
from dultra_jax.rewards.registry import RewardInputs, register


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


@dataclasses.dataclass
class Teacher:
    """An autoregressive teacher: parameters, `TeacherConfig` and its HF tokenizer.

    Attributes:
      params, config: from `dultra_jax.interop.hf_teacher.load_teacher`.
      tokenizer: the teacher's `transformers` tokenizer (with its chat template, if any).
      system_prompt: optional system turn placed before the user prompt.
      length_bucket: prompt and completion lengths are padded up to multiples of this.
      row_bucket: the number of rows of each call is padded up to a multiple of this.
      max_rows: at most this many rows per jitted call (None: all at once).
      max_prompt_tokens: longer prompts keep their last tokens (None: no limit).
      max_completion_tokens: longer completions keep their first tokens (None: no limit).
    """

    params: Any
    config: Any
    tokenizer: Any
    system_prompt: str | None = None
    length_bucket: int = 64
    row_bucket: int = 8
    max_rows: int | None = None
    max_prompt_tokens: int | None = None
    max_completion_tokens: int | None = None

    def __post_init__(self):
        for key in ("length_bucket", "row_bucket"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"Teacher.{key}={getattr(self, key)!r} must be >= 1")

    @classmethod
    def from_dir(cls, path: str, *, dtype: str = "bfloat16", param_dtype: str | None = None, mesh=None,
                 tokenizer_dir: str | None = None, key: str = "rewards.teacher_path", **kwargs) -> "Teacher":
        """Loads an HF Qwen2 / Llama directory (config, safetensors, tokenizer files), or a hub id
        of one (`hub.resolve_model_dir`; `key` names `path` in errors).

        `dtype` is the compute dtype (bfloat16, as the reference runs the teacher), `param_dtype`
        the storage dtype (default: `dtype`); `mesh` shards the parameters; `kwargs` set the other
        attributes.
        """
        path = resolve_model_dir(path, key)
        tokenizer = load_tokenizer(tokenizer_dir or path, key="tokenizer_dir" if tokenizer_dir else key)
        params, config = load_teacher(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh)
        return cls(params=params, config=config, tokenizer=tokenizer, **kwargs)

    @staticmethod
    def check_dir(path: str, *, dtype: str = "bfloat16", tokenizer_dir: str | None = None,
                  key: str = "rewards.teacher_path") -> str:
        """What `from_dir` checks before reading a weight: the path resolves, its `config.json` is a
        supported teacher and its tokenizer loads. Returns the resolved directory."""
        path = resolve_model_dir(path, key)
        teacher_config(path, dtype=dtype, key=key)
        load_tokenizer(tokenizer_dir or path, key="tokenizer_dir" if tokenizer_dir else key)
        return path

    # ----------------------------------------------------------------------------------------------

    @property
    def pad_id(self) -> int:
        for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
            value = getattr(self.tokenizer, attr, None)
            if value is not None:
                return int(value)
        return 0

    def render_prompt(self, prompt: str) -> str:
        """The prompt as the teacher sees it: its chat template with the assistant header appended
        (plain text when the tokenizer has no template)."""
        if getattr(self.tokenizer, "chat_template", None):
            messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
            messages.append({"role": "user", "content": prompt})
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return prompt if not self.system_prompt else self.system_prompt + "\n\n" + prompt

    def encode(self, prompts: Sequence[str], completions: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
        """Teacher token ids of each rendered prompt (at least one token) and each completion."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        prompt_ids, completion_ids = [], []
        for prompt, completion in zip(prompts, completions):
            p = list(self.tokenizer.encode(self.render_prompt(prompt), add_special_tokens=False))
            c = list(self.tokenizer.encode(completion, add_special_tokens=False)) if completion else []
            if self.max_prompt_tokens is not None and len(p) > self.max_prompt_tokens:
                p = p[len(p) - self.max_prompt_tokens:]
            if self.max_completion_tokens is not None:
                c = c[:self.max_completion_tokens]
            if not p:  # something must predict the first completion token
                bos = getattr(self.tokenizer, "bos_token_id", None)
                p = [int(bos) if bos is not None else self.pad_id]
            prompt_ids.append(p)
            completion_ids.append(c)
        return prompt_ids, completion_ids

    def _pack(self, prompt_ids, completion_ids):
        rows = _round_up(len(prompt_ids), self.row_bucket)
        lp = _round_up(max(len(p) for p in prompt_ids), self.length_bucket)
        lc = _round_up(max([len(c) for c in completion_ids] + [1]), self.length_bucket)
        pad = self.pad_id
        p_ids = np.full((rows, lp), pad, np.int32)
        p_valid = np.zeros((rows, lp), bool)
        c_ids = np.full((rows, lc), pad, np.int32)
        c_valid = np.zeros((rows, lc), bool)
        p_valid[:, -1] = True  # padding rows: one real (pad) prompt token, no completion
        for r, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
            p_ids[r, lp - len(p):], p_valid[r, lp - len(p):] = p, True
            c_ids[r, :len(c)], c_valid[r, :len(c)] = c, True
        return p_ids, c_ids, p_valid, c_valid

    def token_logps(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[np.ndarray]:
        """Per row, the teacher log-probability of each completion token (float32)."""

        out: list[np.ndarray] = []
        step = self.max_rows or max(1, len(prompt_ids))
        for start in range(0, len(prompt_ids), step):
            p_chunk, c_chunk = prompt_ids[start:start + step], completion_ids[start:start + step]
            p_ids, c_ids, p_valid, c_valid = self._pack(p_chunk, c_chunk)
            logps = np.asarray(score_jit(self.params, p_ids, c_ids, self.config, p_valid, c_valid), np.float32)
            out.extend(logps[r, :len(c)] for r, c in enumerate(c_chunk))
        return out

    def score_texts(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        """Mean teacher log-probability of each completion's tokens given its prompt: `[B]` float32
        (0 for an empty completion)."""
        if not len(prompts):
            return np.zeros((0,), np.float32)
        prompt_ids, completion_ids = self.encode(prompts, completions)
        logps = self.token_logps(prompt_ids, completion_ids)
        return np.asarray([float(l.sum(dtype=np.float64)) / max(len(l), 1) for l in logps], np.float32)


@register("distill")
def distill(inputs: RewardInputs, *, teacher: Teacher | None = None) -> np.ndarray:
    """Mean teacher log-probability of the completion (see the module docstring). Needs
    `options={"distill": {"teacher": Teacher.from_dir(...)}}` and `inputs.prompts`."""
    if teacher is None:
        raise ValueError("the 'distill' reward needs a teacher: pass options={'distill': {'teacher': "
                         "Teacher.from_dir(<HF teacher directory>)}}, or leave 'distill' out of the reward weights")
    if inputs.prompts is None:
        raise ValueError("the 'distill' reward needs RewardInputs.prompts (the user prompt of each row)")
    return teacher.score_texts(list(inputs.prompts), list(inputs.completions))
