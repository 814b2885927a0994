"""dultra_jax/rewards/official.py and sanitize.py: the official scoring rules on hand-written
completions where they and the strict (training) rules disagree, and the sanitiser on programs with
helpers, classes, imports, top-level test code and prints; its pruned search against the plain
search over every line range."""

import ast
import random

import numpy as np
import pytest

from dultra_jax.rewards import math as math_lib
from dultra_jax.rewards import official as official
from dultra_jax.rewards.official import Extraction
from dultra_jax.rewards.sanitize import longest_valid_code, sanitize

# ------------------------------------------------------------------------------------- GSM8K

# (completion, official value, official rule, what strict extracts)
GSM8K_CASES = [
    # No box and no `####`: strict finds nothing, official takes the last number.
    ("So she has 5 + 37 = 42 apples left.", 42.0, "last_number", None),
    # Only an <answer> tag: as the official code runs, the text's last number (the tag's number here).
    ("<answer>42</answer>", 42.0, "last_number", None),
    # A box with units: official reads its number; strict keeps the text.
    ("Each costs \\boxed{18 dollars}", 18.0, "boxed", "18 dollars"),
    ("Total: \\boxed{\\$1,000}", 1000.0, "boxed", "\\$1,000"),
    # The official boxed step reads a box-less text as its last number, before `####` is looked at.
    ("#### 12\nso 3 are left", 3.0, "last_number", "12"),
    # A box without a number falls through to `####`, then to <answer>.
    ("\\boxed{x} so #### 7 and 9", 7.0, "hash", "x"),
    ("\\boxed{\\text{none}} and <answer> 1,234 </answer> then 7", 1234.0, "answer_tag", "\\text{none}"),
    # `\boxed 5` up to the next `$`; an unclosed box is no box (the text's last number).
    ("so \\boxed 5$ done 8", 5.0, "boxed", "5"),
    ("\\boxed{12", 12.0, "last_number", None),
    ("no number at all", None, None, None),
]


@pytest.mark.parametrize("text, value, rule, strict", GSM8K_CASES)
def test_gsm8k_official_chain_against_strict(text, value, rule, strict):
    got = official.gsm8k_extract(text)
    assert got == Extraction(value, rule)
    assert official.strict_extract("math", text, {}).value == strict


def test_gsm8k_official_verdict_compares_floats_and_disagrees_with_strict():
    # Reference answers as GSM8K gives them (`#### 2,000` -> "2,000").
    assert official.gsm8k_correct(official.gsm8k_extract("The total is 2000 pens."), "2,000")
    assert not math_lib.is_correct("The total is 2000 pens.", "2,000")
    assert official.gsm8k_correct(official.gsm8k_extract("\\boxed{18 dollars}"), "18")
    assert official.gsm8k_correct(official.gsm8k_extract("\\boxed{0.5}"), "0.500001")   # within 1e-5
    assert not official.gsm8k_correct(official.gsm8k_extract("\\boxed{0.5}"), "0.50002")
    assert not official.gsm8k_correct(official.gsm8k_extract("nothing"), "3")
    # The strict rule reads `####` where the official one reads the last number.
    text = "#### 12\nso 3 are left"
    assert math_lib.is_correct(text, "12") and not official.gsm8k_correct(official.gsm8k_extract(text), "12")
    assert official.to_number("1,234.5 m") == 1234.5 and official.to_number("") is None


# ----------------------------------------------------------------------------------- MATH-500


@pytest.mark.parametrize("a, b, equal", [
    ("\\dfrac{1}{2}", "\\frac12", True), ("0.5", "\\frac{1}{2}", True), ("x = 3", "3", True),
    ("5 \\text{ cm}", "5", True), ("3/4", "\\frac{3}{4}", True), ("\\sqrt3", "\\sqrt{3}", True),
    ("10\\%", "10", True), ("\\left( 1, 2 \\right)", "(1,2)", True), (".5", "0.5", True),
    ("a/b", "\\frac{a}{b}", False),   # not an integer ratio: the raw strings are compared
    ("a/b", "a/b", True), ("2", "3", False), ("90^\\circ", "90", True),
])
def test_math_is_equiv_normalisation(a, b, equal):
    assert official.official_is_equiv(a, b) is equal


def test_math500_extraction_rules():
    assert official.math500_extract("so \\boxed{\\frac{1}{2}}.") == Extraction("\\frac{1}{2}", "boxed")
    assert official.math500_extract("x \\fbox{3}") == Extraction("\\fbox{3}", "boxed")
    # No box: the official code keeps the whole text as the answer.
    assert official.math500_extract("The answer is 5") == Extraction("The answer is 5", "whole_text")
    # An unclosed box (or an empty one) goes on to the <answer> tag.
    assert official.math500_extract("\\boxed{3 and <answer> 3 </answer>") == Extraction("3", "answer_tag")
    assert official.math500_extract("\\boxed{} <answer>4</answer>") == Extraction("4", "answer_tag")
    assert official.math500_extract("") == Extraction(None, None)


def test_math500_verdict_where_official_and_strict_disagree():
    # <answer> only after an unclosed box: strict finds no answer.
    text = "\\boxed{3 and <answer>3</answer>"
    assert official.math500_correct(official.math500_extract(text), "3")
    assert not math_lib.is_correct(text, "3")
    # math-verify decides when it parses both sides: 1/2 equals 0.5.
    assert official.math500_correct(official.math500_extract("\\boxed{\\frac{1}{2}}"), "0.5")
    assert not official.math500_correct(official.math500_extract("\\boxed{\\frac{1}{3}}"), "0.5")
    # Without math-verify's verdict the MATH `is_equiv` decides.
    assert official.math500_correct(Extraction("\\dfrac{1}{2}", "boxed"), "\\frac12")
    assert not official.math500_correct(Extraction(None, None), "3")


# ---------------------------------------------------------------------------------------- code


def test_first_python_block_vs_the_last_fenced_block():
    text = "```python\ndef f():\n    return 1\n```\nand a test:\n```python\nassert f() == 2\n```"
    assert official.first_python_block(text) == Extraction("def f():\n    return 1\n", "python_fence")
    assert official.strict_extract("code", text, {}).value == "assert f() == 2"
    assert official.first_python_block("def f(): return 1") == Extraction("def f(): return 1", "whole_text")
    # MBPP: the first ```python block stripped; before the first fence when no fence is python.
    assert official.mbpp_program("x\n```python\ndef g(): pass\n```\n```python\n1\n```") == Extraction(
        "def g(): pass", "python_fence")
    assert official.mbpp_program("head\n```\nbody\n```") == Extraction("head", "before_fence")
    assert official.mbpp_program("def g(): return 2") == Extraction("def g(): return 2", "whole_text")


HUMANEVAL_PROMPT = 'def add(a, b):\n    """Adds."""\n'
HUMANEVAL_TESTS = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


def test_code_verdicts_official_vs_strict_in_the_sandbox():
    # The body calls a helper; top-level test code after it fails (an undefined name).
    completion = ("Here:\n```python\ndef add(a, b):\n    return _plus(a, b)\n\ndef _plus(x, y):\n    return x + y\n\n"
                  "print(add(1, 2))\nassert undefined_name\n```\nDone.")
    example = {"program_prefix": HUMANEVAL_PROMPT, "entry_point": "add", "tests": HUMANEVAL_TESTS}
    extraction = official.official_extract("humaneval", completion, example)
    assert extraction.rule == "python_fence+sanitize"
    assert "print" not in extraction.value and "undefined_name" not in extraction.value
    assert official.official_correct("humaneval", [extraction], [example]) == [True]
    strict = official.strict_extract("code", completion, example)
    assert official.official_correct("humaneval", [strict], [example]) == [False]
    # MBPP: the first python block wins over a later broken one.
    mbpp = {"tests": "assert add(2, 3) == 5\n", "entry_point": "add"}
    two = "```python\ndef add(a, b):\n    return a + b\n```\n```python\ndef add(a, b):\n    return 0\n```"
    assert official.official_correct("mbpp", [official.official_extract("mbpp", two, mbpp)], [mbpp]) == [True]
    assert official.official_correct("mbpp", [official.strict_extract("code", two, mbpp)], [mbpp]) == [False]


def test_scoring_names_are_checked():
    assert official.default_scoring("gsm8k") == "official" and official.default_scoring("exact") == "strict"
    with pytest.raises(ValueError, match="scoring='bogus'"):
        official.check_scoring("bogus", "gsm8k")
    with pytest.raises(ValueError, match="not 'apps'"):
        official.check_scoring("official", "apps")


# ------------------------------------------------------------------------------------ sanitise

PROGRAM = '''Sure! Here is the solution.
import math
from collections import Counter as C
import os, sys

SCALE = 2
UNUSED = 5

class Point:
    def __init__(self, x):
        self.x = x

    def norm(self):
        return math.sqrt(self.x * self.x) * SCALE

def helper(p):
    return p.norm()

def unused():
    return 0

def no_return(x):
    print(x)

def solve(xs):
    counts = C(xs)
    return sum(helper(Point(x)) for x in counts)

print(solve([1, 2]))
assert solve([3]) == 6
if __name__ == "__main__":
    solve([1])
Hope this helps!
'''


def test_sanitize_keeps_imports_and_the_entry_points_closure():
    out = sanitize(PROGRAM, "solve")
    tree = ast.parse(out)
    names = [getattr(n, "name", None) or (n.targets[0].id if isinstance(n, ast.Assign) else None)
             for n in tree.body]
    imports = [ast.unparse(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert imports == ["import math", "from collections import Counter as C", "import os, sys"]
    assert names[3:] == ["SCALE", "Point", "helper", "solve"]          # source order, closure only
    assert "print" not in out and "assert" not in out and "__main__" not in out
    namespace = {}
    exec(out, namespace)  # noqa: S102 - our own test program
    assert namespace["solve"]([3]) == 6


def test_sanitize_without_entry_point_keeps_every_definition():
    out = sanitize(PROGRAM)
    defined = [n.name if hasattr(n, "name") else n.targets[0].id for n in ast.parse(out).body
               if not isinstance(n, (ast.Import, ast.ImportFrom))]
    # A function without a `return` is dropped, as the original does.
    assert defined == ["SCALE", "UNUSED", "Point", "helper", "unused", "solve"]


def test_sanitize_edge_cases():
    # A later definition replaces the earlier one in the earlier one's place.
    assert sanitize("def f():\n    return 1\nX = 1\ndef f():\n    return 2\n", "f") == "def f():\n    return 2"
    # A missing entry point keeps only the imports; text that never parses gives nothing.
    assert sanitize("import re\ndef g():\n    return re\n", "missing") == "import re"
    assert sanitize("this is ( not python", "f") == ""
    # Tabs and CRLF are normalised before parsing.
    assert sanitize("def f():\r\n\treturn 3\r\n", "f") == "def f():\n    return 3"


def _plain_longest_valid(text: str) -> str:
    """The search as described, over every line range in order (a strictly larger non-blank count
    replaces the best)."""
    lines = text.splitlines()[:100]
    best, snippet = 0, ""
    for i in range(len(lines)):
        for j in range(i, len(lines)):
            candidate = "\n".join(lines[i:j + 1])
            try:
                ast.parse(candidate)
            except SyntaxError:
                continue
            count = sum(1 for line in lines[i:j + 1] if line.strip())
            if count > best:
                best, snippet = count, candidate
    return snippet


def test_longest_valid_code_equals_the_plain_search():
    pieces = ["def f(x):", "    return x", "", "prose here, not code", "x = (1,", "2)", "print(f(2))",
              "class A:", "    pass", "  bad indent", "import os", "", "for i in range(3):", "    y = i"]
    rng = random.Random(0)
    for _ in range(60):
        text = "\n".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        assert longest_valid_code(text) == _plain_longest_valid(text), text
    assert np.all([longest_valid_code(PROGRAM) == _plain_longest_valid(PROGRAM)])
