"""Prompt groups: one prompt with k completions, packed so the prompt is computed once.

A DPO pair is a group of two (chosen, rejected); a GRPO group holds the G samples of one prompt.
`pack_groups` lays each group out as one packed segment

    [ prompt[:-1] | prompt[-1] completion_1 | ... | prompt[-1] completion_k ]

Every branch starts with the last prompt token (so it predicts its own first token from it) at the
same position, P-1; a 4D attention mask lets each branch see the shared prompt and itself, never
another branch or another group. `shared_prompt=False` gives the plain layout
[prompt completion_1][prompt completion_2]... (position ids restarting per sequence, no mask), for
comparison and for attention kernels that take no 4D mask. Both layouts give the same log-probs.
"""

from __future__ import annotations

import torch

from align.ops.logprobs import IGNORE_INDEX

Group = tuple[list[int], list[list[int]]]
"""(prompt ids, [completion ids, ...])."""


def pack_groups(groups: list[Group], shared_prompt: bool = True) -> dict[str, torch.Tensor]:
    """Groups -> one packed row [1, N]; sequences are numbered 0..S-1 across groups, in order.

    Returns input_ids, labels, position_ids [1, N]; sequence_ids [1, N] (the sequence whose
    completion token a label is, -1 elsewhere); last_index [S] (the last token of each sequence:
    where a reward or value head reads its score); attention_mask [1, 1, N, N] bool when
    `shared_prompt`, else None; num_tokens.
    """
    ids, labels, positions, seq_ids, blocks, last_index = [], [], [], [], [], []
    sequence = 0
    for prompt, completions in groups:
        if shared_prompt:
            shared = prompt[:-1]
            segments = [(shared, [IGNORE_INDEX] * len(shared), 0, -1)]
            for completion in completions:
                tokens = prompt[-1:] + completion
                segments.append((tokens, completion + [IGNORE_INDEX], len(shared), sequence))
                sequence += 1
            blocks.append([len(s[0]) for s in segments])
        else:
            segments = []
            for completion in completions:
                lab = [IGNORE_INDEX] * (len(prompt) - 1) + completion + [IGNORE_INDEX]
                segments.append((prompt + completion, lab, 0, sequence))
                sequence += 1
        for tokens, lab, first_position, sid in segments:
            if sid >= 0:
                last_index.append(len(ids) + len(tokens) - 1)
            ids += tokens
            labels += lab
            positions += range(first_position, first_position + len(tokens))
            seq_ids += [sid if label != IGNORE_INDEX else -1 for label in lab]
    return {
        "input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([positions]), "sequence_ids": torch.tensor([seq_ids]),
        "last_index": torch.tensor(last_index), "num_tokens": torch.tensor(len(ids)),
        "attention_mask": shared_prompt_mask(blocks) if shared_prompt else None,
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
    output size only the device knows): (row [N], column [N], valid [N] bool) for sequence_ids [1, N];
    tokens of no sequence (-1) get row `num_sequences` (a spare row the caller drops) and column 0.

    Each sequence's tokens are contiguous and in order in the packed row (both layouts), so a token's
    column is its offset from the first token of its sequence."""
    ids = sequence_ids.reshape(-1)
    valid = ids >= 0
    row = torch.where(valid, ids, num_sequences)
    counts = torch.zeros(num_sequences + 1, dtype=torch.long, device=ids.device).scatter_add_(0, row, valid.long())
    starts = torch.cumsum(counts, 0) - counts
    column = torch.where(valid, torch.cumsum(valid.long(), 0) - 1 - starts[row], 0)
    return row, column, valid


def sequence_sums(values: torch.Tensor, sequence_ids: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Per-sequence sums of token values. values, sequence_ids: [1, N] -> [S]."""
    row, _, valid = _token_slots(sequence_ids, num_sequences)
    sums = torch.zeros(num_sequences + 1, dtype=values.dtype, device=values.device)
    return sums.index_add(0, row, values.reshape(-1) * valid)[:num_sequences]


def sequence_tokens(values: torch.Tensor, sequence_ids: torch.Tensor, num_sequences: int,
                    length: int) -> torch.Tensor:
    """Packed token values [1, N] -> right-padded per-sequence rows [S, length] (0 after the end).
    Differentiable."""
    row, column, valid = _token_slots(sequence_ids, num_sequences)
    out = torch.zeros(num_sequences + 1, length, dtype=values.dtype, device=values.device)
    return out.index_put((row, column), values.reshape(-1) * valid, accumulate=True)[:num_sequences]


def packed_tokens(values: torch.Tensor, sequence_ids: torch.Tensor) -> torch.Tensor:
    """Per-sequence rows [S, T] -> the packed layout [1, N] (0 where no sequence's token is): the
    inverse of `sequence_tokens`."""
    row, column, valid = _token_slots(sequence_ids, values.shape[0])
    padded = torch.cat([values, values.new_zeros(1, values.shape[1])])
    return (padded[row, column] * valid).view(sequence_ids.shape)
