"""Orbax checkpoints: round trip of the whole train state, onto a different mesh, atomic steps."""

import os

import jax
import numpy as np

from dultra_jax.checkpoint import Checkpointer, abstract_like
from dultra_jax.config import OptimConfig, RLConfig
from dultra_jax.sharding import make_mesh
from dultra_jax.training.state import create_state, make_optimizer, state_shardings
from tests.helpers import random_params, tiny_config


def test_restore_onto_a_different_mesh_and_skip_incomplete_steps(tmp_path):
    optim, rl = OptimConfig(train="planner"), RLConfig(group_size=2, beta=0.1)
    tx = make_optimizer(optim, total_steps=10)
    params = random_params(tiny_config())
    state = create_state(params, tx, optim.train, 7, keep_reference=rl.beta > 0)
    mesh_a = make_mesh(data=1, fsdp=8, tensor=1)
    state = jax.device_put(state, state_shardings(state, tx, mesh_a))
    state = state.replace(step=state.step + 3)

    checkpointer = Checkpointer(str(tmp_path / "ckpt"), keep=2)
    for step in (1, 2, 3):
        checkpointer.save(step, state, {"next_index": 5 * step}, {"config": {"note": step}})
    checkpointer.close()
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["2", "3"]  # keep=2
    os.makedirs(tmp_path / "ckpt" / "4.orbax-checkpoint-tmp-123")  # a save killed midway

    mesh_b = make_mesh(data=2, fsdp=2, tensor=2)
    target = abstract_like(jax.device_put(state, state_shardings(state, tx, mesh_b)))
    reader = Checkpointer(str(tmp_path / "ckpt"))
    assert reader.latest_step() == 3
    restored, data_state, config = reader.restore(3, target)
    reader.close()
    assert data_state == {"next_index": 15} and config == {"config": {"note": 3}}
    assert int(restored.step) == 3 and restored.reference is not None
    kernel = restored.frozen["blocks"]["q_proj"]["kernel"]
    assert kernel.sharding.spec == jax.P(None, "fsdp", "tensor") and kernel.sharding.mesh.shape["tensor"] == 2
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
