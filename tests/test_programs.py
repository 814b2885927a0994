"""The builder of a run's programs: its abstract shapes and shardings are what the programs really
produce, its lowered programs compile, and its sharded GRPO update equals the plain one."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from dultra_jax.config import ConfigError, DecodeConfig, GRPOConfig, MeshConfig, OptimConfig, RLConfig, from_config
from dultra_jax.decoding import rollout as R
from dultra_jax.rl.grpo import compute_advantages
from dultra_jax.models import policy
from dultra_jax.models import teacher as teacher_lib
from dultra_jax.sharding import (ShardingError, batch_sharding, check_groups_stay_whole, host_contiguous_grid, make_mesh,
                                 param_shardings)
from dultra_jax.training import compile_check
from dultra_jax.training import programs as prog
from dultra_jax.training.state import apply_gradients, create_state, make_optimizer
from tests.helpers import MASK_ID, random_params, tiny_config

MODEL = tiny_config()
DECODE = DecodeConfig(rule="planner_bernoulli", prompt_length=6, gen_length=8, block_length=4, temperature=1.0)
RL = RLConfig(group_size=4, advantage_min_clip=-100.0)
# eps 1: Adam steps ~ lr * g, linear in the gradient, so float32 reduction order stays ~1e-8 in the
# parameters (at eps 1e-8 a near-zero gradient element would step by +-lr on its rounding noise)
OPTIM = OptimConfig(learning_rate=1e-2, eps=1.0)
ROWS = 8


@pytest.fixture(scope="module")
def built():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    state = prog.state_programs(MODEL, mesh, OPTIM, total_steps=10, seed=3)
    return state, prog.grpo_programs(state, DECODE, RL)


def _struct(x):
    return (tuple(x.shape), jnp.dtype(x.dtype), x.sharding)


def test_the_abstract_state_is_the_state_init_creates(built):
    state, _ = built
    real = state.init(random_params(MODEL))
    assert jax.tree.structure(real) == jax.tree.structure(state.abstract)
    for got, want in zip(jax.tree.leaves(real), jax.tree.leaves(state.abstract)):
        assert (tuple(got.shape), got.dtype) == (want.shape, want.dtype)
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim)
    # parameters and moments are sharded by the rules, not replicated
    kernel = state.abstract.trainable["blocks"]["ff_proj"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


def test_the_abstract_trajectory_is_what_the_rollout_returns(built):
    state, grpo = built
    params = state.init(random_params(MODEL)).params
    prompts = np.random.default_rng(0).integers(3, MASK_ID, size=(ROWS, DECODE.prompt_length)).astype(np.int32)
    trajectory = R.rollout(params, jax.device_put(prompts, batch_sharding(state.mesh, 2)), None,
                           jax.random.key(1), DECODE, MODEL)
    abstract = grpo.abstract_trajectory(ROWS)
    assert jax.tree.structure(trajectory) == jax.tree.structure(abstract)
    for got, want in zip(jax.tree.leaves(trajectory), jax.tree.leaves(abstract)):
        assert (tuple(got.shape), got.dtype) == (want.shape, want.dtype)


def test_every_lowered_grpo_program_compiles_and_the_update_aliases_the_state(built):
    _, grpo = built
    reused = dataclasses.replace(RL, num_iterations=2)
    for decode, rl, names in ((DECODE, RL, {"rollout", "grpo_update"}),
                              (DECODE.replace(cache="prefix"), reused, {"rollout", "old_logps", "grpo_update"})):
        programs = prog.grpo_programs(grpo.state, decode, rl)
        lowered = programs.lower(ROWS)
        assert set(lowered) == names
        compiled = {name: low.compile() for name, low in lowered.items()}
        memory = compiled["grpo_update"].memory_analysis()
        # the donated state is written in place: its bytes are aliased, not allocated twice
        assert memory.alias_size_in_bytes >= sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
            grpo.state.abstract.trainable)) // 8


def test_the_built_sharded_update_equals_the_plain_update(built):
    state, grpo = built
    params = random_params(MODEL)
    prompts = np.random.default_rng(1).integers(3, MASK_ID, size=(ROWS, DECODE.prompt_length)).astype(np.int32)
    trajectory = R.rollout(params, prompts, None, jax.random.key(2), DECODE, MODEL)
    advantages = compute_advantages(jnp.arange(ROWS, dtype=jnp.float32), RL)

    tx = make_optimizer(OPTIM, 10)
    plain_state = create_state(params, tx, "all", 3)
    plain, plain_metrics = jax.jit(lambda s, t, a: prog.grpo_update(s, t, a, model=MODEL, decode=DECODE, rl=RL,
                                                                    tx=tx))(plain_state, trajectory, advantages)
    rows = batch_sharding(state.mesh, 1)
    sharded_trajectory = jax.tree.map(lambda x: jax.device_put(x, batch_sharding(state.mesh, x.ndim)), trajectory)
    built_state, built_metrics = grpo.update(state.init(params), sharded_trajectory, jax.device_put(advantages, rows))
    for key in ("loss", "grad_norm"):
        assert float(built_metrics[key]) == pytest.approx(float(plain_metrics[key]), rel=1e-4, abs=1e-6)
    for got, want in zip(jax.tree.leaves(built_state.trainable), jax.tree.leaves(plain.trainable)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=0)
    # and the update moved the parameters, so the comparison is not of two untouched copies
    moved = [np.abs(np.asarray(new) - np.asarray(old)).max() for new, old in
             zip(jax.tree.leaves(plain.trainable), jax.tree.leaves(plain_state.trainable))]
    assert max(moved) > 1e-4, max(moved)  # a hundred times the tolerance above
    assert int(built_state.step) == 1


def test_a_batch_update_lowers_on_abstract_rows(built):
    state, _ = built

    def update(s, batch):
        loss_fn = lambda trainable: (jnp.mean(trainable["ln_f"]["weight"]) * jnp.mean(batch["tokens"]), {})  # noqa: E731
        return apply_gradients(s, loss_fn, state.tx)

    jitted = prog.batch_update(update, state)
    compiled = prog.lower_batch_update(jitted, state, {"tokens": ((ROWS, 12), jnp.float32)}).compile()
    new_state, metrics = compiled(state.init(random_params(MODEL)),
                                  {"tokens": jax.device_put(jnp.ones((ROWS, 12)), batch_sharding(state.mesh, 2))})
    assert int(new_state.step) == 1 and np.isfinite(float(metrics["loss"]))


# ------------------------------------------------------------------ activation sharding constraints


def _constraints_in(lowered) -> int:
    return lowered.as_text().count("sharding_constraint")


def test_the_constrained_forward_equals_the_unconstrained_one_on_eight_devices(built):
    state, _ = built
    mesh = state.mesh
    params = random_params(MODEL)
    canvas = np.random.default_rng(3).integers(0, MASK_ID + 1, size=(ROWS, 12)).astype(np.int32)
    valid = np.ones(canvas.shape, bool)
    valid[:, :2] = False
    forward = lambda p, c, v: policy.policy_apply(p, c, MODEL, valid=v)  # noqa: E731
    plain = jax.jit(forward)
    constrained = jax.jit(prog.on_mesh(forward, mesh))
    sharded = (jax.device_put(params, param_shardings(params, mesh)), jax.device_put(canvas, batch_sharding(mesh, 2)),
               jax.device_put(valid, batch_sharding(mesh, 2)))
    assert _constraints_in(plain.lower(*sharded)) == 0  # no mesh in context: a no-op
    assert _constraints_in(constrained.lower(*sharded)) >= 8  # blocks, MLP, heads, logits, planner
    want = plain(params, canvas, valid)
    got = constrained(*sharded)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-5)
    assert got[0].sharding.spec[0] == ("data", "fsdp")  # logits come out rows-sharded


def test_the_constrained_teacher_scores_equal_the_unconstrained_ones(built):
    state, _ = built
    config = teacher_lib.TeacherConfig(family="qwen2", vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=48)
    params = teacher_lib.teacher_init_params(config, jax.random.key(0))
    rng = np.random.default_rng(4)
    prompt, completion = (rng.integers(0, 64, size=(ROWS, n)).astype(np.int32) for n in (5, 7))
    score = lambda p, a, b: teacher_lib.score(p, a, b, config)  # noqa: E731
    want = jax.jit(score)(params, prompt, completion)
    got = jax.jit(prog.on_mesh(score, state.mesh))(jax.device_put(params, param_shardings(params, state.mesh)),
                                                    *(jax.device_put(x, batch_sharding(state.mesh, 2))
                                                      for x in (prompt, completion)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------ host-contiguous meshes


class _FakeDevice:
    def __init__(self, id, process_index):
        self.id, self.process_index = id, process_index


def test_each_process_gets_one_block_of_the_batch_axes():
    # 4 hosts x 4 devices, listed interleaved (as a TPU pod's default order can be)
    devices = [_FakeDevice(i, i % 4) for i in range(16)]
    grid = host_contiguous_grid((1, 16, 1), devices)
    assert [d.process_index for d in grid[0, :, 0]] == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    grid = host_contiguous_grid((2, 8, 1), devices)  # two hosts along 'data', two along 'fsdp'
    assert [[d.process_index for d in row] for row in grid[:, :, 0]] == [[0] * 4 + [1] * 4, [2] * 4 + [3] * 4]
    grid = host_contiguous_grid((1, 8, 2), devices)
    assert {d.process_index for d in grid[0, :2].flat} == {0}
    with pytest.raises(ShardingError, match=r"mesh.tensor at most the devices of one process"):
        host_contiguous_grid((1, 2, 8), devices)


def test_a_four_host_slice_keeps_groups_whole_below_one_group_per_device():
    pytest.importorskip("libtpu")
    devices = compile_check.topology("v5litepod-16").devices  # 4 hosts x 4 chips
    ours = make_mesh(devices=devices)
    # 4 prompts x 12 rows = 48 rows, 3 per device: a group spans 4 devices, which must be one host's
    check_groups_stay_whole("rows", 48, 12, ours)
    rows_of = {}
    for device, index in batch_sharding(ours, 1).devices_indices_map((48,)).items():
        rows_of.setdefault(device.process_index, []).append(index[0].start)
    assert all(max(r) - min(r) == 9 for r in rows_of.values())  # 4 consecutive 3-row blocks per host
    default = jax.make_mesh((1, 16, 1), ("data", "fsdp", "tensor"), devices=devices,
                            axis_types=(jax.sharding.AxisType.Auto,) * 3)
    if any(a.process_index != b.process_index for a, b in zip(default.devices.flat, ours.devices.flat)):
        with pytest.raises(ShardingError, match="interleaves"):
            check_groups_stay_whole("rows", 48, 12, default)


# ------------------------------------------------------------------ prompts per step


def test_one_prompt_per_device_scales_the_batch_with_the_chips():
    config = tiny.get_config()
    config.data.prompts_per_step = -1
    config.rl.group_size = 12
    cfg = from_config(GRPOConfig, config)
    for devices, prompts in ((1, 1), (4, 4), (8, 8), (16, 16)):
        assert prog.resolve_prompts_per_step(cfg, devices).data.prompts_per_step == prompts
    tensor = dataclasses.replace(cfg, mesh=MeshConfig(data=2, fsdp=-1, tensor=2))
    assert prog.resolve_prompts_per_step(tensor, 16).data.prompts_per_step == 8  # data 2 x fsdp 4
    fixed = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, prompts_per_step=1))
    assert prog.resolve_prompts_per_step(fixed, 4) is fixed  # 12 rows split over 4 devices
    with pytest.raises(ConfigError, match=r"data.prompts_per_step \(1\) \* rl.group_size \(12\) = 12 do not split over "
                                          r"the 8 devices .* set --config.data.prompts_per_step=-1 \(one prompt per "
                                          r"device: 8 x 12 rows\) or a multiple of 2$"):
        prog.resolve_prompts_per_step(fixed, 8)
