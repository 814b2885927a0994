"""Multi-host GRPO: two processes x 4 CPU devices (gloo over loopback) equal one process x 8 devices.

`launch/train.py` runs as real separate processes joined by `jax.distributed` (coordinator on
127.0.0.1). The two-process run trains 1 step, stops, and a second pair of processes resumes it
to step 2 from the Orbax checkpoint both wrote; a single process with 8 devices trains 2 steps
straight. Metrics (process 0's `metrics.jsonl`) and the final parameters must agree.
"""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dultra_jax import distributed
from dultra_jax.interop.hf_llada import load_hf
from dultra_jax.training.restore import restore_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 480  # per launch; a cold compile of both programs on 2 busy cores takes minutes
# Metrics that count discrete outcomes of the decoding (same tokens, same steps): equal exactly.
EXACT = ("step", "reward_mean", "reward_exact_match", "reward_step_penalty", "accuracy", "nfe_mean",
         "tokens_per_forward", "skipped", "learning_rate", "clip_fraction")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, bind_address: str | None = None) -> dict:
    """The subprocess environment: conftest's XLA flags (LLVM -O0: compiling dominates, and process 1
    cannot use the persistent cache on CPU, whose key holds the process's topology) and cache dir,
    with `devices` fake CPU devices. All three runs compile with the same flags."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]))
    if bind_address:
        env["JAX_COORDINATOR_BIND_ADDRESS"] = bind_address  # loopback only (JAX's default is [::])
    return env


def _tail(path: str, chars: int = 3000) -> str:
    with open(path, errors="replace") as f:
        text = "".join(line for line in f if "[Gloo]" not in line)  # gloo prints one line per peer
    return text[-chars:]


def _run_all(commands: list[tuple[list[str], dict]], logdir, name: str) -> list[str]:
    """Starts every command at once, waits for all (killing all of them on a timeout or when one
    fails, since its peers would wait for it), and returns the log paths."""
    logs, procs = [], []
    for i, (args, env) in enumerate(commands):
        log_path = str(logdir / f"{name}.{i}.log")
        with open(log_path, "w") as log:
            procs.append(subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=log,
                                          stderr=subprocess.STDOUT))
        logs.append(log_path)
    deadline = time.monotonic() + TIMEOUT_S
    failed = None
    while failed is None and any(p.poll() is None for p in procs):
        failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
        if time.monotonic() > deadline:
            failed = "timeout"
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    failed = failed if failed is not None else next((i for i, p in enumerate(procs) if p.returncode), None)
    if failed is not None:
        report = "\n".join(f"--- {name} process {i} (rc {p.returncode}) ---\n{_tail(logs[i])}"
                           for i, p in enumerate(procs))
        pytest.fail(f"{name}: {'timed out after %d s' % TIMEOUT_S if failed == 'timeout' else 'failed'}\n{report}")
    return logs


def _train_args(workdir, steps: int) -> list[str]:
    # 4 prompts (16 rows): 2 per process, so a process's rows must be the same contiguous part of the
    # global batch as on the single process, or rows meet other rollout noise and the runs differ.
    return ["launch/train.py", "--config=configs/tiny.py", f"--workdir={workdir}", f"--config.total_steps={steps}",
            "--config.data.prompts_per_step=4"]


def _pretrain_args(workdir) -> list[str]:
    """4 SFT steps of the demo's base model (0.86M params), a checkpoint at 2, the HF export and a
    16-problem decoding eval in 8 steps (at 32, gloo's per-step all-gathers made it 18 s of the
    two-process run); a global batch of 16 rows (2 per device)."""
    return ["launch/pretrain.py", "--config=configs/demo_pretrain.py", f"--workdir={workdir}",
            "--config.total_steps=4", "--config.log_every=2", "--config.optim.warmup_steps=0",
            "--config.data.num_examples=64", "--config.data.batch_size=16", "--config.eval.num_examples=16",
            "--config.eval.batch_size=16", "--config.eval.steps=8", "--config.eval.every=0",
            "--config.checkpoint.every=2", "--config.checkpoint.async_save=False"]


def _multihost(args: list[str], logdir, name: str) -> list[str]:
    port = _free_port()
    address = f"127.0.0.1:{port}"
    return _run_all([(args + [f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
                      _env(4, address)) for i in range(2)], logdir, name)


def _metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("multihost")
    single, multi = base / "single", base / "multi"
    began = time.monotonic()
    _run_all([(_train_args(single, 2), _env(8))], base, "single")
    first = _multihost(_train_args(multi, 1), base, "multi_first")
    resumed = _multihost(_train_args(multi, 2), base, "multi_resumed")
    print(f"multihost runs took {time.monotonic() - began:.0f} s")
    return str(single), str(multi), first, resumed


def test_two_processes_equal_one_process(runs):
    single, multi, first, resumed = runs
    one, two = _metrics(single), _metrics(multi)
    # Process 0 alone writes the metrics: one row per step, and rows are over all 8 rows of the batch.
    assert [r["step"] for r in two] == [1, 2]
    for a, b in zip(one, two):
        for key in EXACT:
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
        # Float reductions across devices: gloo's cross-process all-reduce adds in another order
        # than XLA's in-process one, so these agree to float32 rounding, not bit for bit.
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-5)
        assert b["logp_gap"] < 1e-4 and a["logp_gap"] < 1e-4
    # The resumed pair restored step 1 from the checkpoint both processes wrote.
    assert "resumed from step 1" in _tail(resumed[0], 100_000)
    assert "step 2/2" in _tail(resumed[0], 100_000) and "step 2/2" not in _tail(resumed[1], 100_000)
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(os.path.join(multi, "checkpoints", "2", "state")))

    params_one, _, _ = restore_params(single)
    params_two, _, _ = restore_params(multi)
    leaves_one = jax.tree_util.tree_leaves_with_path(params_one)
    for (path, a), b in zip(leaves_one, jax.tree.leaves(params_two), strict=True):
        # Adam divides by sqrt(v): the float32-rounding differences of the summed gradients grow
        # to a few 1e-6 where gradients are tiny. 2e-5 is 1% of one Adam step (lr 1e-3) and
        # far below what a wrong batch or a wrong update would move (every parameter moves ~1e-3).
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=2e-5, err_msg=jax.tree_util.keystr(path))


def test_pretrain_two_processes_equal_one_process(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    _run_all([(_pretrain_args(single), _env(8))], tmp_path, "pretrain_single")
    logs = _multihost(_pretrain_args(multi), tmp_path, "pretrain_multi")
    one, two = _metrics(single), _metrics(multi)
    assert [r["step"] for r in two] == [2, 4]
    for a, b in zip(one, two):
        assert a["skipped"] == b["skipped"] == 0
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
        np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-5)
    # The held-out decoding eval: both processes' rows, the same tokens as one process.
    with open(single / "pretrain_eval.json") as f, open(multi / "pretrain_eval.json") as g:
        eval_one, eval_two = json.load(f)["eval"], json.load(g)["eval"]
    for a, b in zip(eval_one, eval_two, strict=True):
        assert (b["num_examples"], b["accuracy"], b["nfe_mean"]) == (a["num_examples"], a["accuracy"], a["nfe_mean"])
    # One HF directory, written by process 0 from parameters sharded over both processes.
    assert "exported the backbone" in _tail(logs[0], 100_000)
    assert sorted(os.listdir(multi / "hf")) == sorted(os.listdir(single / "hf"))
    params_one, _, _ = load_hf(str(single / "hf"))
    params_two, _, _ = load_hf(str(multi / "hf"))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params_one), jax.tree.leaves(params_two), strict=True):
        # As in the GRPO test, Adam magnifies float32 rounding where gradients are tiny (seen: one
        # element of 196,608 off by 3.3e-5); 1e-4 is 5% of one step at lr 2e-3, and each of the 4
        # steps moves every parameter by about the learning rate.
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-4, err_msg=jax.tree_util.keystr(path))


# Two processes export a tiny model sharded over both; process 0's second shard file fails to
# write (a full disk). argv: coordinator address, process id, out_dir.
_FAILING_EXPORT = """
import sys
from dultra_jax import distributed
distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
import jax
from configs import common
from dultra_jax.interop import hf_llada
from dultra_jax.interop.build import build_model
from dultra_jax.sharding import make_mesh
mesh = make_mesh()
params, model = build_model(common.tiny_model(), mesh=mesh, seed=0)
assert not all(leaf.is_fully_addressable for leaf in jax.tree.leaves(params))
if jax.process_index() == 0:
    write, calls = hf_llada.save_file, []
    def save_file(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", path)
        write(tensors, path)
    hf_llada.save_file = save_file
try:
    hf_llada.export_hf(params, model, sys.argv[3], dtype="float32", max_shard_size="16KB")
except Exception as e:
    print(f"export failed: {type(e).__name__}: {e}", flush=True)
    sys.exit(3)
"""


def test_export_failure_on_the_writer_reaches_every_process(tmp_path):
    # Before, process 1 waited at export_hf's closing barrier for a process 0 that had raised.
    out_dir = tmp_path / "hf"
    address = f"127.0.0.1:{_free_port()}"
    env = _env(4, address)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    procs = [subprocess.Popen([sys.executable, "-c", _FAILING_EXPORT, address, str(i), str(out_dir)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        outputs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [3, 3], outputs
    assert "export failed: OSError: [Errno 28] No space left on device" in outputs[0], outputs[0][-3000:]
    assert (f"export failed: CheckpointError: export to {out_dir} failed on process 0, the writer"
            in outputs[1]), outputs[1][-3000:]
    assert os.listdir(tmp_path) == []  # neither the directory nor its temporary parts


# The end-of-run comparison (`final_eval.compare`, hence `evaluation.evaluate`) on a tiny random
# model. argv: coordinator address ("-": one process), process id, records file, workdir.
_FINAL_EVAL = """
import json, sys
import numpy as np
from dultra_jax import distributed
if sys.argv[1] != "-":
    distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from configs import common
from dultra_jax.config import DecodeConfig
from dultra_jax.data.tasks import get_task
from dultra_jax.interop.build import build_model
from dultra_jax.sharding import make_mesh
from dultra_jax import evaluation
from dultra_jax.training import final_eval
# The tiny random model answers no record right, so the verdict is a fixed function of the
# completion instead (about half are "correct"), and each process counts what it scored.
scored = []
def verdicts(task, completions, *args):
    scored.append(len(completions))
    return np.array([sum(map(ord, c)) % 2 == 0 for c in completions], bool)
evaluation.score_completions = verdicts
mesh = make_mesh()
distributed.connect_cpu_collectives(mesh)
initial, model = build_model(common.tiny_model(), mesh=mesh, seed=0)
trained, _ = build_model(common.tiny_model(), mesh=mesh, seed=1)
spec = {"path": sys.argv[3], "seeds": (0, 1), "batch_size": 8,
        "rows": {"threshold": {"params": "initial", "rule": "threshold", "threshold": 0.2},
                 "planner": {"params": "trained", "rule": "planner_bernoulli", "factor": 1.0}}}
decode = DecodeConfig(rule="low_confidence", prompt_length=8, gen_length=8, block_length=4, eos_token_id=1)
results = final_eval.compare(spec, {"initial": initial, "trained": trained}, model, None, get_task("exact"), decode,
                             None, sys.argv[4], mesh=mesh)
print("RESULTS " + json.dumps(results), flush=True)
print(f"SCORED {sum(scored)}", flush=True)
"""


def _token_records(tmp_path, count: int = 13) -> str:
    """`count` records of the `exact` task (token-id prompts of 1-5 ids, the answer their first two)."""
    path = tmp_path / "records.jsonl"
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for _ in range(count):
            prompt = rng.integers(3, 60, size=rng.integers(1, 6)).tolist()
            f.write(json.dumps({"prompt_ids": prompt, "answer": " ".join(map(str, prompt[:2]))}) + "\n")
    return str(path)


def _log_lines(log_path, prefix: str) -> list[str]:
    return [line[len(prefix):] for line in _tail(log_path, 100_000).splitlines() if line.startswith(prefix)]


def test_final_evaluation_on_two_processes_equals_one_process(tmp_path):
    """Each process feeds and scores its rows of every batch; every process gets the whole batch's
    results; process 0 writes. 13 records in batches of 8 (the last has 3 filler rows), two seeds."""
    records = _token_records(tmp_path)
    script = ["-c", _FINAL_EVAL]
    [single] = _run_all([(script + ["-", "0", records, str(tmp_path / "single")], _env(8))], tmp_path, "single")
    address = f"127.0.0.1:{_free_port()}"
    multi = _run_all([(script + [address, str(i), records, str(tmp_path / "multi")], _env(4, address))
                      for i in range(2)], tmp_path, "multi")

    def results(log_path):
        [line] = _log_lines(log_path, "RESULTS ")
        rows = json.loads(line)
        assert rows.pop("sweeps") == {}  # the spec names rows only
        return {name: {k: v for k, v in row.items() if k != "tokens_per_s"} for name, row in rows.items()}

    want = results(single)
    assert want["threshold"]["n"] == 13 and want["threshold"]["nfe"] != want["planner"]["nfe"]
    assert all(0 < row["accuracy"] < 100 for row in want.values()), want  # verdicts whose order matters
    assert results(multi[0]) == results(multi[1]) == want
    # Each completion is scored once, by the process that fed its row. Per setting and seed, rows
    # 0-7 and 0-4 of the two batches are valid; process 0 holds rows 0-3 of each (4 + 4 valid),
    # process 1 rows 4-7 (4 + 1); the sampled planner decodes 2 seeds, greedy `threshold` one seed
    # for both (it is deterministic): 3 decoded seeds in all.
    scored = [int(line) for log in [single, *multi] for line in _log_lines(log, "SCORED ")]
    assert scored == [39, 24, 15]
    for name in ("results.json", "pareto.png", "eval/initial/samples.jsonl", "eval/trained/samples.jsonl",
                 "eval/trained/summary.csv"):
        assert os.path.isfile(tmp_path / "multi" / name), name
    for group in ("initial", "trained"):
        assert ((tmp_path / "multi" / "eval" / group / "samples.jsonl").read_text()
                == (tmp_path / "single" / "eval" / group / "samples.jsonl").read_text())


def test_evaluate_launcher_on_two_processes_equals_one_process(tmp_path):
    """`launch/evaluate.py` joins `jax.distributed` from its flags; process 0 alone prints and writes,
    and its outputs equal one process's (10 records: the second batch has 6 filler rows)."""
    args = ["launch/evaluate.py", "--config=configs/tiny.py", "--task=exact", f"--data={_token_records(tmp_path, 10)}",
            "--rules=threshold", "--thresholds=0.2", "--seeds=0", "--gen_length=8", "--block_length=4",
            "--prompt_length=8", "--batch_size=8", "--progress=false"]
    [single] = _run_all([(args + [f"--out={tmp_path / 'single'}"], _env(8))], tmp_path, "single")
    multi = _multihost(args + [f"--out={tmp_path / 'multi'}"], tmp_path, "multi")

    def table(log_path):  # the printed table without its tokens/s column
        return [line.rsplit(maxsplit=1)[0] for line in _log_lines(log_path, "threshold ")]

    assert len(table(single)) == 1 and table(multi[0]) == table(single) and table(multi[1]) == []
    assert sorted(os.listdir(tmp_path / "multi")) == ["pareto.png", "samples.jsonl", "summary.csv", "summary.json"]
    assert (tmp_path / "multi" / "samples.jsonl").read_text() == (tmp_path / "single" / "samples.jsonl").read_text()
    summaries = [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("single", "multi")]
    for summary in summaries:
        [row] = summary.pop("rows")
        assert row["n"] == 10
        summary["row"] = {k: v for k, v in row.items() if k not in ("tokens_per_s", "non_eos_tokens_per_s", "wall_s",
                                                                     "warmup_s")}
    assert summaries[0] == summaries[1]


# The distillation teacher's scoring (`Teacher.token_logps`) on a mesh, each process with its own
# rows. argv: coordinator address ("-": one process), process id, rows file (JSON: prompts and
# completions of every row, and each process's share), output file.
_TEACHER_SCORES = """
import json, sys
import jax
from dultra_jax import distributed
if sys.argv[1] != "-":
    distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from dultra_jax.models.teacher import TeacherConfig, teacher_abstract_params, teacher_init_params
from dultra_jax.rewards.distill import Teacher
from dultra_jax.sharding import make_mesh, param_shardings
mesh = make_mesh()
distributed.connect_cpu_collectives(mesh)
config = TeacherConfig(family="qwen2", vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=48)
shardings = param_shardings(teacher_abstract_params(config), mesh)
# 7.5 x HF's 0.02 init: log-probs far from uniform, so a row scored against another's tokens shows.
params = jax.jit(lambda key: jax.tree.map(lambda x: 7.5 * x, teacher_init_params(config, key)),
                 out_shardings=shardings)(jax.random.key(0))
with open(sys.argv[3]) as f:
    rows = json.load(f)
own = slice(*rows["share"][jax.process_index()]) if jax.process_count() > 1 else slice(None)
prompts, completions = rows["prompts"][own], rows["completions"][own]
teacher = Teacher(params, config, tokenizer=None, length_bucket=8, row_bucket=1, max_rows=2, mesh=mesh)
out = {"rows": [l.tolist() for l in teacher.token_logps(prompts, completions)]}
# A process without rows still joins every call (the other has 3 rows: 2 chunks).
few = slice(0, 3) if jax.process_index() == 0 else slice(0, 0)
out["few"] = [l.tolist() for l in teacher.token_logps(prompts[few], completions[few])]
host = jax.device_put(params, jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), shardings))
offloaded = Teacher(host, config, tokenizer=None, length_bucket=8, row_bucket=1, max_rows=2, mesh=mesh, offload=True)
out["offloaded"] = [l.tolist() for l in offloaded.token_logps(prompts, completions)]
with open(sys.argv[4] + f".{jax.process_index()}.json", "w") as f:
    json.dump(out, f)
"""


def test_teacher_scores_on_two_processes_equal_one_process(tmp_path):
    """Two processes x 4 devices, process 0 with 5 rows (3 chunks of max_rows=2) and process 1 with 2
    (1 chunk) of different lengths, score as one process x 8 devices does all 7 rows; a process
    with no rows joins the other's calls; an offloaded teacher scores the same (up to float
    rounding: a call's padded widths depend on its rows)."""
    rng = np.random.default_rng(3)
    rows = {"prompts": [rng.integers(0, 96, size=rng.integers(1, 12)).tolist() for _ in range(7)],
            "completions": [rng.integers(0, 96, size=rng.integers(0, 14)).tolist() for _ in range(7)],
            "share": [[0, 5], [5, 7]]}
    rows["prompts"][6] = rng.integers(0, 96, size=20).tolist()  # process 1's prompts are the widest
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    script = ["-c", _TEACHER_SCORES]
    env = {k: v for k, v in _env(8).items() if k != "JAX_COMPILATION_CACHE_DIR"}
    _run_all([(script + ["-", "0", str(tmp_path / "rows.json"), str(tmp_path / "single")], env)], tmp_path, "single")
    address = f"127.0.0.1:{_free_port()}"
    _run_all([(script + [address, str(i), str(tmp_path / "rows.json"), str(tmp_path / "multi")],
               {k: v for k, v in _env(4, address).items() if k != "JAX_COMPILATION_CACHE_DIR"}) for i in range(2)],
             tmp_path, "multi")
    single = json.loads((tmp_path / "single.0.json").read_text())
    multi = [json.loads((tmp_path / f"multi.{i}.json").read_text()) for i in range(2)]
    assert [len(r) for r in single["rows"]] == [len(c) for c in rows["completions"]]
    assert len({round(v, 3) for r in single["rows"] for v in r}) > 20  # distinct log-probs, not padding
    for key in ("rows", "offloaded"):
        got = multi[0][key] + multi[1][key]
        assert [len(r) for r in got] == [len(r) for r in single["rows"]]
        for g, w in zip(got, single["rows"]):
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
    assert multi[1]["few"] == [] and len(multi[0]["few"]) == 3
    for g, w in zip(multi[0]["few"], single["rows"][:3]):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.concatenate([np.asarray(r) for r in single["offloaded"]]),
                               np.concatenate([np.asarray(r) for r in single["rows"]]), atol=1e-6, rtol=0)


def test_flag_errors_name_the_flag():
    with pytest.raises(distributed.DistributedError, match=r"--process_id=2 must be in \[0, --num_processes=2\)"):
        distributed.check_flags("127.0.0.1:1234", 2, 2, None)
    with pytest.raises(distributed.DistributedError, match=r"missing --num_processes, --process_id"):
        distributed.check_flags("127.0.0.1:1234", None, None, None)
    with pytest.raises(distributed.DistributedError, match=r"--coordinator_address='localhost' must be host:port"):
        distributed.check_flags("localhost", 2, 0, None)
    with pytest.raises(distributed.DistributedError, match=r"--num_processes=0 must be >= 1"):
        distributed.check_flags("h:1", 0, 0, None)
    with pytest.raises(distributed.DistributedError, match=r"--local_device_ids=0,0"):
        distributed.check_flags("h:1", 2, 0, [0, 0])
    with pytest.raises(distributed.DistributedError, match=r"--num_processes given with --distributed=off"):
        distributed.check_flags(None, 2, None, None, mode="off")
    assert not distributed.check_flags("h:1", 1, 0, None)  # one process: nothing to initialise
    assert distributed.check_flags("h:1", 2, 1, [0, 1])
    # No flags and no cluster: a single process, jax.distributed untouched.
    assert not distributed.initialize(environ={})


def test_cluster_detection_from_env():
    assert distributed.cluster_from_env({}) is None
    assert distributed.cluster_from_env({"TPU_WORKER_HOSTNAMES": "localhost"}) is None  # one host
    assert distributed.cluster_from_env({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}) == "tpu"
    assert distributed.cluster_from_env({"MEGASCALE_COORDINATOR_ADDRESS": "t0:8080"}) == "tpu"
    assert distributed.cluster_from_env({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    assert distributed.cluster_from_env({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == "slurm"
    assert distributed.cluster_from_env({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1"}) == "openmpi"


def test_launcher_rejects_inconsistent_flags(tmp_path):
    proc = subprocess.run([sys.executable, *_train_args(tmp_path / "w", 1), "--coordinator_address=127.0.0.1:1",
                           "--num_processes=2", "--process_id=2"], cwd=ROOT, env=_env(8), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert "train.py: error: --process_id=2 must be in [0, --num_processes=2)" in proc.stderr
