"""Masked negative log-likelihood, the SFT loss."""

from __future__ import annotations

import torch


def masked_nll(logps: torch.Tensor, mask: torch.Tensor, num_items: float | torch.Tensor | None = None) -> torch.Tensor:
    """-sum(logps * mask) / num_items.

    logps: [B, T] token log-probs; mask: [B, T] bool, the trained tokens. `num_items` is the number
    of trained tokens the mean runs over (the whole optimizer step under gradient accumulation);
    defaults to mask.sum(), the plain token mean.
    """
    if num_items is None:
        num_items = mask.sum().clamp(min=1)
    return -(logps * mask).sum() / num_items


def masked_nll_token_weights(mask: torch.Tensor, num_items: float | torch.Tensor | None = None) -> torch.Tensor:
    """d masked_nll / d logps [B, T]: -mask / num_items (the loss is linear in the log-probs)."""
    if num_items is None:
        num_items = mask.sum().clamp(min=1)
    return -mask.float() / num_items
