"""Prompt groups: one prompt with k completions, packed so the prompt is computed once.

A DPO pair is a group of two (chosen, rejected); a GRPO group holds the G samples of one prompt.
`pack_groups` lays each group out as one packed segment

    [ prompt[:-1] | prompt[-1] completion_1 | ... | prompt[-1] completion_k ]

Every branch starts with the last prompt token (so it predicts its own first token from it) at the
same position, P-1; a 4D attention mask lets each branch see the shared prompt and itself, never
another branch or another group. `shared_prompt=False` gives the plain layout
[prompt completion_1][prompt completion_2]... (position ids restarting per sequence, no mask), for
comparison and for attention kernels that take no 4D mask. Both layouts give the same log-probs.
Segments are packed into rows no longer than the longest one (or a token budget), as `pack` does.
"""

from __future__ import annotations

import torch

from align.data.collate import pack_rows
from align.ops.logprobs import IGNORE_INDEX

Group = tuple[list[int], list[list[int]]]
"""(prompt ids, [completion ids, ...])."""


def group_tokens(prompt_length: int, completion_lengths: list[int], shared_prompt: bool = True) -> int:
    """The tokens one group takes in `pack_groups`' rows (padding aside): shared, the prompt once
    and its last token again before each completion; else the prompt before each completion."""
    if shared_prompt:
        return prompt_length - 1 + sum(1 + n for n in completion_lengths)
    return sum(prompt_length + n for n in completion_lengths)


def pack_groups(groups: list[Group], shared_prompt: bool = True, max_length: int | None = None,
                pad_token_id: int = 0, packed: bool = True, score_skip_id: int | None = None) -> dict[str, torch.Tensor]:
    """Groups -> packed rows [R, L]; sequences are numbered 0..S-1 across groups, in order.

    A segment (a whole group when `shared_prompt`, else one prompt + completion) never straddles
    rows; segments fill rows best-fit decreasing (`align.data.collate.pack_rows`), each row at most
    `max(max_length, longest segment)` tokens (default: the longest segment), so attention costs
    grow with the number of rows, not with their square. A row shorter than L is right-padded with
    `pad_token_id`: a sequence of its own (positions 0.., attending only to itself), labels ignored.

    Returns input_ids, labels, position_ids [R, L]; sequence_ids [R, L] (the sequence whose
    completion token a label is, -1 elsewhere); last_index [S] (the last token of each sequence in
    the flattened [R * L] rows: where a reward or value head reads its score); attention_mask
    [R, 1, L, L] bool when `shared_prompt`, else None; num_tokens (real tokens, padding excluded).

    packed=False (with shared_prompt=False): each sequence in a row of its own, right-padded, and
    attention_mask the [R, L] padding mask: the layout any causal LM runs exactly, for a family that
    cannot run packed rows (`align.models.layouts`).

    score_skip_id: last_index is each sequence's last token other than this id (its first token if
    all are), where transformers' sequence-classification forward reads the score: at the last token
    that is not the model's pad token (pad = EOS: before the EOS a completion ends with).
    """
    if shared_prompt and not packed:
        raise ValueError("pack_groups: a shared prompt needs its branches packed in its row")
    segments: list[list[tuple[list[int], list[int], int, int]]] = []  # [(tokens, labels, first position, sequence)]
    sequence = 0
    for prompt, completions in groups:
        if shared_prompt:
            shared = prompt[:-1]
            segment = [(shared, [IGNORE_INDEX] * len(shared), 0, -1)]
            for completion in completions:
                segment.append((prompt[-1:] + completion, completion + [IGNORE_INDEX], len(shared), sequence))
                sequence += 1
            segments.append(segment)
        else:
            for completion in completions:
                labels = [IGNORE_INDEX] * (len(prompt) - 1) + completion + [IGNORE_INDEX]
                segments.append([(prompt + completion, labels, 0, sequence)])
                sequence += 1
    lengths = [sum(len(part[0]) for part in segment) for segment in segments]
    rows = pack_rows(lengths, max_length) if packed else [[j] for j in range(len(segments))]
    width = max(sum(lengths[j] for j in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    sequence_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    last_index = torch.zeros(sequence, dtype=torch.long)
    blocks: list[list[list[int]]] = []  # per row: [len shared, len branch, ...] per group (a padding tail: [len])
    for r, row in enumerate(rows):
        start, row_blocks = 0, []
        for j in row:
            shared_at, shared = start, []  # a shared prompt's place and tokens (before its branches)
            for tokens, part_labels, first_position, sid in segments[j]:
                n = len(tokens)
                input_ids[r, start:start + n] = torch.tensor(tokens)
                labels[r, start:start + n] = torch.tensor(part_labels)
                position_ids[r, start:start + n] = torch.arange(first_position, first_position + n)
                if sid >= 0:
                    sequence_ids[r, start:start + n] = torch.where(labels[r, start:start + n] != IGNORE_INDEX, sid, -1)
                    last_index[sid] = r * width + start + n - 1
                    if score_skip_id is not None:
                        k = last_other(shared + tokens, score_skip_id)  # in the sequence's own tokens
                        last_index[sid] = r * width + (start + k - len(shared) if k >= len(shared) else shared_at + k)
                else:
                    shared = tokens
                start += n
            row_blocks.append([len(part[0]) for part in segments[j]])
        position_ids[r, start:] = torch.arange(width - start)
        if start < width:
            row_blocks.append([width - start])
        blocks.append(row_blocks)
    return {
        "input_ids": input_ids, "labels": labels, "position_ids": position_ids, "sequence_ids": sequence_ids,
        "last_index": last_index, "num_tokens": torch.tensor(sum(lengths)),
        "attention_mask": torch.cat([shared_prompt_mask(b) for b in blocks]) if shared_prompt else
        None if packed else (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long(),
    }


def shared_prompt_mask(blocks: list[list[int]]) -> torch.Tensor:
    """[1, 1, N, N] bool: causal within each group's [shared | branch_1 | ... | branch_k], every
    branch seeing the shared prompt and itself only. `blocks[i]` = [len shared, len branch_1, ...]."""
    n = sum(sum(b) for b in blocks)
    mask = torch.zeros(n, n, dtype=torch.bool)
    start = 0
    for shared, *branches in blocks:
        mask[start:start + shared, start:start + shared] = torch.ones(shared, shared, dtype=torch.bool).tril()
        branch_start = start + shared
        for length in branches:
            end = branch_start + length
            mask[branch_start:end, start:start + shared] = True
            mask[branch_start:end, branch_start:end] = torch.ones(length, length, dtype=torch.bool).tril()
            branch_start = end
        start = branch_start
    return mask[None, None]


def _token_slots(sequence_ids: torch.Tensor, num_sequences: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each packed token sits in the per-sequence layout, without boolean indexing (whose
    output size only the device knows): (row [N], column [N], valid [N] bool) for sequence_ids
    [R, L] flattened; tokens of no sequence (-1) get row `num_sequences` (a spare row the caller
    drops) and column 0.

    Each sequence's tokens are contiguous and in order in its packed row (both layouts), so a token's
    column is its rank among valid tokens minus the rank of its sequence's first one (rows may hold
    sequences in any order)."""
    ids = sequence_ids.reshape(-1)
    valid = ids >= 0
    row = torch.where(valid, ids, num_sequences)
    rank = torch.cumsum(valid.long(), 0) - 1
    first = torch.zeros(num_sequences + 1, dtype=torch.long, device=ids.device).scatter_reduce_(
        0, row, rank, reduce="amin", include_self=False)
    column = torch.where(valid, rank - first[row], 0)
    return row, column, valid


def sequence_sums(values: torch.Tensor, sequence_ids: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Per-sequence sums of token values. values, sequence_ids: [R, L] -> [S]."""
    row, _, valid = _token_slots(sequence_ids, num_sequences)
    sums = torch.zeros(num_sequences + 1, dtype=values.dtype, device=values.device)
    return sums.index_add(0, row, values.reshape(-1) * valid)[:num_sequences]


def sequence_tokens(values: torch.Tensor, sequence_ids: torch.Tensor, num_sequences: int,
                    length: int) -> torch.Tensor:
    """Packed token values [R, L] -> right-padded per-sequence rows [S, length] (0 after the end).
    Differentiable."""
    row, column, valid = _token_slots(sequence_ids, num_sequences)
    out = torch.zeros(num_sequences + 1, length, dtype=values.dtype, device=values.device)
    return out.index_put((row, column), values.reshape(-1) * valid, accumulate=True)[:num_sequences]


def packed_tokens(values: torch.Tensor, sequence_ids: torch.Tensor) -> torch.Tensor:
    """Per-sequence rows [S, T] -> the packed layout [R, L] (0 where no sequence's token is): the
    inverse of `sequence_tokens`."""
    row, column, valid = _token_slots(sequence_ids, values.shape[0])
    padded = torch.cat([values, values.new_zeros(1, values.shape[1])])
    return (padded[row, column] * valid).view(sequence_ids.shape)


def last_other(tokens: list[int], skip: int) -> int:
    """The index of the last of `tokens` that is not `skip`; 0 if all are."""
    return next((i for i in range(len(tokens) - 1, -1, -1) if tokens[i] != skip), 0)
