"""The embedded demo task: template filling, where confidence cannot tell safe guesses from unsafe ones.

A problem is a template of `GEN_LENGTH` = 32 symbols; the completion writes one letter per symbol:

    symbol     the letter below it must be
    a b c d    that letter (a copy)
    ?          any of a, b, c, d (a free choice)
    # #        two different letters of e, f, g, h (a linked pair: `#` always come in pairs)

    prompt      "??##?dc????d???c????b##?##???b??"
    solution    "aaheadcdacadaabcbadbbegdheababcc"   (one of many correct completions)

Why this task. To the model every `?` and every `#` is equally uncertain (a trained model gives
about 1/4 to each of the four letters the position may take), so every confidence-based rule
(`threshold`, `factor`, `low_confidence`) treats them alike. But they are not alike: the free
letters are independent given the prompt, so any number of them can be decoded in the same step,
while the two letters of a pair depend on each other - decoded in the same step from their
marginals, both take the model's favourite letter (the "parallel decoding curse" of masked
diffusion models: greedy decoding takes each position's most likely letter, and a model that
slightly prefers one letter puts it at both). A rule that decodes many tokens per step without
losing accuracy must reveal the free letters and the copies together and split each pair over
two steps. Confidence alone cannot tell the two kinds apart; the model's hidden state can (a
pair's position predicts e-h, a free one a-d), and so can a planner head that reads it. RL can
also make the backbone commit (e.g. always `e` at a pair's first `#`), after which the pairs are
certain too: the mode filtering that gives dUltra much of its speed.

Each template has `NUM_LINKED` = 3 pairs (never overlapping or touching, so every dependency is
one pair); every other symbol is `?` with probability `FREE_PROBABILITY` = 0.8, else a random
letter to copy. Free letters are uniform, a pair uniform over the 12 ordered pairs of different
letters.

Splits and tokenizer as `dultra_jax.data.char_task` describes: disjoint seed ranges, each template
in exactly one split (so no held-out prompt can ever equal a training prompt), one token per
character, vocabulary = the special tokens then `CHARS`, in this order:

    id 0  `<|endoftext|>`  EOS_ID  (also the pad token)
    id 1  `<|mdm_mask|>`   MASK_ID
    id 2+ "abcdefgh?#"  (CHAR_IDS)

so `vocab_size()` is 12. `encode_example` names characters outside `CHARS`. There is no chat
template: prompts are plain text (`tokenizer.encode(prompt, add_special_tokens=False)`).

Reward. `fill_correct` (`dultra_jax.rewards.fill`) is `check_answer(completion, template)`; the
task `fill` (`dultra_jax.data.tasks`) gives each example's template as its `answer` field.
"""

from __future__ import annotations

import random
from typing import Any

from dultra_jax.data import char_task
from dultra_jax.data.char_task import (EOS_ID, EOS_TOKEN, HELDOUT_SEEDS, MASK_ID, MASK_TOKEN, PAD_ID,  # noqa: F401
                                       SPECIAL_TOKENS, SPLITS, TRAIN_SEEDS, split_of, split_of_seed)

# ----------------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------------

LETTERS = "abcd"             # copied and free letters
LINKED_LETTERS = "efgh"      # the letters of a linked pair
FREE = "?"
LINKED = "#"
CHARS = LETTERS + LINKED_LETTERS + FREE + LINKED
CHAR_IDS = {c: len(SPECIAL_TOKENS) + i for i, c in enumerate(CHARS)}

NUM_LINKED = 3                # `##` pairs per template
FREE_PROBABILITY = 0.8        # each other symbol is `?` with this probability, else a random letter

PROMPT_LENGTH = 32
GEN_LENGTH = 32               # one letter per template symbol: 2 blocks of 16
BLOCK_LENGTH = 16

_MAX_REDRAWS = 1_000          # about one draw in two is kept


# ----------------------------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------------------------

def _draw(rng: random.Random) -> tuple[str, str]:
    """(template, solution): NUM_LINKED `##` pairs at uniform non-touching positions, the rest
    free or copied; every free letter uniform over LETTERS, every pair uniform over the ordered
    pairs of different LINKED_LETTERS."""
    while True:  # pairs start at i; they may not overlap or touch (each dependency is one pair)
        starts = sorted(rng.sample(range(GEN_LENGTH - 1), NUM_LINKED))
        if all(b - a > 2 for a, b in zip(starts, starts[1:])):
            break
    template = [FREE if rng.random() < FREE_PROBABILITY else rng.choice(LETTERS) for _ in range(GEN_LENGTH)]
    solution = [rng.choice(LETTERS) if t == FREE else t for t in template]
    for i in starts:
        template[i:i + 2] = LINKED * 2
        solution[i:i + 2] = rng.sample(LINKED_LETTERS, 2)
    return "".join(template), "".join(solution)


def make_problem(seed: int) -> dict[str, str]:
    """The problem of `seed` (a seed of `TRAIN_SEEDS` or `HELDOUT_SEEDS`), deterministic.

    Returns `{"prompt": template, "solution": one correct completion, "answer": template}` (the
    checker needs the template, and `answer` is the field the task passes to rewards); the
    template belongs to the split of the seed's range.
    """
    split = split_of_seed(int(seed))
    rng = random.Random(int(seed))
    for _ in range(_MAX_REDRAWS):
        template, solution = _draw(rng)
        if split_of(template) == split:
            return {"prompt": template, "solution": solution, "answer": template}
    raise RuntimeError(f"seed {seed}: no template of split {split} in {_MAX_REDRAWS} draws")  # pragma: no cover


def make_problems(split: str, n: int, start: int = 0) -> list[dict[str, str]]:
    """The problems of seeds `SPLITS[split][start:start + n]` (split "train" or "heldout")."""
    return char_task.make_problems(make_problem, split, n, start)


def records(split: str, n: int, start: int = 0) -> list[dict[str, str]]:
    """Task records for the data pipeline: `{"prompt", "solution", "answer"}`."""
    return make_problems(split, n, start)


def write_jsonl(path: str, split: str, n: int, start: int = 0) -> str:
    """Writes `records(split, n, start)` as JSON lines to `path` (for file-based configs)."""
    return char_task.write_jsonl(path, records(split, n, start))


# ----------------------------------------------------------------------------------------------
# Checking
# ----------------------------------------------------------------------------------------------

def linked_pairs(template: str) -> list[int]:
    """The first positions of the template's `##` pairs."""
    return [i for i in range(len(template) - 1) if template[i:i + 2] == LINKED * 2
            and (i == 0 or template[i - 1] != LINKED)]


def is_template(template: str) -> bool:
    """Whether `template` is a well-formed template: GEN_LENGTH symbols of `CHARS` whose `#` come as
    NUM_LINKED separate pairs."""
    return (len(template) == GEN_LENGTH and set(template) <= set(LETTERS + FREE + LINKED)
            and template.count(LINKED) == 2 * NUM_LINKED == 2 * len(linked_pairs(template)))


def violations(completion: str, template: str) -> list[str]:
    """What is wrong with `completion` as a fill of `template` ([] when it is correct).

    The completion is read as the model writes it: exactly GEN_LENGTH letters (an EOS decoded to
    "" shortens it).
    """
    if not is_template(template):
        return [f"not a template: {template!r}"]
    if len(completion) != GEN_LENGTH:
        return [f"{len(completion)} characters, expected {GEN_LENGTH}"]
    wrong = []
    for i, (t, c) in enumerate(zip(template, completion)):
        allowed = LINKED_LETTERS if t == LINKED else LETTERS
        if c not in allowed:
            wrong.append(f"position {i}: {c!r} is not a letter of {allowed!r}")
        elif t in LETTERS and c != t:
            wrong.append(f"position {i}: {c!r} where the template copies {t!r}")
    wrong += [f"positions {i} and {i + 1}: the linked pair {LINKED * 2} holds {completion[i:i + 2]!r}, one "
              f"letter twice" for i in linked_pairs(template) if completion[i] == completion[i + 1]]
    return wrong


def check_answer(completion: str, template: str) -> bool:
    """Whether `completion` fills `template` correctly (`violations` is empty)."""
    return not violations(completion, str(template))


def verify(problem: dict[str, Any]) -> bool:
    """Whether a record is consistent: its template is well formed, `answer` is the template, and
    its solution fills it correctly."""
    try:
        template, solution, answer = str(problem["prompt"]), str(problem["solution"]), str(problem["answer"])
    except KeyError:
        return False
    return answer == template and check_answer(solution, template)


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

def vocab_size() -> int:
    """Number of token ids: the special tokens plus one per character of `CHARS`."""
    return len(SPECIAL_TOKENS) + len(CHARS)


def build_tokenizer(out_dir: str | None = None):
    """The task's character-level tokenizer (`char_task.build_tokenizer`), saved to `out_dir` when
    given."""
    return char_task.build_tokenizer(CHARS, PROMPT_LENGTH + GEN_LENGTH, out_dir)


def encode_example(tokenizer, problem: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(prompt ids, solution ids) of a problem: GEN_LENGTH letters, so no EOS padding.

    ValueError naming the field when the prompt or solution has characters outside `CHARS` or
    the wrong length.
    """
    for field, length in (("prompt", PROMPT_LENGTH), ("solution", GEN_LENGTH)):
        text = str(problem[field])
        unknown = sorted(set(text) - set(CHARS))
        if unknown:
            raise ValueError(f"{field} {text!r} has characters outside the task's vocabulary {CHARS!r}: "
                             f"{''.join(unknown)!r}")
        if len(text) != length:
            raise ValueError(f"{field} {text!r} has {len(text)} characters; the task needs {length}")
    prompt = list(tokenizer.encode(str(problem["prompt"]), add_special_tokens=False))
    solution = list(tokenizer.encode(str(problem["solution"]), add_special_tokens=False))
    return prompt, solution


assert PROMPT_LENGTH == GEN_LENGTH and GEN_LENGTH % BLOCK_LENGTH == 0 and 3 * NUM_LINKED <= GEN_LENGTH
