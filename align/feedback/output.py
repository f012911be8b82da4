"""Where a feedback task writes: one data file (and its config and stats) in `output_dir`, written
whole or not at all; an earlier file is moved aside with --overwrite, never deleted."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from align.errors import AlignError

log = logging.getLogger(__name__)


def prepare(output_dir: str, filename: str, overwrite: bool, command: str) -> Path:
    """The path of `filename` in `output_dir` (made if missing). AlignError if it is already there
    (unless `overwrite`, which renames the old one to `<file>.old-<time>`) or cannot be written."""
    from align.trainers.run_dir import check_writable

    out = Path(output_dir).expanduser()
    check_writable(out)
    target = out / filename
    if target.exists():
        if not overwrite:
            raise AlignError(f"output_dir {output_dir!r} already holds {filename} from an earlier run; choose another "
                             f"output_dir (--set output_dir=...) or pass `align {command} --overwrite` (the old file "
                             "is moved aside, not deleted)")
        aside = target.with_name(f"{filename}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        target.rename(aside)
        log.warning("moved the earlier %s to %s", target, aside)
    out.mkdir(parents=True, exist_ok=True)
    return target


def write_jsonl(rows: list[dict], path: Path) -> None:
    """All rows or nothing: written to a temporary file beside `path`, flushed, then renamed."""
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(staging, "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        staging.rename(path)
    except OSError as error:
        staging.unlink(missing_ok=True)
        raise AlignError(f"cannot write {str(path)!r}: {error.strerror or error}; nothing was written") from None


def write_json(data: dict, path: Path) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
