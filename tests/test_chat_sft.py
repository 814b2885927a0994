"""SFT and planner initialisation on chat data (`dultra_jax.data.chat`): records, rows, masking,
the real-run configs on a tiny shape, resume."""

from __future__ import annotations

import contextlib
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import planner_init_8b, sft_8b
from dultra_jax.config import ConfigError, PlannerInitConfig, from_config
from dultra_jax.data.chat import ChatBatches, ChatEncoder, chat_turns, load_chat_records, strip_thinking
from dultra_jax.data.sources import DataError
from dultra_jax.data.tokenizer import load_tokenizer
from dultra_jax.interop.hf_llada import export_hf
from dultra_jax.models import policy
from dultra_jax.training import mdlm_sft, planner_init, sft
from tests.fixtures.data_helpers import EOS_ID, EOT_ID, SPECIAL_TOKENS, fixture_path, write_chat_tokenizer
from tests.helpers import tiny_config

MASK = SPECIAL_TOKENS.index("<|mdm_mask|>")
WIDTH = 96  # the rows of these tests: the longest fixture conversation is 88 tokens


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return write_chat_tokenizer(str(tmp_path_factory.mktemp("chat_tokenizer")))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A random tiny LLaDA (no planner) over the chat tokenizer's ids, saved as an HF directory."""
    directory = str(tmp_path_factory.mktemp("chat_base"))
    config = tiny_config(vocab_size=112, mask_token_id=MASK, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
                         eot_token_id=EOT_ID, max_sequence_length=128, planner=None)
    export_hf(policy.init_params(config, jax.random.key(0)), config, directory, dtype="float32")
    write_chat_tokenizer(directory)
    return directory


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def _ids(text_pieces):
    """Token ids by hand: a special token is one id, every other character its own id."""
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    chars = [c for c in __import__("string").printable if c not in "\x0b\x0c"]
    vocab.update({c: len(SPECIAL_TOKENS) + i for i, c in enumerate(chars)})
    out = []
    for piece in text_pieces:
        out.extend([vocab[piece]] if piece in SPECIAL_TOKENS else [vocab[c] for c in piece])
    return out


# ----------------------------------------------------------------------------------- records


def test_records_of_both_schemas_and_their_errors(tmp_path):
    nemotron = load_chat_records(fixture_path("chat.jsonl"))
    assert len(nemotron) == 48 and {"uuid", "category", "messages"} <= set(nemotron[0])
    turns = chat_turns(nemotron[0], "x")
    assert [t["role"] for t in turns] == ["system", "user", "assistant"]  # tool_calls etc. dropped
    assert set(turns[0]) == {"role", "content"}
    pairs = load_chat_records(fixture_path("chat_pr.parquet"))
    assert len(pairs) == 48
    assert chat_turns({"system": "Be brief.", "prompt": "Hi", "response": "Yo"}, "x") == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"}]

    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    cases = [
        ({"prompt": "q"}, r":2: missing field 'messages' \(or 'prompt' and 'response'\); the record has: prompt"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]},
         r":2: field messages\[1\].role is 'robot'; known roles: system, user, assistant, tool"),
        ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
         r":2: field messages\[1\].role is 'user'; the last turn must be the assistant's"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
         r":2: field messages\[0\] has no 'content'"),
        ({"messages": [{"role": "user", "content": ["q"]}, {"role": "assistant", "content": "a"}]},
         r":2: field messages\[0\].content must be a string, got list"),
        ({"messages": "q"}, r":2: field 'messages' must be a non-empty list"),
    ]
    for i, (bad, message) in enumerate(cases):
        path = _write_jsonl(tmp_path / f"bad{i}.jsonl", [good, bad])
        with pytest.raises(DataError, match=f"{path}{message}"):
            load_chat_records(path)
    # A Parquet or JSON file has no lines: the record's index is named.
    path = str(tmp_path / "bad.json")
    with open(path, "w") as f:
        json.dump([good, good, {"messages": [{"role": "user", "content": "q"}]}], f)
    with pytest.raises(DataError, match=r"bad.json \(record 2\): field messages\[0\].role is 'user'"):
        load_chat_records(path)


def test_strip_thinking():
    assert strip_thinking("<think>\nsum\n</think>\n\n7+7=14.") == "7+7=14."
    assert strip_thinking("a<think>x</think>b<think>y\nz</think>c") == "abc"
    assert strip_thinking("  no tags\n") == "  no tags\n"  # untouched without a span
    assert strip_thinking("<think>unclosed") == "<think>unclosed"


def test_rows_by_hand(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    record = {"messages": [{"role": "user", "content": "Add 1 and 2."},
                           {"role": "assistant", "content": "<think>one plus two</think>\n\n1+2=3."}]}
    prompt = _ids(["<|startoftext|>", "<|start_header_id|>", "user", "<|end_header_id|>", "\n\nAdd 1 and 2.",
                   "<|eot_id|>", "<|start_header_id|>", "assistant", "<|end_header_id|>", "\n\n"])
    response = _ids(["1+2=3.", "<|eot_id|>"])
    encoder = ChatEncoder(tokenizer, sequence_length=64, eos_id=EOS_ID, strip_think=True)
    row = encoder.encode(record, "x")
    expected = prompt + response + [EOS_ID] * (64 - len(prompt) - len(response))
    np.testing.assert_array_equal(row["tokens"], expected)
    assert int(row["prompt_length"]) == len(prompt) and not row["truncated"]
    np.testing.assert_array_equal(row["response"], np.arange(64) >= len(prompt))  # the EOS fill included
    assert row["valid"].all()
    # Without stripping, the reasoning is part of the response.
    kept = ChatEncoder(tokenizer, sequence_length=80, eos_id=EOS_ID).encode(record, "x")
    assert list(kept["tokens"][len(prompt):len(prompt) + 7]) == _ids(["<think>"])
    # Too long: cut at the end, counted; a prompt that fills the row leaves no response.
    short = ChatEncoder(tokenizer, sequence_length=len(prompt) + 3, eos_id=EOS_ID, strip_think=True)
    cut = short.encode(record, "x")
    np.testing.assert_array_equal(cut["tokens"], prompt + response[:3])
    assert cut["truncated"] and cut["response"].sum() == 3
    none = ChatEncoder(tokenizer, sequence_length=10, eos_id=EOS_ID).encode(record, "x")
    assert int(none["prompt_length"]) == 10 and not none["response"].any()
    assert (short.num_encoded, short.num_truncated) == (1, 1)


def test_missing_chat_template_names_the_tokenizer(tmp_path):
    directory = write_chat_tokenizer(str(tmp_path / "tok"), chat_template=None)
    data = from_config(PlannerInitConfig, _planner_config(str(tmp_path), fixture_path("chat.jsonl"))).data
    with pytest.raises(DataError, match=f"the tokenizer in {directory} has no chat template"):
        sft.open_chat_data(data, directory)


def test_only_response_positions_are_masked(tokenizer_dir):
    records = load_chat_records(fixture_path("chat.jsonl"))
    encoder = ChatEncoder(load_tokenizer(tokenizer_dir), sequence_length=WIDTH, eos_id=EOS_ID, strip_think=True)
    rows = [encoder.encode(r, "x") for r in records[:8]]
    tokens = jnp.asarray(np.stack([r["tokens"] for r in rows]))
    response = jnp.asarray(np.stack([r["response"] for r in rows]))
    masked_any = np.zeros(tokens.shape, bool)
    for k in range(20):
        noisy, is_masked, p_mask = mdlm_sft.corrupt(tokens, response, jax.random.key(k), MASK)
        is_masked = np.asarray(is_masked)
        assert not (is_masked & ~np.asarray(response)).any()  # the prompt is never masked
        np.testing.assert_array_equal(np.asarray(noisy), np.where(is_masked, MASK, np.asarray(tokens)))
        masked_any |= is_masked
    assert (masked_any == np.asarray(response)).mean() > 0.99  # the EOS fill is masked too
    # The loss of a hand-built row: prompt [0, 2), response [2, 6) of which 2 and 5 are masked, t = 0.5.
    logits = jax.random.normal(jax.random.key(0), (1, 6, 5))
    targets = jnp.array([[1, 2, 3, 4, 0, 0]])
    resp = jnp.array([[False, False, True, True, True, True]])
    is_masked = jnp.array([[False, False, True, False, False, True]])
    loss, ce = mdlm_sft.masked_diffusion_loss(logits, targets, is_masked, jnp.array([0.5]), resp)
    logp = jax.nn.log_softmax(logits[0])
    expected = -(logp[2, 3] + logp[5, 0]) / 0.5 / 4
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)


def test_stream_resumes_and_splits_over_processes(tokenizer_dir):
    records = load_chat_records(fixture_path("chat.jsonl"))
    encoder = ChatEncoder(load_tokenizer(tokenizer_dir), sequence_length=WIDTH, eos_id=EOS_ID)
    stream = ChatBatches(records, encoder, batch_size=8, seed=3)
    first = [stream.next_batch() for _ in range(3)]
    state = stream.get_state()
    rest = [stream.next_batch() for _ in range(8)]  # past the first epoch (48 records)
    again = ChatBatches(records, encoder, batch_size=8, seed=3)
    again.set_state(state)
    for a, b in zip(rest, [again.next_batch() for _ in range(8)]):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
    epoch = np.concatenate([b["index"] for b in (first + rest)[:6]])
    assert sorted(epoch) == list(range(48))  # one epoch visits every record once
    halves = [ChatBatches(records, encoder, batch_size=8, seed=3, process_index=p, process_count=2) for p in (0, 1)]
    for whole in first:
        parts = [h.next_batch() for h in halves]
        np.testing.assert_array_equal(np.concatenate([p["tokens"] for p in parts]), whole["tokens"])


# ---------------------------------------------------------------------- the real-run configs


class _Crash(Exception):
    pass


@contextlib.contextmanager
def _crash_at_step(monkeypatch, crash_step):
    """The SFT step functions raise `_Crash` when asked for step `crash_step` (0-based): a run
    killed there, after the checkpoints of the steps before it."""
    original = sft.stream_step

    def crashing(*args, **kwargs):
        step_fn = original(*args, **kwargs)

        def step(state, step_index):
            if step_index == crash_step:
                raise _Crash(step_index)
            return step_fn(state, step_index)

        return step

    with monkeypatch.context() as m:
        m.setattr(sft, "stream_step", crashing)
        yield


def _tiny_overrides(config, base_dir, data_path, steps):
    config.model.path = base_dir
    config.model.update(dtype="float32", param_dtype="float32", remat=False)
    config.data.path = data_path
    config.data.split = "train"
    config.data.sequence_length = WIDTH
    config.data.batch_size = 8
    config.total_steps = steps
    config.log_every = 2
    config.checkpoint.update(every=4, keep=2, async_save=False)
    config.export_dtype = "float32"
    return config


def _planner_config(base_dir, data_path, steps=8):
    config = _tiny_overrides(planner_init_8b.get_config(), base_dir, data_path, steps)
    config.optim.update(learning_rate=3e-3)
    config.model.planner = ml_collections.ConfigDict(dict(num_head_layers=1, freq_dim=256, adaln_eps=1e-4))
    config.data.block_length = 8
    config.eval.update(path=fixture_path("chat_heldout.jsonl"), split="test", agreement_batches=2)
    return config


def _sft_config(base_dir, data_path, steps=8):
    config = _tiny_overrides(sft_8b.get_config(), base_dir, data_path, steps)
    config.optim.update(learning_rate=3e-3, warmup_steps=0)
    return config


def test_sft_8b_on_chat_loss_falls_and_resume_equals_uninterrupted(base_dir, tmp_path, monkeypatch):
    whole = mdlm_sft.pretrain(_sft_config(base_dir, fixture_path("chat.jsonl"), steps=12), str(tmp_path / "a"))
    losses = [row["loss"] for row in whole["history"]]
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0], losses
    with _crash_at_step(monkeypatch, 6), pytest.raises(_Crash):  # the last checkpoint is step 4's
        mdlm_sft.pretrain(_sft_config(base_dir, fixture_path("chat.jsonl"), steps=12), str(tmp_path / "b"))
    resumed = mdlm_sft.pretrain(_sft_config(base_dir, fixture_path("chat.jsonl"), steps=12), str(tmp_path / "b"))
    assert [r["step"] for r in resumed["history"]] == [6, 8, 10, 12]
    for a, b in zip(whole["history"][2:], resumed["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)
    with open(tmp_path / "b" / "pretrain_eval.json") as f:
        assert json.load(f)["export_dir"] == str(tmp_path / "b" / "hf")
    assert load_tokenizer(str(tmp_path / "b" / "hf")).chat_template  # the export is a complete chat model


def test_planner_init_8b_on_chat_agrees_better_and_resumes(base_dir, tmp_path, monkeypatch):
    data = fixture_path("chat_pr.parquet")
    start = planner_init.init_planner(_planner_config(base_dir, data, steps=0), str(tmp_path / "start"))
    whole = planner_init.init_planner(_planner_config(base_dir, data, steps=16), str(tmp_path / "a"))
    assert whole["agreement"]["accuracy"] > start["agreement"]["accuracy"] + 0.05, (start["agreement"],
                                                                                   whole["agreement"])
    assert whole["agreement"]["loss"] < start["agreement"]["loss"]
    with _crash_at_step(monkeypatch, 10), pytest.raises(_Crash):  # the last checkpoint is step 8's
        planner_init.init_planner(_planner_config(base_dir, data, steps=16), str(tmp_path / "b"))
    resumed = planner_init.init_planner(_planner_config(base_dir, data, steps=16), str(tmp_path / "b"))
    assert [r["step"] for r in resumed["history"]] == [10, 12, 14, 16]
    for a, b in zip(whole["history"][4:], resumed["history"]):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)
    assert resumed["agreement"]["accuracy"] == pytest.approx(whole["agreement"]["accuracy"], abs=1e-6)


def test_chat_config_errors(base_dir, tmp_path):
    config = planner_init_8b.get_config()
    config.model.path = base_dir
    with pytest.raises(ConfigError, match=r"data.task='chat' needs data.path \(--config.data.path=FILE"):
        planner_init.init_planner(config, str(tmp_path / "a"))
    config = _planner_config(base_dir, fixture_path("chat.jsonl"))
    config.eval.rules = ("factor",)
    with pytest.raises(ConfigError, match=r"eval.rules=\('factor',\): chat data has no answers"):
        planner_init.init_planner(config, str(tmp_path / "b"))
    config = _planner_config(base_dir, fixture_path("chat.jsonl"))
    config.data.sequence_length = 512
    with pytest.raises(ConfigError, match="data.sequence_length=512 exceeds model.max_sequence_length=128"):
        planner_init.init_planner(config, str(tmp_path / "c"))
    # The data is read before the weights: a bad record fails even when the weights are unreadable.
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(base_dir):
        target = broken / name
        if name.endswith(".safetensors"):
            target.write_bytes(b"not weights")
        else:
            target.write_bytes(open(os.path.join(base_dir, name), "rb").read())
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: field messages\[0\].role is 'user'"):
        mdlm_sft.pretrain(_sft_config(str(broken), bad), str(tmp_path / "d"))
