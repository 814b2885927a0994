"""The demo pipeline end to end: GRPO from an HF directory with a planner and the arithmetic
tokenizer, then the final comparison rows (`results.json`, `pareto.png`, the logged table).

The shipped asset (`assets/demo`) is not built yet; this test makes a random stand-in with the
same layout, so the whole `configs/demo.py` path runs in CI.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import arithmetic_model_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = {"low_confidence", "threshold", "factor", "planner_init", "planner_rl"}


def test_shortened_demo_writes_every_row(tmp_path):
    asset = arithmetic_model_dir(str(tmp_path / "asset"))

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    workdir = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "launch/train.py", "--config=configs/demo.py", f"--workdir={workdir}",
         f"--config.model.path={asset}", "--config.total_steps=2", "--config.final_eval.generator.n=24",
         "--config.final_eval.batch_size=12", "--config.final_eval.seeds=(0,)"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(workdir / "results.json") as f:
        results = json.load(f)
    assert set(results) == ROWS
    for row in results.values():
        assert 0 <= row["accuracy"] <= 100 and 4 <= row["nfe"] <= 32  # at least one step per block
        assert row["tpf"] == pytest.approx(32 / row["nfe"]) and row["n"] == 24
    assert results["low_confidence"]["nfe"] == 32  # one token per step
    assert results["planner_rl"]["params"] == "trained" and results["factor"]["params"] == "initial"
    with open(workdir / "pareto.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| planner_rl | trained |" in proc.stderr
    with open(workdir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2] and "reward_arithmetic_correct" in rows[0]
