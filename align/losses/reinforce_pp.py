"""REINFORCE++ (Hu, 2025), as OpenRLHF describes it: no critic and no per-prompt baseline; each
token's reward is -beta x its k1 KL to the reference (when `grpo.kl_in: reward`) plus, at the
completion's last token, the sequence's reward; the advantage of a token is its return-to-go
(gamma 1), whitened over every token of the round.

`grpo.advantage: reinforce_pp`. Returns per-token advantages [N*G, T], 0 beyond each completion.
With `kl_in: loss` (or beta 0) the token rewards are the sequence reward alone, so every token of a
completion has the same return before whitening.

Unscored completions (NaN reward) get advantage 0 on every token and are left out of the
whitening's mean and std, as the "grpo" estimator leaves them out of its statistics.
"""

from __future__ import annotations

import torch

from align.losses.advantages import RolloutScores, register_advantage_estimator, token_kl


def token_rewards(scores: RolloutScores, config) -> torch.Tensor:
    """[N*G, T] per-token rewards: -beta x k1 KL on each token (kl_in == "reward", beta > 0) plus
    the sequence reward on the last token of each completion; 0 beyond it. NaN rewards are taken as
    0 here (the caller zeroes those completions' advantages)."""
    mask = scores.mask.float()
    rewards = torch.zeros_like(mask)
    if config.kl_in == "reward" and config.beta != 0:
        rewards = rewards - config.beta * token_kl(scores).float()
    lengths = mask.sum(-1).long()
    has_tokens = lengths > 0
    rows = torch.arange(len(lengths))[has_tokens]
    rewards[rows, lengths[has_tokens] - 1] += scores.rewards.float().nan_to_num(nan=0.0)[has_tokens]
    return rewards * mask


def returns_to_go(rewards: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = r_t + gamma G_{t+1} along the last dim of [B, T] rewards."""
    if gamma == 1.0:
        return rewards.flip(-1).cumsum(-1).flip(-1)
    returns, running = torch.zeros_like(rewards), torch.zeros_like(rewards[..., 0])
    for t in reversed(range(rewards.shape[-1])):
        running = rewards[..., t] + gamma * running
        returns[..., t] = running
    return returns


def whiten_tokens(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var) over the masked entries (population variance, clamped at eps, as
    OpenRLHF's advantage normalization), 0 where mask is 0."""
    count = mask.sum().clamp(min=1)
    mean = (values * mask).sum() / count
    var = (((values - mean) ** 2) * mask).sum() / count
    return (values - mean) * var.clamp(min=eps).rsqrt() * mask


@register_advantage_estimator("reinforce_pp")
def reinforce_pp(scores: RolloutScores, config) -> torch.Tensor:
    """REINFORCE++ advantages [N*G, T]: returns-to-go of `token_rewards`, whitened over all the
    round's tokens of scored completions."""
    scored = ~scores.rewards.isnan()
    mask = scores.mask.float() * scored[:, None]
    return whiten_tokens(returns_to_go(token_rewards(scores, config)), mask)
