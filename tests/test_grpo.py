"""GRPO: replay log-probs, advantages and loss by hand, accumulated gradients, sharded update."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dultra_jax.config import ConfigError, DecodeConfig, OptimConfig, RLConfig
from dultra_jax.decoding import rollout as R
from dultra_jax.rl.grpo import clipped_step_loss, compute_advantages
from dultra_jax.rl.grpo import exact_old_logps, old_logps_need_replay, replay_logps, replay_step_logp
from dultra_jax.sharding import ShardingError, batch_sharding, check_groups_stay_whole, make_mesh
from dultra_jax.training.programs import grpo_update
from dultra_jax.training.state import create_state, make_optimizer, merge_params, state_shardings
from tests.helpers import MASK_ID, random_params, tiny_config

MODEL = tiny_config()
PARAMS = random_params(MODEL)
DECODE = DecodeConfig(rule="planner_bernoulli", prompt_length=6, gen_length=8, block_length=4, temperature=1.0)


@pytest.fixture(scope="module")
def trajectory():
    prompts = np.random.default_rng(0).integers(3, MASK_ID, size=(8, 6))
    return R.rollout(PARAMS, prompts, None, jax.random.key(4), DECODE, MODEL)


def test_replayed_logps_equal_rollout_logps(trajectory):
    replayed = jax.jit(replay_logps, static_argnames=("model", "config"))(PARAMS, trajectory, model=MODEL,
                                                                           config=DECODE)
    np.testing.assert_allclose(replayed, trajectory.step_logps, atol=1e-5, rtol=0)
    assert np.any(np.asarray(trajectory.num_steps) < DECODE.step_budget)  # some slots stay unused (zeros)


def test_a_cached_rollout_gets_exact_old_logps_when_the_batch_is_reused():
    prompts = np.random.default_rng(0).integers(3, MASK_ID, size=(8, 6))
    cached_decode = DECODE.replace(cache="prefix")
    cached = R.rollout(PARAMS, prompts, None, jax.random.key(4), cached_decode, MODEL)
    exact = replay_logps(PARAMS, cached, MODEL, cached_decode)
    taken = np.arange(exact.shape[1])[None, :] < np.asarray(cached.num_steps)[:, None]
    recorded_gap = np.max(np.where(taken, np.abs(exact - cached.step_logps), 0.0))
    assert recorded_gap > 1e-3  # stale keys/values: the recorded log-probs are not the exact ones
    # exact already without a cache; with one update the replay itself is "old"
    assert not old_logps_need_replay(DECODE, 2) and not old_logps_need_replay(cached_decode, 1)
    assert old_logps_need_replay(cached_decode, 2)
    replaced, gap = jax.jit(exact_old_logps, static_argnums=(2, 3))(PARAMS, cached, MODEL, cached_decode)
    np.testing.assert_allclose(replaced.step_logps, exact, atol=1e-6)
    assert float(gap) == pytest.approx(recorded_gap, rel=1e-5)
    # The first of two updates then starts at ratio 1 (nothing clipped on cache noise), which the
    # recorded log-probs would not.
    rl = RLConfig(group_size=4, num_iterations=2, advantage_min_clip=-100.0)
    advantages = compute_advantages(jnp.arange(8.0), rl)
    state, tx = _state(rl=rl)
    update = jax.jit(lambda s, t: grpo_update(s, t, advantages, model=MODEL, decode=cached_decode, rl=rl, tx=tx))
    _, on_replaced = update(state, replaced)
    _, on_recorded = update(state, cached)
    assert float(on_replaced["logp_gap"]) < 1e-5 and float(on_replaced["clip_fraction"]) == 0.0
    assert float(on_recorded["logp_gap"]) > 1e-3


def test_advantages_by_hand():
    rewards = jnp.array([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    mean = RLConfig(group_size=4, advantage="mean", advantage_min_clip=-100.0)
    np.testing.assert_allclose(compute_advantages(rewards, mean), [-2, -1, 0, 3, 0, 0, 0, 0])
    clipped = RLConfig(group_size=4, advantage="mean", advantage_min_clip=0.0)
    np.testing.assert_allclose(compute_advantages(rewards, clipped), [0, 0, 0, 3, 0, 0, 0, 0])
    loo = RLConfig(group_size=4, advantage="leave_one_out", advantage_min_clip=-100.0)
    np.testing.assert_allclose(compute_advantages(rewards, loo)[:4], [-8 / 3, -4 / 3, 0, 4])
    std = RLConfig(group_size=4, advantage="mean_std", advantage_min_clip=-100.0)
    got = np.asarray(compute_advantages(rewards, std))
    # the sample std (torch's default, which TRL uses): sqrt(14 / 3)
    np.testing.assert_allclose(got[:4], np.array([-2, -1, 0, 3]) / (np.sqrt(14 / 3) + 1e-4), rtol=1e-6)
    assert np.all(got[4:] == 0) and np.all(np.isfinite(got))  # identical rewards: zero, no NaN


def test_clipped_loss_by_hand():
    config = RLConfig(group_size=2, eps_low=0.2, eps_high=1.0)
    logp = jnp.log(jnp.array([1.5, 0.5, 2.5, 0.5, 1.1]))
    old = jnp.zeros(5)
    adv = jnp.array([1.0, 1.0, 1.0, -1.0, 2.0])
    taken = jnp.array([True, True, True, True, False])
    loss, clipped = clipped_step_loss(logp, old, adv, taken, config)
    # r = 1.5, A = 1: min(1.5, 1.5) -> -1.5. r = 0.5, A = 1: min(0.5, 0.8) -> -0.5 (unclipped).
    # r = 2.5, A = 1: min(2.5, 2.0) -> -2.0 (clipped). r = 0.5, A = -1: min(-0.5, -0.8) -> 0.8 (clipped).
    np.testing.assert_allclose(loss, [-1.5, -0.5, -2.0, 0.8, 0.0], rtol=1e-6)
    assert np.asarray(clipped).tolist() == [False, False, True, True, False]
    # KL (k3) to a reference: exp(ref - logp) - (ref - logp) - 1.
    kl_config = RLConfig(group_size=2, beta=0.5)
    ref = jnp.zeros(5)
    with_kl, _ = clipped_step_loss(logp, old, adv, taken, kl_config, ref_logp=ref)
    d = -np.log([1.5, 0.5, 2.5, 0.5, 1.1])
    np.testing.assert_allclose(np.asarray(with_kl)[:4] - np.asarray(loss)[:4], 0.5 * (np.exp(d) - d - 1)[:4], rtol=1e-5)


def test_groups_must_stay_whole_when_the_mesh_interleaves_processes():
    mesh = make_mesh(data=2, fsdp=4)
    position = {device: i for i, device in enumerate(mesh.devices.flat)}  # row-block order
    in_blocks = lambda d: position[d] // 4  # noqa: E731  (hosts in mesh order: 2 x 4 devices)
    interleaved = lambda d: position[d] % 2  # noqa: E731
    check_groups_stay_whole("rows", 16, 4, mesh)  # this machine: one process
    check_groups_stay_whole("rows", 16, 4, mesh, process_of=in_blocks)  # 2 rows per device, groups span 2
    check_groups_stay_whole("rows", 32, 4, mesh, process_of=interleaved)  # 4 rows per device: whole groups
    with pytest.raises(ShardingError, match=r"rows: the mesh interleaves the rows of process\(es\) \[0, 1\] .* "
                                            r"each device's 2 rows must be whole groups of 4"):
        check_groups_stay_whole("rows", 16, 4, mesh, process_of=interleaved)


@pytest.mark.parametrize("updates_per_step", [1, 2, 3])
def test_every_update_of_a_step_uses_that_steps_learning_rate(updates_per_step):
    """Adam's first moves under a constant gradient are -lr * g / |g| = -lr for a 1-D leaf (no weight
    decay), so each update's size is the rate optax applied at that count."""
    optim = OptimConfig(learning_rate=1.0, schedule="cosine", warmup_steps=1)
    total_steps = 4
    tx = make_optimizer(optim, total_steps, updates_per_step=updates_per_step)
    params = {"bias": jnp.zeros(3)}
    opt_state = tx.init(params)
    applied = []
    for _ in range(total_steps * updates_per_step):
        updates, opt_state = tx.update({"bias": jnp.ones(3)}, opt_state, params)
        applied.append(-float(updates["bias"][0]))
    # warm-up 0 at step 0, then cosine from 1 over the remaining 3 steps: 1, 0.75, 0.25 at steps 1-3.
    per_step = [0.0, 1.0, 0.75, 0.25]
    np.testing.assert_allclose(applied, np.repeat(per_step, updates_per_step), atol=1e-5)  # eps


def test_backbone_lr_scale_scales_only_the_backbones_steps():
    """Adam's first step under a constant gradient is -lr per 1-D leaf: 0.1 on the planner, 0.1 *
    0.25 on the backbone; a scale of 1 leaves both at the rate."""
    params = {"planner": {"bias": jnp.zeros(3)}, "ln_f": {"weight": jnp.zeros(3)}}
    grads = jax.tree.map(jnp.ones_like, params)
    for scale, backbone_step in ((0.25, 0.025), (1.0, 0.1)):
        tx = make_optimizer(OptimConfig(learning_rate=0.1, backbone_lr_scale=scale), total_steps=1)
        updates, _ = tx.update(grads, tx.init(params), params)
        np.testing.assert_allclose(-updates["planner"]["bias"], 0.1, rtol=1e-5)
        np.testing.assert_allclose(-updates["ln_f"]["weight"], backbone_step, rtol=1e-5)
    with pytest.raises(ConfigError, match=r"optim.backbone_lr_scale=0.0 must be positive"):
        OptimConfig(backbone_lr_scale=0.0)


def _state(optim=OptimConfig(learning_rate=1e-2), rl=RLConfig(group_size=4), params=PARAMS):
    tx = make_optimizer(optim, total_steps=10)
    return create_state(params, tx, optim.train, 0, keep_reference=rl.beta > 0), tx


def test_accumulated_gradients_equal_grad_of_summed_loss(trajectory):
    rl = RLConfig(group_size=4, num_iterations=2, advantage_min_clip=-100.0)  # old = recorded log-probs
    advantages = compute_advantages(jnp.arange(8.0), rl)
    old = trajectory.step_logps - 0.15 * jnp.arange(8.0)[:, None]  # ratios up to e^1.05: some clip
    traj = trajectory.replace(step_logps=old)

    def summed_loss(params):
        total = 0.0
        for k in range(int(traj.num_steps.max())):
            logp = replay_step_logp(params, traj, jnp.int32(k), MODEL, DECODE)
            loss, _ = clipped_step_loss(logp, old[:, k], advantages, k < traj.num_steps, rl)
            total += jnp.sum(loss)
        return total / (8 * DECODE.gen_length)

    want_loss, want_grads = jax.value_and_grad(summed_loss)(PARAMS)
    tx = optax.sgd(1.0)  # new params = params - accumulated gradient
    state = create_state(PARAMS, tx, OptimConfig().train, 0, keep_reference=rl.beta > 0)
    new_state, metrics = jax.jit(lambda s: grpo_update(s, traj, advantages, model=MODEL, decode=DECODE, rl=rl,
                                                       tx=tx))(state)
    np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5, atol=1e-7)
    got_grads = jax.tree.map(lambda before, after: before - after, state.trainable, new_state.trainable)
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got_grads)[0], jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-4, err_msg=jax.tree_util.keystr(path))
    assert float(metrics["clip_fraction"]) > 0


def test_planner_only_training_leaves_backbone_bit_identical(trajectory):
    optim = OptimConfig(learning_rate=1e-2, train="planner")
    state, tx = _state(optim)
    assert set(state.trainable) == {"planner"} and "planner" not in state.frozen
    assert jax.tree.leaves(state.opt_state[1][0].mu)[0].shape == jax.tree.leaves(state.trainable)[0].shape
    advantages = jnp.linspace(-1.0, 1.0, 8)
    new_state, metrics = grpo_update(state, trajectory, advantages, model=MODEL, decode=DECODE,
                                     rl=RLConfig(group_size=4), tx=tx)
    for a, b in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(new_state.frozen)):
        np.testing.assert_array_equal(a, b)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.trainable),
                                                        jax.tree.leaves(new_state.trainable))]
    assert any(changed) and not bool(metrics["skipped"])


def test_non_finite_update_is_skipped(trajectory):
    state, tx = _state()
    new_state, metrics = grpo_update(state, trajectory, jnp.full((8,), jnp.nan), model=MODEL, decode=DECODE,
                                     rl=RLConfig(group_size=4), tx=tx)
    assert bool(metrics["skipped"])
    for a, b in zip(jax.tree.leaves(state.trainable), jax.tree.leaves(new_state.trainable)):
        np.testing.assert_array_equal(a, b)
    assert int(new_state.step) == 1


def test_sharded_update_equals_unsharded(trajectory):
    rl = RLConfig(group_size=4)
    advantages = jnp.linspace(-1.0, 1.0, 8)
    state, tx = _state(rl=rl)
    step = lambda s, t, a: grpo_update(s, t, a, model=MODEL, decode=DECODE, rl=rl, tx=tx)  # noqa: E731
    want_state, want = jax.jit(step)(state, trajectory, advantages)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    shardings = state_shardings(state, tx, mesh)
    sharded_state = jax.device_put(state, shardings)
    sharded_traj = jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, x.ndim)), trajectory)
    with jax.set_mesh(mesh):
        got_state, got = jax.jit(step, out_shardings=(shardings, None))(
            sharded_state, sharded_traj, jax.device_put(advantages, batch_sharding(mesh, 1)))
    assert got_state.trainable["blocks"]["q_proj"]["kernel"].sharding.spec == jax.P(None, "fsdp", "tensor")
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-6)
    # The rollout-vs-replay gap is itself float32 rounding noise (~1e-6), so only its size is compared.
    np.testing.assert_allclose(got["logp_gap"], want["logp_gap"], atol=1e-5)
    for a, b in zip(jax.tree.leaves(merge_params(got_state.trainable, got_state.frozen)),
                    jax.tree.leaves(merge_params(want_state.trainable, want_state.frozen))):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)  # Adam steps are <= lr = 1e-2
