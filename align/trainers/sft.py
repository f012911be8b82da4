"""Masked-loss SFT: cross-entropy on the trained tokens only (assistant turns, completions)."""

from __future__ import annotations

import torch

from align.data import sft_encoder, tokenize
from align.trainers.base import Trainer


class SFTTrainer(Trainer):
    algorithm = "sft"
    formats = ("text", "messages", "prompt_completion")

    @classmethod
    def build_dataset(cls, recipe, policy, rows, fmt, key):
        return tokenize(rows, sft_encoder(policy.tokenizer, fmt, recipe.data.max_length, key), key)

    def count_items(self, batch: dict) -> float:
        """SFT averages over trained tokens of the whole optimizer step."""
        return float((batch["labels"] != -100).sum())

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """masked_nll(policy.logprobs(batch), mask, num_items), computed by the fused path: every
        trained token weighs 1 / num_items, known before the forward, so the lm-head's gradient is
        made in its forward pass (tests/test_sft.py checks the two agree)."""
        mask = (batch["labels"] != -100).float()
        num_items = batch["num_items"] if batch.get("num_items") is not None else mask.sum().clamp(min=1)
        return -self.policy.weighted_logprob_sum(batch, mask / num_items), {}
