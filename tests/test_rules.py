"""Unmasking rules (docs/algorithm.md sections 3 and 9) against an independent NumPy
implementation, their edge cases, EOSER / ASS / LLaDA schedules, `DecodeConfig` validation, and
the rollout's per-step pieces (`sample_tokens`, `planner_log_probs`, `action_log_prob`,
docs/algorithm.md section 4).

The NumPy reference below is written from docs/algorithm.md, not from `rules.py`: it loops over
each row's candidates in Python, sorts with an explicit `(-score, index)` key (ties: lower index
first) and applies the at-least-one rule by hand. The only shared piece is the uniform draw of the stochastic
rules (`jax.random.uniform(rng, shape)`), reproduced here to get the same numbers.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dultra_jax.config import ConfigError, DecodeConfig
from dultra_jax.decoding import action, rollout, rules

B, LB, V = 5, 8, 12
MASK = V - 1  # the mask token's column in the random token logits
SEEDS = (0, 1, 2, 3)

_select_jit = jax.jit(rules.select, static_argnums=2)


def _select(view, rng, config):
    """`rules.select` as the compiled rollout runs it: the knobs traced, the static config without them."""
    return _select_jit(view.replace(knobs=rules.Knobs.of(config)), rng, config.without_knobs())


_action_log_prob = jax.jit(action.action_log_prob, static_argnums=5)
_uniform = jax.jit(jax.random.uniform, static_argnums=1)  # the stochastic rules' draw, reproduced


def _cfg(rule: str, **kw) -> DecodeConfig:
    kw.setdefault("prompt_length", 4)
    kw.setdefault("gen_length", LB)
    kw.setdefault("block_length", LB)
    return DecodeConfig(rule=rule, **kw)


def _view(confidence, candidates, *, block_step=None, unmask_probs=None, token_logits=None, x0=None):
    confidence = np.asarray(confidence, np.float32)
    candidates = np.asarray(candidates, bool)
    b, lb = confidence.shape
    if token_logits is None:
        token_logits = np.zeros((b, lb, 4), np.float32)
    if x0 is None:
        x0 = np.zeros((b, lb), np.int32)
    if block_step is None:
        block_step = np.zeros((b,), np.int32)
    return rules.StepView(
        token_logits=jnp.asarray(token_logits, jnp.float32), x0=jnp.asarray(x0, jnp.int32),
        confidence=jnp.asarray(confidence),
        unmask_probs=None if unmask_probs is None else jnp.asarray(np.asarray(unmask_probs, np.float32)),
        candidates=jnp.asarray(candidates), block_step=jnp.asarray(np.asarray(block_step, np.int32)),
        knobs=None)  # `_select` fills in the config's


def _run(view, config, seed=0):
    return np.asarray(_select(view, jax.random.key(seed), config))


def _mask(*idx, n=LB):
    out = np.zeros((n,), bool)
    out[list(idx)] = True
    return out


# ------------------------------------------------------------------------ NumPy reference


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def _np_entropy(logits):
    logp = _np_log_softmax(logits)
    p = np.exp(logp)
    return -np.sum(np.where(p > 0, p * np.where(p > 0, logp, 0.0), 0.0), axis=-1)


def _by_score_desc(score_row, cand_idx):
    """Candidate indices by descending score; ties: lower index first."""
    return sorted(cand_idx, key=lambda i: (-float(score_row[i]), i))


def _llada_k(block_step, block_length, steps_per_block):
    base = block_length // steps_per_block
    extra = block_length % steps_per_block
    return base + (1 if block_step < extra else 0)


def reference_select(config, *, confidence, candidates, unmask_probs=None, token_logits=None,
                     block_step=None, u=None):
    """The rule of `config.rule` then the at-least-one guarantee, row by row (docs/algorithm.md section 3)."""
    rule = config.rule
    b_size, lb = candidates.shape
    reveal = np.zeros((b_size, lb), bool)
    entropy = None if token_logits is None else _np_entropy(token_logits)
    for b in range(b_size):
        cand = [i for i in range(lb) if candidates[b, i]]
        if not cand:
            continue
        if rule == "planner_bernoulli":
            score = unmask_probs[b]
            chosen = [i for i in cand if u[b, i] < unmask_probs[b, i]]
        elif rule == "planner_topk":
            score = unmask_probs[b]
            total = sum(float(unmask_probs[b, i]) for i in cand)
            k = min(int(math.floor(total)), len(cand))
            chosen = _by_score_desc(score, cand)[:k]
        elif rule == "threshold":
            score = confidence[b]
            chosen = [i for i in cand if confidence[b, i] >= np.float32(config.rule_threshold)]
        elif rule == "factor":
            score = confidence[b]
            order = _by_score_desc(score, cand)
            n = 1
            for pos in range(1, len(order)):
                k = pos + 1  # 1-based rank of this candidate
                bound = np.float32(1.0) - np.float32(config.rule_factor) / np.float32(k + 1)
                if confidence[b, order[pos]] >= bound:
                    n = k
                else:
                    break
            chosen = order[:n]
        elif rule == "low_confidence":
            score = confidence[b]
            k = _llada_k(int(block_step[b]), config.block_length, config.steps_per_block)
            chosen = _by_score_desc(score, cand)[:k]
        elif rule == "random":
            score = u[b]
            k = _llada_k(int(block_step[b]), config.block_length, config.steps_per_block)
            chosen = _by_score_desc(score, cand)[:k]
        elif rule == "entropy_bound":
            score = -entropy[b]
            order = sorted(cand, key=lambda i: (float(entropy[b, i]), i))
            chosen, total = [], 0.0
            for i in order:
                total += entropy[b, i]
                if total <= config.rule_entropy_bound:
                    chosen.append(i)
                else:
                    break
        elif rule == "ass":
            score = confidence[b]
            chosen = _by_score_desc(score, cand)[:2 ** int(block_step[b])]
        else:
            raise AssertionError(rule)
        if not chosen:  # at-least-one: the best-scoring candidate, first on ties
            best = max(float(score[i]) for i in cand)
            chosen = [next(i for i in cand if float(score[i]) == best)]
        reveal[b, chosen] = True
    return reveal


def _random_inputs(seed, *, max_block_step):
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.3, 6.0, size=(B, LB, 1))
    logits = (rng.standard_normal((B, LB, V)) * scale).astype(np.float32)
    logits[..., MASK] = -np.inf
    x0 = np.argmax(logits, axis=-1).astype(np.int32)
    probs = np.exp(_np_log_softmax(logits))
    confidence = np.take_along_axis(probs, x0[..., None], axis=-1)[..., 0].astype(np.float32)
    candidates = rng.random((B, LB)) < 0.6
    candidates[0] = False  # a done row
    candidates[1] = True  # a fresh block
    candidates[2] = _mask(5)  # a single candidate
    unmask_probs = rng.random((B, LB)).astype(np.float32)
    block_step = rng.integers(0, max_block_step, size=(B,)).astype(np.int32)
    return dict(token_logits=logits, x0=x0, confidence=confidence, candidates=candidates,
                unmask_probs=unmask_probs, block_step=block_step)


RANDOM_CASES = [
    ("planner_bernoulli", {}, 1),
    ("planner_topk", {}, 1),
    ("planner_topk", {"factor": 3.0}, 1),
    ("threshold", {}, 1),
    ("threshold", {"threshold": 0.5}, 1),
    ("factor", {}, 1),
    ("factor", {"factor": 2.0}, 1),
    ("low_confidence", {"steps": 3}, 3),
    ("low_confidence", {"steps": 8}, 8),
    ("random", {"steps": 3}, 3),
    ("entropy_bound", {}, 1),
    ("entropy_bound", {"entropy_bound": 3.0}, 1),
    ("ass", {}, 4),
]


@pytest.mark.parametrize("rule,knobs,max_block_step", RANDOM_CASES,
                         ids=[f"{r}-{k}" for r, k, _ in RANDOM_CASES])
def test_select_matches_numpy_reference(rule, knobs, max_block_step):
    config = _cfg(rule, **knobs)
    for seed in SEEDS:
        inp = _random_inputs(seed, max_block_step=max_block_step)
        if config.uses_planner:
            factor = config.rule_factor
            inp["unmask_probs"] = np.clip(inp["unmask_probs"] * factor, 0.0, 1.0).astype(np.float32)
            sums = np.sum(np.where(inp["candidates"], inp["unmask_probs"], 0.0), axis=-1)
            assert np.all(np.abs(sums - np.round(sums))[np.any(inp["candidates"], -1)] > 1e-4) or factor > 1
        if rule == "entropy_bound":  # keep the cumulative entropies away from the bound (float32 vs 64)
            ent = _np_entropy(inp["token_logits"])
            for b in range(B):
                cum = np.cumsum(np.sort(ent[b][inp["candidates"][b]]))
                assert np.all(np.abs(cum - config.rule_entropy_bound) > 1e-4)
        view = _view(inp["confidence"], inp["candidates"], block_step=inp["block_step"],
                     unmask_probs=inp["unmask_probs"] if config.uses_planner else None,
                     token_logits=inp["token_logits"], x0=inp["x0"])
        key = jax.random.key(100 + seed)
        got = np.asarray(_select(view, key, config))
        u = np.asarray(_uniform(key, (B, LB)))
        want = reference_select(config, u=u, **{k: v for k, v in inp.items() if k != "x0"})
        np.testing.assert_array_equal(got, want, err_msg=f"rule={rule} {knobs} seed={seed}")
        # Invariants: a subset of the candidates, nothing for done rows, >= 1 for the others.
        assert not np.any(got & ~inp["candidates"])
        np.testing.assert_array_equal(np.any(got, -1), np.any(inp["candidates"], -1))


def test_planner_bernoulli_reveal_rate_tracks_p():
    """Sanity of the Bernoulli draw itself: over many keys the reveal frequency is about p."""
    p = np.array([[0.1, 0.5, 0.9, 0.0, 1.0, 0.3, 0.7, 0.2]], np.float32)
    view = _view(np.zeros((1, LB)), np.ones((1, LB), bool), unmask_probs=p)
    config = _cfg("planner_bernoulli")
    keys = jax.random.split(jax.random.key(0), 2000)
    reveals = np.asarray(jax.vmap(lambda k: rules.planner_bernoulli(view, k, config)[0])(keys))
    np.testing.assert_allclose(reveals.mean(axis=0)[0], p[0], atol=0.04)
    assert not reveals[:, 0, 3].any() and reveals[:, 0, 4].all()


# ------------------------------------------------------------------------------ threshold


def test_threshold_none_pass_reveals_exactly_the_most_confident():
    conf = np.array([[0.3, 0.5, 0.8, 0.2, 0.89, 0.1, 0.6, 0.4]])
    got = _run(_view(conf, np.ones((1, LB), bool)), _cfg("threshold"))
    np.testing.assert_array_equal(got[0], _mask(4))


def test_threshold_all_pass_reveals_all_candidates():
    conf = np.array([[0.95, 0.99, 0.9, 1.0, 0.91, 0.93, 0.97, 0.92]])
    cand = np.array([[1, 1, 1, 0, 1, 1, 0, 1]], bool)
    got = _run(_view(conf, cand), _cfg("threshold"))
    np.testing.assert_array_equal(got, cand)


def test_threshold_never_reveals_non_candidates():
    conf = np.array([[1.0, 1.0, 0.2, 1.0, 0.3, 1.0, 0.95, 1.0]])
    cand = _mask(2, 4, 6)[None]
    got = _run(_view(conf, cand), _cfg("threshold"))
    np.testing.assert_array_equal(got[0], _mask(6))
    got = _run(_view(conf, _mask(2, 4)[None]), _cfg("threshold"))  # none pass -> 0.3 at index 4
    np.testing.assert_array_equal(got[0], _mask(4))


def test_threshold_at_tau_passes():
    conf = np.array([[0.5, 0.5, 0.75, 0.5, 0.5, 0.5, 0.5, 0.75]], np.float32)  # 0.75 exact
    got = _run(_view(conf, np.ones((1, LB), bool)), _cfg("threshold", threshold=0.75))
    np.testing.assert_array_equal(got[0], _mask(2, 7))


# ---------------------------------------------------------------------------------- ties


def test_ties_low_confidence_prefers_lower_index():
    conf = np.full((1, LB), 0.5)
    conf[0, 0] = 0.9  # not a candidate
    cand = _mask(1, 2, 3, 5, 6)[None]
    got = _run(_view(conf, cand), _cfg("low_confidence"))  # steps = Lb -> k = 1
    np.testing.assert_array_equal(got[0], _mask(1))
    got = _run(_view(conf, cand), _cfg("low_confidence", steps=4))  # k = 2
    np.testing.assert_array_equal(got[0], _mask(1, 2))


def test_ties_planner_topk_prefers_lower_index():
    p = np.full((1, LB), 0.625)
    p[0, 7] = 1.0  # not a candidate: ignored by k and by the ranking
    cand = _mask(0, 2, 3, 4, 6)[None]  # sum p = 3.125 -> k = 3
    got = _run(_view(np.zeros((1, LB)), cand, unmask_probs=p), _cfg("planner_topk"))
    np.testing.assert_array_equal(got[0], _mask(0, 2, 3))
    p2 = np.full((1, LB), 0.25, np.float32)  # sum 1.25 over 5 candidates -> k = 1, lowest index
    got = _run(_view(np.zeros((1, LB)), cand, unmask_probs=p2), _cfg("planner_topk"))
    np.testing.assert_array_equal(got[0], _mask(0))


def test_ties_at_least_one_prefers_lower_index():
    conf = np.full((1, LB), 0.4)
    got = _run(_view(conf, _mask(3, 5, 6)[None]), _cfg("threshold"))
    np.testing.assert_array_equal(got[0], _mask(3))
    p = np.full((1, LB), 0.25)  # sum over 3 candidates 0.75 -> k = 0 -> forced argmax
    got = _run(_view(conf, _mask(2, 4, 7)[None], unmask_probs=p), _cfg("planner_topk"))
    np.testing.assert_array_equal(got[0], _mask(2))


def test_descending_rank_ties_and_non_candidates():
    score = jnp.array([[0.5, 0.9, 0.5, 0.9, 1.0, 0.1, 0.5, 0.0]])
    cand = jnp.array([[1, 1, 1, 1, 0, 1, 1, 0]], bool)
    rank = np.asarray(rules.descending_rank(score, cand))[0]
    np.testing.assert_array_equal(rank[[1, 3, 0, 2, 6, 5]], [0, 1, 2, 3, 4, 5])
    assert set(rank[[4, 7]]) == {6, 7}


# -------------------------------------------------------------------------------- factor

_BELOW_075 = np.nextafter(np.float32(0.75), np.float32(0.0))


def test_factor_boundary_equality_passes():
    """f = 1: threshold of rank 3 is 1 - 1/4 = 0.75 exactly; c(3) == 0.75 passes (>=)."""
    conf = np.array([[0.1, 0.95, 0.2, 0.75, 0.9, 0.3, 0.5, 0.1]], np.float32)
    # ranks: 0.95 (1), 0.9 (2 >= 0.667), 0.75 (3 >= 0.75), 0.5 (4 < 0.8) -> 3 revealed
    got = _run(_view(conf, np.ones((1, LB), bool)), _cfg("factor", factor=1.0))
    np.testing.assert_array_equal(got[0], _mask(1, 3, 4))


def test_factor_boundary_just_below_fails():
    conf = np.array([[0.1, 0.95, 0.2, _BELOW_075, 0.9, 0.3, 0.5, 0.1]], np.float32)
    got = _run(_view(conf, np.ones((1, LB), bool)), _cfg("factor", factor=1.0))
    np.testing.assert_array_equal(got[0], _mask(1, 4))


def test_factor_boundary_f_half():
    """f = 0.5: rank 3 needs 1 - 0.5/4 = 0.875 (exact), rank 7 needs 1 - 0.5/8 = 0.9375 (exact)."""
    conf = np.array([[0.99, 0.98, 0.875, 0.97, 0.96, 0.95, 0.9375, 0.9375]], np.float32)
    # sorted: 0.99, 0.98 (k2 >= .8333), 0.97 (k3 >= .875), 0.96 (k4 >= .9), 0.95 (k5 >= .9167),
    #         0.9375 (k6 >= .9286), 0.9375 (k7 >= .9375, exact), 0.875 (k8 < .9444)
    got = _run(_view(conf, np.ones((1, LB), bool)), _cfg("factor", factor=0.5))
    np.testing.assert_array_equal(got[0], _mask(0, 1, 3, 4, 5, 6, 7))
    conf[0, 7] = np.nextafter(np.float32(0.9375), np.float32(0.0))  # rank 7 now just below
    got = _run(_view(conf, np.ones((1, LB), bool)), _cfg("factor", factor=0.5))
    np.testing.assert_array_equal(got[0], _mask(0, 1, 3, 4, 5, 6))


def test_factor_first_failure_is_last_candidate_is_not_revealed():
    """docs/algorithm.md section 9: the reference reveals all candidates when the first failing one is the last
    sorted candidate; we reveal exactly the passing prefix."""
    conf = np.array([[1.0, 0.95, 1.0, 0.9, 1.0, 0.7, 1.0, 1.0]], np.float32)
    cand = _mask(1, 3, 5)[None]  # 0.95, 0.9 (>= 2/3), 0.7 (< 0.75, last) -> only the first two
    got = _run(_view(conf, cand), _cfg("factor", factor=1.0))
    np.testing.assert_array_equal(got[0], _mask(1, 3))
    cand2 = _mask(1, 5)[None]  # two candidates: the second (0.7) passes 2/3 -> both
    got = _run(_view(conf, cand2), _cfg("factor", factor=1.0))
    np.testing.assert_array_equal(got[0], _mask(1, 5))
    conf3 = conf.copy()
    conf3[0, 5] = 0.6  # two candidates, the last (0.6 < 2/3) fails -> only the first
    got = _run(_view(conf3, cand2), _cfg("factor", factor=1.0))
    np.testing.assert_array_equal(got[0], _mask(1))


def test_factor_rank_one_always_accepted():
    conf = np.array([[0.05, 0.1, 0.02, 0.01, 0.03, 0.04, 0.06, 0.07]], np.float32)
    got = _run(_view(conf, np.ones((1, LB), bool)), _cfg("factor", factor=1.0))
    np.testing.assert_array_equal(got[0], _mask(1))


# ----------------------------------------------------------------------------- done rows

ALL_RULE_CONFIGS = [
    _cfg("planner_bernoulli"), _cfg("planner_topk"), _cfg("planner_topk", factor=4.0),
    _cfg("threshold"), _cfg("factor"), _cfg("low_confidence", steps=2), _cfg("random", steps=4),
    _cfg("entropy_bound"), _cfg("ass"), _cfg("threshold", eoser=True),
]


@pytest.mark.parametrize("config", ALL_RULE_CONFIGS, ids=lambda c: c.rule)
def test_done_rows_reveal_nothing(config):
    rng = np.random.default_rng(7)
    cand = np.zeros((2, LB), bool)
    cand[1] = _mask(2, 6)  # one active row next to the done row
    conf = np.ones((2, LB), np.float32)
    p = np.ones((2, LB), np.float32)
    logits = rng.standard_normal((2, LB, 4)).astype(np.float32)
    view = _view(conf, cand, block_step=[0, 1], unmask_probs=p if config.uses_planner else None,
                 token_logits=logits)
    got = _run(view, config, seed=3)
    assert not got[0].any()
    assert got[1].any() and not np.any(got[1] & ~cand[1])
    view = _view(conf, np.zeros((2, LB), bool), unmask_probs=p if config.uses_planner else None,
                 token_logits=logits)
    assert not _run(view, config).any()


# ------------------------------------------------------------------- planner_topk factor > 1


def test_planner_topk_factor_above_one_never_exceeds_candidates():
    """docs/algorithm.md section 9: with factor > 1, k = floor(sum p) over the unclipped p is clamped to the
    candidates and non-candidates never move (the reference overwrote zero-probability positions)."""
    config = _cfg("planner_topk", factor=3.0)
    z = np.array([[2.0, 1.0, 0.5, -1.0, 3.0, 0.0, 4.0, -2.0]], np.float32)
    p = np.asarray(action.planner_scores(jnp.asarray(z), config.rule_factor))  # as the rollout passes it
    assert np.sum(p) > 4 and p.max() > 1  # the reference's k over all positions would exceed 3 candidates
    cand = _mask(1, 3, 5)[None]  # p = 2.19, 0.81, 1.5 -> sum 4.5 -> k = 4 -> clamped to 3
    got = _run(_view(np.zeros((1, LB)), cand, unmask_probs=p), config)
    np.testing.assert_array_equal(got[0], _mask(1, 3, 5))
    cand = _mask(3, 7)[None]  # p = 0.81, 0.36 -> k = 1: the larger
    got = _run(_view(np.zeros((1, LB)), cand, unmask_probs=p), config)
    np.testing.assert_array_equal(got[0], _mask(3))


def test_planner_topk_k_comes_from_the_unclipped_sum():
    """docs/algorithm.md section 3, `topk(p, k = floor(sum p))` with `p = factor * sigmoid(z)`: four candidates
    at sigmoid 0.8 and four at 0.1 with factor 1.5 give k = floor(4.8 + 0.6) = 5 (clipping p to 1
    first would give 4); the ranking breaks the p > 1 ties by sigmoid, not by position."""
    sig = np.array([0.1, 0.8, 0.1, 0.8, 0.1, 0.8, 0.1, 0.805])
    z = np.log(sig / (1 - sig)).astype(np.float32)[None]
    p = np.asarray(action.planner_scores(jnp.asarray(z), 1.5))
    got = _run(_view(np.zeros((1, LB)), np.ones((1, LB), bool), unmask_probs=p), _cfg("planner_topk", factor=1.5))
    np.testing.assert_array_equal(got[0], _mask(1, 3, 5, 7, 0))


def test_planner_topk_clamps_unclipped_probabilities():
    """Even if probabilities above 1 reached the rule, k is clamped to the candidates."""
    p = np.full((1, LB), 2.5, np.float32)  # sum over 3 candidates = 7.5 -> k = 7 -> clamp to 3
    cand = _mask(2, 3, 7)[None]
    got = _run(_view(np.zeros((1, LB)), cand, unmask_probs=p), _cfg("planner_topk", factor=2.5))
    np.testing.assert_array_equal(got[0], _mask(2, 3, 7))


# ---------------------------------------------------------------------- schedules, ASS


def test_linear_schedule_matches_llada():
    for lb, s in [(8, 3), (8, 8), (8, 1), (32, 5), (7, 7), (10, 4)]:
        got = np.asarray(rules.linear_schedule(jnp.arange(s, dtype=jnp.int32), lb, s))
        want = [_llada_k(i, lb, s) for i in range(s)]
        np.testing.assert_array_equal(got, want)
        assert got.sum() == lb
    np.testing.assert_array_equal(np.asarray(rules.linear_schedule(jnp.arange(3), 8, 3)), [3, 3, 2])


def _simulate_block(config, confidence, max_steps=20):
    """Drives one block through `select` until no candidate is left; returns reveals per step."""
    cand = np.ones((1, LB), bool)
    counts, revealed_order = [], []
    for step in range(max_steps):
        if not cand.any():
            break
        got = _run(_view(confidence, cand, block_step=[step]), config, seed=step)
        assert not np.any(got & ~cand)
        counts.append(int(got.sum()))
        revealed_order.append(np.flatnonzero(got[0]).tolist())
        cand = cand & ~got
    return counts, revealed_order


def test_low_confidence_schedule_across_block_steps():
    """Lb = 8, 3 steps per block: 3, 3, 2 tokens, the most confident first."""
    conf = np.array([[0.1, 0.8, 0.3, 0.9, 0.5, 0.7, 0.2, 0.6]], np.float32)
    for config in (_cfg("low_confidence", steps=3), _cfg("low_confidence", gen_length=16, steps=6)):
        assert config.steps_per_block == 3
        counts, order = _simulate_block(config, conf)
        assert counts == [3, 3, 2]
        assert order == [[1, 3, 5], [2, 4, 7], [0, 6]]


def test_random_rule_schedule_and_scores():
    counts, _ = _simulate_block(_cfg("random", steps=3), np.full((1, LB), 0.5, np.float32))
    assert counts == [3, 3, 2]
    config = _cfg("random", steps=4)  # k = 2: the two largest uniform scores
    key = jax.random.key(11)
    u = np.asarray(_uniform(key, (1, LB)))
    cand = _mask(0, 2, 3, 5, 6)[None]
    got = np.asarray(_select(_view(np.zeros((1, LB)), cand), key, config))
    best = sorted(np.flatnonzero(cand[0]), key=lambda i: -u[0, i])[:2]
    np.testing.assert_array_equal(got[0], _mask(*best))


def test_ass_doubles_and_takes_remainder():
    conf = np.array([[0.1, 0.8, 0.3, 0.9, 0.5, 0.7, 0.2, 0.6]], np.float32)
    counts, order = _simulate_block(_cfg("ass"), conf)
    assert counts == [1, 2, 4, 1]  # 1, 2, 4, then the remaining 1 of 8 (log2(8) + 1 steps)
    assert order == [[3], [1, 5], [2, 4, 6, 7], [0]]
    full = np.ones((1, LB), bool)
    for step, k in [(0, 1), (1, 2), (2, 4), (3, 8), (4, 8), (40, 8)]:
        got = _run(_view(conf, full, block_step=[step]), _cfg("ass"))
        assert got.sum() == k, (step, got)


# ---------------------------------------------------------------------------------- EOSER


@pytest.mark.parametrize("config,steps", [
    (_cfg("threshold", eoser=True), LB),
    (_cfg("factor", eoser=True, eoser_gamma_min=0.25), LB),
    (_cfg("low_confidence", eoser=True, steps=3), 3),
    (_cfg("low_confidence", eoser=True, gen_length=16, steps=8), 4),
    (_cfg("ass", eoser=True), 4),  # log2(8) + 1
])
def test_eoser_gamma_linear_from_gamma_min_to_one(config, steps):
    s = np.arange(steps + 3)
    got = np.asarray(rules.eoser_gamma(jnp.asarray(s, jnp.int32), config))
    gmin = config.eoser_gamma_min
    want = gmin + (1.0 - gmin) * np.minimum(s / (steps - 1), 1.0)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # as the compiled rollout runs it: steps per block traced, the static config without knobs
    traced = jax.jit(rules.eoser_gamma, static_argnums=1)(jnp.asarray(s, jnp.int32), config.without_knobs(),
                                                          rules.Knobs.of(config))
    np.testing.assert_allclose(traced, want, rtol=1e-6)
    assert got[0] == pytest.approx(gmin) and got[steps - 1] == pytest.approx(1.0)
    assert np.all(got[steps:] == pytest.approx(1.0))


def test_eoser_scaled_confidence_delays_eos():
    """EOS confidence scaled by gamma (docs/algorithm.md section 3: c <- gamma(step) * c when x0 = EOS)."""
    eos = 3
    config = _cfg("threshold", eoser=True, eos_token_id=eos)
    x0 = np.array([[eos, 0, 1, eos, 2, 0, 1, 2]], np.int32)
    raw = np.array([[0.99, 0.5, 0.95, 0.97, 0.2, 0.1, 0.3, 0.4]], np.float32)
    cand = np.ones((1, LB), bool)

    def reveal_at(step):
        gamma = np.asarray(rules.eoser_gamma(jnp.array([step], jnp.int32), config))
        conf = np.where(x0 == eos, raw * gamma[:, None], raw).astype(np.float32)
        return _run(_view(conf, cand, block_step=[step], x0=x0), config)

    np.testing.assert_array_equal(reveal_at(0)[0], _mask(2))  # 0.99 * 0.4 < 0.9
    np.testing.assert_array_equal(reveal_at(LB - 1)[0], _mask(0, 2, 3))  # gamma = 1
    # at the midpoint gamma = 0.4 + 0.6 * 4/7 ~ 0.743 -> EOS still below tau
    np.testing.assert_array_equal(reveal_at(4)[0], _mask(2))


# ------------------------------------------------------------------------ entropy helpers


def test_token_entropy_matches_numpy_with_masked_column():
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal((3, LB, V)) * 3).astype(np.float32)
    logits[..., MASK] = -np.inf
    logits[0, 0] = -np.inf
    logits[0, 0, 2] = 0.0  # one-hot: entropy 0
    got = np.asarray(rules.token_entropy(jnp.asarray(logits)))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, _np_entropy(logits), rtol=1e-5, atol=1e-5)
    assert got[0, 0] == 0.0


def test_entropy_bound_hand_built():
    # entropies: uniform over 1, 2, 4 tokens -> 0, ln 2, ln 4
    logits = np.full((1, LB, 4), -np.inf, np.float32)
    spec = [4, 1, 2, 4, 2, 1, 4, 4]  # support size per position
    for i, n in enumerate(spec):
        logits[0, i, :n] = 0.0
    cand = np.ones((1, LB), bool)
    # ascending: 0 (1), 0 (5), ln2 (2), ln2 (4), ln4, ... cumulative 0, 0, .693, 1.386, ...
    got = _run(_view(np.zeros((1, LB)), cand, token_logits=logits), _cfg("entropy_bound", entropy_bound=1.0))
    np.testing.assert_array_equal(got[0], _mask(1, 5, 2))
    got = _run(_view(np.zeros((1, LB)), _mask(0, 3, 6)[None], token_logits=logits),
               _cfg("entropy_bound", entropy_bound=1.0))  # none fit (ln 4 > 1) -> first lowest
    np.testing.assert_array_equal(got[0], _mask(0))


# --------------------------------------------------------------------------- DecodeConfig


def test_decode_config_errors_name_the_problem():
    with pytest.raises(ConfigError) as err:
        DecodeConfig(rule="threshold", gen_length=20, block_length=8)
    assert "20" in str(err.value) and "8" in str(err.value)
    with pytest.raises(ConfigError, match="no_such_rule"):
        DecodeConfig(rule="no_such_rule")
    with pytest.raises(ConfigError, match="threshold"):
        DecodeConfig(rule="factor", threshold=0.8)
    with pytest.raises(ConfigError, match="factor"):
        DecodeConfig(rule="threshold", factor=1.0)
    with pytest.raises(ConfigError, match="steps"):
        DecodeConfig(rule="ass", steps=8)
    with pytest.raises(ConfigError, match="entropy_bound"):
        DecodeConfig(rule="low_confidence", entropy_bound=1.0)
    with pytest.raises(ConfigError, match="eoser"):
        DecodeConfig(rule="planner_bernoulli", eoser=True)
    assert issubclass(ConfigError, ValueError)
    # the knobs that do apply are accepted
    DecodeConfig(rule="factor", factor=2.0)
    DecodeConfig(rule="planner_topk", factor=2.0)
    DecodeConfig(rule="threshold", threshold=0.7, eoser=True)
    assert DecodeConfig(rule="low_confidence", gen_length=16, block_length=8, steps=6).steps_per_block == 3


# ------------------------------------------------------------- rollout's per-step pieces


def _np_log_sigmoid(z):
    return -np.logaddexp(0.0, -np.asarray(z, np.float64))


def _np_action_log_prob(logits, z, x0, cand, reveal, temp, factor, planner):
    log_q = np.take_along_axis(_np_log_softmax(np.asarray(logits, np.float64) / temp), x0[..., None], -1)[..., 0]
    total = np.sum(np.where(reveal, log_q, 0.0), axis=-1)
    if planner:
        if factor == 1.0:
            log_p, log_not_p = _np_log_sigmoid(z), _np_log_sigmoid(-np.asarray(z, np.float64))
        else:
            p = np.clip(factor / (1.0 + np.exp(-np.asarray(z, np.float64))), 0.0, 1.0)
            with np.errstate(divide="ignore"):
                log_p, log_not_p = np.log(p), np.log1p(-p)
        total = total + np.sum(np.where(reveal, log_p, 0.0), -1) + np.sum(np.where(cand & ~reveal, log_not_p, 0.0), -1)
    return total


def _logprob_inputs(seed):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((B, LB, V)) * 2).astype(np.float32)
    logits[..., MASK] = -np.inf
    x0 = rng.integers(0, MASK, size=(B, LB)).astype(np.int32)
    z = (rng.standard_normal((B, LB)) * 2).astype(np.float32)
    cand = rng.random((B, LB)) < 0.7
    cand[0] = False
    reveal = cand & (rng.random((B, LB)) < 0.5)
    return logits, z, x0, cand, reveal


@pytest.mark.parametrize("config", [
    _cfg("planner_bernoulli"),
    _cfg("planner_bernoulli", factor=0.5),
    _cfg("planner_topk", logprob_temperature=0.5),
    _cfg("planner_bernoulli", temperature=0.7, logprob_temperature=None),
    _cfg("threshold"),
    _cfg("low_confidence", temperature=0.5, logprob_temperature=None),
], ids=lambda c: f"{c.rule}-T{c.logprob_temp}-f{c.rule_factor}")
def test_action_log_prob_matches_numpy(config):
    for seed in (0, 1):
        logits, z, x0, cand, reveal = _logprob_inputs(seed)
        args = (jnp.asarray(logits), jnp.asarray(z) if config.uses_planner else None, jnp.asarray(x0),
                jnp.asarray(cand), jnp.asarray(reveal))
        got = np.asarray(_action_log_prob(*args, config))
        want = _np_action_log_prob(logits, z, x0, cand, reveal, config.logprob_temp, config.rule_factor,
                                   config.uses_planner)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
        assert got[0] == 0.0  # a done row: no candidates, no action
        # The rollout's traced factor and the trainer's constant one give the same log-probs.
        traced = np.asarray(_action_log_prob(*args, config.without_knobs(), rules.Knobs.of(config)))
        np.testing.assert_array_equal(traced, got)


def _np_reveal_set_probability(p, cand, reveal):
    """Probability that planner_bernoulli plus the at-least-one rule reveals exactly `reveal` in a
    row, by enumerating every Bernoulli draw over the candidates (float64)."""
    idx = np.flatnonzero(cand)
    best = _by_score_desc(p, idx)[0]
    total = 0.0
    for draw in itertools.product((False, True), repeat=len(idx)):
        chosen = np.zeros(cand.shape, bool)
        chosen[idx] = draw
        weight = np.prod(np.where(draw, p[idx], 1.0 - p[idx]))
        if not chosen.any():
            chosen[best] = True  # the draws picked nothing: the best candidate is forced
        total += weight * np.array_equal(chosen, reveal)
    return total


@pytest.mark.parametrize("factor", [1.0, 1.5])
def test_forced_logprob_exact_is_the_probability_of_the_revealed_set(factor):
    """`forced_logprob="exact"`: the planner part of the action log-prob is the log-probability of
    the revealed set, drawn or forced, by enumeration; `reference` differs from it exactly on the
    steps that reveal only the best candidate, by that candidate's log p."""
    rng = np.random.default_rng(7)
    logits, z, x0, cand, _ = _logprob_inputs(7)
    cand[0] = rng.random(LB) < 0.7  # every row has candidates here
    cand[:, 0] = True
    p = np.clip(factor / (1.0 + np.exp(-z.astype(np.float64))), 0.0, 1.0)
    best = [_by_score_desc(p[b], np.flatnonzero(cand[b]))[0] for b in range(B)]
    reveal = np.zeros((B, LB), bool)
    reveal[0, best[0]] = True                                       # the best alone: drawn or forced
    reveal[1, [i for i in np.flatnonzero(cand[1]) if i != best[1]][0]] = True  # another one alone
    reveal[2, np.flatnonzero(cand[2])[:2]] = True                  # two
    reveal[3] = cand[3]                                            # all of them
    reveal[4, best[4]] = True
    exact_cfg = _cfg("planner_bernoulli", factor=factor, forced_logprob="exact")
    args = [jnp.asarray(a) for a in (logits, z, x0, cand, reveal)]
    got = np.asarray(_action_log_prob(*args, exact_cfg), np.float64)
    reference = np.asarray(_action_log_prob(*args, _cfg("planner_bernoulli", factor=factor)), np.float64)
    log_q = np.take_along_axis(_np_log_softmax(logits), x0[..., None], -1)[..., 0]
    with np.errstate(divide="ignore"):  # factor 1.5 clips some p to 1: leaving one masked is impossible
        want = np.array([np.log(_np_reveal_set_probability(p[b], cand[b], reveal[b])) for b in range(B)])
    want += np.sum(np.where(reveal, log_q, 0.0), axis=-1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    possible = np.isfinite(want)
    assert possible.sum() >= 3 and (factor == 1.0 or not possible.all())
    only_best = np.array([reveal[b].sum() == 1 and reveal[b, best[b]] for b in range(B)])
    assert only_best[possible].any()
    np.testing.assert_allclose(reference[possible] - got[possible],
                               np.where(only_best, np.log(p[np.arange(B), best]), 0.0)[possible], rtol=1e-5, atol=1e-5)
    # the rollout's traced factor selects the same way
    traced = np.asarray(_action_log_prob(*args, exact_cfg.without_knobs(), rules.Knobs.of(exact_cfg)))
    np.testing.assert_array_equal(traced, got.astype(np.float32))


def test_forced_logprob_is_checked():
    with pytest.raises(ConfigError, match=r"decode.forced_logprob='exact' does not apply to rule 'planner_topk'"):
        _cfg("planner_topk", forced_logprob="exact")
    with pytest.raises(ConfigError, match=r"decode.forced_logprob='true' is unknown; use one of reference, exact"):
        _cfg("planner_bernoulli", forced_logprob="true")


def test_action_log_prob_token_only_for_non_planner_rules():
    logits, z, x0, cand, reveal = _logprob_inputs(3)
    got = np.asarray(_action_log_prob(jnp.asarray(logits), None, jnp.asarray(x0), jnp.asarray(cand),
                                      jnp.asarray(reveal), _cfg("factor")))
    log_q = np.take_along_axis(_np_log_softmax(logits), x0[..., None], -1)[..., 0]
    np.testing.assert_allclose(got, np.sum(np.where(reveal, log_q, 0.0), -1), rtol=1e-5, atol=1e-4)


def test_action_log_prob_factor_two_clips_to_finite():
    """docs/algorithm.md section 9: with factor 2, p = clip(2 sigmoid(z)) reaches 1; revealed positions at
    p = 1 contribute log 1 = 0 (the reference's unclipped p > 1 gave NaN)."""
    config = _cfg("planner_bernoulli", factor=2.0)
    logits, _, x0, _, _ = _logprob_inputs(4)
    z = np.array([[3.0, 1.0, -1.0, -2.0, 0.5, 4.0, -3.0, 2.0]] * B, np.float32)  # z > 0 -> p = 1
    cand = np.ones((B, LB), bool)
    cand[0] = False
    reveal = np.broadcast_to(z > 0, (B, LB)) & cand  # every p = 1 position revealed
    reveal[1, 0] = False  # ... except one: log(1 - 1) = -inf there
    got = np.asarray(_action_log_prob(jnp.asarray(logits), jnp.asarray(z), jnp.asarray(x0), jnp.asarray(cand),
                                      jnp.asarray(reveal), config))
    want = _np_action_log_prob(logits, z, x0, cand, reveal, 1.0, 2.0, True)
    assert np.all(np.isfinite(got[[0, 2, 3, 4]])) and not np.any(np.isnan(got))
    np.testing.assert_allclose(got[[0, 2, 3, 4]], want[[0, 2, 3, 4]], rtol=1e-5, atol=1e-4)
    assert got[1] == -np.inf and want[1] == -np.inf
    # direct check of the planner terms: log p = 0 where clipped, log(1 - p) = log(1 - 2 sigmoid(z)) below
    log_p, log_not_p = (np.asarray(a) for a in action.planner_log_probs(jnp.asarray(z[:1]), 2.0))
    assert np.all(log_p[0][z[0] > 0] == 0.0)
    neg = z[0] < 0
    np.testing.assert_allclose(log_not_p[0][neg], np.log1p(-2.0 / (1.0 + np.exp(-z[0][neg].astype(np.float64)))),
                               rtol=1e-5)
    # The trainer differentiates this: rows with a finite log-prob get finite gradients (the -inf of
    # log(1 - p) at revealed p = 1 positions must not leak 0 * inf = NaN). d/dz: 0 where p is
    # clipped; log p = log 2 + log sigmoid(z) gives sigmoid(-z) for revealed, and
    # log(1 - 2 sigmoid(z)) gives -2 sigmoid(z) sigmoid(-z) / (1 - 2 sigmoid(z)) for masked ones.
    rows = [2, 3, 4]
    grad = np.asarray(jax.grad(lambda zz: jnp.sum(_action_log_prob(
        jnp.asarray(logits[rows]), zz, jnp.asarray(x0[rows]), jnp.asarray(cand[rows]), jnp.asarray(reveal[rows]),
        config)))(jnp.asarray(z[rows])))
    sig = 1.0 / (1.0 + np.exp(-z[rows].astype(np.float64)))
    masked_grad = -2.0 * sig * (1.0 - sig) / (1.0 - 2.0 * sig)
    want_grad = np.where(z[rows] > 0, 0.0, np.where(reveal[rows], 1.0 - sig, masked_grad))
    np.testing.assert_allclose(grad, np.where(cand[rows], want_grad, 0.0), rtol=1e-5, atol=1e-6)


def test_planner_log_probs_factor_one_is_log_sigmoid():
    z = jnp.array([-30.0, -2.0, 0.0, 2.0, 30.0])
    log_p, log_not_p = action.planner_log_probs(z, 1.0)
    np.testing.assert_allclose(np.asarray(log_p), _np_log_sigmoid(np.asarray(z)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(log_not_p), _np_log_sigmoid(-np.asarray(z)), rtol=1e-6, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(log_p))) and np.all(np.isfinite(np.asarray(log_not_p)))


def test_sample_tokens_temperature_zero_is_argmax():
    rng = np.random.default_rng(9)
    logits = rng.standard_normal((B, LB, V)).astype(np.float32)
    logits[..., MASK] = -np.inf
    got = np.asarray(rollout.sample_tokens(jnp.asarray(logits), 0.0, jax.random.key(0)))
    np.testing.assert_array_equal(got, np.argmax(logits, -1))
    assert got.dtype == np.int32


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sample_tokens_matches_softmax_at_temperature(temperature):
    base = np.array([1.5, 0.5, 0.0, -0.5, -np.inf], np.float32)  # last column: the mask token
    n = 4000
    logits = jnp.asarray(np.broadcast_to(base, (4, n // 4, base.size)))
    draws = np.asarray(rollout.sample_tokens(logits, temperature, jax.random.key(42))).ravel()
    freq = np.bincount(draws, minlength=base.size) / n
    want = np.exp(_np_log_softmax(base / temperature))
    np.testing.assert_allclose(freq, want, atol=0.03)
    assert freq[-1] == 0.0
    other = np.exp(_np_log_softmax(base))  # the temperature matters: T = 1 is clearly different
    assert np.max(np.abs(freq - other)) > 0.08
