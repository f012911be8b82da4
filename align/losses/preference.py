"""Pairwise preference losses: the DPO family and the Bradley-Terry reward-model loss.

DPO inputs are sequence log-probs, one number per completion: the sum of its token log-probs, [B].
The caller decides what to pass (sums, or per-token averages for length-normalized variants).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

# Each DPO loss maps (h, beta, eps) -> [B] per-pair losses, where
# h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected) is the log-ratio difference.
DpoLossFn = Callable[[torch.Tensor, float, float], torch.Tensor]


def _sigmoid(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    # DPO; eps > 0 is conservative DPO (cDPO): the label is flipped with probability eps.
    return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


def _robust(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    # Robust DPO (Chowdhury et al., 2024): an unbiased loss under label-flip rate eps.
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {eps}")
    return ((1 - eps) * -F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)


def _ipo(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    # IPO (Azar et al., 2023), beta plays the role of tau: regress h onto 1 / (2 beta).
    return (h - 1 / (2 * beta)) ** 2


def _hinge(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    # SLiC-style hinge on the scaled log-ratio difference.
    return torch.relu(1 - beta * h)


DPO_LOSSES: dict[str, DpoLossFn] = {"sigmoid": _sigmoid, "robust": _robust, "ipo": _ipo, "hinge": _hinge}
_SMOOTHED = ("sigmoid", "robust")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO-family losses and the implicit rewards.

    All inputs: [B] sequence log-probs. Returns (losses [B], chosen_rewards [B], rejected_rewards [B]),
    rewards = beta * (policy - ref), detached. `label_smoothing` is the label-flip rate used by
    "sigmoid" (cDPO) and "robust". For "ipo", TRL passes per-token *average* log-probs (sum / number of
    completion tokens) to keep the squared loss length-independent; that choice is the caller's.
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {sorted(DPO_LOSSES)}")
    if label_smoothing and loss_type not in _SMOOTHED:
        raise ValueError(f"label_smoothing applies only to {list(_SMOOTHED)}, not {loss_type!r}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    losses = DPO_LOSSES[loss_type](chosen_logratios - rejected_logratios, beta, label_smoothing)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def rpo_sft_loss(chosen_logps_sum: torch.Tensor, chosen_token_counts: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean NLL of the chosen completion, the RPO term (Pang et al., 2024).

    chosen_logps_sum: [B] summed token log-probs; chosen_token_counts: [B] completion lengths.
    Returns [B]; the trainer adds alpha * mean(...) to the DPO loss. Each sequence counts once, unlike
    TRL's DPO loss_type="sft", which averages over all chosen tokens of the batch.
    """
    return -chosen_logps_sum / chosen_token_counts.clamp(min=1)


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: torch.Tensor | None = None, center_coef: float = 0.0) -> torch.Tensor:
    """Reward-model loss: mean(-logsigmoid(r_c - r_r - margin)) + center_coef * mean((r_c + r_r)^2).

    chosen_rewards, rejected_rewards: [B] scalar rewards; margin: [B] or None. Returns a scalar.
    The centering term (Eisenstein et al., 2023) keeps the rewards near zero mean.
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen_rewards + rejected_rewards) ** 2).mean()
    return loss


@torch.no_grad()
def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logging stats for [B] chosen / rejected rewards: accuracy (chosen > rejected), margin, means,
    as 0-dim tensors (read them when logging)."""
    return {
        "accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "margin": (chosen_rewards - rejected_rewards).mean(),
        "chosen": chosen_rewards.mean(),
        "rejected": rejected_rewards.mean(),
    }
