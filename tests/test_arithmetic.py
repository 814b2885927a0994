"""The embedded demo task (`dultra_jax.data.arithmetic`): generator, splits, checker, tokenizer."""

import os

import numpy as np
import pytest

from dultra_jax.data import arithmetic as A

N = 2000


@pytest.fixture(scope="module")
def train():
    return A.make_problems("train", N)


@pytest.fixture(scope="module")
def heldout():
    return A.make_problems("heldout", N)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("arith_tok"))
    A.build_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizers(tok_dir):
    import transformers

    from dultra_jax.data.tokenizer import load_tokenizer

    return {"built": A.build_tokenizer(),
            "auto": transformers.AutoTokenizer.from_pretrained(tok_dir, local_files_only=True),
            "load_tokenizer": load_tokenizer(tok_dir)}


# ----------------------------------------------------------------------------------------------
# Generator


def test_problems_verify_and_answer_is_eval(train, heldout):
    for p in train + heldout:
        assert set(p) == {"prompt", "solution", "answer"}
        assert A.verify(p), p
        assert p["answer"] == str(eval(p["prompt"][:-1]))          # left to right, + and - only
        assert p["solution"].endswith("####" + p["answer"])
        assert set(p["prompt"] + p["solution"]) <= set(A.CHARS)
        operands, ops = A.parse_prompt(p["prompt"])
        assert len(operands) == A.NUM_OPERANDS and all(0 <= x <= A.MAX_OPERAND for x in operands)
        assert p["solution"].count(";") == len(ops)                 # one step per operation


def test_worked_solution_format():
    p = {"prompt": "7+5-8+9=", "solution": "7+5=12;12-8=4;4+9=13;####13", "answer": "13"}
    assert A.verify(p)
    assert A._render([7, 5, 8, 9], ["+", "-", "+"]) == (p["prompt"], p["solution"], p["answer"])


@pytest.mark.parametrize("field, value", [
    ("solution", "7+5=13;13-8=5;5+9=14;####14"),   # wrong result digit
    ("solution", "7+5=12;13-8=5;5+9=14;####14"),   # wrong copy of the previous result
    ("solution", "7+6=13;13-8=5;5+9=14;####14"),   # wrong copy of an operand
    ("solution", "7+5=12;12+8=20;20+9=29;####29"),  # wrong operation
    ("solution", "7+5=12;12-8=4;4+9=13;####14"),   # final answer differs from the last step
    ("solution", "7+5=12;12-8=4;####4"),          # missing step
    ("solution", "7+5=12;12-8=4;4+9=13;13"),       # no answer marker
    ("solution", "7+5=12;12-8=04;04+9=13;####13"), # non-canonical number
    ("answer", "14"),
    ("prompt", "7+5-8+9"),
    ("prompt", "07+5-8+9="),
])
def test_verify_rejects_tampering(field, value):
    p = {"prompt": "7+5-8+9=", "solution": "7+5=12;12-8=4;4+9=13;####13", "answer": "13"}
    assert A.verify(p)
    assert not A.verify({**p, field: value})


def test_partial_results_never_negative(train):
    for p in train[:500]:
        operands, ops = A.parse_prompt(p["prompt"])
        assert min(A._partials(operands, ops)) >= 0
    assert any("-" in p["prompt"] for p in train)                  # both operations occur
    assert any(int(p["answer"]) >= 10 for p in train)              # and 2-digit results (carries)


def test_deterministic_by_seed():
    assert A.make_problems("train", 5, start=10) == [A.make_problem(s) for s in range(10, 15)]
    assert A.make_problems("heldout", 3) == [A.make_problem(s) for s in range(1_000_000, 1_000_003)]
    assert A.make_problem(123) == A.make_problem(123)
    # Pinned: the problem of a seed must not change across Python versions or refactors.
    assert A.make_problem(0) == {"prompt": "7+5-9+3=", "solution": "7+5=12;12-9=3;3+3=6;####6", "answer": "6"}
    assert A.make_problem(1_000_000) == {"prompt": "4-0+1-1=", "solution": "4-0=4;4+1=5;5-1=4;####4",
                                         "answer": "4"}
    assert A.records("train", 3) == A.make_problems("train", 3)


def test_split_ranges_and_errors():
    assert A.TRAIN_SEEDS.step == A.HELDOUT_SEEDS.step == 1 and A.TRAIN_SEEDS.stop <= A.HELDOUT_SEEDS.start
    assert A.split_of_seed(0) == "train" and A.split_of_seed(1_999_999) == "heldout"
    with pytest.raises(ValueError):
        A.make_problem(-1)
    with pytest.raises(ValueError):
        A.make_problem(A.HELDOUT_SEEDS.stop)
    with pytest.raises(ValueError):
        A.make_problems("test", 1)
    with pytest.raises(ValueError):
        A.make_problems("train", 2, start=len(A.TRAIN_SEEDS) - 1)


def test_heldout_never_overlaps_train(train, heldout):
    train_prompts = {p["prompt"] for p in train}
    heldout_prompts = {p["prompt"] for p in heldout}
    assert train_prompts.isdisjoint(heldout_prompts)
    assert len(train_prompts) > 0.9 * N and len(heldout_prompts) > 0.9 * N     # 22,892 and 22,893 prompts
    # By construction: every prompt belongs to the split of its seed's range ...
    assert all(A.split_of(p["prompt"]) == "train" for p in train)
    assert all(A.split_of(p["prompt"]) == "heldout" for p in heldout)
    # ... and `split_of` is a pure function of the prompt text, splitting the space about in half.
    rng = np.random.default_rng(0)
    prompts = [f"{a}{o1}{b}{o2}{c}{o3}{d}=" for a, b, c, d, o1, o2, o3 in zip(
        *rng.integers(0, 10, (4, 4000)), *rng.choice(["+", "-"], (3, 4000)))]
    assert [A.split_of(p) for p in prompts] == [A.split_of(p) for p in prompts]
    share = np.mean([A.split_of(p) == "heldout" for p in prompts])
    assert 0.45 < share < 0.55
    assert A.split_of("7+5-8+9=") == "heldout"   # pinned (BLAKE2b is stable)


def test_lengths_fit(train, heldout):
    assert A.GEN_LENGTH % A.BLOCK_LENGTH == 0
    assert A.MAX_PROMPT_CHARS <= A.PROMPT_LENGTH
    assert A.MAX_SOLUTION_CHARS + 1 <= A.GEN_LENGTH                 # room for at least one EOS
    for p in train + heldout:
        assert len(p["prompt"]) <= A.MAX_PROMPT_CHARS
        assert len(p["solution"]) <= A.MAX_SOLUTION_CHARS


# ----------------------------------------------------------------------------------------------
# Answer checking


def _agreement_cases(problems):
    cases = []
    for p in problems:
        sol, ans = p["solution"], p["answer"]
        cases += [(sol, ans, True),
                  (sol[: -len(ans)] + str(int(ans) + 1), ans, False),   # wrong final digit(s)
                  (sol[: sol.index("####")], ans, False)]              # no answer marker
    cases += [
        ("17+25=42;42+8=50;####50", "50", True),
        ("17+25=42;42+8=50;####51", "50", False),
        ("#### 50", "50", True), ("####050", "50", True), ("####+50", "50", True),
        ("####-50", "-50", True), ("####-50", "50", False),
        ("####", "50", False), ("", "50", False), ("50", "50", False),
        ("####50;", "50", False), ("####50####", "50", False), ("#####50", "50", False),
        ("####50=", "50", False), ("####5#", "5", False),
        ("####50" + A.MASK_TOKEN, "50", False), ("####" + A.MASK_TOKEN * 2, "50", False),
        ("1+2=3;####3;####50", "50", False),          # the rest of the line after the first
        ("1+2=3;####50;####3", "50", False),          # marker must be the number
        ("####3\n####50", "50", True),                # the last line with a marker counts
    ]
    return cases


def test_check_answer_agrees_with_math_correct(train):
    from dultra_jax.rewards.math import is_correct, math_correct
    from dultra_jax.rewards.registry import RewardInputs

    cases = _agreement_cases(train[:20])
    completions, answers, expected = zip(*cases)
    mine = [A.check_answer(c, a) for c, a, _ in cases]
    assert mine == list(expected)
    assert is_correct("17+25=42;42+8=50;####50", "50")
    assert not is_correct("17+25=42;42+8=50;####51", "50")
    reward = math_correct(RewardInputs(completions=list(completions), examples=[{"answer": a} for a in answers],
                                       num_steps=np.ones(len(cases))))
    assert [bool(r > 0) for r in reward] == list(expected)


# ----------------------------------------------------------------------------------------------
# Tokenizer


def test_vocab_and_special_ids(tokenizers):
    assert A.vocab_size() == len(A.SPECIAL_TOKENS) + len(A.CHARS) == 17
    assert len(set(A.CHARS)) == len(A.CHARS)
    for name, tok in tokenizers.items():
        assert len(tok) == A.vocab_size(), name
        assert tok.eos_token == A.EOS_TOKEN and tok.eos_token_id == A.EOS_ID == 0, name
        assert tok.pad_token_id == A.EOS_ID, name
        assert tok.mask_token == A.MASK_TOKEN and tok.mask_token_id == A.MASK_ID == 1, name
        assert tok.convert_tokens_to_ids(list(A.CHARS)) == [A.CHAR_IDS[c] for c in A.CHARS], name
        assert tok.get_vocab() == A.vocab(), name
        assert not getattr(tok, "chat_template", None), name
        assert tok.model_max_length == A.PROMPT_LENGTH + A.GEN_LENGTH, name


def test_saved_files(tok_dir):
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= set(os.listdir(tok_dir))


def test_round_trip(tokenizers, train, heldout):
    texts = [c for c in A.CHARS] + [A.CHARS] + [p[k] for p in train[:500] + heldout[:500]
                                                 for k in ("prompt", "solution")]
    for name, tok in tokenizers.items():
        for c in A.CHARS:
            ids = tok.encode(c, add_special_tokens=False)
            assert ids == [A.CHAR_IDS[c]] and tok.decode(ids) == c, (name, c)
        encoded = tok(texts, add_special_tokens=False)["input_ids"]
        for text, ids in zip(texts, encoded):
            assert len(ids) == len(text), (name, text)                 # one token per character
            assert tok.decode(ids) == text, (name, text)
        assert tok.encode("12", add_special_tokens=True) == tok.encode("12", add_special_tokens=False)
        s = "1+2=3;####3" + A.EOS_TOKEN + A.MASK_TOKEN
        ids = tok.encode(s, add_special_tokens=False)
        assert ids[-2:] == [A.EOS_ID, A.MASK_ID] and tok.decode(ids) == s, name
        assert tok.decode(ids, skip_special_tokens=True) == "1+2=3;####3", name


def test_unknown_character_raises(tokenizers):
    with pytest.raises(Exception):
        tokenizers["built"].encode("1 + 2", add_special_tokens=False)


def test_encode_example(tokenizers, train):
    tok = tokenizers["load_tokenizer"]
    for p in train[:200]:
        prompt, target = A.encode_example(tok, p)
        assert tok.decode(prompt) == p["prompt"] and len(prompt) <= A.PROMPT_LENGTH
        assert len(target) == A.GEN_LENGTH
        n = len(p["solution"])
        assert tok.decode(target[:n]) == p["solution"]
        assert target[n:] == [A.EOS_ID] * (A.GEN_LENGTH - n) and A.GEN_LENGTH - n >= 1
    with pytest.raises(ValueError):
        A.encode_example(tok, {"prompt": "1+1=", "solution": "1" * A.GEN_LENGTH})


def test_task_prompt_is_the_bare_problem(tokenizers, train):
    """The demo's task call: the model sees exactly the problem text; the reward is math_correct."""
    from dultra_jax.data import tokenizer as tk
    from dultra_jax.data.pipeline import PromptEncoder
    from dultra_jax.data.tasks import get_task

    task = get_task("custom", kind="math", mode="non-thinking", system_prompt="", prompt_field="prompt",
                    answer_field="answer", reward_weights={"math_format": 0})
    assert dict(task.reward_weights) == {"math_correct": 1.0, "step_penalty": 0.1}
    tok = tokenizers["load_tokenizer"]
    encoder = PromptEncoder(task, tok, prompt_length=A.PROMPT_LENGTH)
    records = A.records("train", 5)
    for i, r in enumerate(records):
        assert tk.render_prompt(tok, task.build_prompt(r)) == r["prompt"]
        row = encoder((i, r))
        ids = tok.encode(r["prompt"], add_special_tokens=False)
        assert row["prompt_text"] == r["prompt"] and row["answer"] == r["answer"]
        assert row["prompt_tokens"][row["prompt_valid"]].tolist() == ids
        assert (row["prompt_tokens"][~row["prompt_valid"]] == A.EOS_ID).all()
