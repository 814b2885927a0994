"""launch/score.py, launch/export.py and benchmarks/forward.py, run as the user runs them."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from benchmarks import common
from dultra_jax.interop.hf_llada import export_hf, load_hf
from dultra_jax.interop.logit_check import TokensError, read_tokens, score_tokens
from dultra_jax.models import policy
from dultra_jax.models.flops import forward_flops
from tests.helpers import MASK_ID, one_device_env, random_params, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=REPO, env=one_device_env(),
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def _write_json(path, value) -> str:
    path.write_text(json.dumps(value))
    return str(path)


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    """A tiny HF directory with a planner, a dummy tokenizer.json and an extra config field."""
    directory = tmp_path_factory.mktemp("src") / "model"
    config = tiny_config()
    export_hf(random_params(config), config, str(directory), dtype="float32")
    hf = json.loads((directory / "config.json").read_text())
    hf["foo_field"] = 1
    (directory / "config.json").write_text(json.dumps(hf))
    (directory / "tokenizer.json").write_text('{"dummy": true}')
    return directory


def _tokens() -> list[list[int]]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, MASK_ID, size=(3, 12))
    tokens[0, 6:] = MASK_ID
    tokens[1, ::3] = MASK_ID
    tokens[2, 0] = MASK_ID
    return tokens.tolist()


def _assert_same_params(a, b):
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        assert x.dtype == y.dtype, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_score_matches_policy_apply_in_process(source_dir, tmp_path):
    tokens = _tokens()
    out = tmp_path / "out.npz"
    proc = _run("launch/score.py", f"--model={source_dir}", f"--tokens={_write_json(tmp_path / 't.json', tokens)}",
                f"--out={out}")
    assert "scored 3 rows x 12 tokens" in proc.stderr

    params, config, _ = load_hf(str(source_dir))
    want_logits, want_unmask = jax.jit(policy.policy_apply, static_argnames=("config", "suppress_mask"))(
        params, np.asarray(tokens, np.int32), config, suppress_mask=False)
    with np.load(out) as got:
        assert set(got.files) == {"tokens", "token_logits", "unmask_logits"}
        assert got["token_logits"].dtype == np.float32 and got["token_logits"].shape == (3, 12, 64)
        assert got["unmask_logits"].dtype == np.float32 and got["unmask_logits"].shape == (3, 12)
        np.testing.assert_array_equal(got["tokens"], tokens)
        # Raw logits: the mask token's logit is finite, not suppressed.
        assert np.all(np.isfinite(got["token_logits"][..., MASK_ID]))
        np.testing.assert_allclose(got["token_logits"], want_logits, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got["unmask_logits"], want_unmask, atol=1e-5, rtol=0)


def test_score_tokens_chunks_and_no_planner(source_dir):
    """Library level: chunked scoring equals one pass; a backbone-only model gives no unmask logits."""
    params, config, _ = load_hf(str(source_dir))
    tokens = np.asarray(_tokens(), np.int32)
    whole = score_tokens(params, config, tokens)
    chunked = score_tokens(params, config, tokens, batch_size=2)
    for key in whole:
        np.testing.assert_allclose(chunked[key], whole[key], atol=1e-6, rtol=0)
    backbone, backbone_config, _ = load_hf(str(source_dir), with_planner=False)
    plain = score_tokens(backbone, backbone_config, tokens)
    assert "unmask_logits" not in plain
    np.testing.assert_allclose(plain["token_logits"], whole["token_logits"], atol=1e-6, rtol=0)
    bad = tokens.copy()
    bad[1, 2] = 64
    with pytest.raises(TokensError, match=r"row 1, position 2: token id 64 is outside the vocabulary"):
        score_tokens(params, config, bad)


@pytest.mark.parametrize("case", ["ragged", "out_of_range", "negative", "missing"])
def test_score_rejects_bad_tokens(source_dir, tmp_path, case):
    if case == "ragged":
        path, culprit = _write_json(tmp_path / "bad.json", [[1, 2, 3], [4, 5, 6], [7, 8]]), r"row 2 has length 2"
    elif case == "out_of_range":
        path, culprit = _write_json(tmp_path / "bad.json", [[1, 2, 3], [4, 64, 6]]), r"token id 64"
    elif case == "negative":
        path, culprit = _write_json(tmp_path / "bad.json", [[1, -1, 3]]), r"token id -1"
    else:
        path, culprit = str(tmp_path / "nowhere.json"), "nowhere.json"
    proc = _run("launch/score.py", f"--model={source_dir}", f"--tokens={path}", f"--out={tmp_path / 'o.npz'}",
                check=False)
    assert proc.returncode != 0
    assert culprit in proc.stderr, proc.stderr[-2000:]
    assert "bad.json" in proc.stderr or case == "missing"
    assert not (tmp_path / "o.npz").exists()


def test_read_tokens_messages(tmp_path):
    path = _write_json(tmp_path / "t.json", [[1, 2], [3, 4]])
    np.testing.assert_array_equal(read_tokens(path, vocab_size=5), [[1, 2], [3, 4]])
    with pytest.raises(TokensError, match=r"row 1, position 0: token id 3 is outside the vocabulary \[0, 3\)"):
        read_tokens(path, vocab_size=3)
    with pytest.raises(TokensError, match=r"row 0, position 1: 2.5 is not an integer"):
        read_tokens(_write_json(tmp_path / "f.json", [[1, 2.5]]))
    with pytest.raises(TokensError, match="non-empty list"):
        read_tokens(_write_json(tmp_path / "e.json", []))


def test_export_float32_round_trip_carries_config_and_tokenizer(source_dir, tmp_path):
    out = tmp_path / "exported"
    proc = _run("launch/export.py", f"--model={source_dir}", f"--out={out}", "--dtype=float32")
    assert "exported" in proc.stderr
    assert (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists()
    assert (out / "tokenizer.json").read_text() == '{"dummy": true}'
    hf = json.loads((out / "config.json").read_text())
    assert hf["foo_field"] == 1 and hf["torch_dtype"] == "float32"
    want, want_config, _ = load_hf(str(source_dir))
    got, got_config, _ = load_hf(str(out))
    assert got_config == want_config
    _assert_same_params(got, want)

    # An existing, non-empty output directory needs --overwrite.
    proc = _run("launch/export.py", f"--model={source_dir}", f"--out={out}", "--dtype=float32", check=False)
    assert proc.returncode != 0 and "overwrite" in proc.stderr
    _run("launch/export.py", f"--model={source_dir}", f"--out={out}", "--dtype=float32", "--overwrite")


def test_export_sharded_bfloat16(source_dir, tmp_path):
    out = tmp_path / "sharded"
    _run("launch/export.py", f"--model={source_dir}", f"--out={out}", "--max_shard_size=20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    assert not (out / "model.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    want, _, _ = load_hf(str(source_dir))
    got, config, _ = load_hf(str(out))
    assert config.has_planner
    # bfloat16 storage: loads back as the bfloat16 rounding of the source.
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y).astype(jax.numpy.bfloat16).astype(np.float32))


def test_export_rejects_non_hf_source(tmp_path):
    (tmp_path / "not_hf").mkdir()
    (tmp_path / "not_hf" / "something.txt").write_text("x")
    proc = _run("launch/export.py", f"--model={tmp_path / 'not_hf'}", f"--out={tmp_path / 'o'}", check=False)
    assert proc.returncode != 0
    assert f"{tmp_path / 'not_hf'} is neither an HF model directory" in proc.stderr
    proc = _run("launch/export.py", f"--model={tmp_path / 'absent'}", f"--out={tmp_path / 'o'}", check=False)
    assert proc.returncode != 0 and "absent: no such file or directory" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_forward_benchmark_json_line():
    proc = _run("benchmarks/forward.py", "--configs=tiny", "--iters=2", "--batch=2", "--length=16")
    last = proc.stdout.strip().splitlines()[-1]
    record = json.loads(last)
    assert record["benchmark"] == "forward"
    assert record["matmul"]["flops_per_s"] > 0
    (result,) = record["results"]
    assert result["config"] == "tiny" and result["batch"] == 2 and result["length"] == 16
    for key in ("params", "flops_per_forward", "best_s", "mean_s", "compile_s", "tokens_per_s", "flops_per_s",
                "fraction_of_matmul"):
        assert result[key] > 0, key
    # The analytic count for the tiny shape (see the benchmark's docstring), worked by hand:
    # per-token kernels 2*7680 (blocks) + 7680 (planner block) + 2*32*64 (AdaLN) + 32 + 32*64 (head).
    per_token = 2 * 7680 + 7680 + 2 * 32 * 64 + 32 + 32 * 64
    want = 2 * per_token * 32 + 2 * 2 * (256 * 32 + 32 * 32) + 4 * 2 * 16 ** 2 * 32 * 3
    assert result["flops_per_forward"] == want
    assert result["mfu"] is None and record["peak_flops_per_s"] is None  # no data-sheet peak for a CPU
    assert record["matmul"]["dtype"] == "float32"


def test_benchmark_shapes_and_data_sheet_peaks():
    configs = common.model_configs(288)
    assert tuple(configs) == common.MODEL_NAMES
    llada_1b = configs["llada_1b"]  # LLaDA-8B's layout (heads of 128, F = 3 D, its vocabulary and ids)
    assert (llada_1b.head_dim, llada_1b.mlp_hidden_size, llada_1b.vocab_size) == (128, 3 * 2048, 126464)
    assert (llada_1b.mask_token_id, llada_1b.rope_theta) == (126336, 500000.0)
    assert 1.2e9 < forward_flops(llada_1b, 4, 288)["params"] < 1.3e9
    # bfloat16 only, matched on JAX's device_kind strings; the narrower names win.
    assert common.peak_flops_per_s("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert common.peak_flops_per_s("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert common.peak_flops_per_s("NVIDIA H200", "bfloat16") == 989e12
    assert common.peak_flops_per_s("TPU v5 lite", "bfloat16") == 197e12
    assert common.peak_flops_per_s("TPU v5", "bfloat16") == 459e12
    assert common.peak_flops_per_s("NVIDIA H100 80GB HBM3", "float32") is None
    assert common.peak_flops_per_s("cpu", "bfloat16") is None
