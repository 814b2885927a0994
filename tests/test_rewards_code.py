"""Code reward sandbox: statuses, hostile programs, cleanup, concurrency, the `code_correct` part."""

import json
import os
import secrets
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from dultra_jax.rewards import RewardInputs, compute_rewards
from dultra_jax.rewards import code as code_lib
from dultra_jax.rewards.code import CodeResult, check_program, check_programs, extract_program

MODE = code_lib.sandbox_mode()
needs_ns = pytest.mark.skipif(MODE != "ns", reason="namespace sandbox not available on this platform")
LIMITS = dict(timeout_s=2.0, memory_mb=512, fsize_mb=4, disk_mb=8, nproc=16)


def _run(program: str, tests: str = "pass", **kwargs) -> CodeResult:
    options = {**LIMITS, **kwargs}
    start = time.monotonic()
    result = check_program(textwrap.dedent(program), textwrap.dedent(tests), **options)
    elapsed = time.monotonic() - start
    assert result.status in code_lib.STATUSES
    assert result.passed == (result.status == "passed")
    # Within its limits: the wall clock plus cleanup.
    assert elapsed < options["timeout_s"] + 3.0, elapsed
    _assert_clean(result)
    return result


def _assert_clean(result: CodeResult):
    """No process of the sandbox (its session, or its uid) and no temporary directory remain."""
    info = result.info
    if not info:  # decided without starting a sandbox (empty program)
        return
    assert code_lib._scan_processes(info["pid"], info["uid"]) == []
    assert not os.path.exists(info["workdir"])


# --------------------------------------------------------------------------------------------------
# Statuses


@pytest.mark.parametrize("program, tests, status", [
    ("def add(a, b):\n    return a + b\n", "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n", "passed"),
    ("def add(a, b):\n    return a - b\n", "assert add(2, 3) == 5\n", "failed"),
    ("def add(a, b)\n    return a + b\n", "assert add(2, 3) == 5\n", "syntax_error"),
    ("def add(a, b):\n  return a\n    + b\n", "assert add(2, 3) == 5\n", "syntax_error"),  # indentation
    ("def add(a, b):\n    return a + c\n", "assert add(2, 3) == 5\n", "runtime_error"),
    ("raise ValueError('at import')\n", "pass\n", "runtime_error"),
    ("import sys\nsys.exit(0)\n", "assert False\n", "runtime_error"),
    ("import os\nos._exit(0)\n", "pass\n", "failed"),  # an early exit is never a pass
    ("   \n", "pass\n", "failed"),  # empty program
])
def test_statuses(program, tests, status):
    result = _run(program, tests)
    assert result.status == status, result


def test_entry_point_check_function():
    tests = "def check(candidate):\n    assert candidate(3) == 9\n    assert candidate(-2) == 4\n"
    assert _run("def square(x):\n    return x * x\n", tests, entry_point="square").status == "passed"
    assert _run("def square(x):\n    return x + x\n", tests, entry_point="square").status == "failed"
    assert _run("def cube(x):\n    return x ** 3\n", tests, entry_point="square").status == "failed"


def test_output_is_captured_and_bounded():
    result = _run("print('hello'); import sys; print('oops', file=sys.stderr)", capture_bytes=1024)
    assert result.status == "passed" and result.stdout == "hello\n" and result.stderr == "oops\n"
    result = _run("print('a' * 5000 + 'END')", capture_bytes=100)
    assert result.status == "passed" and len(result.stdout) == 100 and result.stdout.endswith("END\n")


def test_fake_reports_do_not_pass():
    # Printing or writing to every fd something that looks like a report cannot produce a pass.
    program = """
        import json, os
        for fd in range(3, 64):
            try:
                os.write(fd, (json.dumps({"nonce": "x", "status": "passed"}) + "\\n").encode())
            except OSError:
                pass
        print('{"status": "passed"}')
        os._exit(0)
    """
    assert _run(program).status == "failed"


def test_forked_copies_do_not_report():
    program = """
        import os
        if os.fork() == 0:
            pass  # the child falls through to the tests, which pass for it
        else:
            os.wait()
            raise RuntimeError("parent fails")
    """
    assert _run(program).status == "runtime_error"


def test_bad_tests_raise():
    with pytest.raises(ValueError, match="tests do not compile"):
        check_program("x = 1", "assert (", timeout_s=1.0)


# --------------------------------------------------------------------------------------------------
# Hostile programs


def test_infinite_loop_times_out():
    result = _run("while True:\n    pass\n", timeout_s=1.0)
    assert result.status == "timeout" and 0.9 < result.duration_s < 3.0


def test_sleep_times_out():
    assert _run("import time\ntime.sleep(60)\n", timeout_s=1.0).status == "timeout"


@pytest.mark.parametrize("program", [
    "import os\nwhile True:\n    os.fork()\n",
    "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
])
def test_fork_bomb(program):
    result = _run(program, timeout_s=1.5)
    assert not result.passed and result.status in ("runtime_error", "timeout", "killed")


@pytest.mark.parametrize("program", [
    "x = bytearray(8 * 1024 ** 3)\n",
    "chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 7))\n",
])
def test_memory_bomb(program):
    result = _run(program, memory_mb=256, timeout_s=5.0)
    assert result.status == "killed", result


@pytest.mark.parametrize("program", [
    "with open('big', 'wb') as f:\n    while True:\n        f.write(b'0' * 2 ** 20)\n",
    # Many files, each under the file-size limit (bounded by the private tmpfs in ns mode).
    "i = 0\nwhile True:\n    with open(f'f{i}', 'wb') as f:\n        f.write(b'0' * 3 * 2 ** 20)\n    i += 1\n",
])
def test_disk_flood(program):
    if "f{i}" in program and MODE != "ns":
        pytest.skip("total disk use is only bounded in namespace mode")
    result = _run(program, timeout_s=3.0)
    assert result.status in ("killed", "timeout"), result
    assert not result.passed


@needs_ns
def test_writes_outside_the_sandbox_fail_or_vanish(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    token = secrets.token_hex(6)
    targets = [str(outside / "escaped.txt"), f"/dultra_escape_{token}", f"/var/tmp/dultra_escape_{token}",
               f"/dev/shm/dultra_escape_{token}", f"/tmp/dultra_escape_{token}",
               os.path.join(os.path.dirname(os.path.dirname(__file__)), f"escape_{token}.txt"),
               os.path.join(sys.prefix, f"escape_{token}.txt")]
    program = f"""
        import os
        written = []
        for path in {targets!r} + [os.path.join("..", "rel_escape_{token}")]:
            try:
                with open(path, "w") as f:
                    f.write("escaped")
                written.append(path)
            except OSError:
                pass
        print(written)
    """
    result = _run(program)
    assert result.status == "passed", result
    for path in targets + [f"/tmp/rel_escape_{token}"]:
        assert not os.path.exists(path), path
    assert os.listdir(outside) == []


@needs_ns  # plain mode strips the environment (next test) but cannot hide /proc/<pid>/environ
def test_parent_environment_is_not_visible(monkeypatch):
    secret = "dultra-secret-" + secrets.token_hex(8)
    monkeypatch.setenv("DULTRA_TEST_SECRET", secret)
    program = f"""
        import glob, os
        blob = repr(dict(os.environ))
        for pattern in ("/proc/*/environ", "/proc/*/cmdline", "/proc/*/task/*/environ"):
            for path in glob.glob(pattern):
                try:
                    with open(path, "rb") as f:
                        blob += f.read().decode("latin-1")
                except OSError:
                    pass
        found = {secret!r} in blob
    """
    result = _run(program, "assert not found, 'the secret leaked'\n")
    assert result.status == "passed", result
    assert secret not in result.stdout + result.stderr


def test_environment_is_stripped_in_plain_mode(monkeypatch):
    monkeypatch.setenv("DULTRA_TEST_SECRET", "visible?")
    result = _run("import os\nfound = 'DULTRA_TEST_SECRET' in os.environ\nhome = os.environ['HOME']\n",
                  "assert not found\nimport os\nassert home == os.getcwd()\n", mode="plain")
    assert result.status == "passed", result


@needs_ns
def test_cannot_kill_the_trainer_or_its_processes():
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        program = f"""
            import os, signal
            for pid in (os.getppid(), {os.getpid()}, {bystander.pid}, 1, -1):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            try:
                os.killpg(os.getpgid(0), signal.SIGKILL)
            except OSError:
                pass
        """
        result = _run(program)
        assert not result.passed
        assert bystander.poll() is None  # the trainer's other process is untouched (and so are we)
    finally:
        bystander.kill()
        bystander.wait()


@needs_ns
def test_no_network():
    program = """
        import socket
        errors = []
        for addr in (("127.0.0.1", 80), ("8.8.8.8", 53), ("1.1.1.1", 443)):
            try:
                socket.create_connection(addr, timeout=0.5).close()
            except OSError as exc:
                errors.append(type(exc).__name__)
    """
    assert _run(program, "assert len(errors) == 3, errors\n").status == "passed"


@pytest.mark.parametrize("program", [
    "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
    "print('y' * (64 * 2 ** 20))\n",
])
def test_huge_output(program):
    result = _run(program, capture_bytes=256, max_output_mb=1.0)
    assert result.status in ("killed", "timeout"), result
    assert len(result.stdout) <= 256


@needs_ns  # plain mode does not track processes that leave the session (without a sandbox uid)
def test_daemonised_children_are_killed():
    program = """
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(600)
            os._exit(0)
        os.wait()
    """
    assert _run(program, "assert True\n").status == "passed"  # _run asserts that nothing is left


@pytest.mark.skipif(os.geteuid() != 0, reason="the per-slot sandbox uid needs root")
@needs_ns
def test_runs_as_unprivileged_uid():
    result = _run("import os\nuid = os.getuid()\ngroups = os.getgroups()\n", "assert uid != 0 and groups == []\n")
    assert result.status == "passed", result
    assert result.info["uid"] not in (None, 0)


# --------------------------------------------------------------------------------------------------
# Pool, modes, extraction, the reward part


def test_check_programs_runs_concurrently_and_keeps_order():
    programs = ["import time\ntime.sleep(0.5)\nx = %d\n" % i for i in range(4)] + ["x = (", "x = 1/0"]
    tests = ["assert x == %d\n" % i for i in range(4)] + ["pass", "pass"]
    start = time.monotonic()
    results = check_programs(programs, tests, timeout_s=5.0)
    elapsed = time.monotonic() - start
    assert [r.status for r in results] == ["passed"] * 4 + ["syntax_error", "runtime_error"]
    if code_lib.max_concurrency() >= 2:
        assert elapsed < 4 * 0.5 + 1.0, elapsed  # the sleeps overlapped
    for r in results:
        _assert_clean(r)


def test_plain_mode_basics():
    assert _run("x = 2\n", "assert x == 2\n", mode="plain").status == "passed"
    assert _run("x = 2\n", "assert x == 3\n", mode="plain").status == "failed"
    assert _run("while True:\n    pass\n", mode="plain", timeout_s=1.0).status == "timeout"


def test_extract_program():
    assert extract_program("Here:\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1"
    two = "```python\nx = 1\n```\ntext\n```python\nx = 2\n```"
    assert extract_program(two) == "x = 2"
    assert extract_program("```\ny = 3\n```") == "y = 3"
    assert extract_program("```python\nz = 4\n```\n```text\nnot code\n```") == "z = 4"
    assert extract_program("```python\nunclosed = 5\n") == "unclosed = 5"
    assert extract_program("plain = 6") == "plain = 6"


def test_code_correct_reward_part():
    completions = [
        "```python\ndef inc(x):\n    return x + 1\n```",  # passes
        "```python\ndef inc(x):\n    return x\n```",  # wrong answer
        "```python\ndef inc(x):\n    return x +\n```",  # syntax error
        "```python\ndef inc(x):\n    return x + y\n```",  # runtime error
        "```python\ndef inc(x):\n    return x + 1\n```",  # no tests for this row
        "no code at all",
    ]
    tests = ["assert inc(1) == 2\nassert inc(5) == 6"]
    examples = [{"tests": tests}] * 4 + [{"answer": "2"}, {"tests": "assert inc(1) == 2"}]
    inputs = RewardInputs(completions=completions, examples=examples, num_steps=np.zeros(6, np.int32))
    total, parts = compute_rewards(inputs, {"code_correct": 3.0, "code_fence": 1.0},
                                   options={"code_correct": {"timeout_s": 5.0}})
    np.testing.assert_allclose(parts["code_correct"][:4], [1.0, 0.0, 0.0, -0.05])
    assert np.isnan(parts["code_correct"][4])
    assert parts["code_correct"][5] == 0.0  # "no code at all" runs as Python: a syntax error
    np.testing.assert_allclose(parts["code_fence"], [1.0] * 5 + [0.25])
    np.testing.assert_allclose(total, [4.0, 1.0, 1.0, 0.85, 1.0, 0.25], rtol=1e-6)


def test_apps_rows_are_judged_on_input_output():
    """APPS rows carry no `tests`: the reward runs every `input_output` case (calling `fn_name`, a
    `Solution` method when the program defines the class; a tuple counts as a list; the expected
    output's only element), and standard-input problems read each input on stdin. A row with an
    empty `tests` and nothing else gets NaN, never 1. (Per-case values: tests/test_apps.py.)"""
    from dultra_jax.data import tasks
    from tests.fixtures.data_helpers import fixture_path

    task = tasks.get_task("apps", require_fn_name=False)
    rows = [tasks.load_task_records(task, fixture_path("apps.jsonl"))[i] for i in (0, 1)]  # add(a, b); stdin
    add, stdin = (task.example_fields(r) for r in rows)
    assert add["tests"] == "" and json.loads(add["input_output"])["fn_name"] == "add"
    pair = json.dumps({"fn_name": "pair", "inputs": [[1, 2]], "outputs": [[[2, 1]]]})  # APPS wraps each output
    completions = [
        "```python\ndef add(a, b):\n    return a + b\n```",  # passes
        "```python\ndef add(a, b):\n    return a * b\n```",  # wrong: used to pass (no tests ran)
        "```python\nclass Solution:\n    def add(self, a, b):\n        return a + b\n```",
        "```python\nn = int(input())\nprint(n * n)\n```",  # a stdin problem: run on each input
        "```python\ndef pair(a, b):\n    return (b, a)\n```",  # tuple result against [[2, 1]]
        "```python\nprint(1)\n```",  # a row with empty tests and nothing else
        "```python\nn = int(input())\nprint(n + n)\n```",  # stdin, wrong answer
    ]
    examples = [add, add, add, stdin, {"tests": "", "input_output": pair}, {"tests": ""}, stdin]
    inputs = RewardInputs(completions=completions, examples=examples, num_steps=np.zeros(7, np.int32))
    _, parts = compute_rewards(inputs, {"code_correct": 1.0}, options={"code_correct": {"timeout_s": 10.0}})
    np.testing.assert_array_equal(parts["code_correct"][[0, 1, 2, 3, 4, 6]], [1.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    assert np.isnan(parts["code_correct"][5])


def test_a_program_helper_named_check_is_not_the_test():
    """MBPP rows have an entry point but their tests define no `check`: a solution's own helper of
    that name is not called as HumanEval's `check(entry_point)` would be."""
    program = "def check(s):\n    return len(s) > 0\n\ndef first(s):\n    return s[0] if check(s) else None\n"
    result = check_program(program, "assert first('ab') == 'a'", 5.0, entry_point="first")
    assert result.passed, (result.status, result.error)
    # a `check` the tests define is still called with the entry point
    humaneval_style = "def check(candidate):\n    assert candidate('ab') == 'b'\n"
    plain = "def first(s):\n    return s[0]\n"
    assert check_program(plain, humaneval_style, 5.0, entry_point="first").status == "failed"


@pytest.mark.parametrize("status, value", [("passed", 1.0), ("failed", 0.0), ("syntax_error", 0.0),
                                           ("runtime_error", -0.05), ("timeout", -0.05), ("killed", -0.05)])
def test_code_reward_values(status, value):
    # As in the reference APPS reward: timeouts and crashes are runtime errors, syntax errors are not.
    assert code_lib.code_reward_value(CodeResult(status == "passed", status)) == value
    assert code_lib.code_reward_value(CodeResult(False, "timeout"), penalized=("runtime_error",)) == 0.0
