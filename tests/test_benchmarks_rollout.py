"""benchmarks/rollout.py, run as the user runs it: its JSON line and the consistency of its figures."""


import pytest

from tests.helpers import run_benchmark


ARGS = ("--models=tiny", "--rules=planner_bernoulli,threshold", "--iters=1", "--batch=2", "--prompt_length=4",
        "--gen_length=8", "--block_length=4", "--caches=none,dual")
TIMING_KEYS = ("compile_s", "best_s", "mean_s", "median_s")
RATE_KEYS = ("tokens_per_s", "nfe_per_s", "loop_iters_per_s", "mean_nfe", "tokens_per_forward", "sum_nfe",
             "loop_iters", "generated_tokens")


@pytest.fixture(scope="module")
def record():
    return run_benchmark("rollout.py", *ARGS, table_marker="speedup")[1]


def test_json_line_has_every_figure(record):
    assert record["benchmark"] == "rollout"
    assert record["backend"] == "cpu" and record["device_count"] == 1
    assert record["settings"] == {"models": ["tiny"], "rules": ["planner_bernoulli", "threshold"],
                                  "caches": ["none", "dual"], "ways": ["while_loop", "python_loop"], "batch": 2,
                                  "prompt_length": 4, "gen_length": 8, "block_length": 4, "temperature": 0.0,
                                  "iters": 1, "seed": 0, "dtype": "float32", "param_dtype": "float32"}
    assert record["params"]["tiny"] > 0
    assert [(r["model"], r["rule"], r["cache"]) for r in record["results"]] == [
        ("tiny", "planner_bernoulli", "none"), ("tiny", "planner_bernoulli", "dual"),
        ("tiny", "threshold", "none"), ("tiny", "threshold", "dual")]
    for result in record["results"]:
        assert (result["batch"], result["prompt_length"], result["gen_length"], result["block_length"]) == (2, 4, 8, 4)
        assert result["compiles_during_timing"] == 0  # the warm-up compiled everything the timed calls run
        assert result["speedup"] > 0 and result["speedup_mean"] > 0
        assert result["same_nfe"] is True  # both ways decode the same trajectory
        for mode in ("while_loop", "python_loop"):
            figures = result[mode]
            assert figures["iters"] == 1
            for key in TIMING_KEYS + RATE_KEYS:
                assert figures[key] > 0, (result["rule"], mode, key)
        assert result["speedup"] == pytest.approx(result["python_loop"]["best_s"] / result["while_loop"]["best_s"])
        if result["cache"] == "none":
            assert "token_agreement_vs_none" not in result
        else:
            assert 0 <= result["token_agreement_vs_none"] <= 1 and result["per_nfe_speedup_vs_none"] > 0
            none = next(r for r in record["results"] if r["rule"] == result["rule"] and r["cache"] == "none")
            assert result["batch_speedup_vs_none"] == pytest.approx(none["while_loop"]["best_s"]
                                                                    / result["while_loop"]["best_s"])
            assert 0 <= result["rows_identical_vs_none"] <= result["batch"]


def test_nfe_figures_are_consistent(record):
    for result in record["results"]:
        batch, gen_length = result["batch"], result["gen_length"]
        for mode in ("while_loop", "python_loop"):
            f = result[mode]
            assert f["generated_tokens"] == batch * gen_length  # every position revealed within the budget
            assert f["tokens_per_forward"] * f["mean_nfe"] == pytest.approx(gen_length, rel=1e-9)
            assert f["mean_nfe"] == pytest.approx(f["sum_nfe"] / batch)
            # A row takes at least one step per block and at most one per token; the loop runs as
            # long as its slowest row.
            assert gen_length // result["block_length"] <= f["mean_nfe"] <= f["loop_iters"] <= gen_length
            assert f["tokens_per_s"] == pytest.approx(f["generated_tokens"] / f["best_s"])
            assert f["nfe_per_s"] == pytest.approx(f["sum_nfe"] / f["best_s"])
            assert f["loop_iters_per_s"] == pytest.approx(f["loop_iters"] / f["best_s"])
            assert f["s_per_loop_iter"] == pytest.approx(f["best_s"] / f["loop_iters"])
    # With random-init weights no token clears the 0.9 threshold, so `threshold` reveals one per step.
    threshold = next(r for r in record["results"] if r["rule"] == "threshold" and r["cache"] == "none")
    assert threshold["while_loop"]["mean_nfe"] == 8 and threshold["while_loop"]["tokens_per_forward"] == 1
