"""Pairwise preference losses: the DPO family, the registry of preference losses, and the
Bradley-Terry reward-model loss.

A preference loss sees `PairLogps` (sequence log-probs of B pairs under the policy and, unless it
is reference-free, the reference) and returns per-pair losses and implicit rewards. Each one
registers under the name `dpo.loss_type` gives it (`register_preference_loss`); `preference_loss`
applies one, adds RPO's SFT term, normalizes over the optimizer step and makes the metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from align.registry import PREFERENCE_LOSSES

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
             loss_type: str = "sigmoid", label_smoothing: float | torch.Tensor = 0.0,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO-family losses and the implicit rewards.

    All inputs: [B] sequence log-probs. Returns (losses [B], chosen_rewards [B], rejected_rewards [B]),
    rewards = beta * (policy - ref), detached. `label_smoothing` is the label-flip rate used by
    "sigmoid" (cDPO; a number, or [B] per pair: 0.5 for a tie) and "robust" (a number). For "ipo", TRL passes per-token *average* log-probs (sum / number of
    completion tokens) to keep the squared loss length-independent; that choice is the caller's.
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {sorted(DPO_LOSSES)}")
    per_pair = isinstance(label_smoothing, torch.Tensor)
    if per_pair and loss_type != "sigmoid":
        raise ValueError(f"a per-pair label_smoothing applies only to sigmoid (cDPO), not {loss_type!r}")
    if (bool(label_smoothing.any()) if per_pair else label_smoothing) and loss_type not in _SMOOTHED:
        raise ValueError(f"label_smoothing applies only to {list(_SMOOTHED)}, not {loss_type!r}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    losses = DPO_LOSSES[loss_type](chosen_logratios - rejected_logratios, beta, label_smoothing)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


@dataclass
class PairLogps:
    """Sequence log-probs of B preference pairs, each [B]: the summed token log-probs of the
    chosen and rejected completions under the policy (with gradient) and the reference (None for a
    reference-free loss), and the completions' token counts."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None

    def per_token(self) -> "PairLogps":
        """The same pairs with every log-prob divided by its completion's length (averages)."""
        n_c, n_r = self.chosen_tokens.clamp(min=1), self.rejected_tokens.clamp(min=1)
        return PairLogps(self.chosen / n_c, self.rejected / n_r, self.chosen_tokens, self.rejected_tokens,
                         None if self.ref_chosen is None else self.ref_chosen / n_c,
                         None if self.ref_rejected is None else self.ref_rejected / n_r)


@dataclass(frozen=True)
class PreferenceLoss:
    """A registered preference loss: `fn(pairs, beta, label_smoothing, **loss_kwargs) -> (losses [B],
    chosen_rewards [B], rejected_rewards [B])`; `needs_reference` False: no reference model is
    loaded and `pairs.ref_*` are None."""

    fn: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    needs_reference: bool = True


PREFERENCE_LOSSES.adapt = PreferenceLoss  # a plain function named as module:Name


def register_preference_loss(name: str, needs_reference: bool = True):
    """Decorator: `dpo.loss_type: name` trains with the decorated function (see `PreferenceLoss`)."""

    def add(fn):
        PREFERENCE_LOSSES.register(name)(PreferenceLoss(fn, needs_reference))
        return fn

    return add


@register_preference_loss("sigmoid")
def sigmoid(pairs: PairLogps, beta: float, label_smoothing: float = 0.0):
    """DPO (Rafailov et al., 2023); label_smoothing > 0 is conservative DPO."""
    return dpo_loss(pairs.chosen, pairs.rejected, pairs.ref_chosen, pairs.ref_rejected, beta, "sigmoid",
                    label_smoothing)


@register_preference_loss("robust")
def robust(pairs: PairLogps, beta: float, label_smoothing: float = 0.0):
    """Robust DPO (Chowdhury et al., 2024), unbiased under label-flip rate label_smoothing."""
    return dpo_loss(pairs.chosen, pairs.rejected, pairs.ref_chosen, pairs.ref_rejected, beta, "robust",
                    label_smoothing)


@register_preference_loss("ipo")
def ipo(pairs: PairLogps, beta: float, label_smoothing: float = 0.0):
    """IPO (Azar et al., 2023) on per-token average log-ratios, as TRL computes it (beta is tau)."""
    mean = pairs.per_token()
    return dpo_loss(mean.chosen, mean.rejected, mean.ref_chosen, mean.ref_rejected, beta, "ipo", label_smoothing)


@register_preference_loss("hinge")
def hinge(pairs: PairLogps, beta: float, label_smoothing: float = 0.0):
    """SLiC's hinge loss (Zhao et al., 2023) on the scaled log-ratio difference."""
    return dpo_loss(pairs.chosen, pairs.rejected, pairs.ref_chosen, pairs.ref_rejected, beta, "hinge",
                    label_smoothing)


def preference_loss(pairs: PairLogps, loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
                    rpo_alpha: float = 0.0, num_items: float | torch.Tensor | None = None, **loss_kwargs,
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of B pairs, a share of an optimizer step of `num_items` pairs (default B): the sum of
    the registered `loss_type`'s per-pair losses (plus rpo_alpha x `rpo_sft_loss`) over num_items,
    and its metrics (implicit rewards, their accuracy and margin, policy log-probs) as detached 0-dim
    tensors."""
    losses, chosen_rewards, rejected_rewards = PREFERENCE_LOSSES.get(loss_type).fn(pairs, beta, label_smoothing,
                                                                                    **loss_kwargs)
    if rpo_alpha:
        losses = losses + rpo_alpha * rpo_sft_loss(pairs.chosen, pairs.chosen_tokens)
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": pairs.chosen.detach().mean(),
        "logps/rejected": pairs.rejected.detach().mean(),
    }
    return losses.sum() / (len(losses) if num_items is None else num_items), metrics


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
