"""Building the built-in models Align trains itself (`builtin:tiny-llama-arith`, and the toy judge
`builtin:tiny-judge-arith` trained from it): an explicit step of
the top floor (`align build`, `align train`, the quickstart, examples and tests), never of the model
loader, which only says how when one is missing (`align.models.tiny.resolve`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from align.config import recipe_from_dict
from align.errors import AlignError
from align.models import tiny
from align.toy import prompt_completion_rows, write_jsonl
from align.trainers.sft import SFTTrainer

log = logging.getLogger(__name__)


def build_builtin(name: str) -> Path:
    """Train the built-in `name` (a key of `tiny.TRAINED`, or `builtin:<name>`) into the cache
    unless it is there; returns its directory."""
    name = tiny.builtin_name(name if name.startswith(tiny.PREFIX) else tiny.PREFIX + name)
    if name in tiny.TRAINED and not tiny.is_built(name):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise AlignError(f"{tiny.PREFIX}{name} is built by a training run of its own, once per cache, and a launch "
                             f"of several processes cannot do that; build it in one process first: "
                             f"align build {tiny.PREFIX}{name}")
        build_builtin(tiny.TRAINED[name])  # the one it is trained from, first
        tiny.install(name, BUILDERS[name])
    return Path(tiny.resolve(tiny.PREFIX + name))


def build_builtins(*names_or_paths: str | None) -> None:
    """`build_builtin` for each trained built-in among `names_or_paths` (other values are skipped)."""
    for value in names_or_paths:
        if value and tiny.builtin_name(value) in tiny.TRAINED:
            build_builtin(value)


def build_for_recipe(recipe) -> None:
    """Build the trained built-ins a recipe names (its model, and any other model of its section)."""
    others = [getattr(recipe.section, key, None) for key in ("reference_model", "value_model", "teacher_model")]
    build_builtins(recipe.model.name_or_path, *[v for v in others if isinstance(v, str)])


def build_toy_judge(out_dir: Path) -> None:
    """builtin:tiny-judge-arith: tiny-llama-arith SFT-trained to answer a pairwise judge's question
    with the label of the correct arithmetic answer (`align.feedback.toy_judge`)."""
    from align.feedback.toy_judge import build

    log.warning("building builtin:tiny-judge-arith: SFT of builtin:tiny-llama-arith as a pairwise judge (once)")
    build(out_dir)


def train_arithmetic(base: str, out_dir: Path) -> None:
    """Train tiny-llama-arith from `base` with Align's own SFT on the arithmetic task, into `out_dir`:
    60% of the SFT answers are the careless hedge, so the model answers right only some of the time
    and preference training or RL has something to fix. Takes well under a minute on 2 CPU cores."""
    log.warning("building builtin:tiny-llama-arith: SFT of %s on the arithmetic task (once, ~1 min)", base)
    with tempfile.TemporaryDirectory() as tmp:
        write_jsonl(prompt_completion_rows(19200, seed=1000, hedged=0.6), Path(tmp) / "train.jsonl")
        recipe = recipe_from_dict({
            "algorithm": "sft", "output_dir": str(out_dir), "model": {"name_or_path": base, "dtype": "float32"},
            "data": {"train": {"path": str(Path(tmp) / "train.jsonl")}, "max_length": 64},
            "train": {"lr": 3e-3, "max_steps": 600, "batch_size": 32, "warmup": 0.05, "schedule": "cosine",
                      "seed": 0, "progress": False, "log_every": 10}})
        SFTTrainer.from_recipe(recipe).fit()


BUILDERS = {"tiny-llama-arith": lambda staging: train_arithmetic(tiny.PREFIX + tiny.TRAINED["tiny-llama-arith"], staging),
            "tiny-judge-arith": build_toy_judge}
"""Trained built-in -> the function that builds it into a staging directory."""
