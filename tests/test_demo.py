"""The embedded demo: a shortened run end to end from the shipped asset."""

import json
import os
import subprocess
import sys

import pytest

from dultra_jax.interop.hf_llada import load_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = {"low_confidence", "threshold", "factor", "planner_init", "planner_rl"}


def test_asset_is_a_complete_hf_directory():
    params, config, hf = load_hf(os.path.join(ROOT, "assets", "demo"))
    assert config.has_planner and hf["architectures"] == ["LLaDOUModelLM"]
    for name in ("tokenizer.json", "tokenizer_config.json", "README.md"):
        assert os.path.isfile(os.path.join(ROOT, "assets", "demo", name)), name


def test_shortened_demo_writes_every_row(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    workdir = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "launch/train.py", "--config=configs/demo.py", f"--workdir={workdir}",
         "--config.total_steps=2", "--config.final_eval.generator.n=24", "--config.final_eval.batch_size=12",
         "--config.final_eval.seeds=(0,)"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(workdir / "results.json") as f:
        results = json.load(f)
    assert set(results) == ROWS
    for row in results.values():
        assert 0 <= row["accuracy"] <= 100 and 4 <= row["nfe"] <= 32  # at least one step per block
        assert row["tpf"] == pytest.approx(32 / row["nfe"])
        assert row["n"] == 24
    assert results["low_confidence"]["nfe"] == 32  # one token per step
    with open(workdir / "pareto.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| planner_rl | trained |" in proc.stderr
    with open(workdir / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]
