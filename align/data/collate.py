"""Collators: padding-free packing (the default) and plain right padding.

Both take examples `{"input_ids": [T_i], "labels": [T_i]}` and return tensors the Policy eats.
Packed: rows [R, L] (best-fit decreasing, L <= the longest example unless a larger `max_length` is
given, R <= B) whose position ids restart at 0 for every example; with no attention mask
transformers then keeps attention inside each example. Padded: [B, max T_i] with a mask.
"""

from __future__ import annotations

import torch

from align.ops.logprobs import IGNORE_INDEX


def pack(examples: list[dict], max_length: int | None = None, pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Examples -> rows [R, L] packed best-fit decreasing, each row at most `max(max_length, longest
    example)` tokens (default: the longest example of the batch, so a packed batch never has more
    rows, nor longer rows, than the padded one: attention stays linear in the number of rows).

    Position ids restart at 0 for every example, and transformers then keeps attention inside
    each example (no attention mask: the block-diagonal mask is derived per row from the position
    ids). A row shorter than L is right-padded with `pad_token_id`, positions 0.. of their own
    (a separate "sequence" attending to nothing real) and labels IGNORE_INDEX. The layout is a pure
    function of the lengths and order of the examples.
    """
    ids = [torch.as_tensor(e["input_ids"]) for e in examples]
    labels = [torch.as_tensor(e["labels"]) for e in examples]
    rows = pack_rows([len(i) for i in ids], max_length)
    width = max(sum(len(ids[j]) for j in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=ids[0].dtype)
    row_labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=labels[0].dtype)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for j in row:
            n = len(ids[j])
            input_ids[r, start:start + n], row_labels[r, start:start + n] = ids[j], labels[j]
            position_ids[r, start:start + n] = torch.arange(n)
            start += n
        position_ids[r, start:] = torch.arange(width - start)  # the padding: a sequence of its own
    return {"input_ids": input_ids, "labels": row_labels, "position_ids": position_ids,
            "num_tokens": torch.tensor(sum(len(i) for i in ids)), "num_examples": torch.tensor(len(ids))}


def pack_rows(lengths: list[int], max_length: int | None = None) -> list[list[int]]:
    """Best-fit decreasing: example indices grouped into rows of at most
    `max(max_length or 0, max(lengths))` tokens. Longest first (ties: earlier first), each into the
    fullest row it fits, else a new row; inside a row, examples keep the order they were placed in.
    Then, where the bound exceeds the longest example (a `max_length` was given), the rows are
    balanced if that narrows the widest (`_balanced`): a batch pads every row to its widest, so
    best fit's nearly empty last row would cost as much as a full one. Deterministic.
    -> [[index, ...], ...] covering every index once."""
    if not lengths:
        raise ValueError("pack: no examples")
    bound = max(max_length or 0, max(lengths))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [r for r in range(len(rows)) if free[r] >= lengths[i]]
        if fits:
            r = min(fits, key=lambda r: (free[r], r))
            rows[r].append(i)
            free[r] -= lengths[i]
        else:
            rows.append([i])
            free.append(bound - lengths[i])
    if len(rows) > 1 and bound > max(lengths):
        balanced = _balanced(lengths, len(rows))
        if _width(balanced, lengths) < _width(rows, lengths):
            return balanced
    return rows


def _balanced(lengths: list[int], count: int) -> list[list[int]]:
    """Longest first (ties: earlier first), each example into the row holding the fewest tokens
    (ties: the first): `count` rows of nearly equal length (LPT scheduling, within 4/3 of the
    narrowest possible widest row)."""
    rows: list[list[int]] = [[] for _ in range(count)]
    load = [0] * count
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(count), key=lambda r: (load[r], r))
        rows[r].append(i)
        load[r] += lengths[i]
    return rows


def _width(rows: list[list[int]], lengths: list[int]) -> int:
    return max(sum(lengths[i] for i in row) for row in rows)


def pad(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    length = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), length), pad_token_id)
    labels = torch.full((len(examples), length), IGNORE_INDEX)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[row, :n] = torch.as_tensor(e["input_ids"])
        labels[row, :n] = torch.as_tensor(e["labels"])
        attention_mask[row, :n] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "attention_mask": attention_mask, "num_tokens": attention_mask.sum(),
            "num_examples": torch.tensor(len(examples))}
