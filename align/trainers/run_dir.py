"""The output-dir contract: one run owns its output directory.

- While a run trains, it holds an exclusive `flock` on OUTPUT_DIR/.align.lock (the kernel releases
  it when the process ends, even after kill -9); a second run on the directory is refused, naming
  the holder's pid.
- A new run gets a random run id, written to OUTPUT_DIR/run.json; its checkpoints and metrics
  records carry it, and checkpoint rotation removes only this run's checkpoints.
- A directory that already holds a run is refused unless the new run resumes it
  (`train.resume_from`) or asks to `overwrite` it, which moves the old run aside to
  `OUTPUT_DIR.old-<time>` (never deletes it). A non-empty directory that holds no run (say, a
  source tree) is always refused.
- A run resumes from a checkpoint of its own only: another run's checkpoint starts a new run in a
  new or empty directory; `auto` on a finished run that saved no checkpoint is refused (it would
  start over on its model). A run that stopped before its first step (`PLACEHOLDER_FILES`) loses
  nothing and is taken over.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Iterator

from align.errors import AlignError
from align.trainers.checkpoint import STATE_FILE, checkpoint_run_id, clean_staging, list_checkpoints

log = logging.getLogger(__name__)

LOCK_FILE = ".align.lock"
RUN_FILE = "run.json"
OLD_RUN_FILES = {"recipe.yaml", "metrics.jsonl"}
"""Together, they mark the output dir of a run from before run.json existed."""
PLACEHOLDER_FILES = {RUN_FILE, "recipe.yaml"}
"""All a run that stopped before its first step leaves (say, a refused resume): nothing to lose."""
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
                "pytorch_model.bin")
"""A finished run's final model (one of them)."""


def check_writable(path: Path) -> None:
    """AlignError unless `path` is (or can be made as) a directory this process may write in."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise AlignError(f"output_dir {str(path)!r}: {str(existing)!r} is a file, not a directory; "
                         "choose another output_dir")
    if not (os.access(existing, os.W_OK | os.X_OK) and _can_create_in(existing)):
        raise AlignError(f"output_dir {str(path)!r}: {str(existing)!r} is not writable (read-only or "
                         "not yours); choose another output_dir")


def _can_create_in(directory: Path) -> bool:
    """Whether a directory can be made in `directory` (tried, then removed): os.access says yes to root
    where nothing can be made, as in /proc or /sys."""
    try:
        os.rmdir(tempfile.mkdtemp(dir=directory, prefix=".align-probe-"))
    except OSError:
        return False
    return True


def contents(path: Path) -> list[str]:
    """The names in `path` other than the lock file (empty if it does not exist)."""
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE)


def read_run(path: Path) -> dict:
    """OUTPUT_DIR/run.json ({} if absent or unreadable)."""
    try:
        return json.loads((path / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}


def holds_run(names: list[str]) -> bool:
    """Whether a directory with these names is an Align run's output dir."""
    return RUN_FILE in names or OLD_RUN_FILES <= set(names)


def refuse_foreign(path: Path) -> None:
    """AlignError if `path` is a non-empty directory that holds no Align run (say, a source tree)."""
    names = contents(path)
    if names and not holds_run(names):
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise AlignError(f"output_dir {str(path)!r} is not empty and holds no Align run ({shown}); "
                         "choose a new or empty directory")


def refuse_other_run(path: Path, resume_from: str | None, overwrite: bool) -> None:
    """AlignError if `path` holds a run that this one neither resumes nor overwrites. A run resumes
    from a checkpoint of its own only (another run's checkpoint starts a new run, in a new or empty
    output_dir); `auto` resumes its newest checkpoint, or, with none, starts over only where no model
    would be lost (a run killed before its first checkpoint; not a finished run that saved none)."""
    checkpoint = None if resume_from in (None, "auto") else Path(resume_from).expanduser().resolve()
    if checkpoint is not None and overwrite and path.resolve() in checkpoint.parents:
        raise AlignError(f"train.resume_from: {resume_from!r} lies in output_dir {str(path)!r}, which --overwrite "
                         "would move aside; drop --overwrite to continue that run")
    names = contents(path)
    if overwrite or set(names) <= PLACEHOLDER_FILES:
        return
    run = read_run(path)
    started = f" (run {run.get('run_id')}, started {run.get('started')})" if run else ""
    if not resume_from:
        raise AlignError(f"output_dir {str(path)!r} already holds a run{started}; continue it with "
                         "--set train.resume_from=auto, move it aside with --overwrite, or choose another output_dir")
    if not run:
        raise AlignError(f"output_dir {str(path)!r} holds a run written without a run.json (an older Align); "
                         "it cannot be resumed: use --overwrite to move it aside, or another output_dir")
    if checkpoint is not None:
        if not (checkpoint / STATE_FILE).is_file():
            raise AlignError(f"train.resume_from: {resume_from!r} is not a complete checkpoint directory (no "
                             f"{STATE_FILE}): give one of OUTPUT_DIR/checkpoints/step-NNNNNN, or auto")
        owner = checkpoint_run_id(checkpoint)
        if owner != run["run_id"]:
            raise AlignError(f"output_dir {str(path)!r} holds a run{started}, but train.resume_from {resume_from!r} is "
                             f"a checkpoint of {'run ' + owner if owner else 'another run'}: resuming it here would "
                             "write over this one. Give a new output_dir (a new run from that checkpoint), or move "
                             "this run aside with --overwrite")
        return
    if not list_checkpoints(path / "checkpoints", run["run_id"]) and any((path / f).exists() for f in WEIGHT_FILES):
        raise AlignError(f"output_dir {str(path)!r} holds a finished run{started} with no checkpoint to resume "
                         "(train.save_every): train.resume_from=auto would start over and write over its model. "
                         f"Train on from its model in a new run (model.name_or_path: {str(path)!r}, another "
                         "output_dir), or move it aside with --overwrite")


def check(path: str | os.PathLike, resume_from: str | None, overwrite: bool) -> None:
    """Everything `hold` checks, changing nothing but the lock file: to fail before a model loads."""
    path = Path(path)
    check_writable(path)
    refuse_foreign(path)
    if path.is_dir():
        with _lock(path):
            refuse_other_run(path, resume_from, overwrite)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Hold OUTPUT_DIR's lock (pid written inside); AlignError naming the holder if another has it."""
    try:
        handle = open(path / LOCK_FILE, "a+")
    except OSError as error:
        raise AlignError(f"output_dir {str(path)!r}: cannot create its lock file ({error.strerror})") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise AlignError(f"output_dir {str(path)!r} is in use by another run (pid {holder}); wait for it "
                             "to finish or choose another output_dir") from None
        try:  # the holder's pid, for the refusal above (a full disk may refuse it: only informational)
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
        except OSError:
            pass
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def move_aside(path: Path) -> Path:
    """Move everything in `path` but the lock into a new sibling `<name>.old-<time>`; returns it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    resolved = path.resolve()
    target = resolved.with_name(f"{resolved.name}.old-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = resolved.with_name(f"{resolved.name}.old-{stamp}-{n}")
    target.mkdir()
    for name in contents(path):
        os.replace(path / name, target / name)
    return target


def start_run(path: Path) -> str:
    """Write a new run id to OUTPUT_DIR/run.json (atomically); returns it."""
    run_id = secrets.token_hex(6)
    temporary = path / f".{RUN_FILE}.tmp"
    temporary.write_text(json.dumps({"run_id": run_id, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                     "pid": os.getpid()}) + "\n")
    os.replace(temporary, path / RUN_FILE)
    return run_id


@contextlib.contextmanager
def hold(path: str | os.PathLike, resume_from: str | None, overwrite: bool) -> Iterator[str]:
    """Claim `path` for a run for the duration of the block; yields the run id (the resumed run's,
    or a new one). `overwrite` first moves a previous run aside; leftovers of interrupted checkpoint
    saves are cleaned up."""
    path = Path(path)
    check_writable(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise AlignError(f"output_dir {str(path)!r}: cannot create it ({error.strerror})") from None
    refuse_foreign(path)
    with _lock(path):
        refuse_other_run(path, resume_from, overwrite)
        if overwrite and contents(path):
            log.warning("output_dir %s held a previous run: moved it to %s", path, move_aside(path))
        clean_staging(path / "checkpoints")
        run = read_run(path)
        resumed = bool(run) and (resume_from == "auto" or bool(resume_from) and
                                 checkpoint_run_id(Path(resume_from).expanduser()) == run["run_id"])
        yield run["run_id"] if resumed else start_run(path)
