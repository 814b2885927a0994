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

from configs import demo
from dultra_jax.config import RANDOM_RULES
from tests.helpers import one_device_env


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = {"low_confidence", "threshold", "factor", "planner_init", "planner_rl"}
SWEEPS = {"factor", "threshold", "steps_per_block", "planner_rl", "factor_rl_backbone", "threshold_rl_backbone"}
BLOCKS = demo.get_config().decode.gen_length // demo.get_config().decode.block_length


ASSET = os.path.join(ROOT, "assets", "demo")


def _env(devices: int = 1):
    """XLA's default optimisations (not conftest's fast-compile flags): the shortened demo is no
    faster with those (27 s vs 29 s), as it executes enough on the demo-sized model; `devices`
    CPU devices (8: what a TPU v2-8 or v3-8 in Colab exposes)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return env


def _shortened_demo(workdir, devices: int) -> subprocess.CompletedProcess:
    # 25 problems in batches of 12: the batch grows to a multiple of the devices, the last is padded.
    return subprocess.run(
        [sys.executable, "launch/train.py", "--config=configs/demo.py", f"--workdir={workdir}",
         "--config.total_steps=2", "--config.final_eval.generator.n=25",
         "--config.final_eval.batch_size=12", "--config.final_eval.seeds=(0,)"],
        cwd=ROOT, env=_env(devices), capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """The shortened demo on 1 and on 8 devices: `{devices: (workdir, finished process)}`."""
    runs = {}
    for devices in (1, 8):
        workdir = tmp_path_factory.mktemp(f"demo{devices}") / "demo"
        runs[devices] = (workdir, _shortened_demo(workdir, devices))
    return runs


@pytest.mark.parametrize("devices", [1, 8])
def test_shortened_demo_writes_every_row_and_sweep(demo_runs, devices):
    workdir, proc = demo_runs[devices]
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(workdir / "results.json") as f:
        results = json.load(f)
    assert set(results) == ROWS | {"sweeps"} and set(results["sweeps"]) == SWEEPS
    config = demo.get_config()
    for name, sweep in results["sweeps"].items():
        spec = config.final_eval.sweeps[name]
        assert [r["sweep_value"] for r in sweep] == list(spec["values"])
        assert all(r["rule"] == spec["rule"] and r["params"] == spec["params"] for r in sweep)
    every = [*(results[name] for name in ROWS), *(r for sweep in results["sweeps"].values() for r in sweep)]
    for row in every:
        assert 0 <= row["accuracy"] <= 100 and BLOCKS <= row["nfe"] <= 32  # at least one step per block
        assert row["tpf"] == pytest.approx(32 / row["nfe"]) and row["n"] == 25 and row["seeds"] == 1
    assert results["low_confidence"]["nfe"] == 32  # one token per step
    assert results["sweeps"]["steps_per_block"][0]["nfe"] == BLOCKS
    assert results["planner_rl"]["params"] == "trained" and results["factor"]["params"] == "initial"
    # A setting shared by a row and a sweep is decoded once: the same figures in both places.
    assert results["sweeps"]["factor"][1] == {**results["factor"], "sweep_value": 1.0}
    assert results["sweeps"]["planner_rl"][1] == results["planner_rl"]
    with open(workdir / "pareto.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| planner_rl | trained | planner_bernoulli factor=1 |" in proc.stderr
    assert "| sweep factor_rl_backbone | trained | factor factor=4 |" in proc.stderr
    with open(workdir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2] and "reward_fill_correct" in rows[0]
    # The shipped model solves the task one token per step and fails it in one step per block (the
    # README's table has the full figures).
    assert results["low_confidence"]["accuracy"] >= 80 >= 20 >= results["sweeps"]["steps_per_block"][0]["accuracy"]


def test_demo_on_8_devices_matches_one_device(demo_runs):
    """Sharding the evaluation batch over 8 devices changes no decision: every greedy setting of a
    deterministic rule on the initial parameters has the same accuracy and NFE. (Not compared: the
    sampled planner, whose draws follow the batch, 12 rows on one device and 16 on eight; and the
    trained parameters, two GRPO updates whose gradients are reduced in another order.)"""
    (one, _), (eight, _) = demo_runs[1], demo_runs[8]
    with open(one / "results.json") as f, open(eight / "results.json") as g:
        a, b = json.load(f), json.load(g)
    pairs = [(a[n], b[n]) for n in ROWS] + [(x, y) for n in SWEEPS for x, y in zip(a["sweeps"][n], b["sweeps"][n])]
    initial = [(x, y) for x, y in pairs if x["params"] == "initial" and x["rule"] not in RANDOM_RULES]
    assert len(initial) == 3 + 5 + 6 + 1  # rows, threshold and factor sweeps, one step per block
    for x, y in initial:
        assert (x["accuracy"], x["nfe"]) == (y["accuracy"], y["nfe"]), (x, y)


def test_sweep_rows_agree_with_the_evaluate_launcher(demo_runs, tmp_path):
    """`launch/evaluate.py` on the shortened demo's checkpoint with the same records and seed gives
    the `factor_rl_backbone` sweep's figures."""
    from dultra_jax.data import fill

    workdir, proc = demo_runs[1]
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = fill.write_jsonl(str(tmp_path / "heldout.jsonl"), "heldout", 25)
    out = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, "launch/evaluate.py", f"--model={workdir}", "--task=fill", f"--data={records}",
         "--rules=factor", "--factors=0.5,1,1.5,2,3,4", "--seeds=0", "--gen_length=32",
         f"--block_length={32 // BLOCKS}",
         "--prompt_length=32", "--batch_size=12", f"--out={out}", "--noprogress"],
        cwd=ROOT, env=one_device_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / "summary.json") as f:
        rows = json.load(f)["rows"]
    with open(workdir / "results.json") as f:
        sweep = json.load(f)["sweeps"]["factor_rl_backbone"]
    assert [r["sweep_value"] for r in rows] == [r["sweep_value"] for r in sweep]
    for mine, theirs in zip(rows, sweep):
        assert (mine["accuracy"], mine["nfe"], mine["n"]) == (theirs["accuracy"], theirs["nfe"], theirs["n"])


def test_asset_is_a_complete_hf_directory_with_the_task_tokenizer():
    from dultra_jax.data import fill as A
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
