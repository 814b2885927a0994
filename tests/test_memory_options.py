"""Memory options change nothing numerically except where they must: the update replayed in
row slices equals one pass; every remat policy gives the gradient without remat; Adam moments
stored in bfloat16 only round the moments."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dultra_jax.config import REMAT_POLICIES, ConfigError, DecodeConfig, OptimConfig, RLConfig
from dultra_jax.decoding import rollout as R
from dultra_jax.rl.grpo import compute_advantages, grpo_gradients
from dultra_jax.sharding import batch_sharding, make_mesh
from dultra_jax.training import programs as prog
from dultra_jax.training.state import create_state, make_optimizer, state_shardings
from tests.helpers import MASK_ID, random_params, tiny_config

MODEL = tiny_config()
PARAMS = random_params(MODEL)
DECODE = DecodeConfig(rule="planner_bernoulli", prompt_length=6, gen_length=8, block_length=4, temperature=1.0)
RL = RLConfig(group_size=4, advantage_min_clip=-100.0)
ROWS = 8


@pytest.fixture(scope="module")
def batch():
    prompts = np.random.default_rng(0).integers(3, MASK_ID, size=(ROWS, DECODE.prompt_length)).astype(np.int32)
    trajectory = R.rollout(PARAMS, prompts, None, jax.random.key(4), DECODE, MODEL)
    assert len(set(np.asarray(trajectory.num_steps).tolist())) > 1  # slices stop at different NFE
    advantages = compute_advantages(jnp.asarray(np.random.default_rng(1).standard_normal(ROWS), jnp.float32), RL)
    return trajectory, advantages


def test_row_slices_give_the_one_pass_gradient_and_metrics(batch):
    trajectory, advantages = batch
    # old log-probs away from the replay (two iterations), so some ratios clip
    trajectory = trajectory.replace(step_logps=trajectory.step_logps - 0.2 * jnp.arange(ROWS)[:, None])
    rl = dataclasses.replace(RL, num_iterations=2)
    gradients = jax.jit(grpo_gradients, static_argnames=("model", "decode", "rl"))
    want_grads, want_loss, want = gradients(PARAMS, {}, None, trajectory, advantages, model=MODEL, decode=DECODE, rl=rl)
    assert float(want["clip_fraction"]) > 0
    for slices in (2, 4):
        got_grads, got_loss, got = gradients(PARAMS, {}, None, trajectory, advantages, model=MODEL, decode=DECODE,
                                             rl=dataclasses.replace(rl, update_micro_batches=slices))
        assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-5)
        assert float(got["clip_fraction"]) == float(want["clip_fraction"])
        assert float(got["logp_gap"]) == pytest.approx(float(want["logp_gap"]), abs=1e-6)
        for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4)  # float32 sum order
    with pytest.raises(ConfigError, match=r"rl.update_micro_batches=3 does not divide the update's 8 rows"):
        gradients(PARAMS, {}, None, trajectory, advantages, model=MODEL, decode=DECODE,
                  rl=dataclasses.replace(rl, update_micro_batches=3))


def test_the_sliced_sharded_update_equals_the_one_pass_update(batch):
    trajectory, advantages = batch
    mesh = make_mesh(data=1, fsdp=2, tensor=4)
    optim = OptimConfig(learning_rate=1e-2, eps=1.0)  # steps ~ lr * g: rounding stays ~1e-8
    results = []
    for slices in (1, 2):
        state = prog.state_programs(MODEL, mesh, optim, total_steps=4, seed=0)
        grpo = prog.grpo_programs(state, DECODE, dataclasses.replace(RL, update_micro_batches=slices))
        sharded = jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, x.ndim)), trajectory)
        new_state, metrics = grpo.update(state.init(PARAMS), sharded, jax.device_put(advantages, batch_sharding(mesh, 1)))
        results.append((new_state.trainable, float(metrics["loss"])))
    (want, want_loss), (got, got_loss) = results
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(PARAMS)))
    assert moved > 1e-4  # the step moved the parameters: the comparison below can fail
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)


def test_every_remat_policy_gives_the_gradient_without_remat(batch):
    """`model.remat` with each `model.remat_policy`: the GRPO gradient of the backbone and the
    planner (whose block is rematerialised too) equals the one without remat (float32; XLA may
    order a recomputed sum differently)."""
    trajectory, advantages = batch
    gradients = jax.jit(grpo_gradients, static_argnames=("model", "decode", "rl"))
    want, want_loss, _ = gradients(PARAMS, {}, None, trajectory, advantages, model=MODEL, decode=DECODE, rl=RL)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want["planner"])) > 0
    for policy in REMAT_POLICIES:
        model = MODEL.replace(remat=True, remat_policy=policy)
        got, got_loss, _ = gradients(PARAMS, {}, None, trajectory, advantages, model=model, decode=DECODE, rl=RL)
        assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-6), policy
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5, err_msg=policy)
    with pytest.raises(ConfigError, match=r"model.remat_policy='dots' is unknown; use one of nothing_saveable, "):
        MODEL.replace(remat_policy="dots")


def test_bfloat16_moments_store_the_moments_in_bfloat16_and_only_round_them():
    grads = jax.tree.map(lambda p: jnp.asarray(np.random.default_rng(p.size).standard_normal(p.shape), p.dtype) * 1e-2,
                         PARAMS)
    trained = {}
    for dtype in ("float32", "bfloat16"):  # float32 parameters: float32 is their own dtype
        optim = OptimConfig(learning_rate=1e-3, moment_dtype=dtype)
        tx = make_optimizer(optim, total_steps=10)
        state = create_state(PARAMS, tx, "all", 0)
        shardings = state_shardings(state, tx, make_mesh())  # the moments shard like the parameters
        moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
        assert {x.dtype for x in moments} == {jnp.dtype(dtype)}
        assert len(jax.tree.leaves(shardings.opt_state)) == len(jax.tree.leaves(state.opt_state))
        params, opt_state = PARAMS, state.opt_state
        for step in range(3):
            updates, opt_state = tx.update(jax.tree.map(lambda g: g * (step + 1), grads), opt_state, params)
            params = jax.tree.map(lambda p, u: p + u, params, updates)
        assert {x.dtype for x in jax.tree.leaves(opt_state) if x.ndim > 0} == {jnp.dtype(dtype)}
        trained[dtype] = params
    plain = make_optimizer(OptimConfig(learning_rate=1e-3), total_steps=10)
    params, opt_state = PARAMS, plain.init(PARAMS)
    for step in range(3):
        updates, opt_state = plain.update(jax.tree.map(lambda g: g * (step + 1), grads), opt_state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    # float32 is the plain optimiser (moments in the parameters' dtype) exactly; bfloat16 differs by
    # the moments' rounding only
    for a, b, c in zip(jax.tree.leaves(trained["float32"]), jax.tree.leaves(params), jax.tree.leaves(trained["bfloat16"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_allclose(np.asarray(c), np.asarray(b), atol=3e-5, rtol=0)  # 3 steps of lr 1e-3 x ~1%
    assert any(not np.array_equal(np.asarray(a), np.asarray(c))
               for a, c in zip(jax.tree.leaves(trained["float32"]), jax.tree.leaves(trained["bfloat16"])))


def test_bfloat16_parameters_get_float32_moments_on_request():
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), PARAMS)
    for dtype, want in ((None, jnp.bfloat16), ("float32", jnp.float32)):
        tx = make_optimizer(OptimConfig(moment_dtype=dtype), total_steps=10)
        moments = [x for x in jax.tree.leaves(tx.init(params)) if x.ndim > 0]
        assert {x.dtype for x in moments} == {jnp.dtype(want)}
