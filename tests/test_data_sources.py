"""Data sources: JSONL / JSON / Parquet / TFDS files, split selection and error messages."""

import gzip
import json

import grain
import numpy as np
import pytest

from dultra_jax.data import sources as S
from tests.fixtures.data_helpers import fixture_path

ROWS = [{"question": "What is 1+1?", "answer": "1+1=2\n#### 2"},
        {"question": "What is 2+3?", "answer": "2+3=5\n#### 5"},
        {"question": "What is 4*5?", "answer": "4*5=20\n#### 20"}]


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_jsonl_fixture_has_the_real_schema():
    records = S.load_records(fixture_path("gsm8k.jsonl"), fields=("question", "answer"))
    assert len(records) == 3 and set(records[0]) == {"question", "answer"}
    assert records[0]["answer"].endswith("#### 4")


def test_jsonl_skips_blank_lines_and_gz(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    assert S.load_records(str(path)) == ROWS[:2]
    gz = tmp_path / "x.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in ROWS))
    assert S.load_records(str(gz)) == ROWS


def test_json_list_and_split_object(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(ROWS))
    assert S.load_records(str(tmp_path / "list.json")) == ROWS
    (tmp_path / "splits.json").write_text(json.dumps({"train": ROWS[:2], "test": ROWS[2:]}))
    assert S.load_records(str(tmp_path / "splits.json"), split="test") == ROWS[2:]
    with pytest.raises(S.DataError, match=r"splits.json: no split 'dev'.*'test', 'train'"):
        S.load_records(str(tmp_path / "splits.json"), split="dev")
    with pytest.raises(S.DataError, match="say which one"):
        S.load_records(str(tmp_path / "splits.json"))


def test_parquet_file_and_shards(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [dict(r, test_list=["assert 1", "assert 2"], level=i) for i, r in enumerate(ROWS)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    assert S.load_records(str(tmp_path / "train.parquet"), fields=("question", "test_list")) == rows
    # HF hub layout: a directory with {split}-*.parquet shards.
    (tmp_path / "hub").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:2]), tmp_path / "hub" / "test-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[2:]), tmp_path / "hub" / "test-00001-of-00002.parquet")
    assert S.load_records(str(tmp_path / "hub"), split="test") == rows
    with pytest.raises(S.DataError, match="missing field 'tests'"):
        S.load_records(str(tmp_path / "train.parquet"), fields=("tests",))


def test_split_placeholder_directory_and_split_field(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", ROWS[:2])
    _write_jsonl(tmp_path / "test.jsonl", ROWS[2:])
    assert S.load_records(str(tmp_path / "{split}.jsonl"), split="test") == ROWS[2:]
    assert S.load_records(str(tmp_path), split="train") == ROWS[:2]
    tagged = [dict(r, split=s) for r, s in zip(ROWS, ["train", "test", "train"])]
    path = _write_jsonl(tmp_path / "all.jsonl", tagged)
    assert [r["question"] for r in S.load_records(path, split="train")] == [ROWS[0]["question"], ROWS[2]["question"]]
    with pytest.raises(S.DataError, match=r"all.jsonl: split 'dev' is empty"):
        S.load_records(path, split="dev")
    with pytest.raises(S.DataError, match="placeholder"):
        S.load_records(str(tmp_path / "{split}.jsonl"))


def test_missing_file_names_the_path(tmp_path):
    missing = str(tmp_path / "nope" / "train.jsonl")
    with pytest.raises(S.DataError, match=missing.replace("/", "/")):
        S.load_records(missing)
    with pytest.raises(S.DataError, match=r"no file for split 'dev'"):
        S.load_records(str(tmp_path), split="dev")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(S.DataError, match="x.csv: unknown data format"):
        S.load_records(str(tmp_path / "x.csv"))


def test_missing_field_names_field_path_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", [ROWS[0], {"question": "no answer here"}])
    with pytest.raises(S.DataError) as e:
        S.load_records(path, fields=("question", "answer"))
    assert f"{path}:2" in str(e.value) and "'answer'" in str(e.value)
    # `a|b`: either field will do (MBPP's text / prompt).
    assert len(S.load_records(path, fields=("question|prompt",))) == 2
    (tmp_path / "l.json").write_text(json.dumps([ROWS[0], {"q": 1}]))
    with pytest.raises(S.DataError, match=r"l.json \(record 1\): missing field 'question'"):
        S.load_records(str(tmp_path / "l.json"), fields=("question",))


def test_empty_file_and_bad_json_are_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(S.DataError, match="empty.jsonl: no records"):
        S.load_records(str(tmp_path / "empty.jsonl"))
    (tmp_path / "e.json").write_text(json.dumps({"train": []}))
    with pytest.raises(S.DataError, match=r"e.json: no records in split 'train'"):
        S.load_records(str(tmp_path / "e.json"), split="train")
    (tmp_path / "bad.jsonl").write_text(json.dumps(ROWS[0]) + "\n{oops\n")
    with pytest.raises(S.DataError, match=r"bad.jsonl:2: not valid JSON"):
        S.load_records(str(tmp_path / "bad.jsonl"))


def test_tfds_path_parsing():
    assert S.parse_tfds_path("tfds:gsm8k:train") == ("gsm8k", "train")
    assert S.parse_tfds_path("tfds:mbpp/full:test") == ("mbpp/full", "test")
    assert S.parse_tfds_path("tfds:mbpp/full:1.0.0:test") == ("mbpp/full:1.0.0", "test")
    assert S.parse_tfds_path("tfds:mbpp/full:1.0.0", split="train") == ("mbpp/full:1.0.0", "train")
    assert S.parse_tfds_path("tfds:gsm8k", split="test") == ("gsm8k", "test")
    with pytest.raises(S.DataError, match="no split"):
        S.parse_tfds_path("tfds:gsm8k")
    with pytest.raises(S.DataError, match="names split 'train' but split='test'"):
        S.parse_tfds_path("tfds:gsm8k:train", split="test")


def _prepare_tfds(data_dir):
    """A prepared array_record TFDS dataset, built without TensorFlow (skip_registration: it is read
    back from its files, as a user's prepared data would be)."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class DultraTinyQa(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="main")]

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "question": tfds.features.Text(), "answer": tfds.features.Text(),
                "test_list": tfds.features.Sequence(tfds.features.Text()), "level": np.int64}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(3), "test": self._generate_examples(2)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"question": f"What is {i}+{i}?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i}",
                          "test_list": [f"assert f({i}) == {2 * i}"], "level": i}

    DultraTinyQa(data_dir=data_dir, file_format="array_record").download_and_prepare()


def test_tfds_array_record_source_without_tensorflow(tmp_path):
    import sys
    data_dir = str(tmp_path / "tfds")
    _prepare_tfds(data_dir)
    records = S.load_records("tfds:dultra_tiny_qa/main:train", data_dir=data_dir, fields=("question", "answer"))
    assert len(records) == 3
    assert sorted(r["level"] for r in records) == [0, 1, 2]
    r = next(r for r in records if r["level"] == 1)
    assert r == {"question": "What is 1+1?", "answer": "1+1=2\n#### 2", "test_list": ["assert f(1) == 2"],
                 "level": 1}                                             # bytes decoded to str
    assert S.load_records("tfds:dultra_tiny_qa/main:1.0.0", split="test", data_dir=data_dir)[0]["question"]
    source = S.open_source("tfds:dultra_tiny_qa/main:test", data_dir=data_dir)
    assert len(source) == 2 and isinstance(source[1]["answer"], str)
    assert "tensorflow" not in sys.modules
    with pytest.raises(S.DataError, match=r"tfds:dultra_tiny_qa/main:dev.*split 'dev'"):
        S.load_records("tfds:dultra_tiny_qa/main:dev", data_dir=data_dir)
    with pytest.raises(S.DataError, match="missing field 'solution'"):
        S.load_records("tfds:dultra_tiny_qa/main:train", data_dir=data_dir, fields=("solution",))
    with pytest.raises(S.DataError, match="tfds:no_such_set:train"):
        S.load_records("tfds:no_such_set:train", data_dir=data_dir)


def test_record_sources_work_with_grain():
    source = S.RecordSource(ROWS)
    assert len(source) == 3 and source[2] == ROWS[2]
    indexed = S.IndexedSource(source, indices=[2, 0])
    assert list(grain.MapDataset.source(indexed)) == [(2, ROWS[2]), (0, ROWS[0])]
    assert S.to_python({"a": b"x", "b": np.array([b"y", b"z"], dtype=object), "c": np.int64(3),
                        "d": np.array([1, 2])}) == {"a": "x", "b": ["y", "z"], "c": 3, "d": [1, 2]}

