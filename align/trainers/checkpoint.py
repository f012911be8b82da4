"""Atomic, safe checkpoints: a checkpoint directory appears whole or not at all, and loading one
never runs code.

Each checkpoint is written into a hidden staging directory, flushed to disk, then renamed to
`checkpoints/step-000123`. A kill during a save leaves only the staging directory, which is
ignored and cleaned up, so the previous checkpoint stays intact.

What a checkpoint holds: every tensor of the trainer's state in `tensors.safetensors`, and
everything else (optimizer settings, random generator states, counters) as JSON in
`trainer_state.json`, with the sha256 of each other file. No pickle is read, so a malicious
checkpoint cannot run code; the checksums catch accidental corruption (a truncated or damaged
file), and `load_newest` then falls back to the previous checkpoint.

Sharded state (`RowShard`: an FSDP2 shard, rows of a tensor split along dim 0 over the processes)
is never gathered: each process writes its own rows into `rows-00001-of-00008.safetensors` in the
same staging directory, and the main process renames the directory once every process has written
and flushed its file (on a filesystem every process shares). Loading gives each such tensor as
`StoredRows`, which reads only the rows asked for, so a sharded resume reads each process's share
whatever the number of processes that wrote it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from align.distributed import from_every_process, from_main_process
from align.errors import AlignError

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
TENSORS_FILE = "tensors.safetensors"
ROWS_FILES = "rows-*-of-*.safetensors"


def rows_file(process: int, processes: int) -> str:
    return f"rows-{process + 1:05d}-of-{processes:05d}.safetensors"


class UnusableCheckpoint(AlignError):
    """A checkpoint that cannot be loaded: damaged, incomplete, or in the old pickle format."""


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass(frozen=True)
class RowShard:
    """This process's rows [offset, offset + local.shape[0]) of a tensor of `shape` split along dim 0
    over the processes (an FSDP2 shard). A checkpoint stores it in this process's rows file."""
    local: torch.Tensor
    offset: int
    shape: tuple[int, ...]


class RowsFile:
    """One writer's rows file of a checkpoint; `expected`: its sha256, checked at its first read
    (None: the load checked it already)."""

    def __init__(self, path: Path, expected: str | None = None):
        self.path, self.expected = path, expected

    def open(self):
        if self.expected is not None:
            if sha256(self.path) != self.expected:
                raise UnusableCheckpoint(f"{self.path} is damaged (its sha256 differs from the one saved)")
            self.expected = None
        return safe_open(str(self.path), "pt")


class StoredRows:
    """A tensor of `shape` stored as rows in the rows files of a checkpoint, read on demand.
    pieces: (row offset, the piece's shape, file), which must tile rows [0, shape[0]) with the same
    trailing shape (UnusableCheckpoint if not)."""

    def __init__(self, name: str, shape: tuple[int, ...], pieces: list[tuple[int, tuple, RowsFile]]):
        self.name, self.shape = name, tuple(shape)
        self.pieces = sorted(pieces, key=lambda piece: piece[0])
        starts = [offset for offset, _, _ in self.pieces]
        stops = [offset + piece[0] for offset, piece, _ in self.pieces]
        tiled = bool(self.shape) and starts[:1] == [0] and starts[1:] == stops[:-1] and stops[-1:] == [self.shape[0]]
        if not tiled or any(tuple(piece[1:]) != self.shape[1:] for _, piece, _ in self.pieces):
            raise UnusableCheckpoint(f"{name}: its rows files do not hold rows 0-{self.shape[0] if self.shape else 0} "
                                     f"of shape {list(self.shape)} once each (they hold "
                                     f"{[(offset, list(piece)) for offset, piece, _ in self.pieces]})")

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) as one CPU tensor, read from the files that hold them."""
        if not 0 <= start <= stop <= self.shape[0]:
            raise AlignError(f"{self.name}: rows {start}-{stop} asked of a tensor of {self.shape[0]} rows")
        wanted = [(offset, piece[0], file) for offset, piece, file in self.pieces
                  if max(start, offset) < min(stop, offset + piece[0])]
        parts = []
        for offset, count, file in wanted or [(0, 0, self.pieces[0][2])]:  # none: an empty share, 0 rows
            lo, hi = (max(start, offset), min(stop, offset + count)) if wanted else (0, 0)
            with file.open() as stored:
                parts.append(stored.get_slice(self.name)[lo - offset:hi - offset])
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def whole(self) -> torch.Tensor:
        return self.rows(0, self.shape[0])


def materialize(obj):
    """`obj` (a loaded checkpoint's objects) with every StoredRows read whole."""
    if isinstance(obj, StoredRows):
        return obj.whole()
    if isinstance(obj, dict):
        return {k: materialize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(materialize(v) for v in obj)
    return obj


# ---- nested objects <-> (JSON tree, flat tensors) ---------------------------------------------
class _TensorTable:
    """Collects the tensors of a nested object under path names, storing each storage once: tied
    weights (one tensor under two names) become one entry; other views of a saved storage are copied
    (safetensors refuses tensors that share memory)."""

    def __init__(self, keep_tensors: bool = True):
        self.keep_tensors = keep_tensors  # False: names only (a process that writes only its rows)
        self.tensors: dict[str, torch.Tensor] = {}
        self.rows: dict[str, RowShard] = {}
        self.views: dict[tuple, str] = {}
        self.storages: set[int] = set()

    def add(self, name: str, tensor: torch.Tensor) -> str:
        if not self.keep_tensors:
            return name
        tensor = tensor.detach()
        pointer = tensor.untyped_storage().data_ptr() if tensor.numel() else 0
        view = (pointer, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.device)
        if pointer and view in self.views:
            return self.views[view]
        shared = pointer and pointer in self.storages
        self.tensors[name] = (tensor.clone() if shared else tensor).contiguous().cpu()
        if pointer:
            self.views[view] = name
            self.storages.add(pointer)
        return name


def _encode(obj, name: str, table: _TensorTable):
    """A JSON-able tree of `obj`; tensors go to `table`. Tuples, numpy arrays and dicts whose keys
    are not plain strings are tagged so that `_decode` gives back the same types."""
    if isinstance(obj, torch.Tensor):
        return {"__tensor__": table.add(name, obj)}
    if isinstance(obj, RowShard):
        table.rows[name] = obj
        return {"__rows__": name, "shape": list(obj.shape)}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, f"{name}/{i}", table) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else {"__tuple__": items}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{name}/{k}", table) for k, v in obj.items()}
        return {"__items__": [[k, _encode(v, f"{name}/{k}", table)] for k, v in obj.items()]}
    raise TypeError(f"checkpoint entry {name!r}: cannot store a {type(obj).__name__} (tensors, numbers, "
                    "strings, None and lists/tuples/dicts of them are stored)")


def _decode(tree, tensors: dict[str, torch.Tensor], rows: dict[str, list]):
    """The object `_encode` made `tree` of; `rows`: each stored-rows name's pieces (see StoredRows)."""
    if isinstance(tree, list):
        return [_decode(v, tensors, rows) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if "__rows__" in tree:
        return StoredRows(tree["__rows__"], tree["shape"], rows.get(tree["__rows__"], []))
    if "__ndarray__" in tree:
        return np.array(tree["__ndarray__"], dtype=tree["dtype"])
    if "__tuple__" in tree:
        return tuple(_decode(v, tensors, rows) for v in tree["__tuple__"])
    if "__items__" in tree:
        return {k: _decode(v, tensors, rows) for k, v in tree["__items__"]}
    return {k: _decode(v, tensors, rows) for k, v in tree.items()}


# ---- files --------------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors_streaming(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """`tensors` (on any device) as a safetensors file at `path`, copied to the CPU and written one at a
    time, so that a process's host memory holds one tensor, not all of them (safetensors' own
    `save_file` takes them all on the CPU at once); flushed. Returns the file's sha256, computed as it
    is written (not read back). The format: an 8-byte little-endian header size, a JSON header (each
    tensor's dtype, shape and byte range; the metadata), the bytes."""
    header, offset = {"__metadata__": metadata}, 0
    for name, tensor in tensors.items():
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"checkpoint tensor {name!r}: dtype {tensor.dtype} is not stored")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        def write(block) -> None:
            f.write(block)
            digest.update(block)

        write(len(encoded).to_bytes(8, "little"))
        write(encoded)
        for tensor in tensors.values():  # one on the CPU at a time
            write(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


def _write_rows(staging: Path, rows: dict[str, RowShard], process: int, processes: int) -> dict[str, str]:
    """This process's rows file in `staging` (made by the main process), flushed: {file name: sha256}."""
    if not staging.is_dir():
        raise AlignError(f"process {process} does not see {staging}, which the main process made: every process "
                         "must write to the same output_dir (a filesystem they share)")
    file = staging / rows_file(process, processes)
    return {file.name: write_safetensors_streaming(file, {name: shard.local for name, shard in rows.items()},
                                                   {name: str(shard.offset) for name, shard in rows.items()})}


def _write(staging: Path, trees: dict, table: _TensorTable, state: dict, write_extra, rows_sums: dict) -> None:
    """The main process's files in `staging`, flushed: tensors, extra files, then the state that lists
    the sums of every file (the rows files' as their writers computed them, each checked present)."""
    missing = [name for name in rows_sums if not (staging / name).is_file()]
    if missing:
        raise AlignError(f"the main process does not see {', '.join(missing)} in {staging}, which other processes "
                         "wrote: every process must write to the same output_dir (a filesystem they share)")
    save_file(table.tensors, str(staging / TENSORS_FILE))
    if write_extra is not None:
        write_extra(staging)
    sums = {str(p.relative_to(staging)): sha256(p) for p in sorted(staging.rglob("*"))
            if p.is_file() and p.name not in rows_sums}
    (staging / STATE_FILE).write_text(json.dumps({**state, "objects": trees, "sha256": {**sums, **rows_sums}},
                                                 indent=1))
    _fsync_tree(staging)


def _attempt(work) -> tuple[str | None, Exception | None]:
    """Run `work()`, this process's own part of a save, so that a failure never leaves the other
    processes waiting in the next collective: (None, None), or (why it failed, and the error itself
    where it is not an expected one: a full disk, an I/O error, a directory not shared)."""
    try:
        work()
    except (OSError, SafetensorError, AlignError) as error:
        return _reason(error), None
    except Exception as error:  # a bug, or memory: re-raised once every process knows
        return f"{type(error).__name__}: {error}", error
    return None, None


def save_checkpoint(root: Path, step: int, objects: dict[str, object], state: dict, keep: int,
                    run_id: str | None = None, write_extra=None) -> Path:
    """Every process calls it: write `objects` (nested dicts/lists/tuples of tensors, RowShards,
    numbers and strings) and the JSON-able `state` as checkpoint `step` of run `run_id`.

    The main process writes the objects (every process passes the same, but for its RowShards) and
    each process the rows of its RowShards; the checkpoint appears once all have written (or not at
    all, and every process raises). `write_extra(directory)` may add files (e.g. a loadable
    adapter). Keeps the newest `keep` checkpoints of this run; another run's are never removed.
    """
    processes = PartialState()
    main = processes.is_main_process
    final, staging = checkpoint_dir(root, step), root / f".staging-step-{step:06d}"
    table = _TensorTable(keep_tensors=main)
    trees = {name: _encode(obj, name, table) for name, obj in objects.items()}
    reason, error = _attempt(lambda: _start_staging(staging)) if main else (None, None)
    reason, rows_sums = from_main_process(reason), {}
    if reason is None and table.rows:
        reason, error = _attempt(lambda: rows_sums.update(_write_rows(staging, table.rows, processes.process_index,
                                                                      processes.num_processes)))
    outcomes = from_every_process((reason, rows_sums))
    reason = next((why for why, _ in outcomes if why), None)
    if main:
        if reason is None:
            every_sum = {name: digest for _, sums in outcomes for name, digest in sums.items()}

            def finish():
                _write(staging, trees, table, {**state, "step": step, "run_id": run_id}, write_extra, every_sum)
                _put_in_place(staging, final, root, step)

            reason, error = _attempt(finish)
        if reason is None:
            for old in list_checkpoints(root, run_id)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        else:
            shutil.rmtree(staging, ignore_errors=True)
    reason = from_main_process(reason)
    if error is not None:
        raise error
    if reason:  # disk full, I/O error: the earlier checkpoints stay as they were
        raise AlignError(f"could not write checkpoint step {step} in {root}: {reason}; the earlier "
                         "checkpoints there are intact (free some space and resume with "
                         "train.resume_from=auto)")
    return final


def _put_in_place(staging: Path, final: Path, root: Path, step: int) -> None:
    if final.exists():  # re-saving a step after a resume: move the old copy aside, never delete first
        retired = root / f".retired-step-{step:06d}"
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(final, retired)
        os.replace(staging, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, final)


def _reason(error: Exception) -> str:
    return str(getattr(error, "strerror", None) or error)


def _start_staging(staging: Path) -> None:
    """A fresh, empty `staging` directory (its parents created)."""
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)


def _staged(staging: Path, write) -> str | None:
    """`write(staging)` into the `staging` directory, flushed to disk. On a write error (a full disk,
    an I/O error; safetensors reports those as its own error) the staging directory is removed and the
    reason returned; None when all is written."""
    try:
        write(staging)
        _fsync_tree(staging)
    except (OSError, SafetensorError) as error:
        shutil.rmtree(staging, ignore_errors=True)
        return _reason(error)
    return None


def write_atomically(directory: Path, write, what: str) -> None:
    """`write(staging)` into a hidden staging directory inside `directory`, flushed, then each file
    moved into `directory` (renames, which need no space): a failure while writing (e.g. a full disk)
    removes the staging directory and raises AlignError, leaving `directory`'s files as they were,
    never a config without its weights."""
    directory = Path(directory)
    staging = directory / f".staging-{what.replace(' ', '-')}"
    try:
        _start_staging(staging)
    except OSError as error:
        raise AlignError(f"could not write the {what} to {directory}: {_reason(error)}") from None
    reason = _staged(staging, write)
    if reason:
        raise AlignError(f"could not write the {what} to {directory}: {reason} (nothing of it was "
                         "written; checkpoints in checkpoints/ are intact: free some space and resume with "
                         "train.resume_from=auto)")
    for entry in sorted(staging.iterdir(), key=lambda p: p.suffix == ".json"):  # weights first, configs last
        target = directory / entry.name
        if target.is_dir() and not entry.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging.rmdir()


def checkpoint_run_id(path: Path) -> str | None:
    """The id of the run that wrote checkpoint `path` (None: unreadable, or from before run ids)."""
    try:
        return json.loads((path / STATE_FILE).read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def list_checkpoints(root: Path, run_id: str | None = None) -> list[Path]:
    """Complete checkpoints under `root` (of run `run_id` only, if given), oldest first. Staging
    leftovers are not listed, nor, with a `run_id`, checkpoints whose state cannot be read."""
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()]
    if run_id is not None:
        done = [p for p in done if checkpoint_run_id(p) == run_id]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def set_aside_after(root: Path, run_id: str | None, step: int) -> list[Path]:
    """Rename run `run_id`'s checkpoints after `step` to `abandoned-step-N` (a run resumed from an
    earlier step leaves them: `auto` must not go back to them); returns their new paths."""
    moved = []
    for path in list_checkpoints(root, run_id):
        if int(path.name.split("-")[1]) > step:
            target = path.with_name(f"abandoned-{path.name}")
            n = 1
            while target.exists():
                n += 1
                target = path.with_name(f"abandoned-{n}-{path.name}")
            os.replace(path, target)
            moved.append(target)
    return moved


def clean_staging(root: Path) -> None:
    """Remove what interrupted saves left; a step's old copy moved aside by `_put_in_place` goes back
    where a kill came before the new one took its place."""
    for retired in root.glob(".retired-step-*"):
        final = root / retired.name.removeprefix(".retired-")
        if not final.exists():
            os.replace(retired, final)
    for leftover in [*root.glob(".staging-step-*"), *root.glob(".retired-step-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def _read_state(path: Path, rows_when_read: bool = False) -> dict:
    """The checkpoint's state, its files checked against their sums (UnusableCheckpoint if not);
    rows_when_read: its rows files left for `RowsFile` to check when they are read."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as error:
        raise UnusableCheckpoint(f"{path}: unreadable {STATE_FILE} ({error})") from None
    if "sha256" not in state:
        old = " (pickle *.pt files, which are never loaded: they can run code)" if any(path.glob("*.pt")) else ""
        raise UnusableCheckpoint(f"{path}: not a checkpoint of this Align version{old}")
    for name, expected in state["sha256"].items():
        file = path / name
        if not file.is_file() or (not (rows_when_read and fnmatch(name, ROWS_FILES)) and sha256(file) != expected):
            raise UnusableCheckpoint(f"{path}: {name} is missing or damaged (its sha256 differs from the one saved)")
    return state


def _stored_pieces(path: Path, sums: dict[str, str] | None) -> dict[str, list[tuple[int, tuple, RowsFile]]]:
    """{name: [(row offset, shape, file)]} of the checkpoint's rows files (one per process that wrote
    it); sums: each file's sha256, checked at its first read (None: checked already)."""
    pieces: dict[str, list] = {}
    for path_of_file in sorted(path.glob(ROWS_FILES)):
        file = RowsFile(path_of_file, None if sums is None else sums.get(path_of_file.name, ""))
        try:
            with safe_open(str(path_of_file), "pt") as stored:
                for name, offset in (stored.metadata() or {}).items():
                    pieces.setdefault(name, []).append((int(offset), tuple(stored.get_slice(name).get_shape()), file))
        except (OSError, SafetensorError, ValueError) as error:
            raise UnusableCheckpoint(f"{path}: unreadable {path_of_file.name} ({error})") from None
    return pieces


def load_checkpoint(path: Path, lazy: bool = False, rows_when_read: bool = False) -> tuple[dict, dict[str, object]]:
    """(state, {name: object}) of a checkpoint directory; UnusableCheckpoint if it is damaged.
    lazy: sharded tensors stay `StoredRows` (read on demand) rather than being read whole.
    rows_when_read: each rows file is checked against its sum when first read, not all of them here
    (a process resuming sharded reads its own share of them)."""
    state = _read_state(path, rows_when_read)
    try:
        tensors = load_file(str(path / TENSORS_FILE), device="cpu")
    except (OSError, SafetensorError) as error:
        raise UnusableCheckpoint(f"{path}: unreadable {TENSORS_FILE} ({error})") from None
    pieces = _stored_pieces(path, state["sha256"] if rows_when_read else None)
    objects = {name: _decode(tree, tensors, pieces) for name, tree in state.pop("objects").items()}
    return state, objects if lazy else materialize(objects)


def load_newest(root: Path, run_id: str | None, lazy: bool = False) -> tuple[Path, dict, dict[str, object]] | None:
    """(path, state, objects) of the newest loadable checkpoint of run `run_id` under `root`, falling
    back past damaged ones with a warning; None if there is none; AlignError if none loads."""
    found = list_checkpoints(root, run_id)
    for path in reversed(found):
        try:
            return (path, *load_checkpoint(path, lazy))
        except UnusableCheckpoint as error:
            log.warning("skipping checkpoint %s; trying the one before it", error)
    if found:
        raise AlignError(f"no loadable checkpoint in {root}: all {len(found)} are damaged (see the warnings); "
                         "start afresh with --overwrite")
    return None
