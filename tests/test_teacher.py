"""Autoregressive teacher: HF Qwen2 / Llama import, logits and scores against transformers (torch)."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec as P
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from dultra_jax.config import ConfigError
from dultra_jax.interop.hf_teacher import load_teacher
from dultra_jax.rewards.distill import Teacher
from dultra_jax.sharding import ShardingError, make_mesh, param_partition_spec
from dultra_jax.interop.safetensors_io import CheckpointError, open_checkpoint, save_file
from dultra_jax.models.teacher import (TeacherConfig, score, score_jit, teacher_config_from_hf, teacher_forward,
                                       teacher_init_params)

TINY = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=48)

VARIANTS = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(rope_theta=10000.0)),
    # Other theta, explicit head_dim != hidden/heads, q/k/v/o biases.
    "llama_untied": (LlamaConfig, LlamaForCausalLM,
                     dict(rope_theta=500.0, head_dim=16, attention_bias=True, tie_word_embeddings=False)),
    "llama_tied": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=True)),
}

forward_jit = jax.jit(teacher_forward, static_argnames=("config",))


def _randomize_(model, seed):
    """Weights far from HF's 0.02 init, so logits are not near-uniform and mistakes show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.15 * noise)
    return model


def _build(path, variant, seed=0, **save_kw):
    config_cls, model_cls, extra = VARIANTS[variant]
    torch.manual_seed(seed)
    config = config_cls(**TINY, **extra, attn_implementation="eager")
    model = _randomize_(model_cls(config), seed).eval()
    model.save_pretrained(str(path), safe_serialization=True, **save_kw)
    return str(path), model


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    out = {v: _build(tmp_path_factory.mktemp(v), v, seed=i) for i, v in enumerate(VARIANTS)}
    out["sharded"] = _build(tmp_path_factory.mktemp("sharded"), "qwen2", seed=7, max_shard_size="20KB")
    return out


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


def _tokens(shape, seed):
    return np.random.default_rng(seed).integers(0, TINY["vocab_size"], size=shape).astype(np.int32)


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_torch(hf_models, variant, scan_layers):
    hf_dir, model = hf_models[variant]
    params, config = load_teacher(hf_dir, scan_layers=scan_layers)
    assert config.family == variant.split("_")[0] and config.scan_layers == scan_layers
    assert ("lm_head" in params) == (not config.tie_word_embeddings)
    tokens = _tokens((2, 7), seed=1)
    logits = forward_jit(params, jnp.asarray(tokens), config)
    assert logits.dtype == jnp.float32 and logits.shape == (2, 7, TINY["vocab_size"])
    np.testing.assert_allclose(np.asarray(logits), _torch_logits(model, tokens), atol=1e-4, rtol=1e-4)


def test_config_fields_from_hf(hf_models):
    _, config = load_teacher(hf_models["llama_untied"][0])
    assert (config.rope_theta, config.head_dim, config.attention_bias, config.o_proj_bias) == (500.0, 16, True, True)
    _, config = load_teacher(hf_models["qwen2"][0])
    assert (config.rope_theta, config.head_dim, config.attention_bias, config.o_proj_bias) == (10000.0, 8, True, False)


def test_sharded_checkpoint_with_index(hf_models):
    hf_dir, model = hf_models["sharded"]
    assert os.path.exists(os.path.join(hf_dir, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(hf_dir) if f.endswith(".safetensors")]) > 1
    params, config = load_teacher(hf_dir)
    tokens = _tokens((1, 6), seed=2)
    np.testing.assert_allclose(np.asarray(forward_jit(params, jnp.asarray(tokens), config)),
                               _torch_logits(model, tokens), atol=1e-4, rtol=1e-4)


def test_score_matches_torch_log_softmax(hf_models):
    hf_dir, model = hf_models["qwen2"]
    params, config = load_teacher(hf_dir)
    prompt, completion = _tokens((2, 5), seed=3), _tokens((2, 4), seed=4)
    logps = score_jit(params, jnp.asarray(prompt), jnp.asarray(completion), config)
    full = torch.as_tensor(_torch_logits(model, np.concatenate([prompt, completion], 1)))
    expected = torch.log_softmax(full[:, 4:8], dim=-1).gather(-1, torch.as_tensor(completion).long()[..., None])[..., 0]
    assert logps.shape == (2, 4) and logps.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logps), expected.numpy(), atol=1e-4, rtol=1e-4)
    # The unjitted function agrees with the jitted one.
    np.testing.assert_allclose(np.asarray(score(params, prompt, completion, config)), np.asarray(logps), atol=1e-6)


def test_left_padded_prompts_match_unpadded_rows(hf_models):
    hf_dir, model = hf_models["llama_untied"]
    params, config = load_teacher(hf_dir)
    prompts = [_tokens((3,), seed=5), _tokens((6,), seed=6)]
    completions = [_tokens((4,), seed=7), _tokens((2,), seed=8)]
    lp, lc, pad = 6, 4, 0
    prompt_ids = np.full((2, lp), pad, np.int32)
    prompt_valid = np.zeros((2, lp), bool)
    completion_ids = np.full((2, lc), pad, np.int32)
    completion_valid = np.zeros((2, lc), bool)
    for r, (p, c) in enumerate(zip(prompts, completions)):
        prompt_ids[r, lp - len(p):], prompt_valid[r, lp - len(p):] = p, True
        completion_ids[r, :len(c)], completion_valid[r, :len(c)] = c, True
    logps = np.asarray(score_jit(params, prompt_ids, completion_ids, config, prompt_valid, completion_valid))
    # Padding queries attend to no valid key; they must stay finite so no NaN leaks anywhere.
    logits = forward_jit(params, jnp.concatenate([prompt_ids, completion_ids], 1), config,
                         jnp.concatenate([prompt_valid, completion_valid], 1))
    assert np.isfinite(np.asarray(logits)).all()
    for r, (p, c) in enumerate(zip(prompts, completions)):
        logits = torch.as_tensor(_torch_logits(model, np.concatenate([p, c])[None]))[0]
        expected = torch.log_softmax(logits[len(p) - 1:len(p) - 1 + len(c)], -1).gather(
            -1, torch.as_tensor(c).long()[:, None])[:, 0].numpy()
        np.testing.assert_allclose(logps[r, :len(c)], expected, atol=1e-4, rtol=1e-4)
        assert np.all(logps[r, len(c):] == 0.0)


def test_load_onto_mesh_matches(hf_models):
    hf_dir, model = hf_models["llama_untied"]
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    params, config = load_teacher(hf_dir, mesh=mesh)
    q = params["layers"]["q_proj"]["kernel"]
    assert q.sharding == NamedSharding(mesh, P(None, "fsdp", "tensor"))
    assert q.addressable_shards[0].data.shape == (2, 16, 32)
    assert params["layers"]["down_proj"]["kernel"].sharding.spec == P(None, "tensor", "fsdp")
    assert params["embed_tokens"]["embedding"].sharding.spec == P("tensor", "fsdp")
    assert params["norm"]["weight"].sharding.spec == P()
    tokens = _tokens((2, 7), seed=9)
    np.testing.assert_allclose(np.asarray(forward_jit(params, jnp.asarray(tokens), config)),
                               _torch_logits(model, tokens), atol=1e-4, rtol=1e-4)
    # Explicit shardings override the rules.
    replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), params)
    again, _ = load_teacher(hf_dir, shardings=replicated)
    assert again["layers"]["q_proj"]["kernel"].sharding.spec == P()
    np.testing.assert_array_equal(np.asarray(again["layers"]["q_proj"]["kernel"]), np.asarray(q))


def _ragged_rows(count, seed):
    """`count` prompts (1-9 tokens) and completions (0-6 tokens, empty ones included) of token ids."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, TINY["vocab_size"], size=rng.integers(1, 10)).tolist() for _ in range(count)]
    completions = [rng.integers(0, TINY["vocab_size"], size=rng.integers(0, 7)).tolist() for _ in range(count)]
    completions[1] = []
    return prompts, completions


def _assert_rows_close(got, want, atol):
    assert [len(g) for g in got] == [len(w) for w in want]
    for g, w in zip(got, want):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, w, atol=atol, rtol=0)


def test_teacher_on_a_mesh_scores_as_on_one_device(hf_models):
    """Sharded parameters and rows over the batch axes (8 devices) give one device's log-probs,
    for 5 rows (padded to the mesh's 8) and in chunks of max_rows=3 (3 + 2 rows, each padded to 8)."""
    hf_dir, _ = hf_models["qwen2"]
    mesh = make_mesh(fsdp=-1)
    single = Teacher(*load_teacher(hf_dir), tokenizer=None, length_bucket=8, row_bucket=1)
    sharded = Teacher(*load_teacher(hf_dir, mesh=mesh), tokenizer=None, length_bucket=8, row_bucket=1, mesh=mesh)
    assert sharded.params["layers"]["q_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    assert sharded._row_multiple() == 8
    prompts, completions = _ragged_rows(5, seed=11)
    want = single.token_logps(prompts, completions)
    assert sum(np.count_nonzero(w) for w in want) > 10  # real log-probs, not padding
    _assert_rows_close(sharded.token_logps(prompts, completions), want, atol=1e-5)
    chunked = dataclasses.replace(sharded, max_rows=3)
    _assert_rows_close(chunked.token_logps(prompts, completions), want, atol=1e-5)
    assert sharded.token_logps([], []) == [] and sharded.score_texts([], []).shape == (0,)


def test_offloaded_teacher_keeps_its_weights_on_the_host(hf_models):
    """`pinned_host` parameters (one device, and sharded on a mesh) stay in host memory, and intact,
    after scoring, which copies them to the devices for the call: the same log-probs as resident ones."""
    hf_dir, _ = hf_models["llama_untied"]
    prompts, completions = _ragged_rows(6, seed=12)
    for mesh in (None, make_mesh(data=2, fsdp=2, tensor=2)):
        resident = Teacher(*load_teacher(hf_dir, mesh=mesh), tokenizer=None, length_bucket=8, mesh=mesh)
        offloaded = Teacher(*load_teacher(hf_dir, mesh=mesh, memory_kind="pinned_host"), tokenizer=None,
                            length_bucket=8, mesh=mesh, offload=True)
        leaves = jax.tree.leaves(offloaded.params)
        assert {x.sharding.memory_kind for x in leaves} == {"pinned_host"}
        if mesh is not None:
            assert offloaded.params["layers"]["o_proj"]["kernel"].sharding.spec == P(None, "tensor", "fsdp")
        copies, copy = [], offloaded._device_params
        offloaded._device_params = lambda: copies.append(copy()) or copies[-1]  # to see the device copy
        want = resident.token_logps(prompts, completions)
        _assert_rows_close(offloaded.token_logps(prompts, completions), want, atol=1e-6)
        (device,) = copies  # one copy per call, in device memory, freed when the call returns
        assert {x.sharding.memory_kind for x in jax.tree.leaves(device)} == {"device"}
        assert all(x.is_deleted() for x in jax.tree.leaves(device))
        assert {x.sharding.memory_kind for x in jax.tree.leaves(offloaded.params)} == {"pinned_host"}
        assert not any(x.is_deleted() for x in jax.tree.leaves(offloaded.params))
        for got, kept in zip(jax.tree.leaves(offloaded.params), jax.tree.leaves(resident.params)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(kept))


def test_partition_rules_and_divisibility(hf_models):
    assert param_partition_spec("layers/0/o_proj/kernel", 2) == P("tensor", "fsdp")
    assert param_partition_spec("layers/q_proj/bias", 2) == P()
    assert param_partition_spec("lm_head/kernel", 2) == P("fsdp", "tensor")
    mesh = jax.make_mesh((1, 1, 3), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=jax.devices()[:3])
    # The vocabulary (96) divides 3; the k_proj output (16) does not.
    with pytest.raises(ShardingError, match=r"parameter layers/k_proj/kernel: dim 2 of shape \(2, 32, 16\) has size 16, .* 'tensor' of size 3"):
        load_teacher(hf_models["qwen2"][0], mesh=mesh)


def test_bfloat16_params(hf_models):
    hf_dir, model = hf_models["qwen2"]
    params, config = load_teacher(hf_dir, dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    tokens = _tokens((1, 5), seed=10)
    logits = forward_jit(params, jnp.asarray(tokens), config)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), _torch_logits(model, tokens), atol=0.15)


def test_init_params_shapes():
    config = TeacherConfig(family="llama", **TINY, tie_word_embeddings=True, scan_layers=False)
    params = teacher_init_params(config, jax.random.key(0))
    assert "lm_head" not in params  # tied: the head is embed_tokens.embedding.T
    assert params["layers"][1]["k_proj"]["kernel"].shape == (32, 16)
    assert "bias" not in params["layers"][0]["q_proj"]


# --------------------------------------------------------------------------------------------------
# Errors name the culprit


def _copy_with(src, dst, edit_tensors=None, edit_config=None):
    shutil.copytree(src, dst)
    if edit_config is not None:
        with open(os.path.join(dst, "config.json")) as f:
            cfg = json.load(f)
        edit_config(cfg)
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(cfg, f)
    if edit_tensors is not None:
        ckpt = open_checkpoint(dst)
        tensors = {name: np.array(ckpt.get(name)) for name in ckpt.keys()}
        del ckpt
        edit_tensors(tensors)
        save_file(tensors, os.path.join(dst, "model.safetensors"))
    return str(dst)


def test_missing_tensor(hf_models, tmp_path):
    bad = _copy_with(hf_models["qwen2"][0], tmp_path / "d",
                     edit_tensors=lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model\.layers\.1\.self_attn\.k_proj\.bias"):
        load_teacher(bad)


def test_unexpected_tensor_and_ignored_tied_head(hf_models, tmp_path):
    def add(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"]  # tied models may store it: ignored
        t["model.layers.0.mlp.extra.weight"] = np.zeros((2, 2), np.float32)

    bad = _copy_with(hf_models["llama_tied"][0], tmp_path / "d", edit_tensors=add)
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) model\.layers\.0\.mlp\.extra\.weight"):
        load_teacher(bad)


def test_shape_mismatch(hf_models, tmp_path):
    def shrink(t):
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:40]

    bad = _copy_with(hf_models["qwen2"][0], tmp_path / "d", edit_tensors=shrink)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj\.weight has shape \[40, 32\], "
                                              r"expected \[48, 32\]"):
        load_teacher(bad)


def test_bad_model_type(hf_models, tmp_path):
    bad = _copy_with(hf_models["qwen2"][0], tmp_path / "d", edit_config=lambda c: c.update(model_type="mistral"))
    with pytest.raises(ConfigError, match="model_type='mistral'"):
        load_teacher(bad)


def test_missing_config_json(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path / "config.json")):
        load_teacher(str(tmp_path))


BASE_HF = dict(model_type="llama", **TINY, rms_norm_eps=1e-5)


@pytest.mark.parametrize("extra, culprit", [
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling.rope_type='llama3'"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6}), "rope_parameters.rope_type='yarn'"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(model_type="qwen2", use_sliding_window=True), "use_sliding_window=True"),
    (dict(mlp_bias=True), "mlp_bias=True"),
    (dict(num_key_value_heads=3), "num_key_value_heads=3"),
])
def test_unsupported_hf_config(extra, culprit):
    with pytest.raises(ConfigError, match=culprit.replace(".", r"\.")):
        teacher_config_from_hf({**BASE_HF, **extra})


def test_rope_theta_in_either_place():
    assert teacher_config_from_hf({**BASE_HF, "rope_theta": 1e6}).rope_theta == 1e6
    assert teacher_config_from_hf({**BASE_HF, "rope_theta": 1e6, "rope_scaling": None}).rope_theta == 1e6
    cfg = teacher_config_from_hf({**BASE_HF, "rope_parameters": {"rope_type": "default", "rope_theta": 250.0}})
    assert cfg.rope_theta == 250.0
    assert teacher_config_from_hf(BASE_HF).rope_theta == 10000.0
