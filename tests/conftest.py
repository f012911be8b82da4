"""Shared test fixtures: a private model cache and small recipes over data written to tmp dirs."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from align.config import recipe_from_dict
from align.toy import chat_rows


@pytest.fixture(scope="session", autouse=True)
def _align_cache(tmp_path_factory):
    os.environ["ALIGN_CACHE"] = str(tmp_path_factory.mktemp("align-cache"))


@pytest.fixture(scope="session")
def arith_builtin(_align_cache) -> str:
    """builtin:tiny-llama-arith, trained into this session's cache once (~40 s): tests that use it
    say so (`pytestmark = pytest.mark.usefixtures("arith_builtin")`)."""
    from align.builtins import build_builtin

    build_builtin("tiny-llama-arith")
    return "builtin:tiny-llama-arith"


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def deep_update(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


@pytest.fixture
def make_recipe(tmp_path):
    """make_recipe(rows=None, **sections) -> a validated SFT Recipe over `rows` (default: toy chats)."""

    def make(rows=None, eval_rows=None, raw=False, algorithm="sft", **sections):
        data = {"train": {"path": write_jsonl(tmp_path / "train.jsonl", rows or chat_rows(32, seed=5))},
                "max_length": 128}
        if eval_rows is not None:
            data["eval"] = {"path": write_jsonl(tmp_path / "eval.jsonl", eval_rows)}
        recipe = {"algorithm": algorithm, "output_dir": str(tmp_path / "run"),
                  "model": {"name_or_path": "builtin:tiny-llama", "dtype": "float32"},
                  "data": data,
                  "train": {"lr": 3e-3, "batch_size": 4, "max_steps": 4, "schedule": "constant",
                            "progress": False, "plots": False, "seed": 0}}
        deep_update(recipe, sections)
        return recipe if raw else recipe_from_dict(recipe)

    return make


@contextlib.contextmanager
def rollout_server(recipe: dict, path: Path, *args: str, env: dict | None = None):
    """`align serve-rollouts` of `recipe` (written to `path`) in a subprocess on a free port: yields
    its URL once it listens; stopped on exit."""
    path.write_text(yaml.safe_dump(recipe))
    command = [sys.executable, "-m", "align.cli", "serve-rollouts", str(path), "--port", "0", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, **(env or {})}, cwd=Path(__file__).resolve().parents[1])
    try:
        lines, deadline = [], time.monotonic() + 300
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                raise AssertionError("the server exited:\n" + "".join(lines))
            lines.append(line)
            found = re.search(r"on (http://\S+) ", line)
            if found:  # drained from here on, so that its log never blocks it
                threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
                yield found.group(1)
                return
        raise AssertionError("the server did not start:\n" + "".join(lines))
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def perturb_trainable(model, seed: int, lora_b: float = 0.2, other: float = 0.02) -> None:
    """A training step's worth of change to what `model` trains (the adapter, or everything): Gaussian
    noise, `lora_b` x on LoRA's B matrices (zero at the start), `other` x on the rest."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * (lora_b if "lora_B" in name else other))
