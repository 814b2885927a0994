"""One denoising step's action and its probability, shared by the rollout (which draws it) and
the GRPO replay (which scores it again under new parameters): the planner's scores and reveal
probabilities, their logs, and the action log-probability

    log pi(a_k) = sum_{revealed i} [log p_i + log q(x0_i)] + sum_{candidates j not revealed} log(1 - p_j)

(docs/algorithm.md section 4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dultra_jax.config import DecodeConfig
from dultra_jax.decoding import rules


def planner_scores(unmask_logits: jax.Array, factor: float | jax.Array) -> jax.Array:
    """The planner's `p = factor * sigmoid(z)` as the rules read it, `[B, Lb]` float32: above 1 for
    factor > 1, as in the reference (a Bernoulli draw reveals such a position surely, and
    `planner_topk` takes `k = floor(sum p)` from these values)."""
    return jax.nn.sigmoid(unmask_logits) * factor


def reveal_probs(unmask_logits: jax.Array, factor: float | jax.Array) -> jax.Array:
    """The planner's reveal probabilities `clip(factor * sigmoid(z), 0, 1)`, `[B, Lb]` float32."""
    return jnp.clip(planner_scores(unmask_logits, factor), 0.0, 1.0)


def planner_log_probs(unmask_logits: jax.Array, factor: float | jax.Array):
    """`(log p, log(1 - p))` of the reveal probability `p = clip(factor * sigmoid(z), 0, 1)`.

    With factor 1 both come from log-sigmoids of the logit (exact, no log(0)); a factor > 1 can
    push p to 1, where clipping keeps the logs defined: log(1 - p) is -inf there,
    with a zero gradient. A traced factor (the rollout's `Knobs`, never differentiated) computes
    both and selects.
    """
    def exact():
        return jax.nn.log_sigmoid(unmask_logits), jax.nn.log_sigmoid(-unmask_logits)

    def clipped():
        p = reveal_probs(unmask_logits, factor)
        # Double `where`: the log's argument is moved off 0 where its -inf is selected, so the
        # backward pass never forms 0 * inf (NaN) at positions whose other log the caller reads.
        log_p = jnp.where(p > 0, jnp.log(jnp.where(p > 0, p, 1.0)), -jnp.inf)
        log_not_p = jnp.where(p < 1, jnp.log1p(-jnp.where(p < 1, p, 0.0)), -jnp.inf)
        return log_p, log_not_p

    if isinstance(factor, (int, float)):
        return exact() if factor == 1.0 else clipped()
    return tuple(jnp.where(factor == 1.0, e, c) for e, c in zip(exact(), clipped()))


def action_log_prob(token_logits: jax.Array, unmask_logits: jax.Array | None, x0: jax.Array,
                    candidates: jax.Array, reveal: jax.Array, config: DecodeConfig,
                    knobs: rules.Knobs | None = None) -> jax.Array:
    """Log-probability of one step's action, `[B]` float32.

    `sum_{reveal} [log p + log q(x0)] + sum_{candidates \\ reveal} log(1 - p)`, with q the
    softmax of the token logits at `config.logprob_temp` and p the planner probability; rules
    without a planner score only the token term. The forced at-least-one token counts like any
    revealed one (the reference's choice), unless `config.forced_logprob` is `exact`: then a step
    that reveals only the best candidate `i` (highest p, ties: the first) scores the probability
    of that outcome, drawn or forced: `p_i prod_{j != i} (1 - p_j) + prod_j (1 - p_j)`, which is
    `prod_{j != i} (1 - p_j)`, so its `log p_i` term is dropped.

    Args:
      token_logits: `[B, Lb, V]` (mask logit -inf); unmask_logits: `[B, Lb]` or None.
      x0: `[B, Lb]` tokens (only revealed positions matter); candidates, reveal: `[B, Lb]` bool.
      knobs: the rollout's traced knobs (None: `config`'s factor, a Python float, as the
        trainer's replay differentiates it).
    """
    logits = token_logits.astype(jnp.float32) / config.logprob_temp
    log_q = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), x0[..., None], axis=-1)[..., 0]
    total = jnp.sum(jnp.where(reveal, log_q, 0.0), axis=-1)
    if config.uses_planner:
        factor = config.rule_factor if knobs is None else knobs.factor
        log_p, log_not_p = planner_log_probs(unmask_logits, factor)
        scored_reveal = reveal
        if config.forced_logprob == "exact":
            # the best candidate as `rules.ensure_one` forces it (by the rule's score)
            best = jnp.argmax(jnp.where(candidates, planner_scores(unmask_logits, factor), -jnp.inf), axis=-1)
            only_best = (jnp.sum(reveal, axis=-1) == 1) & jnp.take_along_axis(reveal, best[:, None], axis=-1)[:, 0]
            scored_reveal = reveal & ~only_best[:, None]
        total += jnp.sum(jnp.where(scored_reveal, log_p, 0.0) + jnp.where(candidates & ~reveal, log_not_p, 0.0),
                         axis=-1)
    return total
