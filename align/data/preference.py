"""Preference pairs: tokenization and the shared-prompt packed layout.

A pair is tokenized once into `{"prompt_ids", "chosen_ids", "rejected_ids", "margin"}`.
`pack_pairs` lays each pair out as a group of two completions sharing their prompt
([prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected], see `align.data.groups`), so the
prompt is computed once per pair.
"""

from __future__ import annotations

import logging
import math

import torch

from align.data.formats import prompt_completion_ids
from align.data.groups import pack_groups, sequence_sums
from align.errors import AlignError

log = logging.getLogger(__name__)


def split_implicit_prompt(chosen, rejected):
    """(prompt, chosen, rejected) from a pair whose two sides share a prefix (the prompt).

    Message lists: the shared leading messages. Strings: the common prefix, cut back to whitespace,
    the spaces before the cut going with the completions (as TRL's `extract_prompt` moves a space):
    "Answer:" + " 16" as an explicit pair is written, so a tokenizer reads " 16" as generation does,
    not a lone " " closing the prompt.
    """
    if isinstance(chosen, list):
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        return chosen[:n], chosen[n:], rejected[n:]
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n > 0 and not chosen[n - 1].isspace():
        n -= 1
    while n > 0 and chosen[n - 1] in " \t":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def prompt_problem(prompt_ids: list[int], max_length: int) -> str | None:
    """Why a tokenized prompt leaves no room for a completion (empty, or max_length tokens or more), or None."""
    if not prompt_ids:
        return "empty prompt; give a prompt or a BOS token"
    if len(prompt_ids) >= max_length:
        return (f"the prompt has {len(prompt_ids)} tokens, max_length={max_length}; raise data.max_length or "
                "shorten the prompt")
    return None


def preference_encoder(tokenizer, max_length: int, key: str):
    """Row -> pair example, or a drop reason (prompt alone too long). Completions are cut to the
    same budget, max_length - len(prompt), so chosen and rejected are truncated consistently."""

    def encode(row: dict, index: int) -> dict:
        chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
        if prompt is None:
            prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
        if not chosen or not rejected:
            raise AlignError(f"{key} row {index}: empty {'chosen' if not chosen else 'rejected'} completion; "
                             "every pair needs two non-empty answers")
        prompt_ids, chosen_ids = prompt_completion_ids(tokenizer, prompt, chosen, index, key)
        _, rejected_ids = prompt_completion_ids(tokenizer, prompt, rejected, index, key)
        smoothing = pair_smoothing(row.get("label_smoothing"), index, key)
        empty = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "margin": 0.0, "identical": False,
                 "label_smoothing": smoothing}
        problem = prompt_problem(prompt_ids, max_length)
        if problem:
            return {**empty, "dropped": problem}
        budget = max_length - len(prompt_ids)
        return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids[:budget], "rejected_ids": rejected_ids[:budget],
                "margin": pair_margin(row.get("margin"), index, key), "identical": chosen == rejected,
                "label_smoothing": smoothing}

    return encode


def pair_margin(value, index: int, key: str) -> float:
    """A row's `margin` (how much more chosen is preferred: the reward model's margin term), 0 where
    the row has none; AlignError unless a finite number."""
    if value is None:
        return 0.0
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise AlignError(f"{key} row {index}: margin must be a finite number (how much more chosen is preferred), "
                         f"got {value!r}")
    return float(value)


def pair_smoothing(value, index: int, key: str) -> float:
    """A row's own `label_smoothing` (the probability that its preference is flipped: 0.5 for a tie
    `align label` kept), NaN where the row has none (the recipe's value applies)."""
    if value is None:
        return math.nan
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 0.5:
        raise AlignError(f"{key} row {index}: label_smoothing must be a number in [0, 0.5] (the chance the "
                         f"preference is flipped; 0.5 for a tie), got {value!r}")
    return float(value)


def warn_identical(data, key: str) -> None:
    """A warning naming pairs whose chosen equals rejected; AlignError if every pair is so (nothing
    to learn: the loss would sit at its start)."""
    identical = [i for i, same in enumerate(data["identical"]) if same]
    if identical and len(identical) == len(data):
        raise AlignError(f"{key}: in every pair chosen is identical to rejected, so there is no preference to "
                         "learn; check the columns (data.train.columns) or the file")
    if identical:
        log.warning("%s: %d pairs have chosen identical to rejected (first: row %d); they carry no preference "
                    "signal", key, len(identical), identical[0])


def pack_pairs(pairs: list[dict], shared_prompt: bool = True, packed: bool = True,
               score_skip_id: int | None = None) -> dict[str, torch.Tensor]:
    """Pairs -> packed rows [R, N] (see `align.data.groups.pack_groups`, `packed` and `score_skip_id`
    too): sequence 2i is pair i's chosen completion, 2i+1 its rejected one. Adds margin [B], and
    label_smoothing [B] (NaN: the recipe's) when the pairs carry their own."""
    batch = pack_groups([(p["prompt_ids"], [p["chosen_ids"], p["rejected_ids"]]) for p in pairs], shared_prompt,
                        packed=packed, score_skip_id=score_skip_id)
    batch["margin"] = torch.tensor([p["margin"] for p in pairs])
    if "label_smoothing" in pairs[0]:
        batch["label_smoothing"] = torch.tensor([p["label_smoothing"] for p in pairs], dtype=torch.float32)
    return batch


def pair_sums(values: torch.Tensor, sequence_ids: torch.Tensor, num_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of token values. values, sequence_ids: [1, N] -> (chosen [B], rejected [B])."""
    sums = sequence_sums(values, sequence_ids, 2 * num_pairs)
    return sums[0::2], sums[1::2]
