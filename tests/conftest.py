"""Shared test fixtures: a private model cache and small recipes over data written to tmp dirs."""

from __future__ import annotations

import json
import os

import pytest

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
