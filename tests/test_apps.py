"""APPS: the codeparrot/apps loader and filter, and the per-test-case grading in the sandbox.

The reference (chinsengi/dUltra-os diffu_grpo/reward_func.py `apps_reward_func`) runs every test
case in a fresh process with a 10 s limit and gives 1 when all pass, -0.05 on a runtime error or a
timeout whose message does not mention a syntax or indentation error, else 0.
"""

import json
import pickle
import textwrap

import numpy as np
import pytest

from dultra_jax.data import tasks
from dultra_jax.errors import DataError
from dultra_jax.rewards import RewardInputs, compute_rewards
from dultra_jax.rewards.code import (APPS_CASE_TIMEOUT_S, check_apps_program, check_apps_programs,
                                     code_correct_values, code_reward_value)
from tests.fixtures.data_helpers import fixture_path

RECORDS = fixture_path("apps_records.jsonl")
CASE_TIMEOUT_S = 1.0  # the reference's 10 s would make the timeout cases slow; the rule is the same

CALL_IO = json.dumps({"fn_name": "add", "inputs": [[1, 2], [5, -3], [0, 0]], "outputs": [[3], [2], [0]]})
STDIN_IO = json.dumps({"inputs": ["3\n", "10\n"], "outputs": ["9\n", "100\n"]})

# (program, value): a passing, a wrong, a crashing, a non-compiling and a timing-out program.
CALL_PROGRAMS = {
    "pass": ("def add(a, b):\n    return a + b\n", 1.0),
    "wrong": ("def add(a, b):\n    return a * b\n", 0.0),
    "crash": ("def add(a, b):\n    return [][a]\n", -0.05),
    "syntax": ("def add(a, b)\n    return a + b\n", 0.0),
    "timeout": ("def add(a, b):\n    while True:\n        pass\n", -0.05),
}
STDIN_PROGRAMS = {
    "pass": ("n = int(input())\nprint(n * n)\n", 1.0),
    "wrong": ("n = int(input())\nprint(n + n)\n", 0.0),
    "crash": ("n = int(input())\nprint(n // 0)\n", -0.05),
    "syntax": ("n = int(input()\nprint(n * n)\n", 0.0),
    "timeout": ("import time\nn = int(input())\ntime.sleep(60)\n", -0.05),
}


def _ids(path: str, **options) -> list[int]:
    task = tasks.get_task("apps", **options)
    return [r["problem_id"] for r in tasks.load_task_records(task, path)]


def test_loader_applies_the_reference_filter():
    raw = [json.loads(line) for line in open(RECORDS)]
    # The reference: `x["difficulty"] in ["introductory"] and "fn_name" in x["input_output"]`.
    reference = [r["problem_id"] for r in raw if r["difficulty"] in ["introductory"] and "fn_name" in r["input_output"]]
    assert _ids(RECORDS) == reference == [2401, 2402]
    # Without the fn_name filter, standard-input problems come too, but never one without tests.
    assert _ids(RECORDS, require_fn_name=False) == [2401, 2402, 4101, 4102]
    assert _ids(RECORDS, difficulties=None, require_fn_name=False) == [2401, 2402, 4101, 4102, 12, 3001]
    assert _ids(RECORDS, difficulties=("interview", "competition")) == [12]


def test_reference_solutions_pass_their_tests():
    """solutions[0] of every fixture problem, fenced as a completion, gets 1: call-based, a
    `class Solution` method, stdin with string and list-of-lines cases, and a decimal output."""
    task = tasks.get_task("apps", difficulties=None, require_fn_name=False)
    rows = tasks.load_task_records(task, RECORDS)
    examples = [task.example_fields(r) for r in rows]
    completions = [f"```python\n{task.reference(r)}```" for r in rows]
    values = code_correct_values(completions, examples, apps_case_timeout_s=5.0)
    np.testing.assert_array_equal(values, np.ones(len(rows)))
    assert [e["entry_point"] for e in examples] == ["sum_even", "twoSum", "", "", "distinct", ""]


@pytest.mark.parametrize("kind", ["call", "stdin"])
def test_graders_give_the_reference_values(kind):
    programs, io = (CALL_PROGRAMS, CALL_IO) if kind == "call" else (STDIN_PROGRAMS, STDIN_IO)
    names = list(programs)
    results = check_apps_programs([programs[n][0] for n in names], [io] * len(names), case_timeout_s=CASE_TIMEOUT_S)
    got = {n: (r.status, code_reward_value(r)) for n, r in zip(names, results)}
    assert got == {"pass": ("passed", 1.0), "wrong": ("failed", 0.0), "crash": ("runtime_error", -0.05),
                   "syntax": ("syntax_error", 0.0), "timeout": ("timeout", -0.05)}, got
    n_cases = len(json.loads(io)["inputs"])
    cases = {n: r.cases for n, r in zip(names, results)}
    assert cases == {"pass": (n_cases, n_cases), "wrong": (0 if kind == "stdin" else 1, n_cases),
                     "crash": (0, n_cases), "syntax": (0, n_cases), "timeout": (0, n_cases)}
    assert results[names.index("timeout")].duration_s < CASE_TIMEOUT_S + 5  # stopped at the first timeout


def _reference_call_reward(program: str, io: dict) -> float:
    """The reference's `apps_reward_func` for one call-based program, in this process (trusted test
    programs without timeouts): exec per case, call, pickle round trip (its result queue), compare
    after NumPy arrays and tuples become lists; stop at the first error."""

    def normalize(v):
        if isinstance(v, np.ndarray):
            return v.tolist()
        if isinstance(v, (list, tuple)):
            return [normalize(x) for x in v]
        if isinstance(v, dict):
            return {k: normalize(x) for k, x in v.items()}
        return v

    code = textwrap.dedent(program).strip()
    if "class Solution" in code:
        code += f"\n\ndef {io['fn_name']}(*args, **kwargs):\n    return Solution().{io['fn_name']}(*args, **kwargs)\n"
    outcome, message, passed = "pass", "", 0
    for test_input, expected in zip(io["inputs"], io["outputs"]):
        want = expected[0] if isinstance(expected, list) else expected
        try:
            env = {"__builtins__": __builtins__}
            exec(code, env)
            fn = env.get(io["fn_name"])
            if fn is None or not callable(fn):
                raise ValueError("not defined")
            got = pickle.loads(pickle.dumps(fn(*test_input)))
        except Exception as exc:
            outcome, message = "runtime_error", message or repr(exc)
            break
        if normalize(got) != normalize(want):
            outcome, message = "wrong_output", message or f"Output mismatch. Expected {want!r}, got {got!r}."
            continue
        passed += 1
    if outcome == "runtime_error":
        return 0.0 if ("syntax" in message.lower() or "indentation" in message.lower()) else -0.05
    return 1.0 if passed == len(io["inputs"]) else 0.0


def test_call_based_grading_equals_the_reference_rule():
    io = {"fn_name": "f", "inputs": [[[3, 1, 2]], [[]], [[5]]], "outputs": [[[1, 2, 3]], [[]], [[5]]]}
    programs = [
        "def f(xs):\n    return sorted(xs)\n",                                  # pass
        "def f(xs):\n    return tuple(sorted(xs))\n",                           # a tuple counts as a list
        "import numpy as np\ndef f(xs):\n    return np.sort(np.array(xs, dtype=int))\n",  # an array too
        "class Solution:\n    def f(self, xs):\n        return sorted(xs)\n",   # LeetCode style
        "def f(xs):\n    return xs\n",                                          # wrong on case 0 only
        "def f(xs):\n    return sorted(xs)[::-1] if len(xs) > 1 else xs[0]\n",  # wrong, then a crash: -0.05
        "def f(xs):\n    return eval('sorted(xs')\n",                           # SyntaxError at run time: 0
        "def g(xs):\n    return sorted(xs)\n",                                  # f is not defined: -0.05
        "class Always:\n    def __eq__(self, other):\n        return True\ndef f(xs):\n    return Always()\n",
        "    def f(xs):\n        return sorted(xs)\n",                           # indented: dedented first
    ]
    expected = [_reference_call_reward(p, io) for p in programs]
    assert expected == [1.0, 1.0, 1.0, 1.0, 0.0, -0.05, 0.0, -0.05, -0.05, 1.0]
    results = check_apps_programs([textwrap.dedent(p).strip() for p in programs], [json.dumps(io)] * len(programs),
                                  case_timeout_s=5.0)
    assert [code_reward_value(r) for r in results] == expected, [(r.status, r.error) for r in results]
    # What comes back is read with an allowlist of types: a pickle that would call a function is refused.
    forged = "class E:\n    def __reduce__(self):\n        return (print, ('forged',))\ndef f(xs):\n    return E()\n"
    result = check_apps_program(forged, json.dumps(io), case_timeout_s=5.0)
    assert (result.status, code_reward_value(result)) == ("runtime_error", -0.05)
    assert "builtins.print cannot be returned" in result.error


def test_each_case_runs_in_a_fresh_process_with_its_own_time_limit():
    """State does not leak between cases (the reference starts a process per case), and the limit
    is per case: three cases of 0.4 s pass under a 1 s limit, a 2 s case times out."""
    counter = "calls = []\ndef f(x):\n    calls.append(x)\n    return len(calls)\n"
    io_counter = json.dumps({"fn_name": "f", "inputs": [[1], [2], [3]], "outputs": [[1], [1], [1]]})
    slow = "import time\ndef f(x):\n    time.sleep(x)\n    return x\n"
    io_slow = json.dumps({"fn_name": "f", "inputs": [[0.4], [0.4], [0.4]], "outputs": [[0.4], [0.4], [0.4]]})
    io_slower = json.dumps({"fn_name": "f", "inputs": [[0.1], [2.0], [0.1]], "outputs": [[0.1], [2.0], [0.1]]})
    r_counter, r_slow, r_slower = check_apps_programs([counter, slow, slow], [io_counter, io_slow, io_slower],
                                                      case_timeout_s=CASE_TIMEOUT_S)
    assert r_counter.passed, r_counter.error
    assert r_slow.passed and r_slow.duration_s > 3 * 0.4, (r_slow.status, r_slow.error)
    assert (r_slower.status, r_slower.cases) == ("timeout", (1, 3)) and r_slower.error.startswith("case 1:")
    assert code_reward_value(r_slower) == -0.05


def test_stdout_comparison():
    """Tokens must match (line layout and trailing whitespace do not count); decimals may differ by
    the APPS harness's float tolerance, integers and words may not; a script may sys.exit(0)."""
    io = json.dumps({"inputs": [""], "outputs": ["1 2\n3.1415927\nyes\n"]})
    printed = {
        "1 2\n3.1415927\nyes\n": 1.0,
        "  1   2  \n\n3.1415927   \nyes": 1.0,      # spacing, blank lines, no final newline
        "1\n2\n3.1415927\nyes\n": 1.0,             # the same tokens on other lines
        "1 2\n3.14159271\nyes\n": 1.0,             # within 1e-5 relative
        "1 2\n3.1416\nyes\n": 1.0,                 # |a - b| = 7e-6 <= 1e-8 + 1e-5 * 3.14
        "1 2\n3.1417\nyes\n": 0.0,                 # 7e-5: not within the tolerance
        "2 1\n3.1415927\nyes\n": 0.0,              # order matters
        "1 2\n3.1415927\nYES\n": 0.0,              # words are compared exactly
        "1 2\n3.1415927\nyes\nextra\n": 0.0,
    }
    programs = [f"import sys\nsys.stdout.write({text!r})\n" for text in printed]
    programs += ["import sys\nprint('1 2')\nprint(3.1415927)\nprint('yes')\nsys.exit(0)\n",
                 "import sys\nprint('1 2')\nprint(3.1415927)\nprint('yes')\nsys.exit(1)\n"]
    results = check_apps_programs(programs, [io] * len(programs), case_timeout_s=5.0)
    assert [code_reward_value(r) for r in results] == list(printed.values()) + [1.0, -0.05], \
        [(r.status, r.error) for r in results]
    assert check_apps_program("print(int(input()) ** 2)", json.dumps({"inputs": [["1", "2"]], "outputs": [["1"]]}),
                              case_timeout_s=5.0).passed  # a list of input lines is joined with newlines


def test_reward_on_task_rows_and_options():
    """Through the reward registry on rows the task made: the per-case limit is an option of
    `code_correct`, 10 s by default (the reference's APPS_TIMEOUT)."""
    assert APPS_CASE_TIMEOUT_S == 10.0
    task = tasks.get_task("apps", require_fn_name=False)
    rows = {r["problem_id"]: task.example_fields(r) for r in tasks.load_task_records(task, RECORDS)}
    completions = ["```python\ndef sum_even(xs):\n    return sum(xs)\n```",
                   "```python\nimport time\ntime.sleep(30)\n```",
                   "Here it is:\n```python\nn = int(input())\na = list(map(int, input().split()))\n"
                   "print(sum(a))\nprint(max(a))\n```"]
    examples = [rows[2401], rows[4101], rows[4101]]
    inputs = RewardInputs(completions=completions, examples=examples, num_steps=np.zeros(3, np.int32))
    _, parts = compute_rewards(inputs, {"code_correct": 3.0},
                               options={"code_correct": {"apps_case_timeout_s": CASE_TIMEOUT_S}})
    np.testing.assert_allclose(parts["code_correct"], [0.0, -0.05, 1.0], rtol=1e-6)


@pytest.mark.parametrize("input_output, message", [
    ("{not json", r"not valid JSON"),
    ("[1, 2]", r"expected a JSON object"),
    (json.dumps({"fn_name": "f", "inputs": [[1]]}), r"`outputs` must be a list \(missing"),
    (json.dumps({"inputs": "1 2", "outputs": ["3"]}), r"`inputs` must be a list \(a str"),
    (json.dumps({"fn_name": "f(); import os", "inputs": [], "outputs": []}), r"`fn_name` must be a Python identifier"),
])
def test_malformed_input_output_is_a_clear_error(tmp_path, input_output, message):
    good = json.loads(open(RECORDS).readline())
    bad = dict(good, problem_id=77, input_output=input_output)
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:3: field 'input_output' of APPS problem 77: {message}"):
        tasks.load_task_records(tasks.get_task("apps"), str(path))
    # A record the filter drops is never read: its tests do not matter.
    path.write_text(json.dumps(good) + "\n" + json.dumps(dict(bad, difficulty="interview")) + "\n")
    assert len(tasks.load_task_records(tasks.get_task("apps"), str(path))) == 1


def test_missing_field_names_the_record(tmp_path):
    path = tmp_path / "train.jsonl"
    row = json.loads(open(RECORDS).readline())
    del row["input_output"]
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:1: missing field 'input_output'"):
        tasks.load_task_records(tasks.get_task("apps"), str(path))


def test_code_config_trains_on_apps(tmp_path):
    """configs/code.py: APPS with the reference's filter, weights and prompts, distillation from the
    coding teacher unless `:nodistill`, and no default data path (a one-line error says how to pass one)."""
    from configs import code
    from dultra_jax.config import ConfigError, DataConfig, DecodeConfig, RewardsConfig, from_config
    from dultra_jax.training.data_setup import TrainData
    from tests.fixtures.data_helpers import write_chat_tokenizer
    from tests.helpers import tiny_config

    default = from_config(RewardsConfig, code.get_config().rewards, "rewards.")
    assert default.uses_teacher and default.teacher_path == "Qwen/Qwen2.5-Coder-7B-Instruct"
    assert default.teacher_weight == 1.0
    config = code.get_config("nodistill")
    assert not from_config(RewardsConfig, config.rewards, "rewards.").uses_teacher
    rewards = from_config(RewardsConfig, config.rewards, "rewards.")
    with pytest.raises(ConfigError, match=r"^data needs `path` \(--config.data.path=FILE"):
        TrainData(from_config(DataConfig, config.data, "data."), rewards, tiny_config(), DecodeConfig(), seed=0)
    config.data.path = RECORDS
    config.data.prompts_per_step = 1  # -1 (one per device) is resolved by the trainer
    config.data.tokenizer = write_chat_tokenizer(str(tmp_path / "tokenizer"))
    data = TrainData(from_config(DataConfig, config.data, "data."), rewards, tiny_config(), DecodeConfig(), seed=0)
    assert data.weights == {"code_correct": 3.0, "code_fence": 1.0, "step_penalty": 0.1}
    seen = set()
    for _ in range(4):
        batch = data.next_batch()
        seen.update(json.loads(io)["fn_name"] for io in batch["input_output"])
    assert seen == {"sum_even", "twoSum"}  # the introductory call-based problems only
    assert "Write a solution to the following problem:" in batch["prompt_text"][0]


def test_plain_mode_grades_the_same():
    """Without namespaces (mode="plain") the runner forks its cases the same way."""
    programs = [CALL_PROGRAMS["pass"][0], CALL_PROGRAMS["crash"][0], STDIN_PROGRAMS["pass"][0],
                STDIN_PROGRAMS["wrong"][0]]
    results = check_apps_programs(programs, [CALL_IO, CALL_IO, STDIN_IO, STDIN_IO], case_timeout_s=5.0, mode="plain")
    assert [code_reward_value(r) for r in results] == [1.0, -0.05, 1.0, 0.0], [(r.status, r.error) for r in results]
    assert {r.info["mode"] for r in results} == {"plain"}
