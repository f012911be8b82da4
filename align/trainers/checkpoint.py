"""Atomic checkpoints: a checkpoint directory appears whole or not at all.

Each checkpoint is written into a hidden staging directory, flushed to disk, then renamed to
`checkpoints/step-000123`. A kill during a save leaves only the staging directory, which is
ignored and cleaned up, so the previous checkpoint stays intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "trainer_state.json"


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


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def save_checkpoint(root: Path, step: int, tensors: dict[str, object], state: dict, keep: int,
                    write_extra=None) -> Path:
    """Write `tensors` (torch.save-able objects, one file each) and `state` as checkpoint `step`.

    `write_extra(directory)` may add files (e.g. a loadable adapter). Keeps the newest `keep`.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(root, step)
    staging = root / f".staging-step-{step:06d}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for name, obj in tensors.items():
        torch.save(obj, staging / f"{name}.pt")
    if write_extra is not None:
        write_extra(staging)
    (staging / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=1))
    _fsync_tree(staging)
    if final.exists():  # re-saving a step after a resume: move the old copy aside, never delete first
        retired = root / f".retired-step-{step:06d}"
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(final, retired)
        os.replace(staging, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (staging leftovers are not listed)."""
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def clean_staging(root: Path) -> None:
    for leftover in [*root.glob(".staging-step-*"), *root.glob(".retired-step-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def load_checkpoint(path: Path) -> tuple[dict, dict[str, object]]:
    """(state, {name: object}) of a checkpoint directory."""
    state = json.loads((path / STATE_FILE).read_text())
    tensors = {p.stem: torch.load(p, weights_only=False) for p in path.glob("*.pt")}
    return state, tensors
