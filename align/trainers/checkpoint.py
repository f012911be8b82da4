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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from align.errors import AlignError

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
TENSORS_FILE = "tensors.safetensors"


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


# ---- nested objects <-> (JSON tree, flat tensors) ---------------------------------------------
class _TensorTable:
    """Collects the tensors of a nested object under path names, storing each storage once: tied
    weights (one tensor under two names) become one entry; other views of a saved storage are copied
    (safetensors refuses tensors that share memory)."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self.views: dict[tuple, str] = {}
        self.storages: set[int] = set()

    def add(self, name: str, tensor: torch.Tensor) -> str:
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


def _decode(tree, tensors: dict[str, torch.Tensor]):
    if isinstance(tree, list):
        return [_decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if "__ndarray__" in tree:
        return np.array(tree["__ndarray__"], dtype=tree["dtype"])
    if "__tuple__" in tree:
        return tuple(_decode(v, tensors) for v in tree["__tuple__"])
    if "__items__" in tree:
        return {k: _decode(v, tensors) for k, v in tree["__items__"]}
    return {k: _decode(v, tensors) for k, v in tree.items()}


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


def _write(staging: Path, objects: dict[str, object], state: dict, write_extra) -> None:
    """The checkpoint's files in `staging`: tensors, extra files, then the state that lists their sums."""
    table = _TensorTable()
    trees = {name: _encode(obj, name, table) for name, obj in objects.items()}
    save_file(table.tensors, str(staging / TENSORS_FILE))
    if write_extra is not None:
        write_extra(staging)
    sums = {str(p.relative_to(staging)): sha256(p) for p in sorted(staging.rglob("*")) if p.is_file()}
    (staging / STATE_FILE).write_text(json.dumps({**state, "objects": trees, "sha256": sums}, indent=1))


def save_checkpoint(root: Path, step: int, objects: dict[str, object], state: dict, keep: int,
                    run_id: str | None = None, write_extra=None) -> Path:
    """Write `objects` (nested dicts/lists/tuples of tensors, numbers and strings) and the JSON-able
    `state` as checkpoint `step` of run `run_id`.

    `write_extra(directory)` may add files (e.g. a loadable adapter). Keeps the newest `keep`
    checkpoints of this run; another run's checkpoints are never removed.
    """
    final = checkpoint_dir(root, step)
    staging = root / f".staging-step-{step:06d}"
    reason = _write_staged(staging, lambda d: _write(d, objects, {**state, "step": step, "run_id": run_id},
                                                      write_extra))
    if reason:  # disk full, I/O error: the earlier checkpoints stay as they were
        raise AlignError(f"could not write checkpoint step {step} in {root}: {reason}; the earlier "
                         "checkpoints there are intact (free some space and resume with "
                         "train.resume_from=auto)")
    if final.exists():  # re-saving a step after a resume: move the old copy aside, never delete first
        retired = root / f".retired-step-{step:06d}"
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(final, retired)
        os.replace(staging, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, final)
    for old in list_checkpoints(root, run_id)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_staged(staging: Path, write) -> str | None:
    """`write(staging)` into a fresh `staging` directory (its parents created), flushed to disk. On a
    write error (a full disk, an I/O error; safetensors reports those as its own error) the staging
    directory is removed and the reason returned; None when all is written."""
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        write(staging)
        _fsync_tree(staging)
    except (OSError, SafetensorError) as error:
        shutil.rmtree(staging, ignore_errors=True)
        return str(getattr(error, "strerror", None) or error)
    return None


def write_atomically(directory: Path, write, what: str) -> None:
    """`write(staging)` into a hidden staging directory inside `directory`, flushed, then each file
    moved into `directory` (renames, which need no space): a failure while writing (e.g. a full disk)
    removes the staging directory and raises AlignError, leaving `directory`'s files as they were,
    never a config without its weights."""
    directory = Path(directory)
    staging = directory / f".staging-{what.replace(' ', '-')}"
    reason = _write_staged(staging, write)
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


def _run_id_of(path: Path) -> str | None:
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
        done = [p for p in done if _run_id_of(p) == run_id]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def clean_staging(root: Path) -> None:
    for leftover in [*root.glob(".staging-step-*"), *root.glob(".retired-step-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def _read_state(path: Path) -> dict:
    """The checkpoint's state, its files checked against their sums (UnusableCheckpoint if not)."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as error:
        raise UnusableCheckpoint(f"{path}: unreadable {STATE_FILE} ({error})") from None
    if "sha256" not in state:
        old = " (pickle *.pt files, which are never loaded: they can run code)" if any(path.glob("*.pt")) else ""
        raise UnusableCheckpoint(f"{path}: not a checkpoint of this Align version{old}")
    for name, expected in state["sha256"].items():
        file = path / name
        if not file.is_file() or sha256(file) != expected:
            raise UnusableCheckpoint(f"{path}: {name} is missing or damaged (its sha256 differs from the one saved)")
    return state


def load_checkpoint(path: Path) -> tuple[dict, dict[str, object]]:
    """(state, {name: object}) of a checkpoint directory; UnusableCheckpoint if it is damaged."""
    state = _read_state(path)
    try:
        tensors = load_file(str(path / TENSORS_FILE), device="cpu")
    except (OSError, SafetensorError) as error:
        raise UnusableCheckpoint(f"{path}: unreadable {TENSORS_FILE} ({error})") from None
    return state, {name: _decode(tree, tensors) for name, tree in state.pop("objects").items()}


def load_newest(root: Path, run_id: str | None) -> tuple[Path, dict, dict[str, object]] | None:
    """(path, state, objects) of the newest loadable checkpoint of run `run_id` under `root`, falling
    back past damaged ones with a warning; None if there is none; AlignError if none loads."""
    found = list_checkpoints(root, run_id)
    for path in reversed(found):
        try:
            return (path, *load_checkpoint(path))
        except UnusableCheckpoint as error:
            log.warning("skipping checkpoint %s; trying the one before it", error)
    if found:
        raise AlignError(f"no loadable checkpoint in {root}: all {len(found)} are damaged (see the warnings); "
                         "start afresh with --overwrite")
    return None
