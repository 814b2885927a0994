"""benchmarks/vs_torch.py, run as the user runs it: the PyTorch reference rollout decodes exactly our
tokens without a cache, and the JSON line carries every figure."""

import pytest

from tests.helpers import run_benchmark

pytest.importorskip("torch")


RULES = ("low_confidence", "threshold", "factor", "planner_topk")
# One PyTorch thread: on a busy 2-core host, OpenMP barriers make a 2-thread tiny model crawl.
# Cache `none` only: every (rule, cache) pair is one more rollout compile (~5 s here), and the
# cached modes are approximate, so only `none` has an agreement to assert.
ARGS = ("--model=tiny", f"--rules={','.join(RULES)}", "--caches=none", "--iters=1", "--batch=2",
        "--prompt_length=4", "--gen_length=8", "--block_length=4", "--torch_threads=1")
FIGURES = ("best_s", "mean_s", "s_per_nfe", "tokens_per_s", "forwards", "sum_nfe", "mean_nfe", "generated_tokens")


@pytest.fixture(scope="module")
def record():
    return run_benchmark("vs_torch.py", *ARGS, table_marker="agreement")[1]


def test_settings_and_cache_modes(record):
    assert record["benchmark"] == "vs_torch"
    assert record["backend"] == "cpu" and record["device_count"] == 1
    assert record["torch_threads"] == 1 and record["params"] > 0
    settings = record["settings"]
    assert settings["model"] == "tiny" and settings["rules"] == list(RULES)
    shape = (settings["batch"], settings["prompt_length"], settings["gen_length"], settings["block_length"])
    assert shape == (2, 4, 8, 4)
    assert settings["caches"] == settings["caches_run"] == ["none"]
    assert [(r["rule"], r["cache"]) for r in record["results"]] == [(rule, "none") for rule in RULES]
    assert record["matmul_flops_per_s"]["jax"] > 0 and record["matmul_flops_per_s"]["torch"] > 0


def test_identical_tokens_without_cache(record):
    for r in record["results"]:
        if r["cache"] != "none":
            continue
        assert r["agreement"] == 1.0, r["rule"]
        assert r["rows_identical"] and r["rows_agreeing"] == 2, r["rule"]
        assert r["same_nfe"] and r["same_unmask_step"], r["rule"]  # the same reveal at the same step


def test_timing_figures_are_positive_and_consistent(record):
    for r in record["results"]:
        assert 0.0 <= r["agreement"] <= 1.0
        assert r["compiles_during_timing"] == 0  # the warm-up compiled everything the timed calls run
        for side in ("torch", "ours"):
            f = r[side]
            for key in FIGURES:
                assert f[key] > 0, (r["rule"], r["cache"], side, key)
            assert f["iters"] == 1
            assert f["generated_tokens"] == 2 * 8  # every position revealed within the budget
            assert f["s_per_nfe"] == pytest.approx(f["best_s"] / f["forwards"])
            assert f["tokens_per_s"] == pytest.approx(f["generated_tokens"] / f["best_s"])
            assert 8 // 4 <= f["mean_nfe"] <= f["forwards"] <= 8  # one step per block at least, one per token at most
        assert r["ours"]["compile_s"] > 0
        assert r["speedup"] == pytest.approx(r["torch"]["best_s"] / r["ours"]["best_s"])
        assert r["speedup_per_nfe"] == pytest.approx(r["torch"]["s_per_nfe"] / r["ours"]["s_per_nfe"])
    assert sorted(record["targets"]) == sorted(f"{rule}/none" for rule in RULES)
    for target in record["targets"].values():
        assert target["min_speedup"] == 1.5 and target["identical_tokens"] and isinstance(target["met"], bool)
