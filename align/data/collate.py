"""Collators: padding-free packing (the default) and plain right padding.

Both take examples `{"input_ids": [T_i], "labels": [T_i]}` and return tensors the Policy eats.
Packed: one row [1, sum T_i] whose position ids restart at 0 for every example; with no attention
mask transformers then keeps attention inside each example. Padded: [B, max T_i] with a mask.
"""

from __future__ import annotations

import torch

from align.ops.logprobs import IGNORE_INDEX


def pack(examples: list[dict]) -> dict[str, torch.Tensor]:
    ids = [torch.as_tensor(e["input_ids"]) for e in examples]
    return {
        "input_ids": torch.cat(ids)[None],
        "labels": torch.cat([torch.as_tensor(e["labels"]) for e in examples])[None],
        "position_ids": torch.cat([torch.arange(len(i)) for i in ids])[None],
        "num_tokens": torch.tensor(sum(len(i) for i in ids)),
    }


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
            "attention_mask": attention_mask, "num_tokens": attention_mask.sum()}
