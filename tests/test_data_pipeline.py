"""The grain pipeline: batch layout, left padding, truncation, shuffling, sharding, resumable state."""

import logging

import numpy as np
import pytest

from dultra_jax.data import pipeline as Pl
from dultra_jax.data import tasks as T
from dultra_jax.data import tokenizer as tok
from dultra_jax.data.sources import DataError, load_records
from tests.fixtures.data_helpers import EOS_ID, fixture_path, write_chat_tokenizer

PAD = 1


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tok.load_tokenizer(write_chat_tokenizer(str(tmp_path_factory.mktemp("tok"))))


def id_records(n, *, long_every=0):
    """Token-id examples (the tiny configs' exact task, no tokenizer): prompt i is [10+i]*(i%3+1)."""
    records = []
    for i in range(n):
        ids = [10 + i] * (i % 3 + 1)
        if long_every and i % long_every == 0:
            ids = list(range(100, 112)) + [10 + i]
        records.append({"prompt_ids": ids, "answer": str(i)})
    return records


def iterator(records, **kw):
    args = dict(prompt_length=4, batch_size=4, seed=0, pad_id=PAD)
    args.update(kw)
    return Pl.make_train_iterator(records, T.get_task("exact"), None, **args)


def test_batch_layout_and_left_padding():
    records = id_records(8)
    batch = next(iterator(records))
    assert batch["prompt_tokens"].shape == (4, 4) and batch["prompt_tokens"].dtype == np.int32
    assert batch["prompt_valid"].shape == (4, 4) and batch["prompt_valid"].dtype == np.bool_
    assert batch["index"].shape == (4,) and batch["index"].dtype == np.int64
    assert batch["row_valid"].all() and not batch["prompt_truncated"].any()
    for key in ("answer", "prompt_text", "prompt_messages"):
        assert batch[key].shape == (4,) and batch[key].dtype == object
    for row in range(4):
        i = int(batch["index"][row])
        ids = records[i]["prompt_ids"]
        expect = [PAD] * (4 - len(ids)) + ids
        assert batch["prompt_tokens"][row].tolist() == expect
        assert batch["prompt_valid"][row].tolist() == [False] * (4 - len(ids)) + [True] * len(ids)
        assert batch["answer"][row] == str(i)
        assert batch["prompt_text"][row] == " ".join(map(str, ids))


def test_truncation_keeps_the_end_and_is_counted(caplog):
    records = id_records(6, long_every=3)         # records 0 and 3 have 13 tokens
    with caplog.at_level(logging.WARNING, logger="dultra_jax.data.pipeline"):
        it = iterator(records, batch_size=6, prompt_length=5, num_epochs=1)
        batch = next(it)
    for row in range(6):
        i = int(batch["index"][row])
        ids = records[i]["prompt_ids"]
        assert batch["prompt_truncated"][row] == (len(ids) > 5)
        if len(ids) > 5:
            assert batch["prompt_tokens"][row].tolist() == ids[-5:]      # the END is kept
            assert batch["prompt_valid"][row].all()
    counter = Pl.truncation_counter(it)
    assert counter.truncated == 2 and counter.encoded == 6
    assert "kept its last 5 tokens" in caplog.text


def test_shuffle_depends_on_seed_and_epochs_reshuffle():
    records = id_records(12)

    def order(seed, n=3):
        it = iterator(records, seed=seed)
        return np.concatenate([next(it)["index"] for _ in range(n)]).tolist()

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0)) == list(range(12))                            # one epoch: a permutation
    it = iterator(records, seed=0)
    epochs = np.concatenate([next(it)["index"] for _ in range(6)])
    assert sorted(epochs[12:].tolist()) == list(range(12)) and epochs[12:].tolist() != epochs[:12].tolist()


def test_processes_get_disjoint_shards_covering_the_data():
    records = id_records(16)
    parts = []
    for p in range(2):
        it = iterator(records, batch_size=8, process_index=p, process_count=2, num_epochs=1)
        batches = list(it)
        assert len(batches) == 2 and all(b["prompt_tokens"].shape == (4, 4) for b in batches)
        parts.append(np.concatenate([b["index"] for b in batches]).tolist())
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == list(range(16))
    # Each global batch is a single process's batch, split in process order (so each row meets the
    # same sampling noise and the run does not depend on the process count).
    single = np.concatenate([b["index"] for b in iterator(records, batch_size=8, num_epochs=1)]).tolist()
    assert single == parts[0][:4] + parts[1][:4] + parts[0][4:] + parts[1][4:]
    with pytest.raises(ValueError, match="multiple of process_count 3"):
        iterator(records, batch_size=8, process_count=3)


def test_finite_epochs_drop_the_partial_global_batch():
    batches = list(iterator(id_records(10), batch_size=4, num_epochs=1))
    assert len(batches) == 2
    assert len(list(iterator(id_records(10), batch_size=4, num_epochs=2))) == 5
    with pytest.raises(DataError, match="less than one batch"):
        iterator(id_records(3), batch_size=4, num_epochs=1)


@pytest.mark.parametrize("read_threads", [0, 2])
def test_state_round_trip(read_threads):
    records = id_records(11)
    it = iterator(records, seed=3, read_threads=read_threads)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    resumed = iterator(records, seed=3, read_threads=read_threads)
    resumed.set_state(state)
    for want, got in zip(expected, [next(resumed) for _ in range(2)]):
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])


def test_hf_tokenizer_and_task_fields(tokenizer):
    records = load_records(fixture_path("mbpp.jsonl"))
    task = T.get_task("mbpp", mode="non-thinking")
    it = Pl.make_train_iterator(records, task, tokenizer, prompt_length=512, batch_size=2, seed=0)
    batch = next(it)
    assert set(batch) >= {"prompt_tokens", "prompt_valid", "index", "answer", "tests", "entry_point",
                          "input_output", "prompt_code", "prompt_text", "prompt_messages"}
    for row in range(2):
        rec = records[int(batch["index"][row])]
        ids = tok.encode_text(tokenizer, tok.render_prompt(tokenizer, task.build_prompt(rec)))
        valid = batch["prompt_valid"][row]
        assert batch["prompt_tokens"][row][valid].tolist() == ids
        assert (batch["prompt_tokens"][row][~valid] == EOS_ID).all()     # pad id = the tokenizer's pad
        assert batch["prompt_text"][row].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
        assert batch["entry_point"][row] == task.example_fields(rec)["entry_point"]
    # Task selection (mbpp test split = task ids 11..510): indices still point into `records`.
    it = Pl.make_train_iterator(records, T.get_task("mbpp", split="test"), tokenizer, prompt_length=64,
                                batch_size=2, seed=0, num_epochs=1)
    assert sorted(next(it)["index"].tolist()) == [1, 3]


def test_eval_batches_in_order_with_padding_rows(tokenizer):
    records = load_records(fixture_path("gsm8k.jsonl"))
    task = T.get_task("gsm8k", mode="non-thinking")
    batches = list(Pl.make_eval_batches(records, task, tokenizer, prompt_length=128, batch_size=2))
    assert len(batches) == 2
    assert batches[0]["index"].tolist() == [0, 1] and batches[1]["index"].tolist() == [2, 2]
    assert batches[1]["row_valid"].tolist() == [True, False]
    assert batches[0]["answer"].tolist() == ["4", "6250"]
    assert all(b["prompt_tokens"].shape == (2, 128) for b in batches)
    # Two processes: each takes its half of every global batch; together they are the global batch.
    halves = [list(Pl.make_eval_batches(records, task, tokenizer, prompt_length=128, batch_size=2,
                                        process_index=p, process_count=2)) for p in range(2)]
    assert [b["index"].tolist() for b in halves[0]] == [[0], [2]]
    assert [b["index"].tolist() for b in halves[1]] == [[1], [2]]
    assert halves[1][1]["row_valid"].tolist() == [False]
    np.testing.assert_array_equal(halves[1][0]["prompt_tokens"][0], batches[0]["prompt_tokens"][1])


def test_missing_prompt_ids_without_tokenizer_is_an_error():
    with pytest.raises(DataError, match="prompt_ids"):
        next(iterator([{"prompt": "1+1", "answer": "2"}] * 4))
    with pytest.raises(ValueError, match="pad_id"):
        Pl.make_train_iterator(id_records(4), T.get_task("exact"), None, prompt_length=4, batch_size=4, seed=0)
