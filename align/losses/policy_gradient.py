"""Policy-gradient losses for GRPO-style training: group advantages, the clipped surrogate
(token- or GSPO sequence-level ratio), k3 KL and the loss normalizations.

Shapes: B completions, T completion tokens (right-padded), mask [B, T] marks the trained tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from align.registry import LOSS_NORMS

SCALES = ("group", "batch", "none")
IMPORTANCE_LEVELS = ("token", "sequence")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """(r - group mean) / (std + eps) for rewards [N*G] or [N, G] (G = group_size consecutive
    completions of one prompt). Returns [N*G].

    scale: "group" divides by each group's std, "batch" by the std of all rewards, "none" does not
    divide (Dr. GRPO). std is the unbiased (Bessel-corrected) one, as in TRL.
    A NaN reward marks a completion no reward function scored: as in TRL, it is left out of every
    mean and std and its advantage is 0. So is the advantage of a value whose std is undefined
    (fewer than two scored values): it is the only one in its group, equal to the group's mean.
    """
    if scale not in SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; valid: {list(SCALES)}")
    flat = rewards.reshape(-1)
    if group_size < 1 or flat.numel() % group_size:
        raise ValueError(f"{flat.numel()} rewards cannot be split into groups of group_size={group_size}")
    groups = flat.view(-1, group_size)
    advantages = groups - groups.nanmean(dim=1, keepdim=True)
    if scale != "none":
        values = groups if scale == "group" else flat.view(1, -1)
        advantages = advantages / (nan_std(values, dim=1).unsqueeze(1) + eps)
    return advantages.reshape(-1).nan_to_num(nan=0.0)


def nan_std(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Unbiased std along `dim` of the values that are not NaN; NaN where fewer than two are (as
    TRL's `nanstd`). x: any shape, e.g. [N, G] with dim=1 -> [N]."""
    present = ~x.isnan()
    count = present.sum(dim)
    mean = x.nanmean(dim, keepdim=True)
    squares = torch.where(present, (x - mean) ** 2, 0.0).sum(dim)
    return (squares / (count - 1)).sqrt().masked_fill(count < 2, float("nan"))


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || ref): exp(ref - logp) - (ref - logp) - 1, >= 0.

    logps, ref_logps: [B, T]. Returns [B, T].
    """
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the entries where mask is set (0 if there are none)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def clipped_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, advantages: torch.Tensor,
                        mask: torch.Tensor, eps_low: float = 0.2, eps_high: float = 0.2,
                        importance: str = "token") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Negated PPO clipped surrogate per token: -min(ratio * A, clip(ratio, 1-eps_low, 1+eps_high) * A).

    logps, old_logps: [B, T] (old_logps None means logps.detach(), i.e. on-policy); advantages: [B]
    or [B, T]; mask: [B, T]. importance="token": ratio = exp(logp - old_logp) per token.
    importance="sequence" (GSPO): ratio = s = exp(mean over masked tokens of (logp - old_logp)),
    written per token as sg[s] * pi / sg[pi] so its value is s and d ratio / d logp_t = s; with a
    per-sequence advantage this gives the same gradient as the plain sequence ratio.
    Returns (per_token_loss [B, T], metrics): clip fractions (only where clipping zeroes the gradient),
    over masked tokens, or over sequences for importance="sequence", as detached 0-dim tensors (read
    them when logging: a float here would make a GPU wait).
    """
    if importance not in IMPORTANCE_LEVELS:
        raise ValueError(f"unknown importance level {importance!r}; valid: {list(IMPORTANCE_LEVELS)}")
    if old_logps is None:
        old_logps = logps.detach()
    log_ratio = logps - old_logps
    weights = mask
    if importance == "sequence":
        seq_log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        log_ratio = seq_log_ratio.detach() + logps - logps.detach()
        weights = mask / mask.sum(-1, keepdim=True).clamp(min=1)  # each sequence counts once in metrics
    ratio = torch.exp(log_ratio)
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(ratio * adv, clipped * adv)
    with torch.no_grad():
        low = (ratio < 1 - eps_low) & (adv < 0)
        high = (ratio > 1 + eps_high) & (adv > 0)
        metrics = {"clip_ratio/low": masked_mean(low.float(), weights),
                   "clip_ratio/high": masked_mean(high.float(), weights),
                   "clip_ratio/region": masked_mean((low | high).float(), weights)}
    return per_token_loss, metrics


@dataclass(frozen=True)
class LossNorm:
    """How per-token losses [B, T] become a micro-batch's share of the optimizer step's loss: every
    norm is linear, `sum(per_token_loss * weights(mask, max_completion_length, num_items))`.

    unit: what `num_items`, the step's count (all micro-batches of all processes), counts:
    "tokens" (completion tokens) or "sequences". num_items None: this micro-batch is the whole step.
    """

    weights: Callable[[torch.Tensor, int | None, float], torch.Tensor]
    """(mask [B, T] float, max_completion_length, num_items) -> token weights [B, T]."""
    unit: str = "sequences"
    per_micro_batch: bool = False
    """The weights depend on the micro-batch's own tokens (bnpo), so the update depends on how a step
    is cut into micro-batches: `train.micro_batch_tokens`, which regroups them, is refused."""


LOSS_NORMS.adapt = LossNorm  # a plain weight function named as module:Name


def register_loss_norm(name: str, unit: str = "sequences", per_micro_batch: bool = False):
    """Decorator: `grpo.loss_norm: name` averages token losses with the decorated weight function."""

    def add(fn):
        LOSS_NORMS.register(name)(LossNorm(fn, unit, per_micro_batch))
        return fn

    return add


@register_loss_norm("grpo")
def _grpo(mask: torch.Tensor, max_len: int | None, num_items: float) -> torch.Tensor:
    # GRPO (Shao et al., 2024): the mean over sequences of each sequence's token mean
    return mask / (num_items * mask.sum(-1, keepdim=True).clamp(min=1))


@register_loss_norm("bnpo", per_micro_batch=True)
def _bnpo(mask: torch.Tensor, max_len: int | None, num_items: float) -> torch.Tensor:
    # the token mean of each micro-batch, micro-batches weighted by their sequences
    return mask * (mask.shape[0] / num_items) / mask.sum().clamp(min=1)


@register_loss_norm("dr_grpo")
def _dr_grpo(mask: torch.Tensor, max_len: int | None, num_items: float) -> torch.Tensor:
    # Dr. GRPO (Liu et al., 2025): a constant denominator, sequences x max completion length
    if max_len is None:
        raise ValueError("norm='dr_grpo' needs max_completion_length")
    return mask / (num_items * max_len)


@register_loss_norm("dapo", unit="tokens")
def _dapo(mask: torch.Tensor, max_len: int | None, num_items: float) -> torch.Tensor:
    # DAPO (Yu et al., 2025): the token mean over the whole optimizer step
    return mask / num_items


def norm_weights(mask: torch.Tensor, norm: str = "grpo", max_completion_length: int | None = None,
                 num_items: float | torch.Tensor | None = None) -> torch.Tensor:
    """d (the norm's aggregate) / d per-token loss, [B, T]: the registered `norm`'s token weights of
    this micro-batch, whose share of the step is set by num_items (the step's count of the norm's
    unit; None: the micro-batch is the whole step)."""
    entry = LOSS_NORMS.get(norm)
    mask = mask if mask.is_floating_point() else mask.float()
    if num_items is None:
        num_items = mask.sum().clamp(min=1) if entry.unit == "tokens" else mask.shape[0]
    return entry.weights(mask, max_completion_length, num_items)


def aggregate_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, norm: str = "grpo",
                   max_completion_length: int | None = None, num_items: float | None = None) -> torch.Tensor:
    """Reduce per_token_loss [B, T] over mask [B, T] to a scalar, as TRL's GRPO loss types do.

    grpo: mean over sequences of each sequence's token mean. bnpo: token mean of this batch.
    dr_grpo: sum / (B * max_completion_length). dapo: token mean. With num_items (the step's count of
    the norm's unit: tokens for dapo, sequences for the others), the value is this micro-batch's
    share of the step's, so summing the micro-batch losses gives the step's loss.
    """
    weights = norm_weights(mask, norm, max_completion_length, num_items)
    return (torch.where(mask.bool(), per_token_loss, 0.0) * weights).sum()


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, beta: float = 0.0, eps_low: float = 0.2,
              eps_high: float = 0.2, norm: str = "grpo", importance: str = "token",
              max_completion_length: int | None = None, num_items: float | None = None,
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss: clipped surrogate + beta * k3 KL to the reference, aggregated by `norm`.

    logps, old_logps, ref_logps: [B, T] (old None: on-policy; ref needed when beta != 0);
    advantages: [B] (or [B, T]); mask: [B, T]. Returns (scalar loss, metrics with clip ratios and,
    when ref_logps is given, "kl", the masked token mean of k3; detached 0-dim tensors).
    """
    per_token_loss, metrics = clipped_policy_loss(logps, old_logps, advantages, mask, eps_low, eps_high,
                                                  importance)
    if beta != 0.0 and ref_logps is None:
        raise ValueError(f"beta={beta} needs ref_logps for the KL term")
    if ref_logps is not None:
        kl = k3_kl(logps, ref_logps)
        metrics["kl"] = masked_mean(kl.detach(), mask)
        if beta != 0.0:
            per_token_loss = per_token_loss + beta * kl
    loss = aggregate_loss(per_token_loss, mask, norm, max_completion_length, num_items)
    return loss, metrics


def k3_token_weights(mask: torch.Tensor, beta: float, norm: str = "grpo", max_completion_length: int | None = None,
                     num_items: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """d (beta x the norm's aggregate of k3_kl) / d logps [B, T] = beta w (1 - exp(ref - logp)), w
    the norm's token weight, as (constant beta w, coefficient of exp(ref - logp): -beta w), the
    parts of an `align.ops.logprobs.TokenWeights` (the fused path evaluates the exponential with
    the log-probs in its forward).

    mask: [B, T]; the rest as in `aggregate_loss`.
    """
    weights = beta * norm_weights(mask, norm, max_completion_length, num_items)
    return weights, -weights


def on_policy_token_weights(advantages: torch.Tensor, mask: torch.Tensor, norm: str = "grpo",
                            max_completion_length: int | None = None, num_items: float | None = None) -> torch.Tensor:
    """d grpo_loss / d logps [B, T] when every ratio is 1 (one pass over fresh samples, token-level
    ratios, beta 0): -advantage x the norm's weight of each token. The loss is then linear in the
    log-probs, so these weights give its gradient as a weighted log-prob sum (`Trainer.linear_loss`).

    advantages: [B] (or [B, T]); mask: [B, T]; the rest as in `aggregate_loss`.
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    return -adv * norm_weights(mask.to(adv.dtype), norm, max_completion_length, num_items)
