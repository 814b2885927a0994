"""The jitted rollout: equals a Python loop, keeps its invariants, shards, and rejects bad input."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dultra_jax.config import RULES, ConfigError, DecodeConfig
from dultra_jax.decoding import rollout as R
from dultra_jax.decoding import action, rules
from dultra_jax.sharding import batch_sharding, make_mesh, param_shardings
from tests.helpers import MASK_ID, random_params, tiny_config

MODEL = tiny_config()
PARAMS = random_params(MODEL)
PROMPTS = np.random.default_rng(0).integers(3, MASK_ID, size=(4, 6))


def decode(rule="planner_bernoulli", **kw):
    fields = dict(rule=rule, prompt_length=8, gen_length=12, block_length=4, temperature=0.7, eos_token_id=1)
    fields.update(kw)
    return DecodeConfig(**fields)


def _assert_same(a: R.Trajectory, b: R.Trajectory):
    for name in ("tokens", "unmask_step", "num_steps", "prompt_tokens", "prompt_valid"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_allclose(a.step_logps, b.step_logps, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("config", [decode(rule) for rule in RULES]
                         + [decode("threshold", eoser=True, threshold=0.2), decode("planner_topk", factor=1.5),
                            decode("low_confidence", steps=6, temperature=0.0)],
                         ids=lambda c: f"{c.rule}{'-eoser' if c.eoser else ''}{'-f' if c.factor else ''}")
def test_while_loop_equals_python_loop(config):
    jitted = R.rollout(PARAMS, PROMPTS, None, jax.random.key(1), config, MODEL)
    looped = R.rollout_python_loop(PARAMS, PROMPTS, None, jax.random.key(1), config, MODEL)
    _assert_same(jitted, looped)
    _check_invariants(jitted, config)


def _check_invariants(traj: R.Trajectory, config: DecodeConfig):
    tokens, steps, nfe = map(np.asarray, (traj.tokens, traj.unmask_step, traj.num_steps))
    # Every generated position is revealed exactly once: at one row-step below the row's NFE.
    assert np.all(tokens != MASK_ID) and np.all(steps < nfe[:, None])
    # Each row-step revealed at least one token (NFE counts only steps that did something).
    for row in range(len(nfe)):
        assert set(steps[row]) == set(range(nfe[row]))
    # Blocks are decoded left to right.
    per_block = steps.reshape(len(nfe), config.num_blocks, config.block_length)
    assert np.all(per_block.max(-1)[:, :-1] < per_block.min(-1)[:, 1:])
    assert np.all(nfe <= config.step_budget)
    np.testing.assert_array_equal(traj.prompt_tokens[:, -PROMPTS.shape[1]:], PROMPTS)
    # Log-probs are recorded for exactly the steps taken.
    logps = np.asarray(traj.step_logps)
    assert np.all(logps[np.arange(logps.shape[1])[None] >= nfe[:, None]] == 0)
    assert np.all(np.isfinite(logps))


def test_step_logps_replay_from_the_trajectory():
    """Rebuilding each step's canvas from (tokens, unmask_step) gives the recorded log-probs."""
    config = decode(temperature=0.5)
    traj = R.rollout(PARAMS, PROMPTS, None, jax.random.key(3), config, MODEL)
    valid = jnp.concatenate([traj.prompt_valid, jnp.ones(traj.tokens.shape, bool)], axis=1)
    for k in range(int(traj.num_steps.max())):
        canvas = R.canvas_before_step(traj, k, MASK_ID)
        positions, active, cand, logits, unmask, _ = R.evaluate_block(PARAMS, canvas, valid, MODEL, config)
        reveal = R.policy.gather_positions(traj.unmask_step, positions - config.prompt_length) == k
        x0 = R.policy.gather_positions(traj.tokens, positions - config.prompt_length)
        logp = action.action_log_prob(logits, unmask, x0, cand, reveal & cand, config)
        want = np.where(np.asarray(active), np.asarray(traj.step_logps[:, k]), 0.0)
        np.testing.assert_allclose(np.where(np.asarray(active), logp, 0.0), want, atol=1e-5, rtol=0)


def test_determinism_and_seeds():
    topk = decode("planner_topk", temperature=0.0)
    a = R.rollout(PARAMS, PROMPTS, None, jax.random.key(0), topk, MODEL)
    b = R.rollout(PARAMS, PROMPTS, None, jax.random.key(99), topk, MODEL)
    _assert_same(a, b)
    bern = decode("planner_bernoulli", temperature=0.0)
    c = R.rollout(PARAMS, PROMPTS, None, jax.random.key(0), bern, MODEL)
    d = R.rollout(PARAMS, PROMPTS, None, jax.random.key(1), bern, MODEL)
    assert not np.array_equal(c.unmask_step, d.unmask_step)


@pytest.mark.parametrize("rule", RULES)
def test_deterministic_means_the_key_is_unused(rule):
    """`DecodeConfig.deterministic` (what lets evaluation decode a setting once for every seed) is
    exactly "two keys give the same trajectory": greedy tokens and a rule without draws."""
    greedy, sampled = decode(rule, temperature=0.0), decode(rule, temperature=0.7)
    assert not sampled.deterministic
    a, b = (R.rollout(PARAMS, PROMPTS, None, jax.random.key(k), greedy, MODEL) for k in (0, 1))
    if greedy.deterministic:
        _assert_same(a, b)
    else:
        assert not (np.array_equal(a.unmask_step, b.unmask_step) and np.array_equal(a.tokens, b.tokens))


def test_second_call_does_not_retrace():
    config = decode(gen_length=8)
    R.rollout(PARAMS, PROMPTS, None, jax.random.key(0), config, MODEL)
    count = R.TRACE_COUNT["rollout_loop"]
    R.rollout(PARAMS, PROMPTS[::-1].copy(), None, jax.random.key(5), config, MODEL)
    assert R.TRACE_COUNT["rollout_loop"] == count


def test_a_knob_sweep_compiles_once():
    """factor, threshold, entropy_bound and steps are traced inputs: every value of a sweep reuses
    the rule's one compiled loop and decodes as the Python loop, whose knobs are constants."""
    for rule, key, values in (
            ("planner_bernoulli", "factor", (0.5, 1.0, 1.5)), ("threshold", "threshold", (0.0, 0.9)),
            ("entropy_bound", "entropy_bound", (0.5, 20.0)), ("low_confidence", "steps", (2, 6, 8))):
        results = []
        for value in values:
            config = decode(rule, gen_length=8, **{key: value})
            results.append(R.rollout(PARAMS, PROMPTS, None, jax.random.key(2), config, MODEL))
            if len(results) == 1:
                count = R.TRACE_COUNT["rollout_loop"]
            assert R.TRACE_COUNT["rollout_loop"] == count, (rule, value)
            _assert_same(results[-1], R.rollout_python_loop(PARAMS, PROMPTS, None, jax.random.key(2), config, MODEL))
            if key == "steps":
                assert np.all(np.asarray(results[-1].num_steps) == value), (value, results[-1].num_steps)
        assert not np.array_equal(results[0].unmask_step, results[-1].unmask_step), rule


def test_planner_rules_read_the_unclipped_scores(monkeypatch):
    """The rules see `p = factor * sigmoid(z)` unclipped (planner_topk's k sums it,
    docs/algorithm.md section 3); only the log-probs clip it."""
    seen = []
    topk = rules.RULES["planner_topk"]

    def recording(view, rng, config):
        jax.debug.callback(lambda p: seen.append(np.asarray(p)), view.unmask_probs)
        return topk(view, rng, config)

    monkeypatch.setitem(rules.RULES, "planner_topk", recording)
    config = decode("planner_topk", temperature=0.0, factor=3.0)
    prompts, valid = R.check_prompts(PROMPTS, None, MODEL, config)
    state = R.init_state(jnp.asarray(prompts), jnp.asarray(valid), jax.random.key(0), MODEL, config)
    jax.block_until_ready(R.denoise_step_jit(PARAMS, state, model=MODEL, config=config))
    *_, unmask_logits, _ = jax.jit(R.evaluate_block, static_argnums=(3, 4))(PARAMS, state.canvas, state.valid,
                                                                            MODEL, config)
    want = 3.0 / (1.0 + np.exp(-np.asarray(unmask_logits, np.float64)))
    assert want.max() > 1.0
    np.testing.assert_allclose(seen[0], want, rtol=1e-5)


def test_left_padding_and_step_budget():
    valid = np.ones((2, 6), bool)
    valid[0, :2] = False
    config = decode(max_steps=2)
    traj = R.rollout(PARAMS, PROMPTS[:2], valid, jax.random.key(0), config, MODEL)
    assert traj.prompt_valid.shape == (2, 8)
    np.testing.assert_array_equal(traj.prompt_valid[0], [False] * 4 + [True] * 4)
    np.testing.assert_array_equal(traj.prompt_tokens[:, :2], MODEL.pad_token_id)
    # Budget of 2 steps: rows stop with masks left; unrevealed positions carry unmask_step == T.
    assert np.all(np.asarray(traj.num_steps) == 2)
    unrevealed = np.asarray(traj.tokens) == MASK_ID
    assert unrevealed.any() and np.all(np.asarray(traj.unmask_step)[unrevealed] == 2)


def test_done_rows_spend_no_nfe():
    # threshold 0 reveals the whole block each step: 3 NFE; low_confidence one token per step: 12.
    fast = R.rollout(PARAMS, PROMPTS, None, jax.random.key(0), decode("threshold", threshold=0.0), MODEL)
    assert np.all(np.asarray(fast.num_steps) == 3)
    slow = R.rollout(PARAMS, PROMPTS, None, jax.random.key(0), decode("low_confidence"), MODEL)
    assert np.all(np.asarray(slow.num_steps) == 12)


@pytest.mark.parametrize("rule, cache", [("planner_bernoulli", "none"), ("low_confidence", "none"),
                                         ("planner_bernoulli", "dual"), ("planner_bernoulli", "prefix"),
                                         ("threshold", "prefix")])  # planner / pruned last layer / caches
def test_sharded_rollout_equals_unsharded(rule, cache):
    """Also with the KV cache (the planner rules refresh it by blocks, their `prefix` rows at their
    own pace; `threshold` refreshes in full, its rows in lockstep)."""
    config = decode(rule, temperature=0.5, cache=cache)
    prompts = np.random.default_rng(1).integers(3, MASK_ID, size=(8, 8)).astype(np.int32)
    want = R.rollout(PARAMS, prompts, None, jax.random.key(2), config, MODEL)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    params = jax.device_put(PARAMS, param_shardings(PARAMS, mesh))
    with jax.set_mesh(mesh):
        got = R.rollout(params, jax.device_put(prompts, batch_sharding(mesh)),
                        jax.device_put(np.ones(prompts.shape, bool), batch_sharding(mesh)),
                        jax.random.key(2), config, MODEL)
    for name in ("tokens", "unmask_step", "num_steps", "step_logps", "prompt_tokens", "prompt_valid"):
        assert getattr(got, name).sharding.spec[0] == ("data", "fsdp"), name  # the carry's rows stay sharded
    _assert_same(got, want)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_sharded_cached_rollout_gathers_no_cache(cache):
    """Under a batch-sharded mesh the cache's reads and writes stay on each device's rows: the
    compiled rollout has no collective over keys/values of the cache's layout (a write indexing
    the rows dynamically made the partitioner all-gather the whole cache, for every row)."""
    config = decode(temperature=0.5, cache=cache)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    params = jax.device_put(PARAMS, param_shardings(PARAMS, mesh))
    rows = lambda x: jax.device_put(x, batch_sharding(mesh))  # noqa: E731
    with jax.set_mesh(mesh):
        tokens, valid, knobs, static = R.rollout_inputs(rows(np.ones((8, 8), np.int32) * 5),
                                                        rows(np.ones((8, 8), bool)), config, MODEL)
        hlo = R.rollout_jit.lower(params, tokens, valid, jax.random.key(0), knobs, model=MODEL,
                                  config=static).compile().as_text()
    collectives = re.findall(r"= f32\[([\d,]+)\]\S* (?:all-gather|all-reduce|collective-permute|all-to-all)\(", hlo)
    assert collectives  # the parameters are gathered: the pattern does see collectives
    # keys/values are [n_layers, B, Hkv, L, Dh]: no collective moves anything of that layout
    cache_like = [shape for shape in collectives
                  if len(shape.split(",")) == 5 and int(shape.split(",")[3]) == config.canvas_length]
    assert not cache_like, cache_like


def test_bad_input_names_the_value():
    with pytest.raises(ConfigError, match=r"gen_length=12 is not a multiple of decode.block_length=5"):
        decode(block_length=5)
    with pytest.raises(ConfigError, match=r"decode.rule='confident' is unknown"):
        decode("confident")
    with pytest.raises(ConfigError, match=r"prompts are 9 tokens wide, longer than decode.prompt_length=8"):
        R.rollout(PARAMS, np.ones((2, 9), np.int32), None, jax.random.key(0), decode(), MODEL)
    with pytest.raises(ConfigError, match=r"model.mask_token_id=70 is outside the vocabulary \[0, 64\)"):
        tiny_config(mask_token_id=70)
    with pytest.raises(ConfigError, match=r"row 1, position 7: token id 63 is the mask id"):
        R.rollout(PARAMS, np.array([[5] * 8, [5] * 7 + [MASK_ID]]), None, jax.random.key(0), decode(), MODEL)
    with pytest.raises(ConfigError, match=r"decode.threshold=0.5 does not apply to rule 'factor'"):
        decode("factor", threshold=0.5)
    with pytest.raises(ConfigError, match=r"needs a planner head"):
        R.rollout(PARAMS, PROMPTS, None, jax.random.key(0), decode(), MODEL.replace(planner=None))
