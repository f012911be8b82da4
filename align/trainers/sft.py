"""Masked-loss SFT: cross-entropy on the trained tokens only (assistant turns, completions)."""

from __future__ import annotations

import math
from typing import Literal

import torch

from align.data import sft_encoder, tokenize
from align.losses.sft import masked_nll, masked_nll_token_weights
from align.config import Section
from align.errors import AlignError
from align.trainers.base import Trainer, register_trainer


class SFTConfig(Section):
    assistant_turns: Literal["all", "last"] = "all"
    """`messages` data: the loss on every assistant turn, or on the last one only, the earlier turns
    being context as the chat template renders history (reasoning models whose templates drop
    earlier turns' reasoning, e.g. Qwen3, where `all` is refused)."""


@register_trainer("sft", SFTConfig)
class SFTTrainer(Trainer):
    formats = ("text", "messages", "prompt_completion")

    @classmethod
    def build_dataset(cls, recipe, tokenizer, rows, fmt, key):
        turns = getattr(recipe.section, "assistant_turns", "all")  # (a plug-in's own section may lack it)
        if turns != "all" and fmt != "messages":
            raise AlignError(f"sft.assistant_turns: {turns} picks turns of `messages` data; {key} is {fmt} data "
                             "(a completion is trained whole): remove it")
        return tokenize(rows, sft_encoder(tokenizer, fmt, recipe.data.max_length, key, turns), key,
                        recipe.data.num_proc)

    def count_items(self, batch: dict) -> float:
        """SFT averages over trained tokens of the whole optimizer step."""
        return float((batch["labels"] != -100).sum())

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """masked_nll of the policy's token log-probs, by the fused path (`linear_loss`: every
        trained token weighs 1 / num_items, known before the forward)."""
        mask, num_items = batch["labels"] != -100, batch.get("num_items")
        loss, metrics, _ = self.linear_loss(batch, lambda logps: (masked_nll(logps, mask, num_items), {}),
                                            masked_nll_token_weights(mask, num_items))
        return loss, metrics

    def evaluate(self) -> dict[str, float]:
        """The base metrics plus eval/perplexity: exp of eval/loss, the mean NLL per trained token of
        the whole eval split."""
        metrics = super().evaluate()
        loss = metrics["eval/loss"]
        metrics["eval/perplexity"] = math.exp(loss) if loss < 700 else math.inf
        return metrics
