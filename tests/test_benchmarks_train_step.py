"""benchmarks/train_step.py, run as the user runs it: its JSON line, and flat peak memory in T."""

import json

import numpy as np
import pytest

from benchmarks import common
from dultra_jax.models.flops import forward_flops
from tests.helpers import run_benchmark


ARGS = ("--model=tiny", "--steps=4,2", "--batch=2", "--iters=1", "--prompt_length=4", "--gen_length=8",
        "--block_length=4")
TIMING_KEYS = ("compile_s", "best_s", "mean_s", "median_s", "per_step_s")
MEMORY_KEYS = ("argument_bytes", "output_bytes", "temp_bytes", "peak_bytes")


@pytest.fixture(scope="module")
def run():
    return run_benchmark("train_step.py", *ARGS)[0]


@pytest.fixture(scope="module")
def record(run):
    return json.loads(run.strip().splitlines()[-1])


def test_prints_table_and_verdict(run):
    lines = run.strip().splitlines()
    assert any("peak MiB" in line for line in lines[:-1])  # the table came before the JSON line
    assert any("peak memory T=4 / T=2" in line and "within the 1.2x target" in line for line in lines[:-1])


def test_json_line_has_every_figure(record):
    assert record["benchmark"] == "train_step"
    assert record["backend"] == "cpu" and record["device_count"] == 1
    assert record["settings"] == {"model": "tiny", "steps": [2, 4], "batch": 2, "iters": 1, "remat": False,
                                  "prompt_length": 4, "gen_length": 8, "block_length": 4, "seed": 0,
                                  "dtype": "float32"}
    assert record["params"] > 0 and record["model_shape"]["d_model"] == 32
    assert [r["steps"] for r in record["results"]] == [2, 4]  # ascending, whatever the flag's order
    for result in record["results"]:
        assert result["iters"] == 1
        for key in TIMING_KEYS + MEMORY_KEYS:
            assert result[key] > 0, (result["steps"], key)
        assert result["per_step_s"] == pytest.approx(result["best_s"] / result["steps"])
        assert result["revealed_per_step"] == 8 / result["steps"]
        # A forward and its backward per replayed step: 3 forwards of the [2, 12] canvas, T times.
        forward = forward_flops(common.model_configs(12)["tiny"], 2, 12)["flops"]
        assert result["flops_per_update"] == 3 * forward * result["steps"]
        assert result["flops_per_s"] == pytest.approx(result["flops_per_update"] / result["best_s"])
        assert result["mfu"] is None and record["peak_flops_per_s"] is None  # no data-sheet peak for a CPU
        assert result["peak_bytes"] == (result["argument_bytes"] + result["output_bytes"] - result["alias_bytes"]
                                        + result["temp_bytes"])
        assert result["alias_bytes"] > 0  # the state is donated: the new state reuses its buffers
        assert result["device_peak_bytes"] is None  # the CPU backend keeps no allocator high-water mark
        metrics = result["metrics"]
        assert metrics["skipped"] is False and np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
        # step_logps were replayed with the parameters of the reported (first) update.
        assert metrics["logp_gap"] < 1e-4


def test_peak_memory_is_flat_in_steps(record):
    low, high = record["results"]
    assert record["peak_ratio"] == pytest.approx(high["peak_bytes"] / low["peak_bytes"])
    assert record["peak_ratio_target"] == 1.2
    assert record["peak_ratio"] <= 1.2 and record["within_target"] is True
    assert high["temp_bytes"] == low["temp_bytes"]  # only the [B, T] step_logps argument grows with T
    assert record["device_peak_ratio"] is None


def test_unmask_schedule():
    from benchmarks import train_step  # defines the script's absl flags in this process

    for steps, gen_length, block_length in ((2, 8, 4), (4, 8, 4), (8, 8, 4), (3, 8, 4), (8, 128, 32),
                                            (32, 128, 32), (128, 128, 32), (5, 12, 4)):
        schedule = train_step.unmask_schedule(steps, gen_length, block_length)
        assert schedule.shape == (gen_length,)
        counts = np.bincount(schedule, minlength=steps)
        assert counts.shape == (steps,) and np.all(counts >= 1)  # every step reveals, none is past T
        blocks = schedule.reshape(-1, block_length)
        assert np.all(blocks[1:].min(axis=1) > blocks[:-1].max(axis=1))  # blocks decoded left to right
    with pytest.raises(ValueError):
        train_step.unmask_schedule(1, 8, 4)  # fewer steps than blocks
    with pytest.raises(ValueError):
        train_step.unmask_schedule(9, 8, 4)  # more steps than tokens
