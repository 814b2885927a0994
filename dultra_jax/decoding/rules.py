"""Unmasking rules: which masked positions of the current block to reveal.

Every rule is a pure function `rule(view, rng, config) -> (reveal [B, Lb] bool, score [B, Lb])`
of one step's `StepView` (block-local arrays). `score` ranks the candidates for the at-least-one
guarantee, which `select` applies after the rule: a row that has candidates but revealed none
reveals its best-scoring candidate (ties: the first position). The numeric knobs (threshold,
factor, entropy bound, steps per block) come from `view.knobs`, traced scalars, and never from
`config`, whose knob fields the compiled rollout leaves at None (`DecodeConfig.without_knobs`).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dultra_jax.config import DecodeConfig, SCHEDULED_RULES


@struct.dataclass
class Knobs:
    """The rules' numeric knobs as scalars (traced in the compiled rollout).

    Attributes:
      factor: float32 `f` of the `factor` rule and the planner rules' multiplier on probabilities.
      threshold: float32 confidence threshold of the `threshold` rule.
      entropy_bound: float32 cumulative entropy budget (nats) of the `entropy_bound` rule.
      steps_per_block: int32 steps per block of `low_confidence` / `random` (their `steps`
        divided by the number of blocks; `block_length` for the other rules, which ignore it).
    """

    factor: jax.Array
    threshold: jax.Array
    entropy_bound: jax.Array
    steps_per_block: jax.Array

    @classmethod
    def of(cls, config: DecodeConfig) -> "Knobs":
        """The knobs of `config`, defaults filled in (`DecodeConfig.rule_*`). Host scalars: a
        multi-process jit takes them as replicated inputs."""
        return cls(factor=np.float32(config.rule_factor), threshold=np.float32(config.rule_threshold),
                   entropy_bound=np.float32(config.rule_entropy_bound),
                   steps_per_block=np.int32(config.steps_per_block))


@struct.dataclass
class StepView:
    """One denoising step restricted to each row's current block (`Lb = block_length`).

    Attributes:
      token_logits: `[B, Lb, V]` float32, the mask token's logit already -inf.
      x0: `[B, Lb]` int32 proposed tokens (Gumbel-max at the sampling temperature).
      confidence: `[B, Lb]` float32 softmax probability of `x0` (EOSER-scaled when enabled).
      unmask_probs: `[B, Lb]` float32 planner probabilities with the factor applied, not clipped
        (above 1 for factor > 1, as the reference's p; `action.planner_scores`), or None for rules
        that do not use the planner.
      candidates: `[B, Lb]` bool, masked positions of the current block (False for done rows).
      block_step: `[B]` int32, steps this row has already spent in its current block.
      knobs: the rules' numeric knobs (`Knobs`).
    """

    token_logits: jax.Array
    x0: jax.Array
    confidence: jax.Array
    unmask_probs: jax.Array | None
    candidates: jax.Array
    block_step: jax.Array
    knobs: Knobs


Rule = Callable[[StepView, jax.Array, DecodeConfig], tuple[jax.Array, jax.Array]]


def descending_rank(score: jax.Array, candidates: jax.Array) -> jax.Array:
    """Rank `[B, Lb]` int32 of each candidate by descending score (ties: lower index first);
    non-candidates rank after every candidate."""
    key = jnp.where(candidates, score, -jnp.inf)
    order = jnp.argsort(-key, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True).astype(jnp.int32)


def top_k(score: jax.Array, candidates: jax.Array, k: jax.Array) -> jax.Array:
    """The `k[b]` best-scoring candidates of each row: `[B, Lb]` bool."""
    return candidates & (descending_rank(score, candidates) < k[:, None])


def _num_candidates(candidates: jax.Array) -> jax.Array:
    return jnp.sum(candidates, axis=-1, dtype=jnp.int32)


def planner_bernoulli(view: StepView, rng: jax.Array, config: DecodeConfig):
    """Each candidate independently with its planner probability (training and reported eval)."""
    u = jax.random.uniform(rng, view.unmask_probs.shape)
    return view.candidates & (u < view.unmask_probs), view.unmask_probs


def planner_topk(view: StepView, rng: jax.Array, config: DecodeConfig):
    """The `k = floor(sum p)` most probable candidates (deterministic inference mode).

    p is the unclipped `factor * sigmoid(z)` (with factor > 1 the sum exceeds the
    clipped one); k is clamped to the number of candidates, so non-candidates
    never move.
    """
    p = jnp.where(view.candidates, view.unmask_probs, 0.0)
    k = jnp.minimum(jnp.floor(jnp.sum(p, axis=-1)).astype(jnp.int32), _num_candidates(view.candidates))
    return top_k(p, view.candidates, k), view.unmask_probs


def threshold(view: StepView, rng: jax.Array, config: DecodeConfig):
    """Fast-dLLM: every candidate whose confidence reaches `tau`."""
    return view.candidates & (view.confidence >= view.knobs.threshold), view.confidence


def factor(view: StepView, rng: jax.Array, config: DecodeConfig):
    """Fast-dLLM factor rule: the longest prefix of the confidence-sorted candidates with
    `c(k) >= 1 - f / (k + 1)` for every `2 <= k <= n` (k = 1 always)."""
    key = jnp.where(view.candidates, view.confidence, -jnp.inf)
    ordered = -jnp.sort(-key, axis=-1)  # c(1) >= c(2) >= ...; non-candidates (-inf) last
    k = jnp.arange(1, ordered.shape[-1] + 1, dtype=jnp.float32)
    passes = (k == 1) | (ordered >= 1.0 - view.knobs.factor / (k + 1))
    n = jnp.minimum(jnp.sum(jnp.cumprod(passes, axis=-1), axis=-1, dtype=jnp.int32), _num_candidates(view.candidates))
    return view.candidates & (descending_rank(view.confidence, view.candidates) < n[:, None]), view.confidence


def linear_schedule(block_step: jax.Array, block_length: int, steps_per_block: jax.Array) -> jax.Array:
    """LLaDA's tokens per step: `Lb // S` each, the first `Lb % S` steps one more. `[B]` int32;
    `steps_per_block` (`S`) may be traced."""
    base, extra = jnp.divmod(jnp.int32(block_length), steps_per_block)
    return (base + (block_step < extra)).astype(jnp.int32)


def low_confidence(view: StepView, rng: jax.Array, config: DecodeConfig):
    """LLaDA: a fixed number of tokens per step (linear schedule), the most confident first."""
    k = linear_schedule(view.block_step, config.block_length, view.knobs.steps_per_block)
    return top_k(view.confidence, view.candidates, k), view.confidence


def random(view: StepView, rng: jax.Array, config: DecodeConfig):
    """LLaDA's `random` remasking: the same schedule as `low_confidence`, uniform random scores."""
    score = jax.random.uniform(rng, view.confidence.shape)
    k = linear_schedule(view.block_step, config.block_length, view.knobs.steps_per_block)
    return top_k(score, view.candidates, k), score


def token_entropy(token_logits: jax.Array) -> jax.Array:
    """Entropy (nats) of softmax(token_logits) over the vocabulary: `[..., V] -> [...]`."""
    logp = jax.nn.log_softmax(token_logits, axis=-1)
    return -jnp.sum(jnp.where(logp > -jnp.inf, jnp.exp(logp) * logp, 0.0), axis=-1)


def entropy_bound(view: StepView, rng: jax.Array, config: DecodeConfig):
    """Candidates by ascending entropy while the cumulative entropy stays within the bound."""
    entropy = token_entropy(view.token_logits)
    ordered = jnp.sort(jnp.where(view.candidates, entropy, jnp.inf), axis=-1)
    n = jnp.sum(jnp.cumsum(ordered, axis=-1) <= view.knobs.entropy_bound, axis=-1, dtype=jnp.int32)
    return top_k(-entropy, view.candidates, n), -entropy


def ass(view: StepView, rng: jax.Array, config: DecodeConfig):
    """Ascending step size: step s of a block reveals `2^s` tokens, the most confident first."""
    k = jnp.left_shift(jnp.int32(1), jnp.minimum(view.block_step, 30))
    return top_k(view.confidence, view.candidates, k), view.confidence


RULES: dict[str, Rule] = {
    "planner_bernoulli": planner_bernoulli,
    "planner_topk": planner_topk,
    "threshold": threshold,
    "factor": factor,
    "low_confidence": low_confidence,
    "random": random,
    "entropy_bound": entropy_bound,
    "ass": ass,
}


def eoser_gamma(block_step: jax.Array, config: DecodeConfig, knobs: Knobs | None = None) -> jax.Array:
    """EOSER's factor on EOS confidence: linear from `gamma_min` at a block's first step to 1
    at its last expected step (the rule's steps per block, `knobs.steps_per_block` for the
    scheduled rules; `log2(Lb) + 1` for ASS). `[B]`. `knobs` None: `config`'s."""
    if config.rule in SCHEDULED_RULES:
        steps = config.steps_per_block if knobs is None else knobs.steps_per_block
    elif config.rule == "ass":
        steps = math.ceil(math.log2(config.block_length)) + 1
    else:
        steps = config.block_length
    progress = jnp.minimum(block_step.astype(jnp.float32) / jnp.maximum(steps - 1, 1).astype(jnp.float32), 1.0)
    return config.eoser_gamma_min + (1.0 - config.eoser_gamma_min) * progress


def ensure_one(reveal: jax.Array, candidates: jax.Array, score: jax.Array) -> jax.Array:
    """Adds each row's best-scoring candidate where the row has candidates but reveals none."""
    need = jnp.any(candidates, axis=-1) & ~jnp.any(reveal, axis=-1)
    best = jnp.argmax(jnp.where(candidates, score, -jnp.inf), axis=-1)
    forced = jax.nn.one_hot(best, reveal.shape[-1], dtype=jnp.bool_) & need[:, None]
    return reveal | forced


def select(view: StepView, rng: jax.Array, config: DecodeConfig) -> jax.Array:
    """The positions to reveal this step: `[B, Lb]` bool, a subset of the candidates, at least
    one per row that has candidates."""
    reveal, score = RULES[config.rule](view, rng, config)
    return ensure_one(reveal & view.candidates, view.candidates, score)
