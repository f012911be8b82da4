"""Preference pairs: tokenization and the shared-prompt packed layout.

A pair is tokenized once into `{"prompt_ids", "chosen_ids", "rejected_ids", "margin"}`.
`pack_pairs` lays each pair out as one packed segment whose prompt is computed once:

    [ prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected ]

Both branches start with the last prompt token (so each branch predicts its own first token from
it) at the same position, P-1; a 4D attention mask lets each branch see the shared prompt and
itself, never the other branch or another pair. `pack_pairs(..., shared_prompt=False)` gives the
plain two-sequence layout [prompt chosen][prompt rejected] for comparison and for attention
kernels that take no 4D mask.
"""

from __future__ import annotations

import logging

import torch

from align.data.formats import _check_messages
from align.errors import AlignError
from align.ops.logprobs import IGNORE_INDEX

log = logging.getLogger(__name__)


def split_implicit_prompt(chosen, rejected):
    """(prompt, chosen, rejected) from a pair whose two sides share a prefix (the prompt).

    Message lists: the shared leading messages. Strings: the common prefix, cut back to whitespace.
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
    return chosen[:n], chosen[n:], rejected[n:]


def prompt_completion_ids(tokenizer, prompt, completion, row: int, key: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) for string or conversational data; completions end with EOS."""
    if isinstance(prompt, list):
        _check_messages(prompt + completion, row, key)
        if not tokenizer.chat_template:
            raise AlignError(f"{key}: conversational preference data needs a chat template; "
                             "set model.chat_template")
        prompt_ids = list(tokenizer.apply_chat_template(prompt, tokenize=True, return_dict=True,
                                                        add_generation_prompt=True)["input_ids"])
        full = list(tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"])
        if full[:len(prompt_ids)] != prompt_ids:
            raise AlignError(f"{key} row {row}: the chat template renders the prompt differently inside the "
                             "conversation; cannot separate prompt and completion tokens")
        return prompt_ids, full[len(prompt_ids):]
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return prompt_ids, list(tokenizer(completion, add_special_tokens=False)["input_ids"]) + eos


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
        empty = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "margin": 0.0, "identical": False}
        if not prompt_ids:
            return {**empty, "dropped": "empty prompt; give a prompt or a BOS token"}
        budget = max_length - len(prompt_ids)
        if budget <= 0:
            return {**empty, "dropped": f"the prompt has {len(prompt_ids)} tokens, max_length={max_length}; "
                                        "raise data.max_length or shorten the prompt"}
        return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids[:budget], "rejected_ids": rejected_ids[:budget],
                "margin": float(row.get("margin") or 0.0), "identical": chosen == rejected}

    return encode


def warn_identical(data, key: str) -> None:
    identical = [i for i, same in enumerate(data["identical"]) if same]
    if identical:
        log.warning("%s: %d pairs have chosen identical to rejected (first: row %d); they carry no preference "
                    "signal", key, len(identical), identical[0])


def _branch(tokens: list[int]) -> list[int]:
    """Labels of a branch [last prompt token] + completion: the completion, then nothing."""
    return tokens[1:] + [IGNORE_INDEX]


def pack_pairs(pairs: list[dict], shared_prompt: bool = True) -> dict[str, torch.Tensor]:
    """Pairs -> one packed row [1, N].

    Returns input_ids, labels, position_ids [1, N]; sequence_ids [1, N] (2i for pair i's chosen
    labels, 2i+1 for its rejected ones, -1 elsewhere); last_index [2B] (the last token of each
    sequence, same order: where a reward model reads its score); attention_mask [1, 1, N, N] bool when
    `shared_prompt`, else None (position ids restart per sequence); margin [B]; num_tokens.
    """
    ids, labels, positions, seq_ids, blocks, last_index = [], [], [], [], [], []
    for i, pair in enumerate(pairs):
        prompt = pair["prompt_ids"]
        if shared_prompt:
            shared = prompt[:-1]
            segments = [(shared, [IGNORE_INDEX] * len(shared), list(range(len(shared))), -1)]
            for side, completion in ((0, pair["chosen_ids"]), (1, pair["rejected_ids"])):
                tokens = prompt[-1:] + completion
                segments.append((tokens, _branch(tokens), list(range(len(shared), len(shared) + len(tokens))),
                                 2 * i + side))
            blocks.append([len(s[0]) for s in segments])
        else:
            segments = []
            for side, completion in ((0, pair["chosen_ids"]), (1, pair["rejected_ids"])):
                tokens = prompt + completion
                lab = [IGNORE_INDEX] * (len(prompt) - 1) + completion + [IGNORE_INDEX]
                segments.append((tokens, lab, list(range(len(tokens))), 2 * i + side))
        for tokens, lab, pos, sid in segments:
            if sid >= 0:
                last_index.append(len(ids) + len(tokens) - 1)
            ids += tokens
            labels += lab
            positions += pos
            seq_ids += [sid if label != IGNORE_INDEX else -1 for label in lab]
    batch = {
        "input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]), "position_ids": torch.tensor([positions]),
        "sequence_ids": torch.tensor([seq_ids]), "last_index": torch.tensor(last_index), "margin": torch.tensor([p["margin"] for p in pairs]),
        "num_tokens": torch.tensor(len(ids)),
    }
    batch["attention_mask"] = shared_prompt_mask(blocks) if shared_prompt else None
    return batch


def shared_prompt_mask(blocks: list[list[int]]) -> torch.Tensor:
    """[1, 1, N, N] bool: causal within each pair's [shared | chosen | rejected] with the two
    branches blind to each other. `blocks[i]` = [len shared, len chosen branch, len rejected branch]."""
    n = sum(sum(b) for b in blocks)
    mask = torch.zeros(n, n, dtype=torch.bool)
    start = 0
    for shared, chosen, rejected in blocks:
        for branch_start, length in ((start + shared, chosen), (start + shared + chosen, rejected)):
            end = branch_start + length
            mask[branch_start:end, start:start + shared] = True  # sees the shared prompt
            mask[branch_start:end, branch_start:end] = torch.tril(torch.ones(length, length, dtype=torch.bool))
        mask[start:start + shared, start:start + shared] = torch.tril(torch.ones(shared, shared, dtype=torch.bool))
        start += shared + chosen + rejected
    return mask[None, None]


def sequence_sums(values: torch.Tensor, sequence_ids: torch.Tensor, num_pairs: int) -> tuple[torch.Tensor, ...]:
    """Per-sequence sums of token values. values, sequence_ids: [1, N] -> (chosen [B], rejected [B])."""
    keep = sequence_ids >= 0
    sums = torch.zeros(2 * num_pairs, dtype=values.dtype, device=values.device)
    sums = sums.index_add(0, sequence_ids[keep], values[keep])
    return sums[0::2], sums[1::2]
