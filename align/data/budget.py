"""Micro-batches under a token budget (`train.micro_batch_tokens`).

One optimizer step's items (examples, preference pairs, prompt groups) are cut into micro-batches
for gradient accumulation. Every loss is normalized by the item count of the whole step, so the
update does not depend on how the items are grouped (up to float summation order); the grouping
only decides memory. Peak activation memory follows the largest micro-batch, and a step's items
vary in length: `train.batch_size` items per micro-batch in data order can put twice the tokens of
one micro-batch into the next. Under a budget, each micro-batch holds at most `batch_size` items
and at most the budget's tokens, and the step's tokens are spread evenly over its micro-batches
(the role of fairseq's `max_tokens`, or of TRL's packed rows of `max_length`, without changing
which examples make up a step).
"""

from __future__ import annotations

import math


def budget_groups(sizes: list[int], per_batch: int, max_tokens: int) -> list[list[int]]:
    """Indices into `sizes` (each item's tokens) grouped into micro-batches of at most `per_batch`
    items and `max_tokens` tokens; an item longer than `max_tokens` is a micro-batch of its own.

    Longest first (ties: earlier first), each item goes to the group holding the fewest tokens that
    has room for it (ties: the first), a new group when none has. They start from the fewest groups
    their totals allow, max(ceil(items / per_batch), ceil(tokens / max_tokens)), so the
    loads come out nearly equal (LPT scheduling). Inside a group items keep their order in `sizes`;
    groups are ordered by their first item. Deterministic: a pure function of `sizes` and the caps.
    -> [[index, ...], ...] covering every index once."""
    if per_batch < 1 or max_tokens < 1:
        raise ValueError(f"budget_groups: per_batch ({per_batch}) and max_tokens ({max_tokens}) must be >= 1")
    overlong = [[i] for i, size in enumerate(sizes) if size > max_tokens]
    rest = [i for i, size in enumerate(sizes) if size <= max_tokens]
    count = max(math.ceil(len(rest) / per_batch), math.ceil(sum(sizes[i] for i in rest) / max_tokens))
    groups: list[list[int]] = [[] for _ in range(count)]
    load = [0] * count
    for i in sorted(rest, key=lambda i: (-sizes[i], i)):
        room = [g for g in range(len(groups)) if len(groups[g]) < per_batch and load[g] + sizes[i] <= max_tokens]
        if room:
            g = min(room, key=lambda g: (load[g], g))
        else:
            groups.append([])
            load.append(0)
            g = len(groups) - 1
        groups[g].append(i)
        load[g] += sizes[i]
    return sorted([sorted(group) for group in groups if group] + overlong, key=lambda group: group[0])
