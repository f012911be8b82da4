"""Dataset sources: local jsonl/json/parquet/csv files or directories, hub ids, in-memory rows."""

from __future__ import annotations

import os
from pathlib import Path

import datasets

from align.config import DATA_FILE_TYPES, DataSource
from align.errors import AlignError


def load_rows(source: DataSource, key: str = "data.train") -> datasets.Dataset:
    """Load one split as a `datasets.Dataset`, with `source.columns` renamed and `max_rows` applied."""
    path = os.path.expanduser(source.path)
    try:
        if Path(path).suffix in DATA_FILE_TYPES:
            data = datasets.load_dataset(DATA_FILE_TYPES[Path(path).suffix], data_files=path, split="train")
        else:
            data = datasets.load_dataset(path, source.name, split=source.split)
    except FileNotFoundError as error:
        raise AlignError(f"{key}.path: {source.path!r}: {error}") from None
    except (ValueError, datasets.exceptions.DatasetGenerationError) as error:
        raise AlignError(f"{key}.path: cannot read {source.path!r}: {error}") from None
    missing = [old for old in source.columns if old not in data.column_names]
    if missing:
        raise AlignError(f"{key}.columns: {source.path!r} has no column {missing[0]!r}; "
                         f"its columns are {data.column_names}")
    if source.columns:
        data = data.rename_columns(source.columns)
    if source.max_rows is not None:
        data = data.select(range(min(source.max_rows, len(data))))
    return data
