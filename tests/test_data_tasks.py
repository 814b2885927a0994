"""Tasks: prompts (both modes), references, reward weights and per-row fields on real-shaped rows;
chat-template rendering and completion decoding with a tiny tokenizer."""

import json

import numpy as np
import pytest

from dultra_jax.data import tasks as T
from dultra_jax.data import tokenizer as tok
from dultra_jax.data.sources import DataError, load_records
from tests.fixtures.data_helpers import BOS_ID, EOS_ID, EOT_ID, fixture_path, write_chat_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tok.load_tokenizer(write_chat_tokenizer(str(tmp_path_factory.mktemp("tok"))))


def _rows(name):
    return load_records(fixture_path(name))


def test_gsm8k_prompts_reference_and_weights():
    row = _rows("gsm8k.jsonl")[0]
    task = T.get_task("gsm8k")
    system, user = task.build_prompt(row)
    assert system == {"role": "system", "content": T.MATH_SYSTEM_PROMPT_THINKING}
    assert "<think></think>" in system["content"] and "<answer></answer>" in system["content"]
    assert "\\boxed{}" in system["content"]
    assert user == {"role": "user", "content": row["question"].strip()}
    # Non-thinking (the reference evaluation prompt): one user message, system text + "\n\n" + question.
    (only,) = task.build_prompt(row, "non-thinking")
    assert only == {"role": "user", "content": T.MATH_SYSTEM_PROMPT_NON_THINKING + "\n\n" + row["question"]}
    assert task.reference(row) == "4" and task.example_fields(row) == {"answer": "4"}
    assert T.get_task("gsm8k").reference(_rows("gsm8k.jsonl")[1]) == "6250"     # "#### 6,250"
    assert task.reward_weights == {"math_correct": 1.0, "math_format": 1.0, "think_format": 0.5,
                                   "step_penalty": 0.1}
    assert T.get_task("gsm8k", mode="non-thinking").reward_weights == {
        "math_correct": 1.0, "math_format": 1.0, "step_penalty": 0.1}
    with pytest.raises(DataError, match="####"):
        task.reference({"question": "q", "answer": "no final answer"})


@pytest.mark.parametrize("name", ["math", "math500"])
def test_math_tasks(name):
    row = _rows("math500.jsonl")[0]
    task = T.get_task(name)
    assert task.build_prompt(row)[1]["content"] == row["problem"]
    assert task.reference(row) == row["answer"] == "6"
    # Without `answer`, the last \boxed{} of the solution.
    assert task.reference({"problem": "p", "solution": "so $x=\\boxed{\\frac{1}{2}}$."}) == "\\frac{1}{2}"
    assert T.last_boxed("is $\\boxed 9$.") == "9" and T.last_boxed("none") is None
    assert task.build_prompt(row, "non-thinking")[0]["content"].endswith("\n\n" + row["problem"])


def test_distill_and_override_weights():
    task = T.get_task("math500", reward_weights={"distill": 1.0, "think_format": 0})
    assert task.reward_weights == {"math_correct": 1.0, "math_format": 1.0, "step_penalty": 0.1, "distill": 1.0}
    with pytest.raises(ValueError, match="unknown reward 'distil'"):
        T.get_task("gsm8k", reward_weights={"distil": 1.0})


def test_mbpp_full_and_sanitized():
    task = T.get_task("mbpp", mode="non-thinking")
    row = _rows("mbpp.jsonl")[0]                                  # task 2, the full file (`text`)
    (user,) = task.build_prompt(row)
    tests = "\n".join(row["test_list"])
    assert user["content"] == (f"You are an expert Python programmer, and here is your task: {row['text']} Your code "
                               f"should pass these tests:\n\n{tests}. Respond with the completed solution inside a "
                               f"```python``` code block.")
    fields = task.example_fields(row)
    assert set(fields) == {"answer", "tests", "entry_point", "input_output", "prompt_code", "program_prefix"}
    assert fields["entry_point"] == "similar_elements" and fields["tests"] == tests + "\n"
    assert "\r\n" not in fields["answer"] and fields["answer"] == task.reference(row)
    setup_row = next(r for r in _rows("mbpp.jsonl") if r["test_setup_code"])     # task 367
    assert T.get_task("mbpp").example_fields(setup_row)["tests"].startswith(setup_row["test_setup_code"])
    # Sanitized file: the statement is `prompt`, imports go first in the tests.
    sanitized = _rows("mbpp_sanitized.jsonl")[0]
    fields = task.example_fields(sanitized)
    assert sanitized["prompt"] in task.build_prompt(sanitized)[0]["content"]
    assert fields["tests"].startswith("import math\nassert math.isclose(volume_sphere(10)")
    assert fields["entry_point"] == "volume_sphere"
    # Thinking: the coding system prompt, the same user turn plus the thinking sentence.
    system, user = T.get_task("mbpp").build_prompt(row)
    assert system["content"] == T.CODING_SYSTEM_PROMPT_THINKING and "```python" in system["content"]
    assert user["content"].endswith(T.THINKING_SUFFIX)
    assert T.get_task("mbpp").reward_weights == {"code_correct": 3.0, "code_fence": 1.0, "think_format": 0.5,
                                                 "step_penalty": 0.1}


def test_mbpp_split_option_selects_by_task_id():
    rows = _rows("mbpp.jsonl")                                     # task ids 2, 502, 814, 367
    assert [rows[i]["task_id"] for i in T.get_task("mbpp", split="test").select(rows)] == [502, 367]
    assert [rows[i]["task_id"] for i in T.get_task("mbpp", split="train").select(rows)] == [814]
    assert T.get_task("mbpp").select(rows) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="split='dev'"):
        T.get_task("mbpp", split="dev")
    with pytest.raises(DataError, match="no record is usable"):
        T.load_task_records(T.get_task("mbpp", split="validation"), fixture_path("mbpp.jsonl"))


def test_humaneval():
    row = _rows("humaneval.jsonl")[0]
    task = T.get_task("humaneval", mode="non-thinking")
    (user,) = task.build_prompt(row)
    assert user["content"] == T.HUMANEVAL_USER_TEMPLATE.format(prompt=row["prompt"])
    assert "def unique(l: list):" in user["content"]                      # the signature is in the prompt
    fields = task.example_fields(row)
    assert fields["entry_point"] == "unique" and fields["prompt_code"] == row["prompt"]
    assert fields["tests"] == row["test"]  # defines check(); the sandbox calls check(entry_point)
    assert task.reference(row) == row["prompt"] + row["canonical_solution"]
    ns = {}
    exec(fields["answer"] + "\n" + fields["tests"] + "\ncheck(unique)\n", ns)  # the reference passes its tests


def test_apps_prompt_fields_and_filter():
    rows = _rows("apps.jsonl")
    task = T.get_task("apps")
    assert task.select(rows) == [0]                # introductory with fn_name (the reference's filter)
    assert T.get_task("apps", require_fn_name=False).select(rows) == [0, 1]
    assert T.get_task("apps", difficulties=None, require_fn_name=False).select(rows) == [0, 1, 2]
    row = rows[0]
    system, user = task.build_prompt(row)
    assert system["content"] == T.CODING_SYSTEM_PROMPT_THINKING
    assert user["content"] == ("Write a solution to the following problem:\n" + row["question"] +
                               "\n\nStarter code:\ndef add(a, b):. " + T.THINKING_SUFFIX)
    assert "inputs" not in user["content"]                               # sample I/O is not shown
    system, user = task.build_prompt(row, "non-thinking")
    assert system["content"] == T.CODING_SYSTEM_PROMPT_NON_THINKING and user["content"].endswith("def add(a, b):.")
    fields = task.example_fields(row)
    assert fields["entry_point"] == "add" and json.loads(fields["input_output"])["outputs"] == [[3], [2]]
    assert fields["answer"].startswith("def add(a, b):") and fields["tests"] == ""
    assert T.get_task("apps", show_io=True).build_prompt(row)[1]["content"].count("Sample input/output") == 1
    assert task.example_fields(rows[1])["entry_point"] == ""


def test_custom_task_fields_from_options():
    row = {"q": "How many legs has a cat?", "a": "4", "source": "zoo"}
    task = T.get_task("custom", prompt_field="q", answer_field="a", system_prompt="Answer in \\boxed{}.",
                      extra_fields=("source",))
    assert task.build_prompt(row) == [{"role": "system", "content": "Answer in \\boxed{}."},
                                      {"role": "user", "content": row["q"]}]
    assert task.reference(row) == "4" and task.example_fields(row) == {"answer": "4", "source": "zoo"}
    assert task.required_fields == ("q", "a", "source")
    default = T.get_task("custom", prompt_field="q", answer_field="a")
    assert default.build_prompt(row)[0]["content"] == T.MATH_SYSTEM_PROMPT_THINKING
    templated = T.get_task("custom", answer_field="a", template="Q: {q}\nA:", kind="exact")
    assert templated.build_prompt(row) == [{"role": "user", "content": "Q: How many legs has a cat?\nA:"}]
    assert templated.reward_weights == {"exact_match": 1.0, "step_penalty": 0.1}
    with pytest.raises(DataError, match="missing field 'a'"):
        task.reference({"q": "x", "source": "s"})
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['prompt_feild'\]"):
        T.get_task("custom", prompt_feild="q")


def test_exact_task_text_and_ids():
    task = T.get_task("exact")
    assert task.build_prompt({"prompt": "12+7=", "answer": "19"}) == "12+7="
    assert task.build_prompt({"prompt_ids": [5, 6, 7], "answer": "9 9"}) == "5 6 7"
    assert task.reference({"prompt_ids": [5], "answer": "9 9"}) == "9 9"
    assert task.example_fields({"prompt": "x", "answer": "y"}) == {"answer": "y"}
    assert task.reward_weights == {"exact_match": 1.0, "step_penalty": 0.1}
    assert T.get_task("exact", chat=True).build_prompt({"prompt": "a", "answer": "b"}) == [
        {"role": "user", "content": "a"}]
    with pytest.raises(DataError, match="missing field 'prompt|prompt_ids'"):
        task.build_prompt({"answer": "1"})


def test_unknown_task_and_mode():
    with pytest.raises(ValueError, match="unknown task 'gsm9k'"):
        T.get_task("gsm9k")
    with pytest.raises(ValueError, match="unknown prompt mode 'fast'"):
        T.get_task("gsm8k", mode="fast")
    assert T.get_task("gsm8k", mode="non_thinking").mode == "non-thinking"
    assert set(T.TASKS) == {"gsm8k", "math", "math500", "mbpp", "humaneval", "apps", "custom", "exact", "arithmetic", "fill"}


def test_chat_template_rendering(tokenizer):
    row = _rows("gsm8k.jsonl")[0]
    prompt = T.get_task("gsm8k").build_prompt(row)
    text = tok.render_prompt(tokenizer, prompt)
    assert text == ("<|startoftext|><|start_header_id|>system<|end_header_id|>\n\n" + T.MATH_SYSTEM_PROMPT_THINKING
                    + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n" + row["question"].strip()
                    + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok.encode_text(tokenizer, text)
    assert ids[0] == BOS_ID and ids.count(EOT_ID) == 2
    assert tokenizer.decode(ids) == text
    # The existing helper gives the same ids for a one-user-turn prompt with a system prompt.
    assert tok.encode_prompt(tokenizer, row["question"].strip(), system=T.MATH_SYSTEM_PROMPT_THINKING) == ids
    # Plain text is never templated; no template: contents joined by blank lines.
    assert tok.render_prompt(tokenizer, "12+7=") == "12+7="
    assert tok.render_prompt(None, [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]) == "S\n\nU"


def test_decode_completion(tokenizer):
    ids = tok.encode_text(tokenizer, "\\boxed{4}<|eot_id|><|endoftext|><|endoftext|>")
    stops = tok.stop_token_ids(tokenizer)
    assert set(stops) == {EOS_ID, EOT_ID}
    assert tok.decode_completion(tokenizer, ids, stops) == "\\boxed{4}"
    assert tok.decode_completion(tokenizer, np.array(ids), ()) == "\\boxed{4}<|eot_id|><|endoftext|><|endoftext|>"
    assert tok.decode_completion(None, np.array([7, 8, 1, 9]), stop_ids=(1,)) == "7 8"
    assert tok.decode_completion(None, [3], stop_ids=(1,)) == "3"
