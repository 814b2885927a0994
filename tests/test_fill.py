"""The embedded demo task (`dultra_jax.data.fill`): generator, splits, checker, tokenizer, reward."""

import random

import numpy as np
import pytest

from dultra_jax.data import fill as F

N = 2000
TEMPLATE = "??##?dc????d???c????b##?##???b??"   # the module doc's example


@pytest.fixture(scope="module")
def train():
    return F.make_problems("train", N)


@pytest.fixture(scope="module")
def heldout():
    return F.make_problems("heldout", N)


def _fill(template: str, free: str = "a", pair: str = "ef") -> str:
    """A correct fill written out by hand: copies, `free` at every `?`, `pair` at every `##`."""
    out = [t if t in F.LETTERS else free if t == F.FREE else "" for t in template]
    for i in F.linked_pairs(template):
        out[i], out[i + 1] = pair
    return "".join(out)


def test_problems_verify(train, heldout):
    for p in train + heldout:
        assert set(p) == {"prompt", "solution", "answer"}
        assert F.verify(p), p
        assert F.is_template(p["prompt"]) and p["answer"] == p["prompt"]
        assert len(p["solution"]) == F.GEN_LENGTH and len(F.linked_pairs(p["prompt"])) == F.NUM_LINKED


def test_generator_draws_uniformly(train):
    """Every free letter is uniform and every pair uniform over the ordered pairs of different
    letters (the model is to learn the distribution of correct fills, not one fill); pairs sit
    anywhere."""
    free = [c for p in train for t, c in zip(p["prompt"], p["solution"]) if t == F.FREE]
    counts = np.array([free.count(c) for c in F.LETTERS]) / len(free)
    assert np.allclose(counts, 0.25, atol=0.02)
    pairs = [p["solution"][i:i + 2] for p in train for i in F.linked_pairs(p["prompt"])]
    assert len(pairs) == F.NUM_LINKED * N and len(set(pairs)) == 12   # every ordered pair of different letters
    counts = np.array([pairs.count(a + b) for a in F.LINKED_LETTERS for b in F.LINKED_LETTERS if a != b])
    assert np.allclose(counts / len(pairs), 1 / 12, atol=0.015)
    starts = np.bincount([i for p in train for i in F.linked_pairs(p["prompt"])], minlength=F.GEN_LENGTH - 1)
    assert starts.min() > 0.3 * starts.mean()
    other = [t for p in train for t in p["prompt"] if t != F.LINKED]
    assert abs(other.count(F.FREE) / len(other) - F.FREE_PROBABILITY) < 0.02


def test_problems_are_deterministic_and_splits_never_overlap(train, heldout):
    assert F.make_problems("train", 5) == train[:5]
    assert F.make_problems("heldout", 3, start=2) == heldout[2:5]
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in heldout}
    assert all(F.split_of(p["prompt"]) == "train" for p in train)
    assert all(F.split_of(p["prompt"]) == "heldout" for p in heldout)
    with pytest.raises(ValueError, match="unknown split"):
        F.make_problems("test", 1)
    with pytest.raises(ValueError, match="in no split"):
        F.make_problem(-1)


def test_checker_accepts_every_correct_fill():
    for free in F.LETTERS:
        for a in F.LINKED_LETTERS:
            for b in F.LINKED_LETTERS:
                assert F.check_answer(_fill(TEMPLATE, free, a + b), TEMPLATE) == (a != b)
    rng = random.Random(0)   # letters chosen independently, pairs of different letters
    for _ in range(100):
        fill = [rng.choice(F.LETTERS) if t == F.FREE else t for t in TEMPLATE]
        for i in F.linked_pairs(TEMPLATE):
            fill[i:i + 2] = rng.sample(F.LINKED_LETTERS, 2)
        assert F.violations("".join(fill), TEMPLATE) == []


@pytest.mark.parametrize("change, reason", [
    (lambda s: s[:5] + "a" + s[6:], "position 5: 'a' where the template copies 'd'"),      # wrong copy
    (lambda s: s[:2] + "ee" + s[4:], "positions 2 and 3: the linked pair ## holds 'ee'"),  # a pair that agrees
    (lambda s: s[:2] + "ea" + s[4:], "position 3: 'a' is not a letter of 'efgh'"),         # a pair letter outside e-h
    (lambda s: "e" + s[1:], "position 0: 'e' is not a letter of 'abcd'"),                  # a free letter outside a-d
    (lambda s: s[:1] + "?" + s[2:], "position 1: '?' is not a letter of 'abcd'"),          # a template symbol
    (lambda s: s[:-1], "31 characters, expected 32"),                                      # cut short (EOS)
    (lambda s: s + "a", "33 characters, expected 32"),
])
def test_checker_names_what_is_wrong(change, reason):
    fill = _fill(TEMPLATE)
    assert F.check_answer(fill, TEMPLATE)
    wrong = change(fill)
    assert not F.check_answer(wrong, TEMPLATE)
    assert any(reason in v for v in F.violations(wrong, TEMPLATE)), F.violations(wrong, TEMPLATE)


def test_checker_refuses_malformed_templates():
    assert not F.check_answer(_fill(TEMPLATE), TEMPLATE.replace("##", "??", 1))   # two pairs
    assert not F.check_answer(_fill(TEMPLATE), TEMPLATE.replace("?##", "###", 1))  # a run of three
    assert not F.check_answer(_fill(TEMPLATE), TEMPLATE.replace("##?", "#??", 1))  # a lone #
    assert not F.check_answer("a" * 31, "a" * 31)
    assert F.violations("a" * 32, "x" * 32) == ["not a template: '" + "x" * 32 + "'"]


def test_tokenizer_round_trip_and_errors():
    from dultra_jax.data.tokenizer import load_tokenizer

    tok = F.build_tokenizer()
    assert len(tok) == F.vocab_size() == 12
    assert tok.convert_tokens_to_ids([F.EOS_TOKEN, F.MASK_TOKEN]) == [F.EOS_ID, F.MASK_ID]
    problem = F.make_problem(7)
    prompt, solution = F.encode_example(tok, problem)
    assert len(prompt) == F.PROMPT_LENGTH and len(solution) == F.GEN_LENGTH
    assert prompt == [F.CHAR_IDS[c] for c in problem["prompt"]]
    assert tok.decode(solution) == problem["solution"]
    with pytest.raises(ValueError, match=r"prompt 'ab\?x' has characters outside the task's vocabulary .*'x'"):
        F.encode_example(tok, {"prompt": "ab?x", "solution": problem["solution"]})
    with pytest.raises(ValueError, match=r"solution 'abc' has 3 characters; the task needs 32"):
        F.encode_example(tok, {"prompt": problem["prompt"], "solution": "abc"})
    import tempfile
    with tempfile.TemporaryDirectory() as directory:
        F.build_tokenizer(directory)
        loaded = load_tokenizer(directory)
        assert loaded.encode(problem["prompt"], add_special_tokens=False) == prompt


def test_reward_and_task_agree_with_the_checker():
    from dultra_jax.data.tasks import get_task
    from dultra_jax.rewards import RewardInputs, compute_rewards

    task = get_task("fill")
    assert task.kind == "fill" and task.reward_weights == {"fill_correct": 1.0, "step_penalty": 0.1}
    problem = F.make_problem(3)
    assert task.build_prompt(problem) == problem["prompt"]
    fields = task.example_fields(problem)
    wrong = "a" * F.GEN_LENGTH
    inputs = RewardInputs(completions=[problem["solution"], wrong], examples=[fields, fields],
                          num_steps=np.array([4, 32]))
    total, parts = compute_rewards(inputs, {"fill_correct": 1.0, "step_penalty": 1.0})
    np.testing.assert_allclose(parts["fill_correct"], [1.0, float(F.check_answer(wrong, problem["prompt"]))])
    np.testing.assert_allclose(total, parts["fill_correct"] - np.array([4, 32]) / 50, rtol=1e-6)
