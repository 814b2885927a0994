"""LLaDA backbone + planner: parity with an independent PyTorch reference, structure options, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from dultra_jax.interop.hf_llada import export_hf, load_hf
from dultra_jax.models import policy
from dultra_jax.sharding import make_mesh, param_shardings
from tests import torch_reference as ref
from tests.helpers import MASK_ID, random_canvas, random_params, tiny_config

TOL = 1e-4


def _torch_outputs(model: ref.RefLLaDA, canvas: np.ndarray, candidates: np.ndarray, key_valid=None):
    ids = torch.from_numpy(canvas.astype(np.int64))
    kv = None if key_valid is None else torch.from_numpy(key_valid)
    with torch.no_grad():
        logits, h_last = model(ids, key_valid=kv)
        t, _ = ref.planner_inputs(ids, MASK_ID, kv)
        unmask = model.planner_logits(h_last, t, torch.from_numpy(candidates), key_valid=kv)
    return logits.numpy(), unmask.numpy()


def test_policy_matches_torch_reference_both_directions(tmp_path):
    """ours -> HF dir -> PyTorch reference (strict=True) and PyTorch -> HF dir -> ours agree."""
    config = tiny_config()
    params = random_params(config)
    canvas = random_canvas(3, 24, num_masked=12)
    candidates = np.array(policy.current_block_candidates(jnp.asarray(canvas), MASK_ID, gen_start=16,
                                                            block_length=4))
    assert candidates.sum() == 3 * 4  # the block 16..19 of every row

    apply = jax.jit(policy.policy_apply, static_argnames=("config", "suppress_mask"))
    logits, unmask = apply(params, jnp.asarray(canvas), config, candidates=jnp.asarray(candidates),
                           suppress_mask=False)
    export_hf(params, config, str(tmp_path / "ours"), dtype="float32")
    torch_model = ref.ref_from_hf_dir(str(tmp_path / "ours"))  # load_state_dict(strict=True) inside
    want_logits, want_unmask = _torch_outputs(torch_model, canvas, candidates)
    np.testing.assert_allclose(logits, want_logits, atol=TOL, rtol=0)
    np.testing.assert_allclose(unmask, want_unmask, atol=TOL, rtol=0)

    # The other direction: weights made by PyTorch, read by our loader.
    hf_config = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "mlp_hidden_size": 48,
                 "vocab_size": 64, "embedding_size": 64, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
                 "max_sequence_length": 128, "mask_token_id": MASK_ID, "eos_token_id": 1, "pad_token_id": 1,
                 "num_head_layers": 1, "use_adaln": True, "use_mask_embeddings": True,
                 "use_block_embeddings": False, "block_type": "llama", "model_type": "llada"}
    theirs = ref.random_init_(ref.RefLLaDA(hf_config), seed=3)
    ref.save_hf_dir(theirs, hf_config, str(tmp_path / "theirs"))
    loaded, loaded_config, _ = load_hf(str(tmp_path / "theirs"))
    assert loaded_config.has_planner and loaded_config.n_kv_heads == 2
    logits, unmask = apply(loaded, jnp.asarray(canvas), loaded_config, candidates=jnp.asarray(candidates),
                           suppress_mask=False)
    want_logits, want_unmask = _torch_outputs(theirs, canvas, candidates)
    np.testing.assert_allclose(logits, want_logits, atol=TOL, rtol=0)
    np.testing.assert_allclose(unmask, want_unmask, atol=TOL, rtol=0)


def test_padding_mask_matches_reference_key_mask(tmp_path):
    config = tiny_config()
    params = random_params(config, seed=1)
    canvas = random_canvas(2, 16, num_masked=6, seed=1)
    valid = np.ones_like(canvas, dtype=bool)
    valid[0, :3] = False  # left padding of row 0
    candidates = canvas == MASK_ID
    export_hf(params, config, str(tmp_path / "m"), dtype="float32")
    torch_model = ref.ref_from_hf_dir(str(tmp_path / "m"))
    logits, unmask = policy.policy_apply(params, jnp.asarray(canvas), config, valid=jnp.asarray(valid),
                                         suppress_mask=False)
    want_logits, want_unmask = _torch_outputs(torch_model, canvas, candidates, key_valid=valid)
    np.testing.assert_allclose(logits, want_logits, atol=TOL, rtol=0)
    np.testing.assert_allclose(unmask, want_unmask, atol=TOL, rtol=0)


def test_attention_is_bidirectional():
    config = tiny_config()
    params = random_params(config)
    canvas = random_canvas(1, 12, num_masked=4)
    changed = canvas.copy()
    changed[0, -1] = (changed[0, -1] + 1) % MASK_ID  # a later token
    logits_a, _ = policy.forward(params, jnp.asarray(canvas), config)
    logits_b, _ = policy.forward(params, jnp.asarray(changed), config)
    assert np.abs(np.asarray(logits_a[0, 0] - logits_b[0, 0])).max() > 1e-4  # position 0 saw it


def test_padding_keys_are_ignored_only_when_masked():
    canvas = random_canvas(1, 12, num_masked=4)
    other = canvas.copy()
    other[0, :3] = (other[0, :3] + 7) % MASK_ID  # different padding tokens
    valid = np.ones_like(canvas, dtype=bool)
    valid[0, :3] = False
    for mask_padding, same in ((True, True), (False, False)):
        config = tiny_config(mask_padding=mask_padding)
        params = random_params(config)
        a, _ = policy.forward(params, jnp.asarray(canvas), config, valid=jnp.asarray(valid))
        b, _ = policy.forward(params, jnp.asarray(other), config, valid=jnp.asarray(valid))
        diff = np.abs(np.asarray(a[0, 3:] - b[0, 3:])).max()
        assert (diff < 1e-6) == same, (mask_padding, diff)


def test_scan_unrolled_and_remat_agree():
    scanned = tiny_config()
    params = random_params(scanned)
    unrolled = scanned.replace(scan_layers=False)
    params_unrolled = dict(params)
    params_unrolled["blocks"] = {i: jax.tree.map(lambda a: a[i], params["blocks"]) for i in range(2)}
    canvas = jnp.asarray(random_canvas(2, 10, num_masked=5))
    want = policy.policy_apply(params, canvas, scanned, suppress_mask=False)
    for config, p in ((unrolled, params_unrolled), (scanned.replace(remat=True), params),
                      (unrolled.replace(remat=True), params_unrolled)):
        got = jax.jit(policy.policy_apply, static_argnames=("config", "suppress_mask"))(
            p, canvas, config, suppress_mask=False)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)

    # Gradients through remat equal gradients without it.
    def loss(p, config):
        logits, unmask = policy.policy_apply(p, canvas, config)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + jnp.mean(jax.nn.log_sigmoid(unmask))

    g_plain = jax.grad(loss)(params, scanned)
    g_remat = jax.grad(loss)(params, scanned.replace(remat=True))
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def _flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def test_logit_positions_skip_the_rows_nobody_reads():
    """With `logit_positions` (and no planner to feed), the backbone's last layer computes
    queries/MLP only at those rows: the same outputs as the full forward gathered there, for
    scanned, unrolled and remat stacks, with gradients, and with fewer FLOPs."""
    scanned = tiny_config(n_layers=3)
    params = random_params(scanned, seed=4)
    unrolled = scanned.replace(scan_layers=False)
    params_unrolled = dict(params)
    params_unrolled["blocks"] = {i: jax.tree.map(lambda a: a[i], params["blocks"]) for i in range(3)}
    canvas = jnp.asarray(random_canvas(2, 16, num_masked=8, seed=4))
    positions = jnp.asarray([[8, 9, 10, 11], [12, 13, 14, 15]], jnp.int32)  # a different block per row
    candidates = canvas == MASK_ID
    # jitted throughout: op-by-op dispatch compiles every small op and takes longer
    apply = jax.jit(policy.policy_apply, static_argnames=("config", "with_planner"))
    full_logits, full_unmask = apply(params, canvas, scanned, candidates=candidates)
    want_logits = policy.gather_positions(full_logits, positions)
    want_unmask = policy.gather_positions(full_unmask, positions)
    for config, p in ((scanned, params), (unrolled, params_unrolled), (scanned.replace(remat=True), params)):
        for with_planner in (True, False):
            logits, unmask = apply(p, canvas, config, candidates=candidates, logit_positions=positions,
                                   with_planner=with_planner)
            assert logits.shape == (2, 4, config.vocab_size)
            np.testing.assert_allclose(logits, want_logits, atol=1e-5, rtol=0)
            if with_planner:
                np.testing.assert_allclose(unmask, want_unmask, atol=1e-5, rtol=0)
            else:
                assert unmask is None

    def loss(p, config, logit_positions, with_planner):
        logits, unmask = policy.policy_apply(p, canvas, config, candidates=candidates,
                                             logit_positions=logit_positions, with_planner=with_planner)
        if logit_positions is None:
            logits = policy.gather_positions(logits, positions)
        total = jnp.mean(jax.nn.log_softmax(logits)[..., 0])
        if with_planner:
            unmask = unmask if logit_positions is not None else policy.gather_positions(unmask, positions)
            total += jnp.mean(jax.nn.log_sigmoid(unmask))
        return total

    grad = jax.jit(jax.grad(loss), static_argnums=(1, 3))
    for config in (scanned, scanned.replace(remat=True)):
        for with_planner in (True, False):
            want = grad(params, scanned, None, with_planner)
            got = grad(params, config, positions, with_planner)
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)

    # Work removed, by XLA's cost analysis of the compiled step (unrolled layers: the analysis
    # counts a scan body once whatever its trip count).
    def step(with_planner, logit_positions):
        return lambda c: policy.policy_apply(params_unrolled, c, unrolled, candidates=c == MASK_ID,
                                             logit_positions=logit_positions, with_planner=with_planner)
    pruned, full = _flops(step(False, positions), canvas), _flops(step(False, None), canvas)
    assert pruned < 0.8 * full, (pruned, full)


def test_mask_logit_is_suppressed_and_bfloat16_runs():
    config = tiny_config(dtype="bfloat16", param_dtype="bfloat16")
    params = random_params(config)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))
    logits, unmask = policy.policy_apply(params, jnp.asarray(random_canvas(2, 10, num_masked=5)), config)
    assert logits.dtype == jnp.bfloat16 and unmask.dtype == jnp.float32
    assert np.all(np.isneginf(np.asarray(logits[..., MASK_ID], np.float32)))
    assert np.all(np.isfinite(np.asarray(unmask)))


def test_planner_timestep_and_block_candidates():
    canvas = np.array([[5, 6, MASK_ID, 7, MASK_ID, MASK_ID, MASK_ID, MASK_ID],
                       [5, 6, 7, 8, 9, 10, 11, 12]], np.int32)
    t = policy.planner_timestep(jnp.asarray(canvas), MASK_ID)
    np.testing.assert_allclose(t, [1 - 5 / 8, 1.0])
    # Left padding does not count: row 0 with 2 padding positions is a 6-position canvas.
    valid = np.ones(canvas.shape, bool)
    valid[0, :2] = False
    np.testing.assert_allclose(policy.planner_timestep(jnp.asarray(canvas), MASK_ID, jnp.asarray(valid)),
                               [1 - 5 / 6, 1.0], rtol=1e-6)
    # Generation starts at 2, blocks of 3: [2,3,4] [5,6,7]. Row 0's current block is [2,3,4];
    # the prompt-like mask at 2 counts (it is inside the generation), 5..7 wait for the next block.
    cand = policy.current_block_candidates(jnp.asarray(canvas), MASK_ID, gen_start=2, block_length=3)
    assert np.asarray(cand).tolist() == [[False, False, True, False, True, False, False, False], [False] * 8]


def test_left_padding_changes_neither_output():
    """A left-padded row (padding masked out of attention and out of the planner's t) gives the
    same token and unmask logits at its own positions as the unpadded canvas (RoPE is relative)."""
    config = tiny_config()
    params = random_params(config, seed=3)
    canvas = random_canvas(1, 10, num_masked=6, seed=3)
    padded = np.concatenate([np.zeros((1, 4), np.int32), canvas], axis=1)
    valid = np.concatenate([np.zeros((1, 4), bool), np.ones((1, 10), bool)], axis=1)
    apply = jax.jit(policy.policy_apply, static_argnames=("config",))
    want_logits, want_unmask = apply(params, jnp.asarray(canvas), config)
    got_logits, got_unmask = apply(params, jnp.asarray(padded), config, valid=jnp.asarray(valid))
    np.testing.assert_allclose(got_logits[:, 4:], want_logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got_unmask[:, 4:], want_unmask, atol=1e-4, rtol=0)


def test_sharded_forward_equals_unsharded():
    config = tiny_config()
    params = random_params(config)
    canvas = jnp.asarray(random_canvas(4, 16, num_masked=8))
    want = policy.policy_apply(params, canvas, config, suppress_mask=False)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    shardings = param_shardings(params, mesh)
    sharded = jax.device_put(params, shardings)
    assert sharded["blocks"]["q_proj"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    apply = jax.jit(policy.policy_apply, static_argnames=("config", "suppress_mask"))
    with jax.set_mesh(mesh):
        got = apply(sharded, jax.device_put(canvas, jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp")))),
                    config, suppress_mask=False)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)


def test_llada_8b_config_has_the_reference_parameter_counts():
    """8.02B backbone + 303M planner (reference sections 1.3 and 6.2), from shapes alone."""
    from configs import llada_8b
    from dultra_jax.config import model_config_from_dict

    config = model_config_from_dict(llada_8b.get_config().model)
    shapes = policy.abstract_params(config)
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    assert count({k: v for k, v in shapes.items() if k != "planner"}) == 8_015_581_184
    assert count(shapes["planner"]) == 303_083_521
    assert shapes["blocks"]["ff_proj"]["kernel"].shape == (32, 4096, 12288)
