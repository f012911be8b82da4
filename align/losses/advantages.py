"""Advantage estimators of the online trainer: how a round's rewards become advantages.

Each estimator registers under the name `grpo.advantage` gives it (`register_advantage_estimator`)
and maps the round's `RolloutScores` to advantages, one per completion [N*G] or per token
[N*G, T]. Where the KL to the reference enters is a setting of its own (`grpo.kl_in`): `loss` adds
GRPO's k3 term to the loss; `reward` subtracts beta x the k1 KL from the reward before the
estimator sees it (`kl_penalized_rewards`), as RLOO and REINFORCE++ do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from align.losses.policy_gradient import group_advantages
from align.registry import ADVANTAGE_ESTIMATORS


@dataclass
class RolloutScores:
    """What an estimator sees of one round's N*G completions (G consecutive ones per prompt).

    rewards: [N*G] combined rewards (NaN: no reward function scored the completion);
    mask: [N*G, T] 1 on each completion's tokens; logps, ref_logps: [N*G, T] token log-probs of the
    sampling policy and of the reference, present when the KL enters the reward (else None).
    """

    rewards: torch.Tensor
    group_size: int
    mask: torch.Tensor
    logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None


@dataclass(frozen=True)
class AdvantageEstimator:
    """A registered estimator: `fn(scores: RolloutScores, config) -> advantages` ([N*G] or
    [N*G, T]); config is the trainer's section (grpo: beta, kl_in, scale_rewards, ...)."""

    fn: Callable[[RolloutScores, Any], torch.Tensor]


ADVANTAGE_ESTIMATORS.adapt = AdvantageEstimator  # a plain function named as module:Name


def register_advantage_estimator(name: str):
    """Decorator: `grpo.advantage: name` computes advantages with the decorated function."""

    def add(fn):
        ADVANTAGE_ESTIMATORS.register(name)(AdvantageEstimator(fn))
        return fn

    return add


def token_kl(scores: RolloutScores) -> torch.Tensor:
    """[N*G, T] per-token k1 estimate of KL(policy || reference): logp - ref_logp on the
    completion's tokens, 0 elsewhere."""
    if scores.logps is None or scores.ref_logps is None:
        raise ValueError("a KL penalty in the reward needs the rollout's log-probs and the reference's")
    return (scores.logps - scores.ref_logps) * scores.mask


def kl_penalized_rewards(scores: RolloutScores, config) -> torch.Tensor:
    """[N*G] rewards minus beta x each completion's summed k1 KL when the KL enters the reward
    (config.kl_in == "reward" and beta > 0), else the rewards unchanged."""
    if config.kl_in != "reward" or config.beta == 0:
        return scores.rewards
    return scores.rewards - config.beta * token_kl(scores).sum(-1)


@register_advantage_estimator("grpo")
def grpo(scores: RolloutScores, config) -> torch.Tensor:
    """GRPO (Shao et al., 2024): (r - group mean) / group std, or the batch's std, or undivided
    (Dr. GRPO), as config.scale_rewards says. [N*G]."""
    return group_advantages(kl_penalized_rewards(scores, config), scores.group_size, config.scale_rewards)
