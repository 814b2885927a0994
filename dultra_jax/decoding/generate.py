"""Host-side generation around `rollout`: ragged prompts in, per-row results and timings out."""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import numpy as np

from dultra_jax.config import DecodeConfig, ModelConfig
from dultra_jax.decoding.rollout import Trajectory, compile_rollout, rollout


@dataclasses.dataclass
class Generation:
    """Results of `generate`.

    Attributes:
      rows: per prompt `{"tokens": generated ids [Lg], "unmask_step": [Lg], "nfe": int}`.
      wall_s: seconds of the generation call (compilation excluded).
      compile_s: seconds of tracing and compiling the rollout ahead of that call.
    """

    rows: list[dict]
    wall_s: float
    compile_s: float

    @property
    def tokens_per_forward(self) -> float:
        """Generated tokens / NFE over all rows."""
        return sum(len(r["tokens"]) for r in self.rows) / max(sum(r["nfe"] for r in self.rows), 1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Ragged prompts -> `(tokens [B, W] int32, valid [B, W] bool)`, left-padded to the longest."""
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    valid = np.zeros((len(prompts), width), bool)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            tokens[row, width - len(prompt):] = prompt
            valid[row, width - len(prompt):] = True
    return tokens, valid


def generate(params, model: ModelConfig, decode: DecodeConfig, prompts: Sequence[Sequence[int]],
             seed: int = 0) -> Generation:
    """Decodes every prompt (one batch): the rollout is compiled ahead of time (`compile_s`), then
    one call is timed (`wall_s`)."""
    tokens, valid = left_pad(prompts, model.pad_token_id)
    rng = jax.random.key(seed)
    start = time.perf_counter()
    compile_rollout(params, tokens, valid, rng, decode, model)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    trajectory: Trajectory = jax.block_until_ready(rollout(params, tokens, valid, rng, decode, model))
    wall = time.perf_counter() - start
    out_tokens, steps, nfe = (np.asarray(x) for x in (trajectory.tokens, trajectory.unmask_step,
                                                      trajectory.num_steps))
    rows = [{"tokens": out_tokens[i].tolist(), "unmask_step": steps[i].tolist(), "nfe": int(nfe[i])}
            for i in range(len(prompts))]
    return Generation(rows=rows, wall_s=wall, compile_s=compile_s)
