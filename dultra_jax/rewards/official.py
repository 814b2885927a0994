"""Benchmark scoring as the official dUltra evaluation does it (`scoring="official"`), next to ours
(`scoring="strict"`, the training rewards' extraction), with the extracted answer and the rule that
extracted it, so a number can be put next to the paper's.

Rules of `official` (chinsengi/dUltra-os `eval_math/parse_and_get_acc.py` and the vendored lm-eval
tasks `humaneval_instruct` / `mbpp_instruct`), re-implemented here from their description:

* GSM8K (`gsm8k_extract`): a chain of rules, the first that yields a number wins, compared with the
  reference as floats within 1e-5:
    1. `boxed`: the last `\\boxed{...}` / `\\fbox{...}` (balanced braces; `\\boxed x` up to the
       next `$`), read as a number: commas dropped, then the whole string, else its last number
       (so `\\boxed{18 dollars}` is 18). As the official code runs, a text *without* a box is read
       the same way as a whole, i.e. its last number: that case is reported as `last_number`, and
       the next two rules are only reached when a box holds no number;
    2. `hash`: the first `#### n`;
    3. `answer_tag`: the first `<answer>...</answer>` read as a number;
    4. `last_number`: the last number in the text.
* MATH-500 (`math500_extract`): the last box's content (`boxed`), else (no box) the whole text
  (`whole_text`, as the official code keeps it), else (empty, or a box whose braces never close)
  the first `<answer>...</answer>` (`answer_tag`). Correct when math-verify, given both wrapped in
  `$...$`, parses them and verifies equality; when it cannot parse one of them (or times out), the
  MATH `is_equiv` (`official_is_equiv`, the classic `strip_string` normalisation) decides.
* HumanEval (`humaneval_program`): the text after the first "```python\\n" up to the next fence
  (the whole text without one), after the problem's prompt, cleaned by `sanitize.sanitize` with the
  entry point; MBPP (`mbpp_program`): the first ```python block (stripped; text before the first
  fence when the fences are not python; the whole text without fences), *not* sanitised, as
  `mbpp_instruct` does. Both are then run against the record's tests in the sandbox
  (`code.check_programs`); correct when every test passes (pass@1, greedy).

`strict` (`strict_extract`) is what the training rewards read: the last box, else the last `####`
(`rewards.math.extract_answer`) for math; the last fenced block (`rewards.code.extract_program`) for
code, after the HumanEval prompt.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from dultra_jax.rewards import code as code_lib
from dultra_jax.rewards import math as math_lib
from dultra_jax.rewards.sanitize import sanitize

SCORINGS = ("official", "strict")
OFFICIAL_TASKS = ("gsm8k", "math500", "humaneval", "mbpp")
GSM8K_TOLERANCE = 1e-5

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_HASH_NUMBER = re.compile(r"####\s*\$?([\d,]+(?:\.\d+)?)")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Extraction:
    """What a scoring rule read from a completion: `value` (the answer: a float for GSM8K
    `official`, a string otherwise, the program for code; None when nothing was found) and `rule`,
    the rule that found it (`boxed`, `hash`, `answer_tag`, `last_number`, `whole_text`,
    `python_fence`, `last_fence`, ...; None with no value)."""

    value: Any
    rule: str | None


def default_scoring(task_name: str) -> str:
    """`official` for the benchmarks the paper reports (`OFFICIAL_TASKS`), else `strict`."""
    return "official" if task_name in OFFICIAL_TASKS else "strict"


def check_scoring(scoring: str, task_name: str) -> str:
    """`scoring`, checked: ValueError naming it for an unknown name, or `official` for a task the
    official evaluation does not cover."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring={scoring!r}; use one of {', '.join(SCORINGS)}")
    if scoring == "official" and task_name not in OFFICIAL_TASKS:
        raise ValueError(f"scoring='official' covers the tasks {', '.join(OFFICIAL_TASKS)}, not {task_name!r}; "
                         "use scoring='strict'")
    return scoring


# ------------------------------------------------------------------------------------ numbers


def to_number(value) -> float | None:
    """A number read as the official GSM8K parser reads one: commas dropped, the whole string as a
    float, else its last number (`-?digits(.digits)?`); None when there is none."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    cleaned = str(value).strip().replace(",", "")
    if not cleaned:
        return None
    try:
        return float(cleaned)
    except ValueError:
        numbers = _NUMBER.findall(cleaned)
        return float(numbers[-1]) if numbers else None


# --------------------------------------------------------------------------------------- boxes


def last_box(text: str) -> str | None:
    """The last box of `text` with its command, as the official `last_boxed_only_string` finds it:
    `\\boxed x` (a `\\boxed ` with a space anywhere wins: up to the next `$`), else the last
    `\\boxed` (or, without one, `\\fbox`) with its balanced brace group; the whole `text` when it has
    no box, None when the braces never close."""
    if "\\boxed " in text:
        return "\\boxed " + text.split("\\boxed ")[-1].split("$")[0]
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return text
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i + 1]
    return None


def box_content(box: str) -> str:
    """`\\boxed{x}` or `\\boxed x` -> x; anything else (`\\fbox{x}`, plain text) unchanged."""
    if box.startswith("\\boxed "):
        return box[len("\\boxed "):]
    if box.startswith("\\boxed{") and box.endswith("}"):
        return box[len("\\boxed{"):-1]
    return box


def _has_box(text: str) -> bool:
    return "\\boxed" in text or "\\fbox" in text


# ------------------------------------------------------------------------------------- GSM8K


def gsm8k_extract(text: str) -> Extraction:
    """The official GSM8K answer of a completion (module docstring): a float and its rule."""
    if not text:
        return Extraction(None, None)
    box = last_box(text)
    read = text if box is None else box_content(box)
    value = to_number(read)
    if value is not None:
        # With a box, `last_box` returns the box or None, never the text itself.
        return Extraction(value, "boxed" if box is not None and _has_box(text) else "last_number")
    found = _HASH_NUMBER.search(text)
    if found:
        return Extraction(float(found.group(1).replace(",", "")), "hash")
    tag = _ANSWER_TAG.search(text)
    if tag:
        value = to_number(tag.group(1))
        if value is not None:
            return Extraction(value, "answer_tag")
    numbers = _NUMBER.findall(text)
    if numbers:
        return Extraction(float(numbers[-1]), "last_number")
    return Extraction(None, None)


def gsm8k_correct(extraction: Extraction, reference) -> bool:
    """The official verdict: both numbers and within `GSM8K_TOLERANCE`."""
    truth = to_number(reference)
    return extraction.value is not None and truth is not None and abs(extraction.value - truth) < GSM8K_TOLERANCE


# ---------------------------------------------------------------------------------- MATH-500


def math500_extract(text: str) -> Extraction:
    """The official MATH-500 answer of a completion (module docstring): a string and its rule."""
    text = text or ""
    box = last_box(text)
    if box:
        value = box_content(box)
        if value:
            return Extraction(value, "boxed" if _has_box(text) else "whole_text")
    tag = _ANSWER_TAG.search(text)
    if tag:
        return Extraction(tag.group(1).strip(), "answer_tag")
    return Extraction(None, None)


def _fix_fracs(s: str) -> str:
    head, *rest = s.split("\\frac")
    out = head
    for part in rest:
        out += "\\frac"
        if part[:1] == "{":
            out += part
            continue
        if len(part) < 2:
            return s
        a, b, tail = part[0], part[1], part[2:]
        out += "{" + a + "}" + ("{" + b + "}" + tail if b != "{" else b + tail)
    return out


def _fix_a_slash_b(s: str) -> str:
    parts = s.split("/")
    if len(parts) != 2:
        return s
    a, b = int(parts[0]), int(parts[1])  # a ValueError (not an integer ratio) falls back to equality
    return f"\\frac{{{a}}}{{{b}}}" if s == f"{a}/{b}" else s


def _remove_right_units(s: str) -> str:
    if "\\text{ " in s:
        left, right = s.split("\\text{ ")  # more than one unit: ValueError, equality decides
        return left
    return s


def _fix_sqrt(s: str) -> str:
    head, *rest = s.split("\\sqrt")
    out = head
    for part in rest:
        out += "\\sqrt" + (part if part[0] == "{" else "{" + part[0] + "}" + part[1:])  # `\sqrt` at the end: IndexError
    return out


def strip_string(s: str) -> str:
    """The MATH answer normalisation (`strip_string` of Hendrycks et al.): spacing, `\\left`,
    `\\dfrac`, degrees, `\\$`, a `\\text{ unit}`, `\\%`, leading `0.`, a short `x =`, `\\sqrt3`,
    `\\frac12`, `0.5`, `a/b`. Raises on a few malformed inputs (the caller compares the raw
    strings then, as the original does)."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "")
    s = _remove_right_units(s)
    s = s.replace("\\%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        s = sides[1]
    s = _fix_sqrt(s).replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def official_is_equiv(a: str | None, b: str | None) -> bool:
    """The MATH `is_equiv`: equal after `strip_string` (equal as given when it fails)."""
    if a is None or b is None:
        return a is None and b is None
    try:
        return strip_string(a) == strip_string(b)
    except Exception:  # noqa: BLE001 - the original compares the raw strings on any failure
        return a == b


def math500_correct(extraction: Extraction, reference, *, timeout_s: float = math_lib.DEFAULT_TIMEOUT_S) -> bool:
    """The official hybrid verdict: math-verify when it parses both (`$...$`), else `official_is_equiv`."""
    if extraction.value is None or reference is None:
        return False
    verdict = math_lib.verify_official(str(reference), str(extraction.value), timeout_s=timeout_s)
    if isinstance(verdict, bool):
        return verdict
    return official_is_equiv(str(extraction.value), str(reference))


# --------------------------------------------------------------------------------------- code


def first_python_block(text: str) -> Extraction:
    """HumanEval's program text: after the first "```python\\n" up to the next fence (`python_fence`),
    or, without that opening, the text up to its first fence (`whole_text`)."""
    opened = "```python\n" in text
    body = text.split("```python\n", 1)[-1].split("```")[0]
    return Extraction(body, "python_fence" if opened else "whole_text")


def mbpp_program(text: str) -> Extraction:
    """MBPP's program: the first ```python block, stripped (`python_fence`); with fences but no
    python one, the text before the first fence (`before_fence`); without fences the whole text."""
    if "```" not in text:
        return Extraction(text, "whole_text")
    rule = "python_fence" if "```python" in text else "before_fence"
    return Extraction(text.split("```python", 1)[-1].split("```")[0].strip(), rule)


def humaneval_program(text: str, prompt: str, entry_point: str) -> Extraction:
    """HumanEval's program: `sanitize(prompt + "\\n" + first_python_block, entry_point)`."""
    block = first_python_block(text)
    return Extraction(sanitize(prompt + "\n" + block.value, entry_point), block.rule + "+sanitize")


# ------------------------------------------------------------------------------ the two scorings


def strict_extract(kind: str, text: str, example: Mapping[str, Any]) -> Extraction:
    """What the training rewards read (module docstring); `Extraction(None, None)` for kinds other
    than math and code."""
    if kind == "math":
        value = math_lib.extract_answer(text)
        if value is None:
            return Extraction(None, None)
        # The box wins over `####`: the answer is the box's when it survives dropping every `####`.
        return Extraction(value, "boxed" if math_lib.extract_answer(text.replace("####", "")) == value else "hash")
    if kind == "code":
        return Extraction(code_lib.program_of(text, example), "last_fence" if "```" in text else "whole_text")
    return Extraction(None, None)


def official_extract(task_name: str, text: str, example: Mapping[str, Any]) -> Extraction:
    """The official rule of `task_name` (one of `OFFICIAL_TASKS`) applied to a completion; `example`
    holds the task's reward fields (`program_prefix`: the HumanEval prompt, `entry_point`)."""
    text = text or ""
    if task_name == "gsm8k":
        return gsm8k_extract(text)
    if task_name == "math500":
        return math500_extract(text)
    if task_name == "humaneval":
        return humaneval_program(text, str(example.get("program_prefix") or example.get("prompt_code") or ""),
                                 str(example.get("entry_point") or ""))
    if task_name == "mbpp":
        return mbpp_program(text)
    raise ValueError(f"no official scoring for task {task_name!r}; known: {', '.join(OFFICIAL_TASKS)}")


def official_correct(task_name: str, extractions: Sequence[Extraction], examples: Sequence[Mapping[str, Any]], *,
                     timeout_s: float | None = None, max_workers: int | None = None,
                     **sandbox_kwargs) -> list[bool]:
    """The official verdict of each extraction against its example (`answer` for math, `tests` and
    `entry_point` for code). `timeout_s`: math-verify's bound per answer, or the sandbox's per
    program (defaults: `math.DEFAULT_TIMEOUT_S`, 10 s)."""
    if len(extractions) != len(examples):
        raise ValueError(f"{len(extractions)} extractions but {len(examples)} examples")
    if task_name == "gsm8k":
        return [gsm8k_correct(x, ex.get("answer")) for x, ex in zip(extractions, examples)]
    if task_name == "math500":
        timeout = math_lib.DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
        return [math500_correct(x, ex.get("answer"), timeout_s=timeout) for x, ex in zip(extractions, examples)]
    if task_name in ("humaneval", "mbpp"):
        if not extractions:
            return []
        results = code_lib.check_programs([str(x.value) for x in extractions],
                                          [str(ex.get("tests") or "") for ex in examples],
                                          entry_points=[ex.get("entry_point") or None for ex in examples],
                                          max_workers=max_workers, timeout_s=10.0 if timeout_s is None else timeout_s,
                                          **sandbox_kwargs)
        return [r.status == "passed" for r in results]
    raise ValueError(f"no official scoring for task {task_name!r}; known: {', '.join(OFFICIAL_TASKS)}")
