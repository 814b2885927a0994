"""The demo pipeline end to end on the shipped asset (`assets/demo`): GRPO from the pretrained
tiny LLaDA with its initialised planner, then the final comparison rows (`results.json`,
`pareto.png`, the logged table); the asset itself (layout, tokenizer, accuracy); and rebuilding it
from scratch with the documented commands for a few steps.
"""

import json
import os
import subprocess
import sys

import jax
import pytest

from tests.helpers import one_device_env


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = {"low_confidence", "threshold", "factor", "planner_init", "planner_rl"}


ASSET = os.path.join(ROOT, "assets", "demo")


def _env():
    """XLA's default optimisations (not conftest's fast-compile flags): the shortened demo is no
    faster with those (27 s vs 29 s), as it executes enough on the demo-sized model."""
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def test_shortened_demo_writes_every_row(tmp_path):
    workdir = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "launch/train.py", "--config=configs/demo.py", f"--workdir={workdir}",
         "--config.total_steps=2", "--config.final_eval.generator.n=24",
         "--config.final_eval.batch_size=12", "--config.final_eval.seeds=(0,)"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
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
    # The shipped model solves the task (the README's table has the full figures).
    assert results["low_confidence"]["accuracy"] >= 50 and results["planner_init"]["accuracy"] >= 50


def test_asset_is_a_complete_hf_directory_with_the_task_tokenizer():
    from dultra_jax.data import arithmetic as A
    from dultra_jax.data.tokenizer import load_tokenizer
    from dultra_jax.interop.hf_llada import load_hf

    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert os.path.isfile(os.path.join(ASSET, name)), name
    params, model, _ = load_hf(ASSET)
    assert model.has_planner and model.vocab_size == A.vocab_size() and model.mask_token_id == A.MASK_ID
    assert "planner" in params
    tokenizer = load_tokenizer(ASSET)
    text = A.CHARS + A.make_problems("heldout", 1)[0]["solution"]
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    with open(os.path.join(ASSET, "README.md")) as f:   # says how it was made
        readme = f.read()
    for command in ("launch/pretrain.py --config=configs/demo_pretrain.py", "launch/init_planner.py"):
        assert command in readme


def test_rebuilding_the_asset_from_scratch_runs(tmp_path):
    """The asset's README commands, a few steps each: pre-training, then planner initialisation;
    the result has the asset's architecture and parameter names and shapes. Pre-training's decoding
    evaluation is left out (test_sft runs it) and planner initialisation's decodes with one rule."""
    from dultra_jax.interop.hf_llada import load_hf

    pre, planner = tmp_path / "pretrain", tmp_path / "planner"
    for args in (["launch/pretrain.py", "--config=configs/demo_pretrain.py", f"--workdir={pre}",
                  "--config.total_steps=3", "--config.data.num_examples=512", "--config.eval.num_examples=0",
                  "--config.eval.every=0"],
                 ["launch/init_planner.py", "--config=configs/planner_init.py", f"--workdir={planner}",
                  f"--config.model.path={pre / 'hf'}", "--config.total_steps=2", "--config.data.num_examples=256",
                  "--config.eval.num_examples=16", "--config.eval.rules=('planner_bernoulli',)",
                  "--config.eval.agreement_batches=1"]):
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=one_device_env(), capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
    rebuilt, rebuilt_model, _ = load_hf(str(planner / "hf"))
    shipped, shipped_model, _ = load_hf(ASSET)
    assert rebuilt_model == shipped_model
    assert jax.tree.map(lambda a: (a.shape, a.dtype), rebuilt) == jax.tree.map(lambda a: (a.shape, a.dtype), shipped)
