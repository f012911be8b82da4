"""Dataset sources: local jsonl/json/parquet/csv files or directories, hub ids, in-memory rows."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
from pathlib import Path

import datasets
import pyarrow as pa
from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

from align.config import DATA_FILE_TYPES, DataSource, unsupported_data_file
from align.data.formats import check_columns
from align.errors import AlignError


def load_rows(source: DataSource, key: str = "data.train") -> datasets.Dataset:
    """Load one split as a `datasets.Dataset`, with `source.columns` renamed and `max_rows` applied.

    Refused with an AlignError naming the file and the line or row: an unreadable or empty file,
    text that is not UTF-8, and a format column (text, prompt, messages...) of the wrong type in a row.
    """
    path = os.path.expanduser(source.path)
    problem = unsupported_data_file(source.path)
    if problem:
        raise AlignError(f"{key}.path: {problem}")
    if os.path.isfile(path) and os.path.getsize(path) == 0:  # (datasets' readers fail on it, each another way)
        raise AlignError(_no_rows(source, key))
    csv_files = _csv_files(path, source.split)
    as_text = _text_features(csv_files) if csv_files else None
    try:
        with _datasets_logs_quiet():  # (its reader logs an error of its own, naming the wrong row, before ours)
            if as_text is not None:
                data = datasets.load_dataset("csv", data_files=csv_files, split="train", features=as_text)
            elif Path(path).suffix in DATA_FILE_TYPES:
                data = datasets.load_dataset(DATA_FILE_TYPES[Path(path).suffix], data_files=path, split="train")
            else:
                data = datasets.load_dataset(path, source.name, split=source.split)
    except FileNotFoundError as error:
        raise AlignError(f"{key}.path: {source.path!r}: {error}") from None
    except ConnectionError as error:  # a hub id, the hub out of reach (and the dataset not in datasets' cache)
        raise AlignError(f"{key}.path: {source.path!r} is no local file, and as a hub dataset it cannot be "
                         f"fetched: {error}; give a local .jsonl/.json/.parquet/.csv file or directory") from None
    except UnicodeDecodeError:
        raise AlignError(_not_utf8(path, key)) from None
    except StopIteration:  # what `datasets` raises on a directory of 0-byte files
        raise AlignError(_no_rows(source, key)) from None
    except (ValueError, datasets.exceptions.DatasetGenerationError) as error:
        # `[]`, blank lines only, a csv header only; a csv of blank lines (pandas' error)
        if "corresponds to no data" in str(error) or "No columns to parse" in str(error.__cause__):
            raise AlignError(_no_rows(source, key)) from None
        raise AlignError(f"{key}.path: cannot read {source.path!r}: {_bad_json_line(path) or error}") from None
    if len(data) == 0:
        raise AlignError(_no_rows(source, key))
    try:
        data.data.table.validate(full=True)  # arrow keeps bytes that are not UTF-8 as they are
    except pa.ArrowInvalid:
        raise AlignError(_not_utf8(path, key)) from None
    missing = [old for old in source.columns if old not in data.column_names]
    if missing:
        raise AlignError(f"{key}.columns: {source.path!r} has no column {missing[0]!r}; "
                         f"its columns are {data.column_names}")
    if source.columns:
        data = data.rename_columns(source.columns)
    if as_text is not None:
        data = _csv_typed_columns(data)
    if source.max_rows is not None:
        data = data.select(range(min(source.max_rows, len(data))))
    check_columns(data, key, renamed={new: old for old, new in source.columns.items()})
    return data


def _csv_files(path: str, split: str) -> list[str] | None:
    """The .csv files `path` holds for `split` (itself, if it is one; a directory's, as datasets picks
    them by name), or None where any is of another type."""
    if os.path.isdir(path):
        try:
            files = DataFilesDict.from_patterns(get_data_patterns(path), base_path=path).get(split) or []
        except (FileNotFoundError, ValueError, EmptyDatasetError):
            return None
    else:
        files = [path] if os.path.isfile(path) else []
    return list(files) if files and all(Path(f).suffix == ".csv" for f in files) else None


def _text_features(files: list[str]) -> datasets.Features | None:
    """Every column of these csv files (one header) read as text, as a .jsonl string would be.
    (pandas' guess would turn an answer "007" into 7.0, and a column of integers with one blank cell
    into floats "42.0", before any reward compares them.) None where the headers differ or repeat a
    name: left to datasets (which reports it)."""
    headers = set()
    for file in files:
        with open(file, encoding="utf-8-sig", errors="replace", newline="") as f:
            header = next(csv.reader(f), None)
        if not header:
            return None
        headers.add(tuple(name or f"Unnamed: {i}" for i, name in enumerate(header)))  # (pandas' name for a blank)
    if len(headers) != 1:
        return None
    (header,) = headers
    if len(set(header)) != len(header):
        return None
    return datasets.Features({name: datasets.Value("string") for name in header})


CSV_TYPED = {"label": "bool", "margin": "float", "label_smoothing": "float"}
"""The csv columns Align reads as values, not text: kto's `label`, a pair's reward `margin` and its
own `label_smoothing` (`align label` writes one for a tie it keeps)."""


_UNREADABLE = object()


def _csv_value(text: str | None, kind: str):
    """A csv cell of a CSV_TYPED column as a bool (true/false/1/0, any case) or a number (a blank
    cell: None), or _UNREADABLE."""
    if kind == "bool":
        return {"true": True, "1": True, "false": False, "0": False}.get(str(text).strip().lower(), _UNREADABLE)
    if text is None or not text.strip():
        return None
    try:
        return float(text)
    except ValueError:
        return _UNREADABLE


def _csv_typed_columns(data: datasets.Dataset) -> datasets.Dataset:
    """A csv's CSV_TYPED columns, read as text, made values (`_csv_value`) when every row reads so;
    otherwise left as text, for their checks to name the row."""
    for name, kind in CSV_TYPED.items():
        if name not in data.column_names:
            continue
        values = [_csv_value(text, kind) for text in data[name]]
        if _UNREADABLE not in values:
            data = data.remove_columns(name).add_column(name, values)
    return data


@contextlib.contextmanager
def _datasets_logs_quiet():
    """Inside, `datasets` logs nothing below CRITICAL (what goes wrong is raised and reported by Align)."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _no_rows(source: DataSource, key: str) -> str:
    return (f"{key}.path: {source.path!r} holds no rows; add some (in a .jsonl file, one JSON object per line, "
            'e.g. {"prompt": "...", "completion": "..."})')


def _bad_json_line(path: str) -> str | None:
    """Where a .jsonl file breaks its format (datasets names no line, or the wrong one): its first
    line that is not a JSON object, or None."""
    if Path(path).suffix != ".jsonl" or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line.strip())
            except ValueError as error:
                return f"line {n} is not valid JSON ({error}); each line holds one JSON object"
            if not isinstance(value, dict):
                return f"line {n} holds a {type(value).__name__}, not a JSON object {{\"column\": value, ...}}"
    return None


def _not_utf8(path: str, key: str) -> str:
    """The message for text that is not UTF-8, naming the first bad line when `path` is a text file."""
    where = ""
    if os.path.isfile(path) and Path(path).suffix != ".parquet":
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as error:
                    where = f" line {n} (byte {line[error.start]:#04x} at column {error.start + 1})"
                    break
    return (f"{key}.path: {path!r}{where}: not UTF-8 text; save the file as UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8 IN > OUT)")
