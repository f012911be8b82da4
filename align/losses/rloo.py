"""RLOO (Ahmadian et al., 2024, "Back to Basics"): each completion's baseline is the mean reward of
the other completions of its prompt (leave-one-out), as TRL 1.16's RLOOTrainer computes it.

`grpo.advantage: rloo`. With `grpo.kl_in: reward` and beta > 0 the rewards are first lowered by
beta x each completion's summed k1 KL (log-prob of the sampling policy minus the reference's), as
TRL's RLOO always does; with `kl_in: loss` they are the raw rewards and GRPO's k3 term goes into
the loss instead. `grpo.scale_rewards` is not read (it is grpo's).

Unscored completions (NaN reward), as TRL and the "grpo" estimator: left out of their siblings'
baselines (the sum and the count, k - 1 becomes scored - 1) and given advantage 0; so is a
completion that is the only scored one of its group (no sibling to compare with).
"""

from __future__ import annotations

import torch

from align.losses.advantages import RolloutScores, kl_penalized_rewards, register_advantage_estimator
from align.losses.policy_gradient import nan_std


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int, normalize: bool = False,
                             eps: float = 1e-4) -> torch.Tensor:
    """r_i - mean of the other scored rewards of its group, for rewards [N*G] (G consecutive per
    prompt; NaN = unscored). Returns [N*G], 0 where there is no advantage (NaN reward, or no
    scored sibling).

    normalize: then (A - mean A) / (std A + eps) over the whole batch's scored completions (TRL's
    `normalize_advantages`, off by default there; unbiased std, eps 1e-4).
    """
    flat = rewards.reshape(-1)
    if group_size < 2 or flat.numel() % group_size:
        raise ValueError(f"RLOO needs groups of at least 2 completions; got {flat.numel()} rewards in groups "
                         f"of {group_size}")
    groups = flat.view(-1, group_size)
    scored = (~groups.isnan()).sum(dim=1, keepdim=True)
    total = groups.nansum(dim=1, keepdim=True)
    baselines = (total - groups) / (scored - 1)  # NaN for a NaN reward; 0/0 for a lone scored one
    advantages = (groups - baselines).reshape(-1)
    if normalize:
        advantages = (advantages - advantages.nanmean()) / (nan_std(advantages[None], dim=1) + eps)
    return advantages.nan_to_num(nan=0.0)


@register_advantage_estimator("rloo")
def rloo(scores: RolloutScores, config) -> torch.Tensor:
    """RLOO advantages [N*G] of the (KL-penalized, when kl_in == "reward") rewards, normalized over
    the batch when config.normalize_advantages (off by default, as in TRL)."""
    return leave_one_out_advantages(kl_penalized_rewards(scores, config), scores.group_size,
                                    normalize=config.normalize_advantages)
