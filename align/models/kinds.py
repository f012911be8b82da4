"""What a local model directory holds, read from its configs alone (no weights, no torch): a reward
model or a causal LM, full or as an adapter. Loading a checkpoint as the other kind would start its
head at random, so the loaders and `align validate` ask here first."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from align.errors import AlignError


@dataclass(frozen=True)
class Checkpoint:
    is_reward_model: bool
    """A sequence classifier (every architecture `...ForSequenceClassification`) or its adapter (task SEQ_CLS)."""
    what: str
    """For messages: "a LlamaForCausalLM", "a CAUSAL_LM adapter"."""
    labels: int | None = None
    """A full classifier's number of labels (a reward model has one); None for an adapter."""


def read_config(path: str, name: str, key: str) -> dict | None:
    """The JSON file `name` in directory `path`, None if it is not there; AlignError naming `key` if unreadable."""
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise AlignError(f"{key}: cannot read {file}: {error}") from None


def architecture_name(architectures: list[str] | None) -> str:
    """A config's `architectures` for messages: "a LlamaForCausalLM"."""
    return f"a {'/'.join(architectures or []) or 'model of no stated architecture'}"


def inspect_checkpoint(path: str, key: str) -> Checkpoint | None:
    """What directory `path` holds; None where it holds no model config (a hub id, another directory)."""
    adapter = read_config(path, "adapter_config.json", key)
    if adapter is not None:
        task = adapter.get("task_type")
        return Checkpoint(task == "SEQ_CLS", f"a {task or 'untyped'} adapter")
    config = read_config(path, "config.json", key)
    if config is None:
        return None
    architectures = config.get("architectures") or []
    is_classifier = bool(architectures) and all(a.endswith("ForSequenceClassification") for a in architectures)
    labels = len(config.get("id2label") or {}) or config.get("num_labels", 1)
    return Checkpoint(is_classifier, architecture_name(architectures), labels)
