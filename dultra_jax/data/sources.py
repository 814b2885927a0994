"""Where examples come from: local JSONL / JSON / Parquet files and TFDS data sources.

`load_records` reads a whole split into a list of plain dicts (the benchmark sets are small);
`open_source` gives a random-access source (`__len__`, `__getitem__`) that grain reads directly,
which is what a large TFDS (array_record) split should use.

Paths:
  - `data/gsm8k/train.jsonl`, `x.json`, `x.parquet`, `x.jsonl.gz`, `x.json.gz`: one file.
  - `data/gsm8k/{split}.jsonl`: `{split}` is replaced by `split`.
  - a directory with `split` given: the file `{split}.jsonl|.jsonl.gz|.json|.json.gz|.parquet`
    in it, or the Parquet shards `{split}-*.parquet` / `{split}/*.parquet` (the HF hub layout).
  - `tfds:NAME[/CONFIG][:VERSION]:SPLIT` (or `tfds:NAME[/CONFIG]` with `split=`): a TFDS dataset
    prepared in array_record format under `data_dir` (default: TFDS's own default, e.g.
    `~/tensorflow_datasets`), read with `tfds.data_source`, which needs no TensorFlow. Text
    features come back as `bytes` from TFDS; they are decoded to `str` here.

Splits inside one file: a JSON file may hold a list of records or an object mapping split names to
lists (`{"train": [...], "test": [...]}`); records of any format that carry a `split` field are
filtered on it when `split` is given. Otherwise the file *is* the split and `split` only names it.

Errors (`DataError`, a `ValueError`) always name the path, and for a missing field, the field and
the record (line number for JSONL).
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from dultra_jax.errors import DataError  # re-exported; errors.py holds every user error

logger = logging.getLogger(__name__)

TFDS_PREFIX = "tfds:"
_FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")


# ----------------------------------------------------------------------------------------------
# Value normalisation (TFDS gives bytes and numpy values; Parquet gives numpy-free Python values)
# ----------------------------------------------------------------------------------------------

def to_python(value: Any) -> Any:
    """`bytes` -> `str`, numpy scalars/arrays -> Python scalars/lists, recursively."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        if value.dtype.kind in ("S", "O", "U"):
            return [to_python(v) for v in value.tolist()]
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------
# Field checks
# ----------------------------------------------------------------------------------------------

def _field_alternatives(field: str) -> tuple[str, ...]:
    return tuple(f.strip() for f in field.split("|") if f.strip())


def check_fields(record: Mapping[str, Any], fields: Sequence[str], *, where: str) -> None:
    """Raise `DataError` naming `where` and the field when `record` lacks one of `fields`.

    A field written `a|b` is satisfied by either `a` or `b` (e.g. MBPP's `text|prompt`).
    """
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a JSON object (a dict of fields), got {type(record).__name__}")
    for field in fields:
        alternatives = _field_alternatives(field)
        if not any(a in record for a in alternatives):
            have = ", ".join(sorted(map(str, record.keys()))[:20])
            raise DataError(f"{where}: missing field {field!r} (the record has: {have})")


def record_location(path: str, index: int, line_numbers: Sequence[int] | None = None) -> str:
    """How errors name a record: `path:LINE` for JSONL, else `path (record INDEX)`."""
    return f"{path}:{line_numbers[index]}" if line_numbers is not None else f"{path} (record {index})"


def _check_all(records: Sequence[Mapping[str, Any]], fields: Sequence[str], path: str, *,
               line_numbers: Sequence[int] | None = None,
               validate: Callable[[Mapping[str, Any], str], None] | None = None) -> None:
    if not fields and validate is None:
        return
    for i, record in enumerate(records):
        where = record_location(path, i, line_numbers)
        check_fields(record, fields, where=where)
        if validate is not None:
            validate(record, where)


# ----------------------------------------------------------------------------------------------
# Local files
# ----------------------------------------------------------------------------------------------

def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_jsonl(path: str) -> tuple[list[dict], list[int]]:
    records, lines = [], []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
            lines.append(lineno)
    return records, lines


def _read_json(path: str, split: str | None) -> list[dict]:
    with _open_text(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        if all(isinstance(v, list) for v in data.values()) and data:
            if split is None:
                if len(data) == 1:
                    return next(iter(data.values()))
                raise DataError(f"{path}: the file holds splits {sorted(data)}; say which one with `split`")
            if split not in data:
                raise DataError(f"{path}: no split {split!r} in the file (it has {sorted(data)})")
            return data[split]
        raise DataError(f"{path}: a JSON file must hold a list of records or an object of split -> list")
    raise DataError(f"{path}: a JSON file must hold a list of records, got {type(data).__name__}")


def _read_parquet(paths: Sequence[str]) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is an install requirement
        raise DataError(f"{paths[0]}: reading Parquet needs `pyarrow` (pip install pyarrow)") from e
    records: list[dict] = []
    for p in paths:
        try:
            records.extend(pq.read_table(p).to_pylist())
        except Exception as e:  # pyarrow raises several types for broken files
            raise DataError(f"{p}: cannot read Parquet ({e})") from e
    return records


def resolve_path(path: str, split: str | None = None) -> list[str]:
    """The file(s) that `path` (and `split`) name; `DataError` naming the path if there are none."""
    if "{split}" in path:
        if split is None:
            raise DataError(f"{path}: the path has a {{split}} placeholder but no split was given")
        path = path.replace("{split}", split)
    if os.path.isdir(path):
        if split is None:
            raise DataError(f"{path}: is a directory; give a file, or a split to pick {{split}}.jsonl etc. in it")
        for suffix in _FILE_SUFFIXES:
            candidate = os.path.join(path, split + suffix)
            if os.path.isfile(candidate):
                return [candidate]
        shards = sorted(glob.glob(os.path.join(path, f"{split}-*.parquet"))
                        + glob.glob(os.path.join(path, split, "*.parquet")))
        if shards:
            return shards
        raise DataError(f"{path}: no file for split {split!r} (looked for {split}.jsonl/.json/.parquet "
                        f"and {split}-*.parquet)")
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if not path.endswith(_FILE_SUFFIXES):
        raise DataError(f"{path}: unknown data format (use .jsonl, .json, .parquet, optionally .gz for "
                        f"JSON, or tfds:NAME:SPLIT)")
    return [path]


def _filter_split(records: list[dict], split: str | None, path: str,
                  lines: list[int] | None) -> tuple[list[dict], list[int] | None]:
    if split is None or not records or not all(isinstance(r, Mapping) and "split" in r for r in records):
        return records, lines
    keep = [i for i, r in enumerate(records) if str(r["split"]) == split]
    if not keep:
        have = sorted({str(r["split"]) for r in records})
        raise DataError(f"{path}: split {split!r} is empty (the records' `split` field has {have})")
    return [records[i] for i in keep], ([lines[i] for i in keep] if lines is not None else None)


# ----------------------------------------------------------------------------------------------
# TFDS
# ----------------------------------------------------------------------------------------------

def parse_tfds_path(path: str, split: str | None = None) -> tuple[str, str]:
    """`tfds:NAME[/CONFIG][:VERSION]:SPLIT` -> (`NAME[/CONFIG][:VERSION]`, SPLIT)."""
    if not path.startswith(TFDS_PREFIX):
        raise DataError(f"{path}: not a tfds: path")
    spec = path[len(TFDS_PREFIX):]
    parts = spec.split(":")
    if len(parts) == 1 or (len(parts) == 2 and _looks_like_version(parts[1])):
        name, path_split = spec, None
    else:
        name, path_split = ":".join(parts[:-1]), parts[-1]
    if not name:
        raise DataError(f"{path}: no dataset name (expected tfds:NAME[/CONFIG]:SPLIT)")
    if path_split and split and path_split != split:
        raise DataError(f"{path}: the path names split {path_split!r} but split={split!r} was given")
    chosen = path_split or split
    if not chosen:
        raise DataError(f"{path}: no split (expected tfds:NAME[/CONFIG]:SPLIT, or pass split=)")
    return name, chosen


def _looks_like_version(s: str) -> bool:
    pieces = s.split(".")
    return len(pieces) == 3 and all(p.isdigit() for p in pieces)


class DecodedSource(Sequence):
    """Random-access view of another source whose records are converted by `to_python`
    (bytes -> str, numpy -> Python)."""

    def __init__(self, source, *, path: str = ""):
        self._source = source
        self._path = path

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        record = self._source[index]
        return {str(k): to_python(v) for k, v in record.items()}

    def __repr__(self) -> str:
        return f"DecodedSource({self._path or self._source!r}, {len(self)} records)"


def open_tfds(path: str, split: str | None = None, *, data_dir: str | None = None,
              fields: Sequence[str] = ()) -> DecodedSource:
    """A random-access source over a prepared TFDS split (array_record), without TensorFlow.

    Every way the dataset can be missing (no such `data_dir`, a name, config or version not
    prepared there, an unknown split) is one `DataError` naming `path` and where TFDS looked;
    TFDS's own log lines about it are held back.
    """
    name, split = parse_tfds_path(path, split)
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(f"{path}: reading TFDS data needs `tensorflow-datasets` (pip install "
                        f"tensorflow-datasets; TensorFlow itself is not needed)") from e
    where = f"{path} (data_dir={data_dir})" if data_dir else path
    if data_dir and not os.path.isdir(os.path.expanduser(data_dir)):
        raise DataError(f"{where}: no such data directory {data_dir}")
    try:
        with _quiet_tfds_logs():
            source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises many types (DatasetNotFoundError, AssertionError, ValueError)
        if type(e).__name__ == "DatasetNotFoundError" or "not been generated" in str(e):
            looked = data_dir or os.environ.get("TFDS_DATA_DIR") or getattr(tfds.core.constants, "DATA_DIR", "")
            raise DataError(f"{where}: no prepared TFDS dataset {name!r} in {looked} (prepare it there with "
                            f"file_format='array_record', or pass its data_dir)") from None
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise DataError(f"{where}: cannot open TFDS split {split!r} of {name!r} ({type(e).__name__}: "
                        f"{first_line}); tfds.data_source reads datasets prepared with "
                        f"file_format='array_record'") from None
    if len(source) == 0:
        raise DataError(f"{where}: split {split!r} is empty")
    decoded = DecodedSource(source, path=path)
    if fields:
        check_fields(decoded[0], fields, where=f"{where} (record 0)")
    return decoded


class _DropTfdsInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or "tensorflow_datasets" not in record.pathname


@contextlib.contextmanager
def _quiet_tfds_logs():
    """Holds back TFDS's info and warning lines (through absl's logger) while a dataset is opened:
    on failure they repeat, over several lines, what the one DataError says."""
    drop = _DropTfdsInfo()
    loggers = [logging.getLogger("absl"), logging.getLogger()]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------

def load_records(path: str, split: str | None = None, fields: Sequence[str] = (), *,
                 data_dir: str | None = None, limit: int | None = None,
                 validate: Callable[[Mapping[str, Any], str], None] | None = None) -> list[dict]:
    """All records of one split as plain dicts (str, int, float, lists), checked for `fields`.

    Args:
      path: a file, a directory, a path with `{split}`, or `tfds:NAME[/CONFIG]:SPLIT` (module doc).
      split: the split to read (see the module doc for what it means for each kind of path).
      fields: fields every record must have (`a|b`: one of the two); a missing one is a
        `DataError` naming the path, the record and the field.
      data_dir: the TFDS data directory (tfds: paths only).
      limit: keep only the first `limit` records (after split selection).
      validate: called as `validate(record, where)` on every record, `where` naming it as errors
        do (`path:LINE` for JSONL, else `path (record INDEX)`); it raises `DataError`.
    """
    if path.startswith(TFDS_PREFIX):
        source = open_tfds(path, split, data_dir=data_dir, fields=())
        n = len(source) if limit is None else min(limit, len(source))
        records = [source[i] for i in range(n)]
        _check_all(records, fields, path, validate=validate)
        return records

    files = resolve_path(path, split)
    lines: list[int] | None = None
    shown = files[0] if len(files) == 1 else f"{os.path.dirname(files[0])}/{{{len(files)} parquet shards}}"
    if files[0].endswith((".jsonl", ".jsonl.gz")):
        records, lines = _read_jsonl(files[0])
    elif files[0].endswith((".json", ".json.gz")):
        records = _read_json(files[0], split)
    else:
        records = _read_parquet(files)
    records, lines = _filter_split(records, split, shown, lines)
    if not records:
        raise DataError(f"{shown}: no records" + (f" in split {split!r}" if split else ""))
    if limit is not None:
        records, lines = records[:limit], (lines[:limit] if lines is not None else None)
    _check_all(records, fields, shown, line_numbers=lines, validate=validate)
    return [to_python(r) if not _is_plain(r) else r for r in records]


def _is_plain(record: Any) -> bool:
    return isinstance(record, dict) and not any(isinstance(v, (bytes, np.ndarray, np.generic))
                                                for v in record.values())


def open_source(path: str, split: str | None = None, fields: Sequence[str] = (), *,
                data_dir: str | None = None) -> Sequence[dict]:
    """A random-access source for grain: lazy for TFDS, an in-memory list for local files."""
    if path.startswith(TFDS_PREFIX):
        return open_tfds(path, split, data_dir=data_dir, fields=fields)
    return RecordSource(load_records(path, split, fields))


class RecordSource(Sequence):
    """A grain random-access data source over in-memory records (`grain.sources.RandomAccessDataSource`
    protocol: `__len__` and `__getitem__`)."""

    def __init__(self, records: Iterable[Mapping[str, Any]]):
        self._records = list(records)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self._records[index]
        return self._records[index]

    def __repr__(self) -> str:
        return f"RecordSource({len(self)} records)"


class IndexedSource(Sequence):
    """`(index, record)` pairs over another random-access source: the pipeline's grain source, so
    that every example remembers which record it came from through shuffling and sharding."""

    def __init__(self, source: Sequence[Mapping[str, Any]], indices: Sequence[int] | None = None):
        self._source = source
        self._indices = None if indices is None else np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._source) if self._indices is None else len(self._indices)

    def __getitem__(self, i: int) -> tuple[int, Mapping[str, Any]]:
        index = int(i) if self._indices is None else int(self._indices[i])
        return index, self._source[index]

    def __repr__(self) -> str:
        return f"IndexedSource({len(self)} of {self._source!r})"
