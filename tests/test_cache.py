"""The block KV cache (`decode.cache` prefix / dual): window forwards, exact cases, rollout invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dultra_jax.config import PLANNER_RULES, RULES, ConfigError, DecodeConfig
from dultra_jax.decoding import cache as C
from dultra_jax.decoding import rollout as R
from dultra_jax.models import layers, policy
from tests.helpers import MASK_ID, random_params, tiny_config
from tests.test_rollout import _assert_same, _check_invariants

MODEL = tiny_config()
PARAMS = random_params(MODEL)
PROMPTS = np.random.default_rng(0).integers(3, MASK_ID, size=(4, 6))
LP, LG, LB = 8, 12, 4
apply_kv = jax.jit(policy.policy_apply_kv, static_argnums=2, static_argnames=("with_planner", "suffix_start"))
apply = jax.jit(policy.policy_apply, static_argnums=2, static_argnames="with_planner")


def decode(rule, cache, **kw):
    fields = dict(rule=rule, prompt_length=LP, gen_length=LG, block_length=LB, temperature=0.0, eos_token_id=1,
                  cache=cache)
    fields.update(kw)
    return DecodeConfig(**fields)


def _canvas():
    """A half-decoded canvas: prompt, first block revealed, second block partly, the rest masked."""
    rng = np.random.default_rng(1)
    gen = np.full((4, LG), MASK_ID)
    gen[:, :LB] = rng.integers(3, MASK_ID, size=(4, LB))
    gen[:, LB] = rng.integers(3, MASK_ID, size=4)
    canvas = np.concatenate([PROMPTS, np.zeros((4, LP - PROMPTS.shape[1]), int), gen], axis=1)
    valid = np.ones(canvas.shape, bool)
    valid[:, PROMPTS.shape[1]:LP] = False     # padding in the middle would be odd; only the mask matters
    return jnp.asarray(canvas, jnp.int32), jnp.asarray(valid)


def test_window_forward_on_a_fresh_cache_equals_the_full_forward():
    canvas, valid = _canvas()
    block = jnp.tile(jnp.arange(LP + LB, LP + 2 * LB, dtype=jnp.int32)[None], (4, 1))
    candidates = (canvas == MASK_ID) & (jnp.arange(LP + LG)[None] >= LP + LB) & (jnp.arange(LP + LG)[None] < LP + 2 * LB)
    full_logits, full_unmask, kv = apply_kv(PARAMS, canvas, MODEL, valid=valid, candidates=candidates,
                                                          logit_positions=block)
    ref_logits, ref_unmask = apply(PARAMS, canvas, MODEL, valid=valid, candidates=candidates,
                                                 logit_positions=block)
    np.testing.assert_allclose(full_logits, ref_logits, atol=1e-5)
    np.testing.assert_allclose(full_unmask, ref_unmask, atol=1e-5)
    assert kv[0][0].shape == (MODEL.n_layers, 4, MODEL.n_kv_heads, LP + LG, MODEL.head_dim)
    # dual: the block alone; prefix: block start to the canvas end, here clipped (duplicates of
    # the last position) as for a row ahead of the slowest one.
    prefix = C._prefix_window(block[:, 0], LG, LP + LG)
    assert int(prefix[0, -1]) == LP + LG - 1 and int(prefix[0, 0]) == LP + LB
    for window in (block, prefix):
        logits, unmask, _ = apply_kv(PARAMS, canvas, MODEL, valid=valid, candidates=candidates,
                                                   logit_positions=block, cache=kv, window=window)
        np.testing.assert_allclose(logits, full_logits, atol=1e-5)
        np.testing.assert_allclose(unmask, full_unmask, atol=1e-5)
    # prefix as the rollout runs it: one static suffix for every row, from the block or before it
    # (the positions before a row's block then read from the cache), outputs at the block.
    for start in (LP + LB, LP):
        logits, unmask, _ = apply_kv(PARAMS, canvas, MODEL, valid=valid, candidates=candidates,
                                     logit_positions=block, cache=kv, suffix_start=start)
        np.testing.assert_allclose(logits, full_logits, atol=1e-5)
        np.testing.assert_allclose(unmask, full_unmask, atol=1e-5)
    # Without the planner: no planner keys/values, the same logits and backbone keys/values.
    logits, unmask, kv_backbone_only = apply_kv(PARAMS, canvas, MODEL, valid=valid, candidates=candidates,
                                                logit_positions=block, with_planner=False)
    assert unmask is None and kv_backbone_only[1] is None
    np.testing.assert_allclose(logits, full_logits, atol=1e-5)
    for a, b in zip(kv_backbone_only[0], kv[0]):
        np.testing.assert_allclose(a, b, atol=1e-6)
    for window in (block, prefix):
        logits, _, _ = apply_kv(PARAMS, canvas, MODEL, valid=valid, candidates=candidates, logit_positions=block,
                                cache=kv, window=window, with_planner=False)
        np.testing.assert_allclose(logits, full_logits, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_over_cache_equals_attention_over_the_written_cache(dtype):
    """Two key sets, one softmax: the same as writing the window's keys/values into the cache and
    attending to all `S` keys. Grouped heads (4 query heads on 2 kv heads), left padding, and a
    window with a repeated position (a prefix window clipped at the canvas end) whose key counts
    once."""
    rng = np.random.default_rng(1)
    batch, length, heads, kv_heads, dim = 3, 10, 4, 2, 8
    window = jnp.asarray([[4, 5, 6, 7], [6, 7, 8, 9], [7, 8, 9, 9]], jnp.int32)
    valid = jnp.asarray(np.arange(length)[None] >= np.array([[0], [2], [3]]))  # rows 1, 2 left-padded
    draw = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)  # noqa: E731
    q = draw(batch, 4, heads, dim)
    # keys/values heads-major, as the cache keeps them: [B, Hkv, S|W, Dh]
    cache, fresh = (draw(batch, kv_heads, length, dim), draw(batch, kv_heads, length, dim)), \
        (draw(batch, kv_heads, 4, dim), draw(batch, kv_heads, 4, dim))
    fresh = tuple(x.at[2, :, 3].set(x[2, :, 2]) for x in fresh)  # a repeated position computes the same keys/values
    keys = layers.window_keys(valid, window, length)
    got = layers.attention_over_cache(q, cache, fresh, keys.cache_valid, keys.fresh_valid)
    rows = jnp.arange(batch)[:, None]
    written = tuple(c.swapaxes(1, 2).at[rows, window].set(f.swapaxes(1, 2)) for c, f in zip(cache, fresh))
    want = layers.attention(q, *written, key_valid=valid)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=1e-5 if dtype == jnp.float32 else 2e-2)
    # the repeated key counted twice would shift row 2's output
    doubled = layers.attention_over_cache(q, cache, fresh, keys.cache_valid, keys.fresh_valid.at[2, 3].set(True))
    assert np.abs(np.asarray(doubled[2], np.float32) - np.asarray(want[2], np.float32)).max() > 1e-2


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_one_step_per_block_is_exact(cache):
    """Every step is then a refresh (a full forward), so the cache changes nothing."""
    config = decode("low_confidence", cache, steps=LG // LB)
    exact = R.rollout(PARAMS, PROMPTS, None, jax.random.key(0), config.replace(cache="none"), MODEL)
    cached = R.rollout(PARAMS, PROMPTS, None, jax.random.key(0), config, MODEL)
    _assert_same(cached, exact)
    assert np.all(np.asarray(cached.num_steps) == LG // LB)


ONE_LAYER_CASES = [("prefix", LG, "full"), ("prefix", LB, "full"), ("dual", LB, "full"), ("prefix", LB, "blocks"),
                   ("dual", LB, "blocks")]


@pytest.mark.parametrize("cache, block_length, refresh", ONE_LAYER_CASES,
                         ids=["prefix-one-block", "prefix", "dual", "prefix-blocks", "dual-blocks"])
def test_one_layer_model_decodes_exactly_with_the_cache(cache, block_length, refresh):
    """With one layer a cached backbone key/value is a projection of its own token, and the cached
    tokens (those before the block; for `dual` also the all-mask suffix) do not change while the
    block decodes, so the cache is exact for a rule that does not read the planner (whose keys come
    from the backbone's output), for a block covering the whole generation too. A `blocks`
    refresh is exact there as well, provided it rewrites the finished block's keys/values (its
    tokens are the only ones revealed since they were cached). With two layers the prompt's keys
    at layer 1 have attended to the changing generation (Fast-dLLM's approximation): the same
    rollout then differs from `none`, which shows the cache was in use."""
    config = decode("threshold", cache, block_length=block_length, threshold=0.3, cache_refresh=refresh)
    one_layer = tiny_config(n_layers=1)
    params = random_params(one_layer)
    exact = R.rollout(params, PROMPTS, None, jax.random.key(0), config.replace(cache="none"), one_layer)
    cached = R.rollout(params, PROMPTS, None, jax.random.key(0), config, one_layer)
    _assert_same(cached, exact)
    assert np.asarray(exact.num_steps).min() > LG // block_length     # blocks took several steps
    exact = R.rollout(PARAMS, PROMPTS, None, jax.random.key(0), config.replace(cache="none"), MODEL)
    cached = R.rollout(PARAMS, PROMPTS, None, jax.random.key(0), config, MODEL)
    assert np.abs(np.asarray(cached.step_logps) - np.asarray(exact.step_logps)).max() > 1e-3


def test_first_step_of_each_block_is_exact():
    """A refresh step is the full forward: a rule revealing one token per step picks the same first
    token of every block's first step as long as the blocks before agree."""
    none = R.rollout(PARAMS, PROMPTS, None, jax.random.key(0), decode("low_confidence", "none"), MODEL)
    dual = R.rollout(PARAMS, PROMPTS, None, jax.random.key(0), decode("low_confidence", "dual"), MODEL)
    first = np.asarray(none.unmask_step) == 0
    np.testing.assert_array_equal(np.asarray(dual.unmask_step) == 0, first)
    np.testing.assert_array_equal(np.asarray(dual.tokens)[first], np.asarray(none.tokens)[first])
    np.testing.assert_allclose(np.asarray(dual.step_logps)[:, 0], np.asarray(none.step_logps)[:, 0], atol=1e-5)


CASES = [("low_confidence", "prefix", {}), ("threshold", "dual", dict(threshold=0.3)), ("factor", "prefix", {}),
         ("planner_bernoulli", "dual", dict(temperature=0.7)), ("planner_topk", "prefix", {}),
         ("planner_bernoulli", "dual", dict(temperature=0.7, cache_refresh="blocks")),
         ("factor", "prefix", dict(cache_refresh="blocks"))]


@pytest.mark.parametrize("rule, cache, kw", CASES, ids=[f"{c[0]}-{c[1]}-{c[2].get('cache_refresh', 'auto')}"
                                                        for c in CASES])
def test_cached_rollouts_keep_the_rollout_invariants(rule, cache, kw):
    config = decode(rule, cache, **kw)
    _check_invariants(R.rollout(PARAMS, PROMPTS, None, jax.random.key(3), config, MODEL), config)


@pytest.mark.parametrize("cache, refresh", [("prefix", "full"), ("dual", "full"), ("prefix", "blocks"),
                                            ("dual", "blocks")])
def test_cached_while_loop_equals_python_loop(cache, refresh):
    config = decode("planner_bernoulli", cache, temperature=0.7, cache_refresh=refresh)
    jitted = R.rollout(PARAMS, PROMPTS, None, jax.random.key(3), config, MODEL)
    looped = R.rollout_python_loop(PARAMS, PROMPTS, None, jax.random.key(3), config, MODEL)
    _assert_same(jitted, looped)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_rows_enter_blocks_together_and_wait_at_no_cost(cache):
    """With a cache only the rows in the batch's earliest block step: a row that finished its block
    waits (no NFE, canvas and cache unchanged) until the others have finished theirs, so every
    refresh is one full forward for all stepping rows."""
    config = decode("threshold", cache, threshold=0.08, prompt_length=PROMPTS.shape[1])
    state = R.init_state_jit(jnp.asarray(PROMPTS, jnp.int32), jnp.ones(PROMPTS.shape, bool), jax.random.key(0),
                             model=MODEL, config=config)
    waited = refreshed = 0
    while bool(R.keep_going(state, config)):
        positions, active = R.block_positions(state.canvas, MASK_ID, config)
        block = (np.asarray(positions[:, 0]) - config.prompt_length) // LB
        new = R.denoise_step_jit(PARAMS, state, model=MODEL, config=config)
        stepped = np.asarray(new.nfe - state.nfe) == 1
        assert np.all(stepped <= np.asarray(active))
        assert len(set(block[stepped])) == 1 and block[stepped][0] == block[np.asarray(active)].min()
        np.testing.assert_array_equal(np.asarray(new.canvas)[~stepped], np.asarray(state.canvas)[~stepped])
        np.testing.assert_array_equal(np.asarray(new.cache.block)[~stepped], np.asarray(state.cache.block)[~stepped])
        np.testing.assert_array_equal(np.asarray(new.cache.block)[stepped], block[stepped])
        entering = np.asarray(state.cache.block)[stepped] != block[stepped]
        assert entering.all() or not entering.any()                    # refreshes are all or none
        refreshed += entering.all()
        waited += int(np.sum(np.asarray(active) & ~stepped))
        state = new
    assert refreshed == LG // LB and waited > 0 and np.asarray(state.done).all()
    assert int(R.loop_iterations(R.to_trajectory(state, config), config)) == int(state.step)


def test_unknown_cache_mode_names_the_key():
    with pytest.raises(ConfigError, match="decode.cache='full'"):
        decode("low_confidence", "full")
    with pytest.raises(ConfigError, match="decode.cache_refresh='window' is unknown; use one of auto, full, blocks"):
        decode("low_confidence", "dual", cache_refresh="window")


def test_auto_refresh_is_blocks_under_the_planner_rules_and_full_under_the_others():
    """`cache_refresh="auto"` (the default): the planner rules refresh by blocks and their `prefix`
    rows go at their own pace; Fast-dLLM's rules keep its full refresh and lockstep; an explicit
    refresh is kept as given."""
    for rule in RULES:
        config = decode(rule, "prefix")
        assert config.cache_refresh == "auto"
        want = "blocks" if rule in PLANNER_RULES else "full"
        assert config.resolved_cache_refresh == want, rule
        assert C.rows_take_blocks_together(config) == (want == "full")
        assert C.rows_take_blocks_together(config.replace(cache="dual"))
        assert not C.rows_take_blocks_together(config.replace(cache="none"))
        for refresh in ("full", "blocks"):
            assert config.replace(cache_refresh=refresh).resolved_cache_refresh == refresh


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_a_blocks_refresh_rewrites_the_finished_block_only(cache):
    """Rows entering block 2 with caches made for block 1 on an older canvas: the outputs are those
    of the window forward over the new block and the finished one (`prefix`: to the canvas end)
    against the old cache; the keys/values of the finished block, and of no other position, are
    rewritten with that window's (the new block's and the suffix's, recomputed by every later
    step of the block or cached as the suffix's, are not read from the cache), and at the
    backbone's layer 0 (a projection of each position's own token) they equal the full
    forward's."""
    config = decode("planner_bernoulli", cache, cache_refresh="blocks")
    canvas, older, valid = _staggered_canvas([2, 2, 2, 2])
    positions, active = R.block_positions(canvas, MASK_ID, config)
    in_block = R.scatter_positions(jnp.zeros(canvas.shape, bool), positions, jnp.ones(positions.shape, bool))
    candidates = (canvas == MASK_ID) & in_block
    _, _, stale = apply_kv(PARAMS, older, MODEL, valid=valid, candidates=candidates, logit_positions=positions)
    logits, unmask, new = jax.jit(C.evaluate_block_cached, static_argnums=(7, 8))(
        PARAMS, canvas, valid, C.BlockCache(kv=stale, block=jnp.ones(4, jnp.int32)), positions, active,
        candidates, MODEL, config)
    np.testing.assert_array_equal(new.block, [2] * 4)
    end = LP + 3 * LB if cache == "dual" else LP + LG
    window = jnp.tile(jnp.arange(LP + LB, end, dtype=jnp.int32)[None], (4, 1))
    refresh_window = jnp.concatenate([positions, window], axis=1)  # the new block, then from the finished one
    want_logits, want_unmask, fresh = apply_kv(PARAMS, canvas, MODEL, valid=valid, candidates=candidates,
                                               logit_positions=positions, cache=stale, window=refresh_window)
    np.testing.assert_allclose(logits, want_logits, atol=2e-5)
    np.testing.assert_allclose(unmask, want_unmask, atol=2e-5)
    _, _, full = apply_kv(PARAMS, canvas, MODEL, valid=valid, candidates=candidates, logit_positions=positions)
    rewritten = np.zeros(LP + LG, bool)
    rewritten[LP + LB:LP + 2 * LB] = True
    for got, window_kv, old in zip(jax.tree.leaves(new.kv), jax.tree.leaves(fresh), jax.tree.leaves(stale)):
        # the finished block follows the new block in the refresh window
        np.testing.assert_allclose(np.asarray(got)[:, :, :, rewritten], np.asarray(window_kv)[:, :, :, LB:2 * LB],
                                   atol=1e-5)
        np.testing.assert_array_equal(np.asarray(got)[:, :, :, ~rewritten], np.asarray(old)[:, :, :, ~rewritten])
    for got, old, exact in zip(new.kv[0], stale[0], full[0]):  # the backbone's keys, values
        np.testing.assert_allclose(np.asarray(got)[0, :, :, rewritten], np.asarray(exact)[0, :, :, rewritten], atol=1e-5)
        assert np.abs(np.asarray(old)[0, :, :, rewritten] - np.asarray(exact)[0, :, :, rewritten]).max() > 1e-2


# ------------------------------------------------------------------ refresh scheduling


def _staggered_canvas(current_blocks):
    """Rows at their own blocks (`current_blocks[b]`, None: done): earlier blocks revealed, the
    current one's first token revealed, later ones masked. Also the canvas one block earlier
    (the current block still masked), on which a stale cache is made."""
    rng = np.random.default_rng(2)
    batch = len(current_blocks)
    gen = rng.integers(3, MASK_ID, size=(batch, LG))
    older = gen.copy()
    for row, block in enumerate(current_blocks):
        if block is not None:
            gen[row, (block + 1) * LB - LB + 1:] = MASK_ID
            older[row, max(block - 1, 0) * LB:] = MASK_ID
    prompts = np.tile(PROMPTS, (2, 1))[:batch]
    prompt = np.concatenate([prompts, np.zeros((batch, LP - PROMPTS.shape[1]), int)], axis=1)
    valid = np.ones((batch, LP + LG), bool)
    valid[:, PROMPTS.shape[1]:LP] = False
    as_canvas = lambda g: jnp.asarray(np.concatenate([prompt, g], axis=1), jnp.int32)  # noqa: E731
    return as_canvas(gen), as_canvas(older), jnp.asarray(valid)


# Rows' current blocks (None: done) and the rows whose cache is for an older block: none refresh
# (the window forward), some (the full forward and the window forward), every active row (the
# full forward alone). A full refresh's lockstep makes only the first and last; all stay exact.
REFRESH_CASES = [([0, 1, 2, 1], []), ([0, 1, 2, 1], [2]), ([0, 1, 2, 1], [0, 3]), ([0, 1, 2, 1], [0, 1, 3]),
                 ([0, 1, 2, 1], [0, 1, 2, 3]), ([1, 2, 0, None], [0, 1, 2]), ([1, 2, 0, None], [1]),
                 ([0, 1, 2, 1, 0, 2, None, 1], [0, 2, 5]), ([0, 1, 2, 1, 0, 2, None, 1], [1, 3, 4, 5, 7])]


@pytest.mark.parametrize("cache, refresh", [("prefix", "full"), ("dual", "full"), ("prefix", "blocks"),
                                            ("dual", "blocks")])
@pytest.mark.parametrize("blocks, refreshing", REFRESH_CASES, ids=[f"{c[0]}-refresh{c[1]}" for c in REFRESH_CASES])
def test_partial_refresh_equals_refreshing_rows_one_by_one(cache, refresh, blocks, refreshing):
    """Against a reference without gathers or switches: a row refreshing in full gets the outputs
    and keys/values of the full forward over the whole batch; a row refreshing by blocks (here one
    in block >= 1, whose cache is for the block before) those of its own window forward over its
    block and the finished one (`prefix`: to the canvas end) against its stale cache, with that
    window's keys/values of the finished block written; any other active row's outputs are those
    of its own exact-width window (one row at a time) against its stale cache, which stays, as
    do the rows that do not step. `dual` refreshes by blocks
    only when every stepping row does (else every refreshing row takes the full forward);
    `prefix` row by row (its rows go at their own pace)."""
    config = decode("planner_bernoulli", cache, cache_refresh=refresh)
    canvas, older, valid = _staggered_canvas(blocks)
    positions, active = R.block_positions(canvas, MASK_ID, config)
    np.testing.assert_array_equal(active, [b is not None for b in blocks])
    in_block = R.scatter_positions(jnp.zeros(canvas.shape, bool), positions, jnp.ones(positions.shape, bool))
    candidates = (canvas == MASK_ID) & in_block
    _, _, stale = apply_kv(PARAMS, older, MODEL, valid=valid, candidates=candidates, logit_positions=positions)
    current = (np.asarray(positions[:, 0]) - LP) // LB
    batch = len(blocks)
    block = np.where(np.isin(np.arange(batch), refreshing), current - 1, current)
    logits, unmask, new = jax.jit(C.evaluate_block_cached, static_argnums=(7, 8))(
        PARAMS, canvas, valid, C.BlockCache(kv=stale, block=jnp.asarray(block, jnp.int32)), positions, active,
        candidates, MODEL, config)

    stepping = [row for row in range(batch) if blocks[row] is not None]
    by_blocks = set()
    if refresh == "blocks":
        with_cache = {row for row in refreshing if block[row] >= 0}
        if cache == "prefix" or (with_cache and all(row in with_cache for row in stepping)):
            by_blocks = with_cache
    full_rows = set(refreshing) - by_blocks
    full_logits, full_unmask, fresh = apply_kv(PARAMS, canvas, MODEL, valid=valid, candidates=candidates,
                                               logit_positions=positions)
    # Rows that do not step (here done rows) keep their cache and its block.
    np.testing.assert_array_equal(new.block, np.where(np.asarray(active), current, block))
    for row in set(range(batch)) - set(stepping):
        jax.tree.map(lambda got, old: np.testing.assert_array_equal(got[:, row], old[:, row]), new.kv, stale)
    for row in stepping:
        one = lambda x: x[row:row + 1]  # noqa: E731
        row_cache = jax.tree.map(lambda x: x[:, row:row + 1], stale)
        if row in full_rows:
            want_kv = jax.tree.map(lambda x: x[:, row], fresh)
            want_logits, want_unmask = one(full_logits), one(full_unmask)
        else:
            if row in by_blocks:
                finished = LP + int(block[row]) * LB
                end = LP + LG if cache == "prefix" else finished + LB
                window = jnp.concatenate([positions[row], jnp.arange(finished, end, dtype=jnp.int32)])[None]
            elif cache == "prefix":
                window = jnp.arange(int(positions[row, 0]), LP + LG, dtype=jnp.int32)[None]
            else:
                window = one(positions)
            want_logits, want_unmask, row_fresh = apply_kv(PARAMS, one(canvas), MODEL, valid=one(valid),
                                                           candidates=one(candidates), logit_positions=one(positions),
                                                           cache=row_cache, window=window)
            want_kv = jax.tree.map(lambda x: np.array(x[:, 0]), row_cache)
            if row in by_blocks:  # its finished block's keys/values, in the window after the new block
                finished = LP + int(block[row]) * LB
                for want, window_kv in zip(jax.tree.leaves(want_kv), jax.tree.leaves(row_fresh)):
                    want[:, :, finished:finished + LB] = np.asarray(window_kv)[:, 0, :, LB:2 * LB]
        np.testing.assert_allclose(logits[row], want_logits[0], atol=2e-5, err_msg=f"row {row}")
        np.testing.assert_allclose(unmask[row], want_unmask[0], atol=2e-5, err_msg=f"row {row}")
        jax.tree.map(lambda got, want: np.testing.assert_allclose(got[:, row], want, atol=1e-5), new.kv, want_kv)
    # The stale cache differs where it matters, so the reference cannot pass by accident.
    assert np.abs(np.asarray(fresh[0][0]) - np.asarray(stale[0][0])).max() > 1e-2
    if by_blocks:  # and the rows refreshing by blocks rewrote their finished block's
        row = min(by_blocks)
        finished = slice(LP + int(block[row]) * LB, LP + int(block[row]) * LB + LB)
        assert np.abs(np.asarray(new.kv[0][0])[:, row, :, finished] - np.asarray(stale[0][0])[:, row, :, finished]).max() > 1e-2


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_rows_at_their_own_pace_decode_exactly_on_a_one_layer_model(cache):
    """Rows that need different numbers of steps per block (so with the cache some wait for the
    others), rows that finish early, blocks decoded in one step: the threshold chosen makes this
    rollout have them all (asserted), and on a one-layer model (where the cache is exact, see
    above) the cached rollout must equal `none` step for step: waiting changed no row's tokens,
    steps or log-probs, and every refresh gave the rows their exact keys/values. Each row's NFE
    is its number of revealing steps."""
    config = decode("threshold", cache, threshold=0.08)
    one_layer = tiny_config(n_layers=1)
    params = random_params(one_layer)
    exact = R.rollout(params, PROMPTS, None, jax.random.key(0), config.replace(cache="none"), one_layer)
    cached = R.rollout(params, PROMPTS, None, jax.random.key(0), config, one_layer)
    _assert_same(cached, exact)
    looped = R.rollout_python_loop(params, PROMPTS, None, jax.random.key(0), config, one_layer)
    _assert_same(looped, cached)

    steps, nfe = np.asarray(cached.unmask_step), np.asarray(cached.num_steps)
    assert len(set(nfe.tolist())) > 1                                  # rows finish at different steps
    per_block = steps.reshape(4, config.num_blocks, LB)
    one_step = per_block.min(-1) == per_block.max(-1)
    assert np.any(one_step) and not np.all(one_step)                   # some blocks took one step
    block_steps = per_block.max(-1) - per_block.min(-1) + 1
    assert np.any(block_steps.min(0) < block_steps.max(0))             # so rows waited in some block
    for row in range(4):
        assert len(set(steps[row].tolist())) == nfe[row]               # NFE = revealing steps


@pytest.mark.parametrize("rule, kw", [("threshold", dict(threshold=0.1, cache_refresh="blocks")), ("planner_topk", {})],
                         ids=["threshold-blocks", "planner_topk-auto"])
def test_prefix_blocks_rows_go_at_their_own_pace_as_if_alone(rule, kw):
    """`prefix` with the `blocks` refresh (the planner rules' default, `auto`): no row waits for the
    others at a block's end (every row with masks steps every iteration, so the loop runs as
    many iterations as the largest row NFE), and each row decodes exactly as it would alone, in a
    batch of one where nobody waits: same tokens, steps and log-probs, its refreshes being its
    own suffix windows inside the batch's one suffix forward. Under `threshold` 0.1 the rows need
    different numbers of steps per block (asserted), so under a lockstep some would have waited
    (the random planner of `planner_topk` takes as many steps in every row)."""
    config = decode(rule, "prefix", **kw)
    assert config.resolved_cache_refresh == "blocks" and not C.rows_take_blocks_together(config)
    key = jax.random.key(0)
    batched = R.rollout(PARAMS, PROMPTS, None, key, config, MODEL)
    for row in range(len(PROMPTS)):
        alone = R.rollout(PARAMS, PROMPTS[row:row + 1], None, key, config, MODEL)
        _assert_same(jax.tree.map(lambda x: x[row:row + 1], batched), alone)
    _assert_same(R.rollout_python_loop(PARAMS, PROMPTS, None, key, config, MODEL), batched)

    steps = np.asarray(batched.unmask_step).reshape(len(PROMPTS), config.num_blocks, LB)
    block_steps = steps.max(-1) - steps.min(-1) + 1
    if rule == "threshold":
        assert np.any(block_steps.min(0) < block_steps.max(0))         # rows' blocks take different steps
    prompt_tokens, prompt_valid = R.check_prompts(PROMPTS, None, MODEL, config)
    state = R.init_state_jit(prompt_tokens, prompt_valid, key, model=MODEL, config=config)
    while bool(R.keep_going(state, config)):
        _, active = R.block_positions(state.canvas, MASK_ID, config)
        new = R.denoise_step_jit(PARAMS, state, model=MODEL, config=config)
        np.testing.assert_array_equal(np.asarray(new.nfe - state.nfe), np.asarray(active))  # nobody waits
        state = new
    assert int(state.step) == int(np.asarray(batched.num_steps).max())
    assert int(R.loop_iterations(batched, config)) == int(state.step)
