"""HF LLaDA interop: exact round trips, sharded files, mesh placement, config carry-through, errors."""

import json
import os
import shutil
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch

from dultra_jax.config import ConfigError
from dultra_jax.interop import hf_llada, safetensors_io
from dultra_jax.interop.hf_llada import export_hf, load_hf, parse_size, tensor_map
from dultra_jax.interop.safetensors_io import CheckpointError
from dultra_jax.models import policy
from dultra_jax.sharding import ShardingError, make_mesh, param_shardings
from tests.helpers import random_params, tiny_config


def _assert_trees_equal(a, b):
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
    assert [p for p, _ in flat_a] == list(flat_b)
    for path, leaf in flat_a:
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat_b[path]), err_msg=str(path))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    config = tiny_config()
    params = random_params(config)
    out = str(tmp_path_factory.mktemp("hf") / "model")
    export_hf(params, config, out, dtype="float32")
    return config, params, out


def test_round_trip_is_exact_and_layout_independent(exported):
    config, params, out = exported
    loaded, loaded_config, hf = load_hf(out)
    assert loaded_config == config
    _assert_trees_equal(params, loaded)
    assert hf["architectures"] == ["LLaDOUModelLM"] and hf["use_block_embeddings"] is False
    # Without a source config, transformers finds LLaDA's code in its hub repository.
    assert hf["auto_map"]["AutoModel"] == "GSAI-ML/LLaDA-8B-Instruct--modeling_llada.LLaDAModelLM"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o777 & ~umask  # not mkdtemp's 0700
    # The same directory read unscanned gives the per-layer slices of the stacked leaves.
    unrolled, unrolled_config, _ = load_hf(out, scan_layers=False)
    assert not unrolled_config.scan_layers
    for i in range(config.n_layers):
        _assert_trees_equal(jax.tree.map(lambda a: a[i], params["blocks"]), unrolled["blocks"][i])


def test_bfloat16_round_trip_is_exact(tmp_path):
    config = tiny_config(param_dtype="bfloat16", dtype="bfloat16")
    params = random_params(config)
    export_hf(params, config, str(tmp_path / "m"), dtype="bfloat16")
    raw = safetensors.torch.load_file(str(tmp_path / "m" / "model.safetensors"))  # PyTorch reads our writer
    assert raw["model.transformer.wte.weight"].dtype == torch.bfloat16
    loaded, _, _ = load_hf(str(tmp_path / "m"), param_dtype="bfloat16", dtype="bfloat16")
    _assert_trees_equal(params, loaded)


def test_sharded_export_writes_index_and_loads_back(exported, tmp_path):
    config, params, _ = exported
    out = str(tmp_path / "sharded")
    export_hf(params, config, out, dtype="float32", max_shard_size="20KB")
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == {e.hf_name for e in tensor_map(config)}
    assert index["metadata"]["total_size"] == sum(
        os.path.getsize(os.path.join(out, s)) for s in shards) - sum(
        8 + int.from_bytes(open(os.path.join(out, s), "rb").read(8), "little") for s in shards)
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
    loaded, _, _ = load_hf(out)
    _assert_trees_equal(params, loaded)


def test_single_file_wins_over_an_index_as_in_transformers(exported, tmp_path):
    config, params, out = exported
    sharded = str(tmp_path / "sharded")
    export_hf(random_params(config, seed=1), config, sharded, dtype="float32", max_shard_size="20KB")
    shutil.copy(os.path.join(out, "model.safetensors"), sharded)
    loaded, _, _ = load_hf(sharded)
    _assert_trees_equal(params, loaded)


def test_shard_sizes_read_decimal_and_binary_units():
    assert [parse_size(s) for s in ("5GB", "5GiB", "500MB", "500mib", "20KB", "2KiB", "123", None, 7)] == [
        5 * 10**9, 5 * 2**30, 500 * 10**6, 500 * 2**20, 20 * 10**3, 2 * 2**10, 123, None, 7]
    with pytest.raises(ConfigError, match="max_shard_size='5 TB'"):
        parse_size("5 TB")


def test_load_places_each_tensor_with_its_mesh_sharding(exported):
    config, params, out = exported
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    loaded, _, _ = load_hf(out, mesh=mesh)
    want = param_shardings(params, mesh)
    for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(loaded)[0], jax.tree.leaves(want)):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), path
    assert loaded["wte"]["embedding"].addressable_shards[0].data.shape == (32, 16)  # [V/tensor, D/fsdp]
    _assert_trees_equal(params, loaded)


def test_config_fields_are_carried_through_and_tokenizer_copied(exported, tmp_path):
    config, params, out = exported
    source = str(tmp_path / "source")
    os.makedirs(source)
    with open(os.path.join(out, "config.json")) as f:
        hf = json.load(f)
    hf.update(foo_field={"kept": True}, auto_map={"AutoModel": "modeling_llada.LLaDAModelLM"},
              vocab_size=config.vocab_size - 3)
    with open(os.path.join(source, "config.json"), "w") as f:
        json.dump(hf, f)
    for name in ("tokenizer.json", "tokenizer_config.json", "modeling_llada.py"):
        with open(os.path.join(source, name), "w") as f:
            f.write("{}")
    with open(os.path.join(source, "notes.bin"), "w") as f:
        f.write("not copied")

    export_hf(params, config, str(tmp_path / "with_planner"), source_dir=source)
    with open(tmp_path / "with_planner" / "config.json") as f:
        written = json.load(f)
    assert written["foo_field"] == {"kept": True} and written["auto_map"] == hf["auto_map"]
    assert written["num_head_layers"] == 1 and written["use_adaln"] and written["architectures"] == ["LLaDOUModelLM"]
    files = set(os.listdir(tmp_path / "with_planner"))
    assert {"tokenizer.json", "tokenizer_config.json", "modeling_llada.py"} <= files and "notes.bin" not in files

    backbone_only = config.replace(planner=None)
    backbone_params = {k: v for k, v in params.items() if k != "planner"}
    export_hf(backbone_params, backbone_only, str(tmp_path / "backbone"), source_dir=source)
    with open(tmp_path / "backbone" / "config.json") as f:
        written = json.load(f)
    assert "num_head_layers" not in written and written["architectures"] == ["LLaDAModelLM"]
    # The tokenizer's vocab_size below the padded embedding rows is kept, not rounded up.
    assert (written["vocab_size"], written["embedding_size"]) == (hf["vocab_size"], config.vocab_size)
    loaded, loaded_config, _ = load_hf(str(tmp_path / "backbone"))
    assert loaded_config.planner is None and "planner" not in loaded


def test_planner_can_be_dropped_or_freshly_initialised(exported, tmp_path):
    config, params, out = exported
    dropped, dropped_config, _ = load_hf(out, with_planner=False)
    assert dropped_config.planner is None and "planner" not in dropped
    export_hf(dropped, dropped_config, str(tmp_path / "backbone"), dtype="float32")
    fresh, fresh_config, _ = load_hf(str(tmp_path / "backbone"), with_planner=True, planner_rng=jax.random.key(5))
    assert fresh_config.has_planner
    _assert_trees_equal(dropped["blocks"], fresh["blocks"])
    want = jax.tree.map(jnp.shape, params["planner"])
    assert jax.tree.map(jnp.shape, fresh["planner"]) == want
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) mask_embedding.weight"):
        load_hf(str(tmp_path / "backbone"), with_planner=True)


def _rewrite(directory, edit):
    """Loads `model.safetensors` into memory, applies `edit(dict)`, writes it back."""
    path = os.path.join(directory, "model.safetensors")
    file = safetensors_io.SafetensorsFile(path)
    tensors = {name: np.array(file.get(name)) for name in file.keys()}
    del file
    edit(tensors)
    safetensors_io.save_file(tensors, path)


@pytest.fixture()
def copy_of(exported, tmp_path):
    _, _, out = exported

    def make(name="copy"):
        target = str(tmp_path / name)
        shutil.copytree(out, target)
        return target
    return make


def test_missing_tensor_is_named(copy_of):
    d = copy_of()
    _rewrite(d, lambda t: t.pop("model.transformer.blocks.1.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model\.transformer\.blocks\.1\.up_proj\.weight"):
        load_hf(d)


def test_unexpected_tensor_is_named(copy_of):
    d = copy_of()
    _rewrite(d, lambda t: t.update({"model.transformer.blocks.7.q_proj.weight": np.zeros((2, 2), np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) model\.transformer\.blocks\.7\.q_proj\.weight"):
        load_hf(d)


def test_shape_mismatch_names_tensor_and_both_shapes(copy_of):
    d = copy_of()
    _rewrite(d, lambda t: t.update({"model.transformer.blocks.0.k_proj.weight": np.zeros((8, 32), np.float32)}))
    with pytest.raises(CheckpointError, match=r"model\.transformer\.blocks\.0\.k_proj\.weight has shape \[8, 32\], "
                                              r"expected \[16, 32\]"):
        load_hf(d)


@pytest.mark.parametrize("key, value", [("block_type", "sequential"), ("weight_tying", True), ("alibi", True),
                                        ("use_block_embeddings", True), ("num_head_layers", 2),
                                        ("activation_type", "gelu")])
def test_unsupported_config_value_is_named(copy_of, key, value):
    d = copy_of()
    with open(os.path.join(d, "config.json")) as f:
        hf = json.load(f)
    hf[key] = value
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(hf, f)
    with pytest.raises(ConfigError, match=f"{key}={value!r}"):
        load_hf(d)


def test_unreadable_files_are_named(copy_of, tmp_path):
    d = copy_of()
    with open(os.path.join(d, "model.safetensors"), "wb") as f:
        f.write(b"\x05\x00")
    with pytest.raises(CheckpointError, match=f"cannot read safetensors file {d}/model.safetensors"):
        load_hf(d)
    os.remove(os.path.join(d, "config.json"))
    with pytest.raises(CheckpointError, match=f"cannot read {d}/config.json"):
        load_hf(d)
    with pytest.raises(CheckpointError, match="nowhere/config.json"):
        load_hf(str(tmp_path / "nowhere"))
    # A file cut short after a valid header.
    d2 = copy_of("copy2")
    path = os.path.join(d2, "model.safetensors")
    os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(CheckpointError, match=f"{path} is truncated"):
        load_hf(d2)
    # A header whose byte range for one tensor does not hold its shape.
    d3 = copy_of("copy3")
    path = os.path.join(d3, "model.safetensors")
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        begin, end = header["model.transformer.ln_f.weight"]["data_offsets"]
        header["model.transformer.ln_f.weight"]["data_offsets"] = [begin, end - 4]
        f.seek(8)
        rewritten = json.dumps(header, separators=(",", ":")).encode()
        assert len(rewritten) <= size
        f.write(rewritten.ljust(size))
    with pytest.raises(CheckpointError, match=rf"{path}: tensor model.transformer.ln_f.weight \(F32 \[32\]\) "
                                              rf"needs 128 bytes, its data_offsets .* give 124"):
        load_hf(d3)


def test_missing_shard_is_named(exported, tmp_path):
    config, params, _ = exported
    out = str(tmp_path / "sharded")
    export_hf(params, config, out, max_shard_size="20KB")
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        second = sorted(set(json.load(f)["weight_map"].values()))[1]
    os.remove(os.path.join(out, second))
    with pytest.raises(CheckpointError, match=f"checkpoint shard {out}/{second}"):
        load_hf(out)


def test_export_refuses_wrong_shapes_and_non_empty_targets(exported, tmp_path):
    config, params, out = exported
    bad = jax.tree.map(lambda a: a, params)
    bad["ln_f"]["weight"] = jnp.ones((31,))
    with pytest.raises(CheckpointError, match=r"parameter ln_f/weight has shape \[31\], expected \[32\]"):
        export_hf(bad, config, str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad")
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        export_hf(params, config, out)


def test_overwrite_replaces_the_directory_and_keeps_it_if_the_move_fails(exported, tmp_path, monkeypatch):
    config, params, _ = exported
    out = str(tmp_path / "out")
    export_hf(params, config, out, dtype="float32")
    other = random_params(config, seed=1)
    export_hf(other, config, out, dtype="float32", overwrite=True)
    _assert_trees_equal(other, load_hf(out)[0])
    assert os.listdir(tmp_path) == ["out"]  # no temporary or set-aside directory is left behind

    real_replace = os.replace

    def failing_replace(src, dst):  # only the final move of the directory fails
        if dst == out:
            raise OSError("disk full")
        real_replace(src, dst)
    monkeypatch.setattr(hf_llada.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        export_hf(params, config, out, dtype="float32", overwrite=True)
    monkeypatch.undo()
    _assert_trees_equal(other, load_hf(out)[0])  # the previous export is back in place
    assert os.listdir(tmp_path) == ["out"]


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="model.n_heads=5"):
        tiny_config(n_heads=5)
    with pytest.raises(ConfigError, match="model.mask_token_id=64"):
        tiny_config(mask_token_id=64)
    with pytest.raises(ConfigError, match="model.dtype='fp8'"):
        tiny_config(dtype="fp8")


def test_mesh_divisibility_error_names_parameter_and_sizes():
    config = tiny_config(vocab_size=66, mask_token_id=65)
    with pytest.raises(ShardingError, match=r"parameter ff_out/kernel: dim 1 .* size 66.*'tensor' of size 4"):
        param_shardings(policy.abstract_params(config), make_mesh(data=1, fsdp=2, tensor=4))
