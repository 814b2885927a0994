"""Distillation reward: the mean log-probability of the completion under an autoregressive teacher.

The teacher (a Qwen2 / Llama causal LM, e.g. Qwen2.5-Math-7B-Instruct) reads the prompt rendered
with *its own* chat template (a user turn, optionally after a system turn, with the assistant header
appended) followed by the completion re-tokenised by *its own* tokenizer. The reward of a row is
`sum_j log p_teacher(c_j | prompt, c_<j) / max(n, 1)` over the `n` completion tokens (length
normalised; 0 for an empty completion), as in the reference `verifier_reward`.

Scoring is one jitted call per chunk of rows (`dultra_jax.models.teacher.score_jit`). Prompts are
left-padded and completions right-padded to multiples of `length_bucket` tokens, and the number of
rows to a multiple of `row_bucket`, so batches of similar size reuse one compiled program; every
chunk of one call has the same shape.

On a mesh (`Teacher.from_dir(mesh=...)`) the parameters are sharded as the policy's
(`sharding.param_shardings`) and each chunk's rows over the batch axes, every process scoring its
own rows; several processes agree on the chunks' shape and count first, since each call is a
collective program all of them must run. An offloaded teacher (`offload=True`,
`rewards.teacher_offload`) keeps its weights in host memory and copies them to the devices for
the length of one `token_logps` call.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from dultra_jax.data.tokenizer import load_tokenizer
from dultra_jax.hub import resolve_model_dir
from dultra_jax.interop.hf_teacher import load_teacher, teacher_config
from dultra_jax.models.teacher import score_jit
from dultra_jax.rewards.registry import RewardInputs, register
from dultra_jax.sharding import batch_devices, global_rows, local_rows


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
      mesh: the `Mesh` the parameters are sharded on (None: one device); each call's rows are
        then sharded over its batch axes, so the rows of a call are padded to a multiple of this
        process's share of them as well as of `row_bucket`.
      offload: the parameters live in host memory (`pinned_host`); each `token_logps` call copies
        them to the devices and frees the copy before it returns.
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
    mesh: Any = None
    offload: bool = False

    def __post_init__(self):
        for key in ("length_bucket", "row_bucket"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"Teacher.{key}={getattr(self, key)!r} must be >= 1")

    @classmethod
    def from_dir(cls, path: str, *, dtype: str = "bfloat16", param_dtype: str | None = None, mesh=None,
                 offload: bool = False, tokenizer_dir: str | None = None, key: str = "rewards.teacher_path",
                 **kwargs) -> "Teacher":
        """Loads an HF Qwen2 / Llama directory (config, safetensors, tokenizer files), or a hub id
        of one (`hub.resolve_model_dir`; `key` names `path` in errors).

        `dtype` is the compute dtype (bfloat16, as the reference runs the teacher), `param_dtype`
        the storage dtype (default: `dtype`); `mesh` shards the parameters (and each call's rows);
        `offload` reads them into host memory (`pinned_host`) rather than the devices'; `kwargs`
        set the other attributes.
        """
        path = resolve_model_dir(path, key)
        tokenizer = load_tokenizer(tokenizer_dir or path, key="tokenizer_dir" if tokenizer_dir else key)
        params, config = load_teacher(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh,
                                      memory_kind="pinned_host" if offload else None)
        return cls(params=params, config=config, tokenizer=tokenizer, mesh=mesh, offload=offload, **kwargs)

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

    def _pack(self, prompt_ids, completion_ids, rows: int, lp: int, lc: int):
        """`[rows, lp]` left-padded prompts and `[rows, lc]` right-padded completions (ids, valid)."""
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

    @property
    def _collective(self) -> bool:
        """Whether scoring is a program every process runs together (a mesh over several processes)."""
        return self.mesh is not None and jax.process_count() > 1

    def _row_multiple(self) -> int:
        """What this process's rows of one call are padded to a multiple of: `row_bucket`, and with a
        mesh this process's share of the batch axes' devices (each device holds as many rows)."""
        if self.mesh is None:
            return self.row_bucket
        return math.lcm(self.row_bucket, max(1, -(-batch_devices(self.mesh) // jax.process_count())))

    def _device_params(self):
        """The parameters in device memory: a copy of the host-resident ones when offloaded."""
        if not self.offload:
            return self.params
        return jax.device_put(self.params, jax.tree.map(lambda x: x.sharding.with_memory_kind("device"), self.params))

    def _score(self, params, p_ids, c_ids, p_valid, c_valid) -> np.ndarray:
        """One chunk's `[rows, lc]` float32 log-probs (this process's rows on a mesh)."""
        if self.mesh is None:
            return np.asarray(score_jit(params, p_ids, c_ids, self.config, p_valid, c_valid), np.float32)
        inputs = [global_rows(x, self.mesh) for x in (p_ids, c_ids, p_valid, c_valid)]
        with jax.set_mesh(self.mesh):  # rows over the batch axes, as `sharding.constrain` pins them
            logps = score_jit(params, inputs[0], inputs[1], self.config, inputs[2], inputs[3])
        return np.asarray(local_rows(logps, self.mesh), np.float32)

    def token_logps(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[np.ndarray]:
        """Per row, the teacher log-probability of each completion token (float32).

        Rows go in chunks of at most `max_rows`, all of one shape: prompt and completion widths
        over every row of the call, and `min(max_rows, rows)` rows padded to `_row_multiple`, so
        one call compiles at most one program. With several processes every process must run
        the same programs the same number of times: the widths, rows and number of chunks are
        their maxima over the processes (one small all-gather), and a process past its own rows
        scores padding rows only. With no rows and one process, nothing runs.
        """
        if len(prompt_ids) != len(completion_ids):
            raise ValueError(f"{len(prompt_ids)} prompt rows but {len(completion_ids)} completion rows")
        count = len(prompt_ids)
        if not count and not self._collective:
            return []
        step = self.max_rows or max(1, count)
        lp = _round_up(max((len(p) for p in prompt_ids), default=1), self.length_bucket)
        lc = _round_up(max((len(c) for c in completion_ids), default=1), self.length_bucket)
        rows = _round_up(min(step, max(count, 1)), self._row_multiple())
        chunks = -(-count // step)
        if self._collective:
            agreed = multihost_utils.process_allgather(np.asarray([lp, lc, rows, chunks], np.int32))
            lp, lc, rows, chunks = (int(v) for v in np.asarray(agreed).reshape(-1, 4).max(axis=0))

        out: list[np.ndarray] = []
        params = self._device_params()
        try:
            for start in range(0, chunks * step, step):
                p_chunk, c_chunk = prompt_ids[start:start + step], completion_ids[start:start + step]
                logps = self._score(params, *self._pack(p_chunk, c_chunk, rows, lp, lc))
                out.extend(logps[r, :len(c)] for r, c in enumerate(c_chunk))
        finally:
            if self.offload:  # free the chips for the rollout and the update; the host copy stays
                for copy, kept in zip(jax.tree.leaves(params), jax.tree.leaves(self.params)):
                    if copy is not kept:
                        copy.delete()
        return out

    def score_texts(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        """Mean teacher log-probability of each completion's tokens given its prompt: `[B]` float32
        (0 for an empty completion). With several processes on a mesh, every process calls this
        together, even with no rows of its own (`token_logps`)."""
        if not len(prompts) and not self._collective:
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
