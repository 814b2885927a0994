"""Tasks by name: prompt builder, reference answer, reward weights and the per-row reward fields.

    task = get_task("gsm8k", mode="thinking")
    records = load_task_records(task, "/path/to/gsm8k/train.jsonl")
    task.build_prompt(records[0])      # [{"role": "system", ...}, {"role": "user", ...}] or text
    task.reference(records[0])         # "72"
    task.example_fields(records[0])    # {"answer": "72"}: what the rewards read, all str
    task.reward_weights                # {"math_correct": 1.0, "math_format": 1.0, ...}

Modes: "thinking" (the reference GRPO default: a system prompt asking for <think></think>) and
"non-thinking" (the reference evaluation prompt). Prompt texts are module constants, copied from the
reference implementation (chinsengi/dUltra-os) where it has them; see each constant's comment.

Reward names are those of the reward registry (`dultra_jax.rewards`): `math_correct`,
`math_format`, `think_format`, `code_correct`, `code_fence`, `step_penalty`, `distill`,
`exact_match`. Default weights follow the reference: math 1.0 / format 1.0 / think tags 0.5 (thinking
mode only) / code 3.0 / fence 1.0 / step penalty 0.1. `distill` is never on by default: the config
adds it (`reward_weights={"distill": 1.0}`) when a teacher is configured.

Per-row fields (`example_fields`), all strings:
  - math tasks (`gsm8k`, `math`, `math500`, `custom` kind math): `answer` (the reference answer).
  - code tasks (`mbpp`, `humaneval`, `apps`, `custom` kind code):
      `answer`      the reference solution (may be "" for APPS rows without one);
      `tests`       Python source to run after the candidate program; it raises on failure
                    (MBPP: imports + setup + asserts; HumanEval: `test`, whose `check` the sandbox calls with
                    `entry_point`);
                    "" for APPS, which is judged on `input_output` case by case (call-based and
                    standard-input problems; see `rewards.code.check_apps_program`);
      `entry_point` the function under test ("" when the program is a stdin/stdout script);
      `input_output` APPS's JSON string {"inputs": [...], "outputs": [...], "fn_name"?: str}, else "";
      `prompt_code` code the prompt gave (HumanEval signature+docstring, APPS starter code), else "";
      `program_prefix` code run before the extracted program (HumanEval: the prompt, as the
                    reference runs `prompt + "\n" + completion`), else "".
  - `exact`: `answer`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dultra_jax.data.sources import DataError, check_fields, load_records

THINKING = "thinking"
NON_THINKING = "non-thinking"
MODES = (THINKING, NON_THINKING)

# ----------------------------------------------------------------------------------------------
# Prompt texts
# ----------------------------------------------------------------------------------------------

# chinsengi/dUltra-os diffu_grpo/data_utils.py, MATH_SYSTEM_PROMPT_THINKING (GRPO training default),
# after its textwrap.dedent(...).strip().
MATH_SYSTEM_PROMPT_THINKING = (
    "You are a math expert. To answer the user's question, first write your full reasoning inside "
    "<think></think>. After thinking, provide only the final result inside an <answer></answer> block, "
    "wrapping the answer in \\boxed{}."
)

# chinsengi/dUltra-os eval_math/gsm8k.py GSM_SYSTEM_PROMPT (= math500.py MATH500_SYSTEM_PROMPT and,
# up to a leading newline, data_utils.py MATH_SYSTEM_PROMPT_NON_THINKING). The evaluation puts it in
# ONE user message: this text + "\n\n" + question (trailing newline kept, as the reference does).
MATH_SYSTEM_PROMPT_NON_THINKING = (
    "You are a math expert.\n"
    "Follow these rules:\n"
    "1) Carefully read the question and identify what is being asked.\n"
    "2) Solve the problem step by step, showing the intermediate reasoning.\n"
    "3) Present the final answer inside \\boxed{}.\n"
)

# chinsengi/dUltra-os diffu_grpo/data_utils.py CODING_SYSTEM_PROMPT_THINKING (dedented, stripped;
# the reference's missing space in "unit tests,and" is kept).
CODING_SYSTEM_PROMPT_THINKING = (
    "You are an expert Python programmer. Carefully read the task description and unit tests,and write a "
    "correct and efficient python implementation. To answer the user's question, you first think about "
    "the reasoning process and then provide the user with the answer. The reasoning process and answer "
    "are enclosed within <think> </think> and a ```python``` code block, respectively, i.e., <think> "
    "reasoning process here </think>\n```python\nanswer code here\n```."
)

# chinsengi/dUltra-os diffu_grpo/data_utils.py CODING_SYSTEM_PROMPT_NON_THINKING (dedented, stripped).
CODING_SYSTEM_PROMPT_NON_THINKING = (
    "You are an expert Python programmer. Carefully read and think about the task provided and write "
    "correct, efficient Python code that solves the problem and passes the hidden tests. Wrap the final "
    "code inside a ```python``` code block."
)

# chinsengi/dUltra-os diffu_grpo/data_utils.py get_apps_questions: the user turn is
# dedent(f"Write a solution to the following problem:\n{problem}. {suffix}").strip(), where the
# suffix is this text in thinking mode and "" otherwise; the problem is the question, then
# "Starter code:\n..." when there is starter code (sample I/O is not shown during training).
APPS_USER_TEMPLATE = "Write a solution to the following problem:\n{problem}. {suffix}"
THINKING_SUFFIX = "Make sure to include all your thinking steps."
STARTER_CODE_HEADER = "Starter code:\n"

# chinsengi/dUltra-os eval_coding/lm_eval/tasks/humaneval/humaneval_instruct.yaml doc_to_text
# (user-only chat, 0-shot): the HumanEval `prompt` is the signature and docstring.
HUMANEVAL_USER_TEMPLATE = "Write a solution to the following problem and make sure that it passes the tests:\n{prompt}"

# chinsengi/dUltra-os eval_coding/lm_eval/tasks/mbpp/mbpp_instruct.yaml doc_to_text (user-only chat,
# 0-shot); the reference joins test_list[0..2] with newlines, we join all of them (MBPP has 3).
MBPP_USER_TEMPLATE = (
    "You are an expert Python programmer, and here is your task: {text} Your code should pass these "
    "tests:\n\n{tests}. Respond with the completed solution inside a ```python``` code block."
)

# Ours (the reference trains code only on APPS and evaluates MBPP/HumanEval without a system
# prompt): thinking mode for MBPP/HumanEval = the coding thinking system prompt + the evaluation user
# turn + this sentence, mirroring APPS's thinking suffix.
CODE_THINKING_USER_SUFFIX = "\n\n" + THINKING_SUFFIX

# MBPP's few-shot examples (`shots` option, the baselines' 3-shot runs): the MBPP "prompt" records
# (task ids 2, 3, 4) that lm-eval's mbpp tasks place first (`first_n`), each rendered as its user
# text, its code and "\n[DONE]", separated by a blank line, before the question, in one user turn.
MBPP_FEWSHOT = (
    {"text": "Write a function to find the similar elements from the given two tuple lists.",
     "code": "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n"
             "  return (res) ",
     "test_list": ["assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)",
                   "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)",
                   "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)"]},
    {"text": "Write a python function to identify non-prime numbers.",
     "code": "import math\r\ndef is_not_prime(n):\r\n    result = False\r\n    for i in range(2,int(math.sqrt(n)) + 1):"
             "\r\n        if n % i == 0:\r\n            result = True\r\n    return result",
     "test_list": ["assert is_not_prime(2) == False", "assert is_not_prime(10) == True",
                   "assert is_not_prime(35) == True"]},
    {"text": "Write a function to find the largest integers from a given list of numbers using heap queue algorithm.",
     "code": "import heapq as hq\r\ndef heap_queue_largest(nums,n):\r\n  largest_nums = hq.nlargest(n, nums)\r\n"
             "  return largest_nums",
     "test_list": ["assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] ",
                   "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] ",
                   "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, 35]"]},
)
FEWSHOT_TARGET_END = "\n[DONE]"
FEWSHOT_DELIMITER = "\n\n"

# MBPP standard splits by task_id (google-research mbpp README / HF "full" config).
MBPP_SPLITS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974)}

MATH_WEIGHTS = {"math_correct": 1.0, "math_format": 1.0}
CODE_WEIGHTS = {"code_correct": 3.0, "code_fence": 1.0}
THINK_WEIGHT = 0.5
STEP_PENALTY_WEIGHT = 0.1
REWARD_NAMES = ("math_correct", "math_format", "think_format", "code_correct", "code_fence",
                "step_penalty", "distill", "exact_match", "arithmetic_correct",
                "fill_correct")
# The reward part whose positive value means "correct", per task kind (accuracy in training
# metrics and in evaluation).
CORRECTNESS = {"math": "math_correct", "code": "code_correct", "exact": "exact_match",
               "arithmetic": "arithmetic_correct", "fill": "fill_correct"}


# ----------------------------------------------------------------------------------------------
# Task
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)   # identity hash: usable as a dict key / static arg
class Task:
    """A named task: how to prompt, what the answer is and how rewards are weighted.

    Attributes:
      name: the registry name.
      mode: the default prompt mode (`thinking` or `non-thinking`).
      reward_weights: reward name -> weight (names from the reward registry).
      required_fields: fields every record needs (`a|b`: either), checked at load time.
      kind: "math", "code" or "exact".
      prompt_fn / reference_fn / fields_fn / filter_fn: the task's functions (use the methods).
      validate_fn: `validate_fn(record, where)` raises `DataError` (naming `where`, the file and
        record) for a record whose fields are malformed; `load_task_records` calls it on every record.
    """

    name: str
    mode: str
    reward_weights: Mapping[str, float]
    required_fields: tuple[str, ...]
    kind: str
    prompt_fn: Callable[[Mapping[str, Any], str], list[dict[str, str]] | str]
    reference_fn: Callable[[Mapping[str, Any]], str]
    fields_fn: Callable[[Mapping[str, Any]], dict[str, str]]
    filter_fn: Callable[[Mapping[str, Any]], bool] | None = None
    validate_fn: Callable[[Mapping[str, Any], str], None] | None = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def build_prompt(self, example: Mapping[str, Any], mode: str | None = None):
        """Chat messages `[{"role", "content"}, ...]` (rendered with the chat template) or plain text."""
        mode = _check_mode(mode or self.mode)
        self._check(example)
        return self.prompt_fn(example, mode)

    def reference(self, example: Mapping[str, Any]) -> str:
        self._check(example)
        return self.reference_fn(example)

    def example_fields(self, example: Mapping[str, Any]) -> dict[str, str]:
        """The per-row strings the rewards need (module doc); the same keys for every row."""
        self._check(example)
        return self.fields_fn(example)

    def keep(self, example: Mapping[str, Any]) -> bool:
        """Whether the task uses this record (APPS difficulty, MBPP split, ...)."""
        return True if self.filter_fn is None else bool(self.filter_fn(example))

    def select(self, records: Sequence[Mapping[str, Any]]) -> list[int]:
        """Indices of the records the task uses (all of them for most tasks)."""
        if self.filter_fn is None:
            return list(range(len(records)))
        return [i for i in range(len(records)) if self.keep(records[i])]

    @property
    def correctness_part(self) -> str | None:
        """The reward part whose positive value means a correct completion (`CORRECTNESS`)."""
        return CORRECTNESS.get(self.kind)

    def _check(self, example: Mapping[str, Any]) -> None:
        check_fields(example, self.required_fields, where=f"task {self.name!r}")


def _check_mode(mode: str) -> str:
    m = mode.lower().replace("_", "-")
    if m not in MODES:
        raise ValueError(f"unknown prompt mode {mode!r}; expected one of {MODES}")
    return m


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def _chat(system: str | None, user: str) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def _str(example: Mapping[str, Any], field: str) -> str:
    """`example[field]` as text: "" when absent or None, JSON for lists and dicts."""
    value = example.get(field)
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def extract_hash_answer(text: str) -> str:
    """GSM8K's final answer: the text after the last `####`, commas (thousands separators) removed."""
    if "####" not in text:
        raise DataError(f"GSM8K answer has no '####' final answer: {text[-80:]!r}")
    return text.split("####")[-1].strip().replace(",", "")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) with balanced braces, or None."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start + (6 if text.startswith("\\boxed", start) else 5):]
    if rest[:1] == " ":   # `\boxed 2`: the argument is the next word
        word = re.match(r"\s*([^\s$]+)", rest)
        return word.group(1) if word else None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


def _math_prompt(question: str, mode: str, system_thinking: str = MATH_SYSTEM_PROMPT_THINKING,
                 system_non_thinking: str = MATH_SYSTEM_PROMPT_NON_THINKING):
    if mode == THINKING:
        return _chat(system_thinking, textwrap.dedent(question).strip())
    return _chat(None, system_non_thinking + "\n\n" + question)


def _weights(kind: str, mode: str, overrides: Mapping[str, float] | None) -> dict[str, float]:
    if kind == "math":
        weights = dict(MATH_WEIGHTS)
    elif kind == "code":
        weights = dict(CODE_WEIGHTS)
    elif kind == "exact":
        weights = {"exact_match": 1.0}
    elif kind == "arithmetic":
        weights = {"arithmetic_correct": 1.0}
    elif kind == "fill":
        weights = {"fill_correct": 1.0}
    else:
        raise ValueError(f"unknown task kind {kind!r}; expected math, code, exact, arithmetic or fill")
    if mode == THINKING and kind in ("math", "code"):
        weights["think_format"] = THINK_WEIGHT
    weights["step_penalty"] = STEP_PENALTY_WEIGHT
    for name, w in (overrides or {}).items():
        if name not in REWARD_NAMES:
            raise ValueError(f"reward_weights: unknown reward {name!r}; known: {REWARD_NAMES}")
        if w == 0:
            weights.pop(name, None)
        else:
            weights[name] = float(w)
    return weights


def _code_fields(*, answer: str, tests: str = "", entry_point: str = "", input_output: str = "",
                 prompt_code: str = "", program_prefix: str = "") -> dict[str, str]:
    return {"answer": answer, "tests": tests, "entry_point": entry_point, "input_output": input_output,
            "prompt_code": prompt_code, "program_prefix": program_prefix}


def _take_options(name: str, options: dict[str, Any], allowed: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"task {name!r}: unknown option(s) {unknown}; known: {sorted(allowed)}")
    return {k: options.get(k, v) for k, v in allowed.items()}


_COMMON = {"mode": THINKING, "reward_weights": None}


# ----------------------------------------------------------------------------------------------
# Math
# ----------------------------------------------------------------------------------------------

def _gsm8k(options):
    o = _take_options("gsm8k", options, _COMMON)
    mode = _check_mode(o["mode"])
    return Task(
        name="gsm8k", mode=mode, kind="math", reward_weights=_weights("math", mode, o["reward_weights"]),
        required_fields=("question", "answer"),
        prompt_fn=lambda ex, m: _math_prompt(str(ex["question"]), m),
        reference_fn=lambda ex: extract_hash_answer(str(ex["answer"])),
        fields_fn=lambda ex: {"answer": extract_hash_answer(str(ex["answer"]))},
        options=o)


def _math_reference(ex) -> str:
    answer = ex.get("answer")
    if answer not in (None, ""):
        return str(answer)
    boxed = last_boxed(str(ex.get("solution", "")))
    if boxed is None:
        raise DataError(f"MATH record {ex.get('unique_id', '')!r}: no `answer` and no \\boxed{{}} in `solution`")
    return boxed


def _math(name):
    def make(options):
        o = _take_options(name, options, _COMMON)
        mode = _check_mode(o["mode"])
        return Task(
            name=name, mode=mode, kind="math", reward_weights=_weights("math", mode, o["reward_weights"]),
            required_fields=("problem", "answer|solution"),
            prompt_fn=lambda ex, m: _math_prompt(str(ex["problem"]), m),
            reference_fn=_math_reference,
            fields_fn=lambda ex: {"answer": _math_reference(ex)},
            options=o)
    return make


# ----------------------------------------------------------------------------------------------
# Code
# ----------------------------------------------------------------------------------------------

def _mbpp_text(ex) -> str:
    return str(ex["text"] if "text" in ex else ex["prompt"])   # full file: text; sanitized: prompt


def _mbpp_entry_point(ex) -> str:
    names = re.findall(r"^def\s+([A-Za-z_]\w*)\s*\(", str(ex.get("code", "")).replace("\r\n", "\n"), re.M)
    tests = " ".join(map(str, ex.get("test_list", [])))
    for n in names:
        if re.search(rf"\b{re.escape(n)}\s*\(", tests):
            return n
    return names[-1] if names else ""


def _mbpp_tests(ex) -> str:
    parts = [str(s) for s in ex.get("test_imports", []) or []]
    if ex.get("test_setup_code"):
        parts.append(str(ex["test_setup_code"]))
    parts += [str(t) for t in ex["test_list"]]
    return "\n".join(parts) + "\n"


def _mbpp_user(ex) -> str:
    return MBPP_USER_TEMPLATE.format(text=_mbpp_text(ex), tests="\n".join(map(str, ex["test_list"])))


def _mbpp(options):
    o = _take_options("mbpp", options, {**_COMMON, "split": None, "shots": 0})
    mode = _check_mode(o["mode"])
    split, shots = o["split"], o["shots"]
    if split is not None and split not in MBPP_SPLITS:
        raise ValueError(f"task 'mbpp': option split={split!r}; expected one of {sorted(MBPP_SPLITS)} or None")
    if not isinstance(shots, int) or not 0 <= shots <= len(MBPP_FEWSHOT):
        raise ValueError(f"task 'mbpp': option shots={shots!r}; expected an integer in [0, {len(MBPP_FEWSHOT)}]")
    # The examples are answered in the user turn itself, as lm-eval renders a few-shot context.
    context = "".join(_mbpp_user(shot) + shot["code"] + FEWSHOT_TARGET_END + FEWSHOT_DELIMITER
                      for shot in MBPP_FEWSHOT[:shots])

    def prompt(ex, m):
        user = context + _mbpp_user(ex)
        if m == THINKING:
            return _chat(CODING_SYSTEM_PROMPT_THINKING, user + CODE_THINKING_USER_SUFFIX)
        return _chat(None, user)

    def fields(ex):
        return _code_fields(answer=_str(ex, "code").replace("\r\n", "\n"), tests=_mbpp_tests(ex),
                            entry_point=_mbpp_entry_point(ex))

    keep = None
    if split is not None:
        lo, hi = MBPP_SPLITS[split]
        keep = lambda ex: lo <= int(ex["task_id"]) <= hi  # noqa: E731
    return Task(
        name="mbpp", mode=mode, kind="code", reward_weights=_weights("code", mode, o["reward_weights"]),
        required_fields=("text|prompt", "test_list") + (("task_id",) if split else ()),
        prompt_fn=prompt, reference_fn=lambda ex: _str(ex, "code").replace("\r\n", "\n"),
        fields_fn=fields, filter_fn=keep, options=o)


def _humaneval(options):
    o = _take_options("humaneval", options, {**_COMMON, "shots": 0})
    mode = _check_mode(o["mode"])
    if o["shots"] != 0:
        # lm-eval draws HumanEval's shots at random from the test problems themselves (the task
        # has no few-shot split), which a prompt built from one record cannot reproduce.
        raise ValueError(f"task 'humaneval': option shots={o['shots']!r}; only 0 is supported (the reference's "
                         "few-shot HumanEval samples its shots from the test set at random)")

    def prompt(ex, m):
        user = HUMANEVAL_USER_TEMPLATE.format(prompt=str(ex["prompt"]))
        if m == THINKING:
            return _chat(CODING_SYSTEM_PROMPT_THINKING, user + CODE_THINKING_USER_SUFFIX)
        return _chat(None, user)

    def reference(ex):
        return str(ex["prompt"]) + _str(ex, "canonical_solution")

    def fields(ex):
        entry = str(ex["entry_point"])
        return _code_fields(answer=reference(ex), tests=ex["test"], entry_point=entry,
                            prompt_code=str(ex["prompt"]), program_prefix=str(ex["prompt"]))

    return Task(
        name="humaneval", mode=mode, kind="code", reward_weights=_weights("code", mode, o["reward_weights"]),
        required_fields=("prompt", "entry_point", "test"),
        prompt_fn=prompt, reference_fn=reference, fields_fn=fields, options=o)


def _json_field(ex, field: str):
    value = ex.get(field)
    if value in (None, ""):
        return None
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return None
    return value


def apps_test_shape(input_output: Any) -> tuple[str | None, int]:
    """`(fn_name, number of test cases)` of APPS's `input_output` (its JSON string or the object).

    `fn_name` is None for a standard-input problem; the cases are the (input, output) pairs, paired
    as the reference zips `inputs` with `outputs`. "" or None (APPS problems without tests) give
    `(None, 0)`. Integers are not converted (APPS has some longer than Python's default limit).

    Raises:
      ValueError: saying what is malformed (not JSON, not an object, `inputs`/`outputs` missing or
        not lists, `fn_name` not an identifier).
    """
    if input_output is None or input_output == "":
        return None, 0
    io = input_output
    if isinstance(io, str):
        try:
            io = json.loads(io, parse_int=str)
        except ValueError as e:
            raise ValueError(f"not valid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(io, dict):
        raise ValueError(f"expected a JSON object with `inputs` and `outputs`, got {type(io).__name__}")
    for key in ("inputs", "outputs"):
        if not isinstance(io.get(key), list):
            have = "missing" if key not in io else f"a {type(io[key]).__name__}"
            raise ValueError(f"`{key}` must be a list ({have}; the object has keys {sorted(io)})")
    fn_name = io.get("fn_name")
    if fn_name is not None and not (isinstance(fn_name, str) and fn_name.isidentifier()):
        raise ValueError(f"`fn_name` must be a Python identifier, got {fn_name!r}")
    return fn_name, min(len(io["inputs"]), len(io["outputs"]))


def _apps(options):
    """codeparrot/apps records: `problem_id`, `question`, `solutions` (JSON list of str),
    `input_output` (JSON: `inputs`, `outputs`, optional `fn_name`), `starter_code`, `difficulty`,
    `url`. The reference's filter keeps `difficulties` (introductory) with a `fn_name`
    (call-based problems; `require_fn_name=False` keeps standard-input problems too)."""
    o = _take_options("apps", options, {**_COMMON, "difficulties": ("introductory",),
                                        "require_fn_name": True, "show_io": False})
    mode = _check_mode(o["mode"])
    difficulties = None if o["difficulties"] is None else tuple(o["difficulties"])

    def problem(ex) -> str:
        sections = [textwrap.dedent(str(ex["question"])).strip()]
        starter = _str(ex, "starter_code")
        if starter:
            sections.append(STARTER_CODE_HEADER + starter.strip())
        io = _str(ex, "input_output")
        if o["show_io"] and io:
            sections.append(f"Sample input/output:\n{io.strip()}")
        return "\n\n".join(s for s in sections if s)

    def prompt(ex, m):
        suffix = THINKING_SUFFIX if m == THINKING else ""
        user = textwrap.dedent(APPS_USER_TEMPLATE.format(problem=problem(ex), suffix=suffix)).strip()
        system = CODING_SYSTEM_PROMPT_THINKING if m == THINKING else CODING_SYSTEM_PROMPT_NON_THINKING
        return _chat(system, user)

    def reference(ex):
        solutions = _json_field(ex, "solutions")
        return str(solutions[0]) if isinstance(solutions, list) and solutions else ""

    def shape(ex) -> tuple[str | None, int]:
        try:
            return apps_test_shape(ex.get("input_output"))
        except ValueError:
            return None, 0

    def fn_name(ex) -> str | None:
        return shape(ex)[0]

    def fields(ex):
        return _code_fields(answer=reference(ex), entry_point=fn_name(ex) or "",
                            input_output=_str(ex, "input_output"), prompt_code=_str(ex, "starter_code"))

    def wanted_difficulty(ex) -> bool:
        return difficulties is None or str(ex.get("difficulty", "")) in difficulties

    def keep(ex):
        # The reference keeps call-based problems; without that filter, a problem needs a test case.
        if not wanted_difficulty(ex):
            return False
        name, n_cases = shape(ex)
        return name is not None if o["require_fn_name"] else n_cases > 0

    def validate(ex, where):
        if not wanted_difficulty(ex):
            return  # never used: its tests are not read
        try:
            apps_test_shape(ex.get("input_output"))
        except ValueError as e:
            raise DataError(f"{where}: field 'input_output' of APPS problem {ex.get('problem_id', '?')}: {e}") from None

    return Task(
        name="apps", mode=mode, kind="code", reward_weights=_weights("code", mode, o["reward_weights"]),
        required_fields=("question", "input_output"),
        prompt_fn=prompt, reference_fn=reference, fields_fn=fields, filter_fn=keep, validate_fn=validate, options=o)


# ----------------------------------------------------------------------------------------------
# Custom and exact
# ----------------------------------------------------------------------------------------------

def _custom(options):
    o = _take_options("custom", options, {
        **_COMMON, "prompt_field": "prompt", "answer_field": "answer", "system_prompt": None,
        "non_thinking_system_prompt": None, "template": None, "kind": "math", "extra_fields": ()})
    mode = _check_mode(o["mode"])
    pf, af, kind = o["prompt_field"], o["answer_field"], o["kind"]
    extra = tuple(o["extra_fields"])
    defaults = {"math": (MATH_SYSTEM_PROMPT_THINKING, MATH_SYSTEM_PROMPT_NON_THINKING),
                "code": (CODING_SYSTEM_PROMPT_THINKING, CODING_SYSTEM_PROMPT_NON_THINKING),
                "exact": (None, None)}
    if kind not in defaults:
        raise ValueError(f"task 'custom': option kind={kind!r}; expected math, code or exact")
    sys_think = o["system_prompt"] if o["system_prompt"] is not None else defaults[kind][0]
    sys_plain = (o["non_thinking_system_prompt"] if o["non_thinking_system_prompt"] is not None
                 else o["system_prompt"] if o["system_prompt"] is not None else defaults[kind][1])

    def user(ex) -> str:
        if o["template"]:
            try:
                return str(o["template"]).format_map({k: v for k, v in ex.items()})
            except KeyError as e:
                raise DataError(f"task 'custom': template field {e.args[0]!r} missing from the record") from e
        return str(ex[pf])

    def prompt(ex, m):
        system = sys_think if m == THINKING else sys_plain
        return _chat(system or None, user(ex).strip())

    def fields(ex):
        out = {"answer": _str(ex, af)}
        if kind == "code":
            out = _code_fields(answer=out["answer"], tests=_str(ex, "tests"), entry_point=_str(ex, "entry_point"),
                               input_output=_str(ex, "input_output"), prompt_code=_str(ex, "prompt_code"),
                               program_prefix=_str(ex, "program_prefix"))
        for f in extra:
            out[f] = _str(ex, f)
        return out

    return Task(
        name="custom", mode=mode, kind=kind, reward_weights=_weights(kind, mode, o["reward_weights"]),
        required_fields=(pf, af) + extra if not o["template"] else (af,) + extra,
        prompt_fn=prompt, reference_fn=lambda ex: _str(ex, af), fields_fn=fields, options=o)


def _exact(options):
    o = _take_options("exact", options, {**_COMMON, "chat": False})

    def prompt(ex, m):
        del m
        if "prompt" in ex:
            text = str(ex["prompt"])
        else:
            text = " ".join(str(int(i)) for i in ex["prompt_ids"])
        return _chat(None, text) if o["chat"] else text

    return Task(
        name="exact", mode=_check_mode(o["mode"]), kind="exact",
        reward_weights=_weights("exact", THINKING, o["reward_weights"]),
        required_fields=("prompt|prompt_ids", "answer"),
        prompt_fn=prompt, reference_fn=lambda ex: str(ex["answer"]),
        fields_fn=lambda ex: {"answer": str(ex["answer"])}, options=o)


def _char_task(name: str) -> Callable[[dict[str, Any]], Task]:
    """An embedded character-level task (`dultra_jax.data.arithmetic`, the earlier demo; `.fill`,
    the demo): the bare problem text as the prompt (no system prompt, no chat template), and the
    record's `answer` field for the task's own strict reward (`arithmetic_correct`: the integer
    after `####`; `fill_correct`: the template that the completion must fill)."""

    def make(options):
        o = _take_options(name, options, {**_COMMON, "mode": NON_THINKING})
        return Task(
            name=name, mode=_check_mode(o["mode"]), kind=name,
            reward_weights=_weights(name, NON_THINKING, o["reward_weights"]),
            required_fields=("prompt", "answer"), prompt_fn=lambda ex, m: str(ex["prompt"]),
            reference_fn=lambda ex: str(ex["answer"]), fields_fn=lambda ex: {"answer": str(ex["answer"])},
            options=o)

    return make


TASKS: dict[str, Callable[[dict[str, Any]], Task]] = {
    "gsm8k": _gsm8k,
    "math": _math("math"),
    "math500": _math("math500"),
    "mbpp": _mbpp,
    "humaneval": _humaneval,
    "apps": _apps,
    "custom": _custom,
    "exact": _exact,
    "arithmetic": _char_task("arithmetic"),
    "fill": _char_task("fill"),
}


def get_task(name: str, **options) -> Task:
    """The task `name` (one of `TASKS`) with its options.

    Options for every task: `mode` ("thinking" default, or "non-thinking"), `reward_weights`
    (merged into the defaults; a weight of 0 removes a reward). Per task: mbpp `split`
    (prompt/test/validation/train by task_id, None = every record); apps `difficulties`
    (("introductory",)), `require_fn_name` (True), `show_io` (False); custom `prompt_field`,
    `answer_field`, `system_prompt`, `non_thinking_system_prompt`, `template` (str.format over the
    record), `kind` (math/code/exact: default system prompts and rewards), `extra_fields`; exact
    `chat` (False: the prompt text is encoded as is, no chat template).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name](dict(options))


def load_task_records(task: Task, path: str, split: str | None = None, *, data_dir: str | None = None,
                      limit: int | None = None) -> list[dict]:
    """`load_records` checked for the task's fields, keeping only the records the task uses."""
    records = load_records(path, split, task.required_fields, data_dir=data_dir, validate=task.validate_fn)
    keep = task.select(records)
    if not keep:
        raise DataError(f"{path}: no record is usable by task {task.name!r} (options {dict(task.options)})")
    records = [records[i] for i in keep]
    return records[:limit] if limit is not None else records
