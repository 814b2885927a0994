"""A character-level task (the embedded demo's before `fill`): short, verifiable arithmetic chains
with worked solutions.

A problem adds and subtracts four one-digit numbers from left to right; the completion works it
out one step per operation, then states the answer after GSM8K's `####` marker:

    prompt    "7+5-8+9="
    solution  "7+5=12;12-8=4;4+9=13;####13"
    answer    "13"

Operands are 0..9, every partial result is non-negative (a draw that would go negative is
redrawn), so every number is at most 36 and Python's `eval` of the prompt (without the `=`) is
the answer. The completion mixes the two kinds of tokens dUltra's planner exploits: *easy* ones -
the fixed punctuation (`=`, `;`, `####`) and copies (the operands copied from the prompt, each
step's result copied as the next step's left operand, the final result copied after `####`),
which can be decoded in parallel - and *hard* ones - the digits of each result, which depend on
the earlier results. (An earlier version drew two-digit operands; a 4-layer, D=128 model learned
the format but not the carries in 1,500 steps, so the demo now keeps the numbers small and the
chain longer.)

Splits. `TRAIN_SEEDS` and `HELDOUT_SEEDS` are disjoint seed ranges, and in addition each prompt
string belongs to exactly one split by construction: `split_of(prompt)` is the low bit of the
BLAKE2b hash of the prompt text, and `make_problem` redraws (from the same seeded stream) until the
prompt belongs to the split of its seed's range. So no held-out prompt can ever equal a training
prompt, however many problems either side draws. Of the 45,785 valid prompts, 22,892 are
training prompts and 22,893 held-out ones.

Lengths. Prompts have at most 8 characters (`PROMPT_LENGTH` = 8), solutions at most 29
(`"9+9=18;18+9=27;27+9=36;####36"`), so every solution plus at least one EOS fits in
`GEN_LENGTH` = 32 = 4 blocks of `BLOCK_LENGTH` = 8 tokens; the rest of the generation is EOS
padding (LLaDA's SFT convention: the model learns to fill the tail with EOS).

Tokenizer. One token per character (a `tokenizers` WordLevel model over single characters, with a
pre-tokenizer that isolates every character and a `Fuse` decoder), vocabulary = the special tokens
then `CHARS`, in this order:

    id 0  `<|endoftext|>`  EOS_ID  (also the pad token)
    id 1  `<|mdm_mask|>`   MASK_ID
    id 2+ "0123456789+-=;#"  (CHAR_IDS)

so `vocab_size()` is 17. There is no unknown token: encoding a character outside `CHARS` raises.
There is no chat template either: prompts are encoded as plain text
(`tokenizer.encode(prompt, add_special_tokens=False)`).

Reward. The final answer follows `####`, which `dultra_jax.rewards.math.extract_answer` reads,
so the registry's `math_correct` reward scores completions; `check_answer` is the strict
(integer-only) checker of this module. With the task

    get_task("custom", kind="math", mode="non-thinking", system_prompt="",
             prompt_field="prompt", answer_field="answer", reward_weights={"math_format": 0})

over `records(split, n)`, the prompt the model sees is exactly the problem text (a single user
message, rendered without a template because this tokenizer has none) and the reward is
`math_correct` (+ the step penalty).
"""

from __future__ import annotations

import random
import re
from typing import Any

from dultra_jax.data import char_task
from dultra_jax.data.char_task import (EOS_ID, EOS_TOKEN, HELDOUT_SEEDS, MASK_ID, MASK_TOKEN, PAD_ID,  # noqa: F401
                                       SPECIAL_TOKENS, SPLITS, TRAIN_SEEDS, split_of, split_of_seed)

# ----------------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------------

DIGITS = "0123456789"
OPS = "+-"
STEP_SEP = ";"
ANSWER_MARKER = "####"
CHARS = DIGITS + OPS + "=" + STEP_SEP + "#"   # every character of prompts and solutions
CHAR_IDS = {c: len(SPECIAL_TOKENS) + i for i, c in enumerate(CHARS)}

NUM_OPERANDS = 4          # three operations per problem
MAX_OPERAND = 9           # operands are drawn uniformly from 0..MAX_OPERAND

PROMPT_LENGTH = 8         # prompt tokens (characters): "9+9+9+9=" is the longest
BLOCK_LENGTH = 8
GEN_LENGTH = 32           # generation tokens: solution (<= 28) + EOS padding, 4 blocks

_MAX_REDRAWS = 10_000     # never reached: about 1 draw in 3 is kept


# ----------------------------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------------------------

def _apply(x: int, op: str, y: int) -> int:
    return x + y if op == "+" else x - y


def _render(operands: list[int], ops: list[str]) -> tuple[str, str, str]:
    """(prompt, solution, answer) of a chain (the caller checks that partial results are >= 0)."""
    prompt = "".join(f"{x}{op}" for x, op in zip(operands, ops)) + f"{operands[-1]}="
    steps, acc = [], operands[0]
    for op, y in zip(ops, operands[1:]):
        result = _apply(acc, op, y)
        steps.append(f"{acc}{op}{y}={result}")
        acc = result
    answer = str(acc)
    solution = STEP_SEP.join(steps) + STEP_SEP + ANSWER_MARKER + answer
    return prompt, solution, answer


def _partials(operands: list[int], ops: list[str]) -> list[int]:
    out, acc = [], operands[0]
    for op, y in zip(ops, operands[1:]):
        acc = _apply(acc, op, y)
        out.append(acc)
    return out


def make_problem(seed: int) -> dict[str, str]:
    """The problem of `seed` (a seed of `TRAIN_SEEDS` or `HELDOUT_SEEDS`), deterministic.

    Returns `{"prompt": "7+5-9+3=", "solution": "7+5=12;12-9=3;3+3=6;####6", "answer": "6"}`; its
    prompt belongs to the split of the seed's range (`split_of(prompt) == split_of_seed(seed)`).
    """
    split = split_of_seed(int(seed))
    rng = random.Random(int(seed))
    for _ in range(_MAX_REDRAWS):
        operands = [rng.randint(0, MAX_OPERAND) for _ in range(NUM_OPERANDS)]
        ops = [rng.choice(OPS) for _ in range(NUM_OPERANDS - 1)]
        if min(_partials(operands, ops)) < 0:
            continue
        prompt, solution, answer = _render(operands, ops)
        if split_of(prompt) != split:
            continue
        return {"prompt": prompt, "solution": solution, "answer": answer}
    raise RuntimeError(f"seed {seed}: no valid problem in {_MAX_REDRAWS} draws")  # pragma: no cover


def make_problems(split: str, n: int, start: int = 0) -> list[dict[str, str]]:
    """The problems of seeds `SPLITS[split][start:start + n]` (split "train" or "heldout")."""
    return char_task.make_problems(make_problem, split, n, start)


def records(split: str, n: int, start: int = 0) -> list[dict[str, str]]:
    """Task records for the data pipeline: `{"prompt", "solution", "answer"}` (module doc for the
    task that reads them)."""
    return make_problems(split, n, start)


def write_jsonl(path: str, split: str, n: int, start: int = 0) -> str:
    """Writes `records(split, n, start)` as JSON lines to `path` (for file-based configs)."""
    return char_task.write_jsonl(path, records(split, n, start))


# ----------------------------------------------------------------------------------------------
# Checking
# ----------------------------------------------------------------------------------------------

_NUMBER = r"(0|[1-9]\d*)"
_PROMPT_RE = re.compile("^" + (_NUMBER + "([+-])") * (NUM_OPERANDS - 1) + _NUMBER + "=$")
_STEP_RE = re.compile(f"^{_NUMBER}([+-]){_NUMBER}={_NUMBER}$")
_HASH_RE = re.compile(r"####\s*([^\n]*)")   # as `dultra_jax.rewards.math.extract_answer`
_INT_RE = re.compile(r"[+-]?\d+")


def parse_prompt(prompt: str) -> tuple[list[int], list[str]]:
    """(operands, ops) of a prompt; ValueError when it is not a well-formed problem."""
    m = _PROMPT_RE.match(prompt)
    if not m:
        raise ValueError(f"not an arithmetic prompt: {prompt!r}")
    groups = m.groups()
    return [int(g) for g in groups[0::2]], list(groups[1::2])


def final_answer(completion: str) -> str | None:
    """The text after the answer marker, read as `dultra_jax.rewards.math.extract_answer` reads it:
    the rest of the line after the first `####` of the last line holding one (stripped); None when
    there is no marker. So `"####3;####50"` reads `"3;####50"` (not a number)."""
    found = _HASH_RE.findall(completion)
    return found[-1].strip() if found else None


def check_answer(completion: str, answer: str) -> bool:
    """Whether the completion's final answer (`final_answer`) is an integer equal to `answer`.

    Anything else is wrong: no marker, nothing after it, any other character after it. The
    `math_correct` reward agrees on every completion the task's vocabulary can express except
    arithmetic expressions after the marker (`####40+2` for 42), which math-verify evaluates and
    accepts and this checker rejects.
    """
    value = final_answer(completion)
    if value is None or not _INT_RE.fullmatch(value):
        return False
    try:
        return int(value) == int(str(answer).strip())
    except ValueError:
        return False


def verify(problem: dict[str, Any]) -> bool:
    """Recomputes the problem from its prompt and checks its worked solution step by step.

    True when the prompt is well formed, every step `x op y = r` copies the right operands (the
    prompt's first two, then the previous result and the next operand) and computes `r` correctly
    with `r >= 0`, the solution ends with `####` + the last result, `answer` is that result and
    equals `eval` of the prompt, and the solution is exactly the canonical one.
    """
    try:
        operands, ops = parse_prompt(str(problem["prompt"]))
        solution, answer = str(problem["solution"]), str(problem["answer"])
    except (KeyError, ValueError):
        return False
    parts = solution.split(STEP_SEP)
    if len(parts) != len(ops) + 1 or not parts[-1].startswith(ANSWER_MARKER):
        return False
    left = operands[0]
    for part, op, right in zip(parts[:-1], ops, operands[1:]):
        m = _STEP_RE.match(part)
        if not m:
            return False
        x, step_op, y, r = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        if (x, step_op, y) != (left, op, right) or r != _apply(x, op, y) or r < 0:
            return False
        left = r
    stated = parts[-1][len(ANSWER_MARKER):]
    if not re.fullmatch(_NUMBER, stated) or int(stated) != left or answer != stated:
        return False
    if eval(problem["prompt"][:-1], {"__builtins__": {}}, {}) != left:   # noqa: S307 (checked by regex)
        return False
    return (problem["prompt"], solution, answer) == _render(operands, ops)


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

def vocab_size() -> int:
    """Number of token ids: the special tokens plus one per character of `CHARS`."""
    return len(SPECIAL_TOKENS) + len(CHARS)


def vocab() -> dict[str, int]:
    """Token -> id (module doc)."""
    return char_task.vocab(CHARS)


def build_tokenizer(out_dir: str | None = None):
    """The task's character-level tokenizer (`char_task.build_tokenizer`), saved to `out_dir` when
    given."""
    return char_task.build_tokenizer(CHARS, PROMPT_LENGTH + GEN_LENGTH, out_dir)


def encode_example(tokenizer, problem: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(prompt ids, solution ids followed by EOS up to `GEN_LENGTH`) of a problem.

    The prompt is encoded as plain text (no template, no special tokens), unpadded; ValueError when
    it is longer than `PROMPT_LENGTH` or the solution leaves no room for an EOS in `GEN_LENGTH`.
    """
    prompt = list(tokenizer.encode(str(problem["prompt"]), add_special_tokens=False))
    solution = list(tokenizer.encode(str(problem["solution"]), add_special_tokens=False))
    if len(prompt) > PROMPT_LENGTH:
        raise ValueError(f"prompt {problem['prompt']!r} has {len(prompt)} tokens > PROMPT_LENGTH={PROMPT_LENGTH}")
    if len(solution) >= GEN_LENGTH:
        raise ValueError(f"solution {problem['solution']!r} has {len(solution)} tokens; GEN_LENGTH={GEN_LENGTH} "
                         f"leaves no room for EOS")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else EOS_ID
    return prompt, solution + [int(eos)] * (GEN_LENGTH - len(solution))


# The longest prompt and solution (all operands MAX_OPERAND, all additions) must fit.
_LONGEST = _render([MAX_OPERAND] * NUM_OPERANDS, ["+"] * (NUM_OPERANDS - 1))
MAX_PROMPT_CHARS = len(_LONGEST[0])
MAX_SOLUTION_CHARS = len(_LONGEST[1])
assert MAX_PROMPT_CHARS <= PROMPT_LENGTH and MAX_SOLUTION_CHARS < GEN_LENGTH and GEN_LENGTH % BLOCK_LENGTH == 0
