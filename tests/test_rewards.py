"""Rewards: format parts, step penalty, math answers, the registry, and the distillation teacher."""

import threading
import time

import numpy as np
import pytest

from dultra_jax.rewards import REWARDS, RewardInputs, compute_rewards, register
from dultra_jax.rewards import math as math_lib
from dultra_jax.rewards.fmt import code_fence_score, math_format_score, think_format_score
from dultra_jax.rewards.math import extract_answer, is_correct


def _inputs(completions, examples=None, num_steps=None, prompts=None):
    n = len(completions)
    return RewardInputs(completions=list(completions), examples=examples or [{} for _ in range(n)],
                        num_steps=np.zeros(n, np.int32) if num_steps is None else np.asarray(num_steps),
                        prompts=prompts)


# --------------------------------------------------------------------------------------------------
# Format parts (reference 1.6), values computed by hand


@pytest.mark.parametrize("text, value", [
    ("<think>x</think><answer>\\boxed{3}</answer>", 1.0),  # 0.5 * (1 + 1)
    ("<answer>3</answer>", 0.75),  # 0.5 * (1 + 0.5)
    ("so the answer is \\boxed{3}", 0.5),  # no tag: 0.5 * (0 + 1)
    ("3", 0.25),  # 0.5 * (0 + 0.5)
    ("<answer>3</answer> later \\boxed{3}", 0.75),  # the box is outside the answer span
    ("<answer>\\boxed{3}", 1.0),  # the opening tag is what counts (reference code)
])
def test_math_format(text, value):
    assert math_format_score(text) == pytest.approx(value)


@pytest.mark.parametrize("text, value", [
    ("<think>reason</think> answer", 0.5), ("<think>reason", 0.0), ("reason</think>", 0.0), ("", 0.0),
])
def test_think_format(text, value):
    assert think_format_score(text) == value


@pytest.mark.parametrize("text, value", [
    ("```python\nprint(1)\n```", 1.0),  # fence + python + two fences + nothing after
    ("```\nx = 1\n```", 0.75),  # no ```python
    ("```Python\nx = 1\n```\n", 1.0),  # case-insensitive, trailing whitespace is fine
    ("```python\nx = 1\n```\nDone.", 0.745),  # 0.75 - 5 * 0.001
    ("```python\nx = 1\n``` " + "y" * 300, 0.55),  # 0.75 - min(300, 200) * 0.001
    ("```python\nx = 1", 0.488),  # one fence: 0.5, then "python\nx = 1" (12 chars) trails it
    ("no code here", 0.25),  # no fence, nothing trails a fence
    ("", 0.0),
])
def test_code_fence(text, value):
    assert code_fence_score(text) == pytest.approx(value)


def test_format_parts_through_the_registry():
    texts = ["<think>a</think><answer>\\boxed{1}</answer>", "```python\nx\n```", "plain"]
    _, parts = compute_rewards(_inputs(texts), {"math_format": 1.0, "think_format": 0.5, "code_fence": 1.0})
    np.testing.assert_allclose(parts["math_format"], [1.0, 0.25, 0.25])
    np.testing.assert_allclose(parts["think_format"], [0.5, 0.0, 0.0])
    np.testing.assert_allclose(parts["code_fence"], [0.25, 1.0, 0.25])
    assert all(p.dtype == np.float32 and p.shape == (3,) for p in parts.values())


def test_step_penalty():
    _, parts = compute_rewards(_inputs(["a", "b", "c"], num_steps=[20, 0, 7]), {"step_penalty": 0.1})
    np.testing.assert_allclose(parts["step_penalty"], [-0.4, 0.0, -0.14], rtol=1e-6)
    _, parts = compute_rewards(_inputs(["a"], num_steps=[10]), {"step_penalty": 1.0},
                               options={"step_penalty": {"scale": 20.0}})
    np.testing.assert_allclose(parts["step_penalty"], [-0.5])


def test_exact_match():
    inputs = _inputs([" 1 2 3 ", "1 2", "x"], examples=[{"answer": "1 2 3"}, {"answer": 12}, {}])
    _, parts = compute_rewards(inputs, {"exact_match": 1.0})
    np.testing.assert_array_equal(parts["exact_match"][:2], [1.0, 0.0])
    assert np.isnan(parts["exact_match"][2])


# --------------------------------------------------------------------------------------------------
# Math answers


@pytest.mark.parametrize("text, answer", [
    ("so \\boxed{\\frac{1}{2}} is it", "\\frac{1}{2}"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("nested \\boxed{a^{2} + \\sqrt{b}}", "a^{2} + \\sqrt{b}"),
    ("$\\boxed 5$", "5"),
    ("\\fbox{7}", "7"),
    ("work...\n#### 1,234\n", "1,234"),
    ("#### 3\nmore\n#### 4", "4"),
    ("\\boxed{unclosed", None),
    ("no final answer 42", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize("completion, reference", [
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("The answer is \\boxed{42}.", "42"),
    ("\\boxed{42}", "\\boxed{42}"),
    ("#### 1,234", "1234"),
    ("\\boxed{1234}", "She has 1,234 in all.\n#### 1,234"),  # a GSM8K solution as the reference
    ("\\boxed{\\dfrac{3}{4}}", "0.75"),
    ("\\boxed{x = 3}", "3"),
    ("\\boxed{\\frac{1}{2}\\sqrt{3}}", "\\frac{\\sqrt{3}}{2}"),  # needs math-verify
    ("\\boxed{(x+1)^2}", "x^2+2x+1"),  # needs math-verify
])
def test_is_correct_equivalent_forms(completion, reference):
    assert is_correct(completion, reference)


@pytest.mark.parametrize("completion, reference", [
    ("\\boxed{43}", "42"),
    ("\\boxed{\\frac{1}{3}}", "0.5"),
    ("#### 1,235", "1234"),
    ("the answer is 42", "42"),  # no final answer
    ("", "42"),
    ("\\boxed{}", "42"),
])
def test_is_correct_rejects(completion, reference):
    assert not is_correct(completion, reference)


def test_math_correct_part():
    inputs = _inputs(["\\boxed{4}", "\\boxed{5}", "#### 4", "4"], examples=[{"answer": "4"}, {"answer": "4"},
                                                                          {"answer": 4}, {}])
    _, parts = compute_rewards(inputs, {"math_correct": 1.0})
    np.testing.assert_array_equal(parts["math_correct"][:3], [2.0, 0.0, 2.0])
    assert np.isnan(parts["math_correct"][3])


def test_is_correct_from_worker_threads():
    cases = [("\\boxed{\\frac{1}{2}\\sqrt{3}}", "\\frac{\\sqrt{3}}{2}", True), ("\\boxed{2x+2}", "2(x+1)", True),
             ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", True), ("\\boxed{\\pi}", "3", False),
             ("\\boxed{x^2}", "x^3", False), ("#### 7", "7", True), ("\\boxed{\\frac{6}{4}}", "1.5", True),
             ("\\boxed{2^{10}}", "1024", True)]
    results, errors = {}, []

    def work(i):
        try:
            completion, reference, _ = cases[i]
            results[i] = is_correct(completion, reference, timeout_s=20.0)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert [results.get(i) for i in range(len(cases))] == [expected for _, _, expected in cases]


def test_pathological_answer_is_bounded():
    assert math_lib.warmup()  # math-verify is installed and a worker is up
    start = time.monotonic()
    # sympy cannot finish comparing this tower with 1; the wall-clock bound ends it.
    assert not is_correct("\\boxed{9^{9^{9^{9}}}}", "1", timeout_s=0.5)
    assert time.monotonic() - start < 2.5
    # The pool recovers (a new worker replaces the killed one).
    assert is_correct("\\boxed{\\frac{1}{2}\\sqrt{3}}", "\\frac{\\sqrt{3}}{2}", timeout_s=20.0)


# --------------------------------------------------------------------------------------------------
# Registry


def test_compute_rewards_weights_and_nan():
    calls = {}

    @register("_test_part_a")
    def part_a(inputs, scale=1.0):
        calls["a"] = scale
        return np.array([1.0, np.nan, 2.0], np.float32) * scale

    @register("_test_part_b")
    def part_b(inputs):
        return np.array([0.5, 0.5, np.nan], np.float32)

    try:
        total, parts = compute_rewards(_inputs(["x", "y", "z"]), {"_test_part_a": 2.0, "_test_part_b": -1.0},
                                       options={"_test_part_a": {"scale": 3.0}})
        assert calls["a"] == 3.0
        np.testing.assert_allclose(total, [2.0 * 3.0 - 0.5, -0.5, 12.0])
        np.testing.assert_allclose(parts["_test_part_a"], [3.0, np.nan, 6.0])  # unweighted, NaN kept
        assert total.dtype == np.float32 and set(parts) == {"_test_part_a", "_test_part_b"}
        # All parts NaN for a row: the row's total is 0 (nansum).
        total, _ = compute_rewards(_inputs(["x", "y", "z"]), {"_test_part_a": 1.0})
        assert total[1] == 0.0
    finally:
        REWARDS.pop("_test_part_a", None)
        REWARDS.pop("_test_part_b", None)


def test_compute_rewards_unknown_name():
    with pytest.raises(ValueError, match=r"unknown reward 'math_corect'.*math_correct"):
        compute_rewards(_inputs(["x"]), {"math_corect": 1.0})
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        compute_rewards(_inputs(["x"]), {"exact_match": 1.0}, options={"nope": {}})


def test_wrong_shape_and_mismatched_inputs():
    @register("_test_bad_shape")
    def bad(inputs):
        return np.zeros(5, np.float32)

    try:
        with pytest.raises(ValueError, match="_test_bad_shape.*shape"):
            compute_rewards(_inputs(["x"]), {"_test_bad_shape": 1.0})
    finally:
        REWARDS.pop("_test_bad_shape", None)
    with pytest.raises(ValueError, match="must agree"):
        RewardInputs(completions=["a", "b"], examples=[{}], num_steps=np.zeros(2))


def test_registered_names():
    assert {"exact_match", "math_correct", "math_format", "think_format", "code_correct", "code_fence",
            "step_penalty", "distill"} <= set(REWARDS)


def test_distill_without_teacher_is_a_clear_error():
    with pytest.raises(ValueError, match="needs a teacher"):
        compute_rewards(_inputs(["x"], prompts=["p"]), {"distill": 1.0})


# --------------------------------------------------------------------------------------------------
# Distillation teacher


WORDS = "the cat sat on a mat dog ran to and is what 1 2 3 4 5 + = answer".split()
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def _save_tiny_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<|end|>",
                                   additional_special_tokens=specials[2:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return fast


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=48, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, attn_implementation="eager")
    model = Qwen2ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # far from the 0.02 init, so log-probs differ clearly between tokens
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.15 * noise)
    model.save_pretrained(str(path), safe_serialization=True)
    # The tokenizer gets its own directory: next to a qwen2 config.json, transformers 5 would load
    # a word-level tokenizer.json as a (byte-level BPE) Qwen2Tokenizer.
    tokenizer = _save_tiny_tokenizer(path / "tokenizer")
    return str(path), model, tokenizer


def _torch_mean_logp(model, tokenizer, prompt, completion):
    import torch

    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    p = tokenizer.encode(text, add_special_tokens=False)
    c = tokenizer.encode(completion, add_special_tokens=False)
    if not c:
        return 0.0
    with torch.no_grad():
        logits = model(torch.tensor([p + c])).logits[0]
    logps = torch.log_softmax(logits[len(p) - 1:len(p) - 1 + len(c)].double(), -1)
    return float(logps.gather(-1, torch.tensor(c)[:, None]).mean())


def _teacher_kw(path):
    # The same buckets everywhere: one compiled scorer serves every call in these tests.
    return dict(tokenizer_dir=path + "/tokenizer", dtype="float32", length_bucket=16, row_bucket=4)


def test_teacher_scores_match_torch(teacher_dir):
    from dultra_jax.models.teacher import score_jit
    from dultra_jax.rewards.distill import Teacher

    path, model, tokenizer = teacher_dir
    teacher_kw = _teacher_kw(path)
    teacher = Teacher.from_dir(path, **teacher_kw)
    assert teacher.render_prompt("what is 1 + 2") == "<|user|> what is 1 + 2 <|end|> <|assistant|> "
    prompts = ["what is 1 + 2", "the cat sat on a mat", "what", "2 + 2 ="]
    completions = ["answer is 3", "and the dog ran to the cat", "", "4 <|end|>"]
    scores = teacher.score_texts(prompts, completions)
    expected = [_torch_mean_logp(model, tokenizer, p, c) for p, c in zip(prompts, completions)]
    assert scores.shape == (4,) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, expected, atol=1e-4, rtol=1e-4)
    assert scores[2] == 0.0 and all(s < 0 for i, s in enumerate(scores) if i != 2)

    # Other lengths and row counts inside the same buckets reuse the compiled scorer.
    before = score_jit._cache_size()
    again = teacher.score_texts(prompts[:3], ["3", "cat", "1 2 3 4 5"])
    assert score_jit._cache_size() == before
    np.testing.assert_allclose(again[1], _torch_mean_logp(model, tokenizer, prompts[1], "cat"), atol=1e-4)

    # Through the registry, with the teacher in the options.
    inputs = _inputs(completions, prompts=prompts)
    total, parts = compute_rewards(inputs, {"distill": 1.0}, options={"distill": {"teacher": teacher}})
    np.testing.assert_allclose(parts["distill"], expected, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(total, parts["distill"])


def test_teacher_chunks_and_truncation(teacher_dir):
    from dultra_jax.rewards.distill import Teacher

    path, model, tokenizer = teacher_dir
    teacher_kw = _teacher_kw(path)
    teacher = Teacher.from_dir(path, max_rows=2, **teacher_kw)  # 2 chunks
    prompts = ["what is 1 + 2", "the cat", "2 + 2 =", "a dog"]
    completions = ["3", "sat on a mat", "4", "ran to the cat"]
    expected = [_torch_mean_logp(model, tokenizer, p, c) for p, c in zip(prompts, completions)]
    np.testing.assert_allclose(teacher.score_texts(prompts, completions), expected, atol=1e-4, rtol=1e-4)
    short = Teacher.from_dir(path, max_completion_tokens=2, **teacher_kw)
    np.testing.assert_allclose(short.score_texts(["the cat"], ["sat on a mat"]),
                               [_torch_mean_logp(model, tokenizer, "the cat", "sat on")], atol=1e-4)
    with pytest.raises(ValueError, match="needs RewardInputs.prompts"):
        compute_rewards(_inputs(["x"]), {"distill": 1.0}, options={"distill": {"teacher": teacher}})


def test_teacher_from_dir_on_a_mesh_offloaded(teacher_dir):
    """`from_dir(mesh=..., offload=True)` (what `rewards.teacher_offload` loads): sharded weights in
    host memory, and the same scores as torch (5 rows over 8 devices, in chunks of 2)."""
    import jax

    from dultra_jax.rewards.distill import Teacher
    from dultra_jax.sharding import make_mesh

    path, model, tokenizer = teacher_dir
    mesh = make_mesh(fsdp=-1)
    teacher = Teacher.from_dir(path, mesh=mesh, offload=True, max_rows=2, **_teacher_kw(path))
    assert teacher.mesh is mesh and teacher.offload
    assert {x.sharding.memory_kind for x in jax.tree.leaves(teacher.params)} == {"pinned_host"}
    assert teacher.params["layers"]["gate_proj"]["kernel"].sharding.mesh == mesh
    prompts = ["what is 1 + 2", "the cat", "2 + 2 =", "a dog", "what"]
    completions = ["3", "sat on a mat", "", "ran to the cat", "4 <|end|>"]
    expected = [_torch_mean_logp(model, tokenizer, p, c) for p, c in zip(prompts, completions)]
    np.testing.assert_allclose(teacher.score_texts(prompts, completions), expected, atol=1e-4, rtol=1e-4)
    assert {x.sharding.memory_kind for x in jax.tree.leaves(teacher.params)} == {"pinned_host"}
