"""Eval samples: a few greedy completions of eval prompts at each evaluation, appended to
OUTPUT_DIR/samples.jsonl (and handed to the callbacks: the trackers' tables), so that a user sees what
the model says and not only numbers. Online trainers write the completions their evaluation scored
(with their rewards); the others generate them here (`greedy_completions`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from align.trainers.callbacks import own_lines

log = logging.getLogger(__name__)

SHOWN = 4
"""Eval prompts shown at each evaluation: the first ones of the eval split."""

MAX_NEW_TOKENS = 128
"""The longest completion generated for display."""


def untrained_prefix(input_ids: list[int], labels: list[int]) -> list[int]:
    """The tokens before the first trained one: an SFT row's prompt (up to its first assistant turn),
    empty for plain text. `labels` are shifted (`labels[t]` is the target of position t), so the
    first trained target at position t means tokens 0..t are the prompt."""
    first = next((t for t, label in enumerate(labels) if label != -100), None)
    return [] if first is None or first == 0 else list(input_ids[:first + 1])


def greedy_completions(engine, tokenizer, prompt_ids: list[list[int]], max_length: int) -> list[str]:
    """Greedy completions (text, special tokens dropped) of `prompt_ids` by a rollout engine on the
    trained modules themselves (`align.rollout.in_process_engine`), up to the recipe's max_length in
    all (at most MAX_NEW_TOKENS new tokens)."""
    from align.rollout import SamplingParams

    new_tokens = max(1, min(MAX_NEW_TOKENS, max_length - min(map(len, prompt_ids))))
    rollout = engine.generate(prompt_ids, SamplingParams(max_new_tokens=new_tokens, temperature=0.0), 1)
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in rollout.completion_ids]


class SamplesFile:
    """OUTPUT_DIR/samples.jsonl: one {"step", "prompt", "completion", ..., "run_id"} line per sample.
    The first write of a trainer keeps only its own run's earlier lines (a resumed run's, before its
    step), as metrics.jsonl does; a step is written at most once."""

    def __init__(self, output_dir: Path, run_id: str):
        self.path, self.run_id = Path(output_dir) / "samples.jsonl", run_id
        self.written: set[int] = set()

    def write(self, step: int, samples: list[dict]) -> None:
        if step in self.written:
            return
        try:
            if not self.written and self.path.exists():
                self.path.write_text("".join(line + "\n" for line in own_lines(self.path, self.run_id, step)))
            self.written.add(step)
            with open(self.path, "a") as f:
                for sample in samples:
                    f.write(json.dumps({"step": step, **sample, "run_id": self.run_id}) + "\n")
        except OSError as error:  # (a full disk: samples are for show; the weights matter, the saves say so)
            log.error("could not write step %d's samples to %s (%s); training goes on", step, self.path,
                      error.strerror or error)
