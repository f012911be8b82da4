"""PPO pieces: per-token rewards with a KL penalty, GAE, whitening, and the clipped value and
policy losses.

Shapes: B completions, T completion tokens, right-padded; mask [B, T] marks the real tokens.
Rollout quantities (rewards, values, advantages) are computed without gradients by the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from align.losses.policy_gradient import aggregate_loss, clipped_policy_loss, masked_mean


def missing_eos_penalty(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float) -> torch.Tensor:
    """Subtract `penalty` from the score of each completion that did not end with EOS.

    scores: [B]; has_eos: [B] bool, whether the completion's last token is an EOS id (a completion
    ended by max_new_tokens, a stop string or another stop id has none). Returns [B].
    """
    return scores - penalty * (~has_eos.bool()).to(scores.dtype)


def token_level_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor,
                        mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: -kl_coef * (logp - ref_logp) on each masked token (the k1 KL penalty),
    plus the sequence score on the last masked token of each row.

    scores: [B]; logps, ref_logps, mask: [B, T]. Returns [B, T], zero outside the mask
    (a row with no masked token gets nothing).
    """
    mask = mask.to(logps.dtype)
    rewards = -kl_coef * (logps - ref_logps) * mask
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask.bool(), positions, -1).amax(dim=-1)
    at_last = F.one_hot(last.clamp(min=0), mask.shape[1]).to(rewards.dtype) * (last >= 0).unsqueeze(-1)
    return rewards + at_last * scores.unsqueeze(-1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation, right to left.

    rewards, values, mask: [B, T], right-padded; the value after the last masked token is 0
    (the episode ends there). Returns (advantages [B, T], returns = advantages + values [B, T]),
    both zero outside the mask.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    running = torch.zeros_like(values[:, 0])
    next_values = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
        next_values = values[:, t]
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalize x [B, T] to zero mean, unit variance over the masked entries. Returns [B, T], zero
    outside the mask. The variance is unbiased (as in TRL's PPO); shift_mean=False keeps the mean.
    """
    mask = mask.to(x.dtype)
    count = mask.sum()
    mean = (x * mask).sum() / count.clamp(min=1)
    var = (((x - mean) ** 2) * mask).sum() / (count - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   mask: torch.Tensor, clip_range: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: 0.5 * masked mean of max((v - R)^2, (clip(v, old - c, old + c) - R)^2).

    values, old_values, returns, mask: [B, T]. Returns (scalar loss, clipfrac: share of masked tokens
    where the clipped term is the larger one, a detached 0-dim tensor).
    """
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_loss, clipped_loss), mask)
    clipfrac = masked_mean((clipped_loss > unclipped_loss).float(), mask).detach()
    return loss, clipfrac


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip_range: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped policy loss, a token mean over the mask.

    logps, old_logps, advantages, mask: [B, T]. Returns (scalar loss, metrics: clip ratios and
    approx_kl = 0.5 * masked mean of (logp - old_logp)^2; detached 0-dim tensors).
    """
    per_token_loss, metrics = clipped_policy_loss(logps, old_logps, advantages, mask, clip_range, clip_range)
    metrics["approx_kl"] = 0.5 * masked_mean((logps - old_logps).detach() ** 2, mask)
    return aggregate_loss(per_token_loss, mask, norm="bnpo"), metrics
