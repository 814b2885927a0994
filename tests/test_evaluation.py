"""dultra_jax/evaluation.py and launch/evaluate.py: metrics on hand-made trajectories, one compile per
setting, and the launcher end to end on a tiny random model with a character-level chat tokenizer."""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from dultra_jax import evaluation as ev
from dultra_jax.training.restore import load_model_source
from dultra_jax.config import ConfigError, ModelConfig, PlannerConfig
from dultra_jax.decoding import rollout as rollout_lib
from dultra_jax.decoding.rollout import Trajectory
from tests.fixtures.data_helpers import EOS_ID, EOT_ID, SPECIAL_TOKENS, write_chat_tokenizer
from tests.helpers import one_device_env, random_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# GSM8K-format records (question / answer ending in '#### n'), short so prompts stay small.
GSM8K_RECORDS = [
    {"question": "What is 2+2?", "answer": "2+2=<<2+2=4>>4\n#### 4"},
    {"question": "Tom has 3 apples and eats 1. How many are left?", "answer": "3-1=<<3-1=2>>2\n#### 2"},
    {"question": "A box holds 1,000 pens. How many pens are in 2 boxes?", "answer": "2*1000=2000\n#### 2,000"},
]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(REPO, "launch/evaluate.py"), *args], cwd=REPO,
                          env=one_device_env(),
                          capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------------------- metrics


def _trajectory(tokens, num_steps) -> Trajectory:
    tokens = np.asarray(tokens, np.int32)
    b = tokens.shape[0]
    return Trajectory(tokens=tokens, unmask_step=np.zeros_like(tokens), num_steps=np.asarray(num_steps, np.int32),
                      step_logps=np.zeros((b, 1), np.float32), prompt_tokens=np.zeros((b, 2), np.int32),
                      prompt_valid=np.ones((b, 2), bool))


def test_row_metrics_counts_tokens_before_the_first_stop_id():
    traj = _trajectory([[7, 8, 0, 9, 0, 0],     # EOS at 2
                        [4, 0, 0, 0, 0, 0],     # end of turn first: 0 tokens
                        [7, 8, 9, 10, 11, 12],  # no stop id: all 6
                        [7, 8, 9, 4, 0, 0]],    # padding row
                       num_steps=[3, 2, 6, 5])
    got = ev.row_metrics(traj, stop_ids=(0, 4), row_valid=[True, True, True, False])
    np.testing.assert_array_equal(got["non_eos"], [2, 0, 6])
    np.testing.assert_array_equal(got["nfe"], [3, 2, 6])
    np.testing.assert_array_equal(got["generated"], [6, 6, 6])
    np.testing.assert_array_equal(ev.first_stop_lengths([[1, 2, 3]], ()), [3])


def test_summarize_setting_tpf_and_tokens_per_second():
    setting = ev.Setting("threshold", "threshold", 0.9)
    nfe = np.array([[3, 2, 6], [4, 2, 6]])
    non_eos = np.array([[2, 0, 6], [3, 0, 6]])
    correct = np.array([[True, False, True], [True, False, False]])
    row = ev.summarize_setting(setting, correct, nfe, non_eos, gen_length=6, wall_s=2.0, warmup_s=5.0)
    assert row["nfe"] == pytest.approx(23 / 6)
    assert row["tpf"] == pytest.approx(36 / 23)          # 6 seeds x records x 6 tokens / 23 NFE
    assert row["tpf_non_eos"] == pytest.approx(17 / 23)
    assert row["tokens_per_s"] == pytest.approx(18.0)
    assert row["non_eos_tokens_per_s"] == pytest.approx(8.5)
    assert (row["n"], row["seeds"], row["rule"], row["sweep_value"]) == (3, 2, "threshold", 0.9)
    assert row["accuracy"] == pytest.approx(50.0)
    assert set(ev.SUMMARY_COLUMNS) <= set(row)


def test_accuracy_standard_error_is_over_records_of_seed_averaged_correctness():
    correct = np.array([[1, 0, 1, 1], [1, 1, 0, 1]], bool)   # 2 seeds x 4 records
    stats = ev.accuracy_stats(correct)
    per_record = np.array([1.0, 0.5, 0.5, 1.0])
    want_se = 100 * math.sqrt(np.sum((per_record - 0.75) ** 2) / 3) / math.sqrt(4)
    assert stats["accuracy"] == pytest.approx(75.0)
    assert stats["accuracy_stderr"] == pytest.approx(want_se)
    assert stats["accuracy_per_seed"] == [75.0, 75.0]
    assert stats["accuracy_seed_std"] == pytest.approx(0.0)
    # One seed of 0/1 outcomes: the familiar sqrt(p (1 - p) / (n - 1)).
    one = ev.accuracy_stats(np.array([[1, 1, 1, 0, 0]], bool))
    assert one["accuracy_stderr"] == pytest.approx(100 * math.sqrt(0.6 * 0.4 / 4))
    assert one["accuracy_seed_std"] is None
    assert ev.accuracy_stats(np.array([[1], [0]], bool))["accuracy_stderr"] is None


def test_pareto_front():
    nfe = [10, 20, 15, 30, 10, 40]
    acc = [50, 70, 40, 70, 50, 80]
    np.testing.assert_array_equal(ev.pareto_front(nfe, acc), [True, True, False, False, True, True])


def test_sweep_settings_defaults_and_errors():
    settings = ev.sweep_settings({"planner_bernoulli": None, "threshold": [0.8, 0.9], "low_confidence": None,
                                  "ass": None})
    assert [s.value for s in settings[:5]] == list(ev.DEFAULT_FACTORS)
    assert {s.key for s in settings[:5]} == {"factor"}
    assert settings[5:7] == [ev.Setting("threshold", "threshold", 0.8), ev.Setting("threshold", "threshold", 0.9)]
    assert settings[7] == ev.Setting("low_confidence", "steps", None)
    assert settings[8] == ev.Setting("ass", None, None)
    assert ev.sweep_settings(["factor"]) == [ev.Setting("factor", "factor", None)]
    with pytest.raises(ConfigError, match="unknown rule 'bogus'"):
        ev.sweep_settings({"bogus": None})
    with pytest.raises(ConfigError, match="no sweep knob"):
        ev.sweep_settings({"ass": [1.0]})
    with pytest.raises(ConfigError, match="twice"):
        ev.sweep_settings([("factor", [1.0]), ("factor", [1.0])])


# -------------------------------------------------------------------------------- launcher


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random LLaDA + planner in HF layout with the character-level chat tokenizer beside it."""
    from dultra_jax.interop.hf_llada import export_hf

    directory = tmp_path_factory.mktemp("eval") / "model"
    vocab = len(SPECIAL_TOKENS) + 98   # the specials + printable ASCII without \x0b \x0c
    config = ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=48,
                         rope_theta=10000.0, max_sequence_length=128,
                         mask_token_id=SPECIAL_TOKENS.index("<|mdm_mask|>"), eos_token_id=EOS_ID,
                         pad_token_id=EOS_ID, eot_token_id=EOT_ID, planner=PlannerConfig())
    export_hf(random_params(config), config, str(directory), dtype="float32")
    write_chat_tokenizer(str(directory))
    tokenizer = json.loads((directory / "tokenizer.json").read_text())
    assert len(tokenizer["model"]["vocab"]) == vocab <= 128
    return directory


@pytest.fixture(scope="module")
def gsm8k_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GSM8K_RECORDS))
    return path


def _typed(value: str, like):
    if like is None:
        return value or None
    return type(like)(value) if not isinstance(like, float) else float(value)


def test_launcher_writes_samples_summary_and_pareto_plot(model_dir, gsm8k_file, tmp_path):
    out = tmp_path / "eval"
    proc = _run(f"--model={model_dir}", "--task=gsm8k", f"--data={gsm8k_file}", "--rules=planner_bernoulli,threshold",
                "--factors=1.0,1.5", "--thresholds=0.9", "--seeds=42,123", "--gen_length=16", "--block_length=8",
                "--prompt_length=48", "--batch_size=2", "--dtype=float32", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "batch/s" in proc.stderr or "s/batch" in proc.stderr   # the tqdm progress bar
    assert "planner_bernoulli" in proc.stdout and "threshold=0.9" in proc.stdout

    assert sorted(os.listdir(out)) == ["pareto.png", "samples.jsonl", "summary.csv", "summary.json"]
    png = (out / "pareto.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    settings = [("planner_bernoulli", 1.0), ("planner_bernoulli", 1.5), ("threshold", 0.9)]
    assert len(samples) == len(GSM8K_RECORDS) * len(settings) * 2
    for s in samples:
        assert set(ev.SAMPLE_FIELDS) <= set(s)
        assert isinstance(s["correct"], bool) and isinstance(s["completion"], str)
        assert 1 <= s["nfe"] <= 16 and 0 <= s["non_eos_tokens"] <= 16
        assert s["prompt"].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert {(s["rule"], s["sweep_value"], s["seed"], s["index"]) for s in samples} == {
        (rule, value, seed, i) for rule, value in settings for seed in (42, 123) for i in range(3)}
    assert {s["index"]: s["reference"] for s in samples} == {0: "4", 1: "2", 2: "2000"}
    assert {s["sweep_key"] for s in samples} == {"factor", "threshold"}

    summary = json.loads((out / "summary.json").read_text())
    assert (summary["task"], summary["num_records"], summary["seeds"]) == ("gsm8k", 3, [42, 123])
    rows = summary["rows"]
    assert [(r["rule"], r["sweep_value"]) for r in rows] == settings
    with open(out / "summary.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    for row, csv_row in zip(rows, csv_rows):
        assert list(csv_row) == list(ev.SUMMARY_COLUMNS)
        for key in ev.SUMMARY_COLUMNS:
            got = _typed(csv_row[key], row[key])
            assert got == (pytest.approx(row[key]) if isinstance(row[key], float) else row[key]), key
        mine = [s for s in samples if (s["rule"], s["sweep_value"]) == (row["rule"], row["sweep_value"])]
        assert (row["n"], row["seeds"]) == (3, 2)
        assert row["nfe"] == pytest.approx(np.mean([s["nfe"] for s in mine]))
        assert row["tpf"] == pytest.approx(16 * len(mine) / sum(s["nfe"] for s in mine))
        assert row["accuracy"] == pytest.approx(100 * np.mean([s["correct"] for s in mine]))
        assert row["tokens_per_s"] > 0 and row["wall_s"] > 0


# ------------------------------------------------------------------------- library, in process


def test_a_knob_sweep_compiles_and_warms_up_once(model_dir, tmp_path):
    """The planner factor and the scheduled rules' steps are traced knobs: three sweep values of
    each rule, one trace and one warm-up per rule; each value still decodes as its own setting (a
    larger factor takes fewer steps; `steps` is the NFE)."""
    from dultra_jax.data.tasks import get_task

    params, model, _ = load_model_source(str(model_dir))
    records = [{"prompt_ids": [13, 14, 15], "answer": "13 14 15"}, {"prompt_ids": [10, 11], "answer": "12"}]
    before = rollout_lib.TRACE_COUNT["rollout_loop"]
    summary = ev.evaluate(params, model, None, records, get_task("exact"),
                          rules_and_sweeps={"planner_topk": [0.5, 1.0, 4.0], "low_confidence": [2, 4, 8]},
                          seeds=[1], gen_length=8, block_length=8, prompt_length=8, batch_size=2,
                          out_dir=str(tmp_path), progress=False)
    assert rollout_lib.TRACE_COUNT["rollout_loop"] - before == 2
    rows = {rule: [r for r in summary["rows"] if r["rule"] == rule] for rule in ("planner_topk", "low_confidence")}
    assert [r["sweep_value"] for r in rows["planner_topk"]] == [0.5, 1.0, 4.0]
    assert [r["sweep_value"] for r in rows["low_confidence"]] == [2, 4, 8]
    for rule_rows in rows.values():
        assert rule_rows[0]["warmup_s"] > 0 and rule_rows[1]["warmup_s"] == rule_rows[2]["warmup_s"] == 0.0
    assert rows["planner_topk"][2]["nfe"] < rows["planner_topk"][0]["nfe"]
    assert [r["nfe"] for r in rows["low_confidence"]] == [2.0, 4.0, 8.0]


def test_evaluate_compiles_once_per_setting_and_writes_outputs(model_dir, tmp_path):
    """The exact task on token-id prompts (no tokenizer): two seeds x two batches (the last padded)
    reuse one compiled rollout; samples and summary agree."""
    from dultra_jax.data.tasks import get_task

    params, model, source_dir = load_model_source(str(model_dir))
    assert source_dir == str(model_dir) and model.has_planner
    records = [{"prompt_ids": [13, 14, 15], "answer": "13 14 15"}, {"prompt_ids": [10, 11], "answer": "12"},
               {"prompt_ids": [20, 21, 22, 23], "answer": "24 25"}]
    before = rollout_lib.TRACE_COUNT["rollout_loop"]
    summary = ev.evaluate(params, model, None, records, get_task("exact"), rules_and_sweeps={"threshold": None},
                          seeds=[1, 2], gen_length=8, block_length=4, prompt_length=8, batch_size=2,
                          out_dir=str(tmp_path), progress=False)
    assert rollout_lib.TRACE_COUNT["rollout_loop"] - before == 1
    [row] = summary["rows"]
    assert (row["rule"], row["sweep_key"], row["sweep_value"], row["n"], row["seeds"]) == (
        "threshold", "threshold", 0.9, 3, 2)
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and sorted((s["seed"], s["index"]) for s in samples) == [
        (seed, i) for seed in (1, 2) for i in range(3)]
    assert [s["reference"] for s in samples[:3]] == ["13 14 15", "12", "24 25"]
    assert row["nfe"] == pytest.approx(np.mean([s["nfe"] for s in samples]))
    assert row["accuracy"] == pytest.approx(100 * np.mean([s["correct"] for s in samples]))
    assert row["tpf_non_eos"] == pytest.approx(sum(s["non_eos_tokens"] for s in samples)
                                               / sum(s["nfe"] for s in samples))
    assert set(summary["files"]) == {"samples", "summary_json", "summary_csv", "pareto_png"}


def test_a_deterministic_setting_decodes_one_seed_for_all(model_dir, tmp_path, monkeypatch):
    """Greedy `threshold` ignores the key: three seeds cost one decoded seed (warm-up + 2 batches
    instead of warm-up + 6), and give exactly what decoding each seed on its own gives; the
    sampled planner still decodes every seed."""
    from dultra_jax.data.tasks import get_task

    params, model, _ = load_model_source(str(model_dir))
    records = [{"prompt_ids": [13, 14, 15], "answer": "13 14 15"}, {"prompt_ids": [10, 11], "answer": "12"},
               {"prompt_ids": [20, 21, 22, 23], "answer": "24 25"}]
    calls = []
    real = ev.rollout
    monkeypatch.setattr(ev, "rollout", lambda *a, **k: calls.append(a[4].rule) or real(*a, **k))
    run = lambda rules, seeds, out: ev.evaluate(  # noqa: E731
        params, model, None, records, get_task("exact"), rules_and_sweeps=rules, seeds=seeds, gen_length=8,
        block_length=4, prompt_length=8, batch_size=2, out_dir=str(tmp_path / out), progress=False)
    together = run({"threshold": [0.5], "planner_bernoulli": [1.0]}, [1, 2, 3], "together")
    assert calls.count("threshold") == 1 + 2 and calls.count("planner_bernoulli") == 1 + 6
    for i, seed in enumerate((1, 2, 3)):
        [alone, _] = run({"threshold": [0.5], "planner_bernoulli": [1.0]}, [seed], f"alone{seed}")["rows"]
        assert together["rows"][0]["accuracy_per_seed"][i] == alone["accuracy"]
    threshold = together["rows"][0]
    assert threshold["seeds"] == 3 and threshold["accuracy_seed_std"] == 0.0
    samples = [json.loads(line) for line in (tmp_path / "together" / "samples.jsonl").read_text().splitlines()]
    by_seed = {seed: [(s["index"], s["completion"], s["nfe"]) for s in samples
                      if s["rule"] == "threshold" and s["seed"] == seed] for seed in (1, 2, 3)}
    assert len(by_seed[1]) == 3 and by_seed[1] == by_seed[2] == by_seed[3]


@pytest.mark.parametrize("flag, message", [
    ("--rules=planner_bernoulli,bogus", "--rules: unknown rule(s) 'bogus'"),
    ("--data={missing}", "--data={missing}: no such file"),
    ("--model={missing}", "--model: {missing}: no such file"),
    ("--task_option=bogus=1", "--task / --task_option: task 'gsm8k': unknown option(s) ['bogus']"),
    ("--task_option=split", "--task_option=split: expected KEY=VALUE"),
])
def test_launcher_errors_name_the_flag(model_dir, gsm8k_file, tmp_path, flag, message):
    missing = str(tmp_path / "missing")
    args = {"--model": f"--model={model_dir}", "--data": f"--data={gsm8k_file}", "--rules": "--rules=threshold"}
    args[flag.split("=")[0]] = flag.format(missing=missing)
    proc = _run(*args.values(), f"--out={tmp_path / 'out'}")
    assert proc.returncode != 0
    assert message.format(missing=missing) in proc.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ speed at batch 1, scoring


def test_effective_tokens_and_per_sample_speed_by_hand():
    tokens = [[7, 63, 8, 0, 9], [5, 5, 5, 5, 5], [0, 7, 7, 7, 7]]   # 63: mask, 0: EOS
    np.testing.assert_array_equal(ev.effective_lengths(tokens, stop_ids=(0,), special_ids=(0, 63)), [2, 5, 0])
    speed = ev.sample_speed(nfe=[2, 4, 2], generated=[5, 5, 5], effective=[2, 5, 0], seconds=[0.5, 1.0, 0.5])
    assert speed == {"sample_tokens_per_s": 15 / 2.0, "sample_effective_tokens_per_s": 7 / 2.0,
                     "sample_tpf": 15 / 8, "sample_tpf_effective": 7 / 8, "sample_s": 2.0 / 3, "sample_n": 3}


def test_official_and_strict_scoring_of_completions():
    from dultra_jax.data.tasks import get_task

    task = get_task("gsm8k")
    completions = ["So the total is 2000 pens.", "#### 2000\nthat is 3 boxes", "\\boxed{2,000 pens}"]
    examples = [{"answer": "2,000"}] * 3
    official = ev.score_completions(task, completions, examples, [1, 1, 1], scoring="official")
    strict = ev.score_completions(task, completions, examples, [1, 1, 1], scoring="strict")
    np.testing.assert_array_equal(official, [True, False, True])
    np.testing.assert_array_equal(strict, [False, True, True])
    assert [(x.value, x.rule) for x in ev.extract_answers(task, completions, examples, "official")] == [
        (2000.0, "last_number"), (3.0, "last_number"), (2000.0, "boxed")]
    assert ev.resolve_scoring(task, None) == "official" and ev.resolve_scoring(get_task("exact"), None) == "strict"
    with pytest.raises(ConfigError, match="scoring='official' covers the tasks"):
        ev.resolve_scoring(get_task("exact"), "official")


EXACT_RECORDS = [{"prompt_ids": [13, 14, 15], "answer": "13 14 15"}, {"prompt_ids": [10, 11], "answer": "12"},
                 {"prompt_ids": [20, 21, 22, 23], "answer": "24 25"}]


def test_batch_one_timing_next_to_the_batched_throughput(model_dir, tmp_path):
    """`speed_records` decodes the first records one at a time: the rows decode as in the batch
    (same NFE), so the per-sample TPF is the batched rows' own; batch size 1 times the evaluation
    itself; without either, the per-sample columns are empty."""
    from dultra_jax.data.tasks import get_task

    params, model, _ = load_model_source(str(model_dir))
    run = lambda out, **kw: ev.evaluate(  # noqa: E731
        params, model, None, EXACT_RECORDS, get_task("exact"), rules_and_sweeps={"threshold": [0.5]}, seeds=[1],
        gen_length=8, block_length=4, prompt_length=8, out_dir=str(tmp_path / out), progress=False, **kw)
    timed = run("timed", batch_size=2, speed_records=2)
    [row] = timed["rows"]
    samples = [json.loads(line) for line in (tmp_path / "timed" / "samples.jsonl").read_text().splitlines()]
    first_two = [s for s in samples if s["index"] < 2]
    assert row["sample_n"] == 2 and timed["speed_records"] == 2
    assert row["sample_tpf"] == pytest.approx(8 * 2 / sum(s["nfe"] for s in first_two))
    assert row["sample_tpf_effective"] == pytest.approx(sum(s["effective_tokens"] for s in first_two)
                                                        / sum(s["nfe"] for s in first_two))
    assert row["sample_tokens_per_s"] > 0 and row["tokens_per_s"] > 0 and row["sample_s"] > 0
    assert row["tpf_effective"] == pytest.approx(sum(s["effective_tokens"] for s in samples)
                                                 / sum(s["nfe"] for s in samples))
    assert "batch 1 over 2 samples" in ev.summary_table(timed)

    single = run("single", batch_size=1)
    [one] = single["rows"]
    assert one["sample_n"] == 3 and one["sample_tpf"] == pytest.approx(one["tpf"])
    assert one["sample_tokens_per_s"] == pytest.approx(one["tokens_per_s"])
    assert run("untimed", batch_size=2)["rows"][0]["sample_n"] is None
    with pytest.raises(ConfigError, match="speed_records=-2"):
        run("bad", batch_size=2, speed_records=-2)


# ------------------------------------------------------------------------ evaluation configs

EVAL_CONFIGS = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs", "eval"))
                      if f.endswith(".py") and f not in ("__init__.py", "base.py"))
BENCHMARK_RECORDS = {
    "gsm8k": GSM8K_RECORDS,
    "math500": [{"problem": "What is 1/2 + 1/2?", "answer": "1", "unique_id": "a"},
                {"problem": "Simplify 2/4.", "answer": "\\frac{1}{2}", "unique_id": "b"}],
    "humaneval": [{"task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Add.\"\"\"\n", "entry_point": "add",
                   "canonical_solution": "    return a + b\n",
                   "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"}],
    "mbpp": [{"task_id": 11, "text": "Write a function to add two numbers.", "code": "def add(a, b):\r\n  return a + b",
              "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(2, 2) == 4"]},
             {"task_id": 600, "text": "Not in the test split.", "code": "def f():\n  return 1",
              "test_list": ["assert f() == 1"]}],
}


def _config_tasks(name: str) -> list[str]:
    """Every benchmark a config file accepts (its argument; the backbone file also takes `,128`)."""
    import importlib

    module = importlib.import_module(f"configs.eval.{name}")
    accepted = []
    for task in BENCHMARK_RECORDS:
        try:
            module.get_config(task)
        except ConfigError:
            continue
        accepted.append(task)
    with pytest.raises(ConfigError, match="takes the benchmark as its argument"):
        module.get_config("bogus")
    return accepted


@pytest.mark.parametrize("name", EVAL_CONFIGS)
def test_every_eval_config_loads_and_runs_a_few_records(name, model_dir, tmp_path):
    """Each row file, for every benchmark it takes, is a valid `evaluate` section of the paper's
    protocol with `model.path` unset; its first benchmark then runs on two records of a tiny model
    with only the sizes overridden."""
    import importlib

    from dultra_jax.config import EvalRunConfig, from_config
    from dultra_jax.data.tasks import get_task, load_task_records
    from dultra_jax.data.tokenizer import load_tokenizer

    module = importlib.import_module(f"configs.eval.{name}")
    tasks = _config_tasks(name)
    assert tasks
    for task in tasks:
        config = module.get_config(task)
        assert config.model.path is None
        run = from_config(EvalRunConfig, config.evaluate, "evaluate.")
        assert (run.task, run.gen_length, run.temperature, run.scoring, run.cache) == (
            task, 256, 0.0, "official", "none")
        assert run.block_length in (32, 128) and run.data is None and run.out.startswith("eval_results/")
    if name.endswith("_llada"):   # the Fast-dLLM factor rule baselines: block 128, the factor sweep
        assert (run.rules, run.block_length, tuple(run.factors)) == (("factor",), 128, (0.5, 0.8, 1.0, 1.2, 1.5))
    task = get_task(run.task, mode=run.mode, **dict(run.task_options or {}))
    data = tmp_path / f"{run.task}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in BENCHMARK_RECORDS[run.task]))
    records = load_task_records(task, str(data), limit=2)
    params, model, _ = load_model_source(str(model_dir))
    rule = run.rules[0]
    summary = ev.evaluate(params, model, load_tokenizer(str(model_dir)), records, task,
                          rules_and_sweeps=ev.rule_sweeps([rule], {ev.SWEEP_KEYS[rule]: list(run.factors)[:1]}),
                          seeds=list(run.seeds)[:1], gen_length=16, block_length=8, prompt_length=48, batch_size=2,
                          out_dir=str(tmp_path / "out"), progress=False, scoring=run.scoring, speed_records=1,
                          mode=run.mode, plot=False)
    assert summary["scoring"] == "official" and summary["num_records"] == len(records)
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert {s["scoring"] for s in samples} == {"official"}
    assert all(s["extracted_by"] in (None, "boxed", "hash", "answer_tag", "last_number", "whole_text",
                                     "python_fence", "before_fence", "python_fence+sanitize", "whole_text+sanitize")
               for s in samples)
    assert summary["rows"][0]["sample_n"] == 1


def test_launcher_runs_an_eval_config_with_flags_on_top(model_dir, gsm8k_file, tmp_path):
    out = tmp_path / "eval"
    proc = _run("--config=configs/eval/dultra_math_b32.py:gsm8k", f"--config.model.path={model_dir}",
                f"--config.evaluate.data={gsm8k_file}", f"--config.evaluate.out={out}", "--gen_length=16",
                "--block_length=8", "--prompt_length=48", "--seeds=42", "--batch_size=2", "--speed_records=1",
                "--dtype=float32", "--noprogress")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "scoring official" in proc.stdout and "batch 1 over 1 samples" in proc.stdout
    assert "per sample, as the paper reports speed" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["scoring"], summary["seeds"], summary["batch_size"], summary["block_length"]) == (
        "official", [42], 2, 8)
    assert [(r["rule"], r["sweep_value"]) for r in summary["rows"]] == [("planner_bernoulli", 1.0)]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all(s["scoring"] == "official" for s in samples)

    missing = _run("--config=configs/eval/dultra_math_b32.py:gsm8k", f"--config.evaluate.data={gsm8k_file}")
    assert missing.returncode == 2 and "config.model.path is not set" in missing.stderr
