"""Reference-free preference losses: SimPO and ORPO (`dpo.loss_type: simpo | orpo`).

Both score a completion by its length-normalized (per-token average) log-prob under the policy
alone, so they register with needs_reference=False: the DPO trainer loads no reference model and
precomputes nothing. Both report TRL's implicit rewards, beta x the per-token average log-prob.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from align.losses.preference import PairLogps, register_preference_loss


def _average_logps(pairs: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token average log-probs of the chosen and rejected completions, each [B], in at least
    float32 (as TRL casts them)."""
    mean = pairs.per_token()
    dtype = torch.promote_types(mean.chosen.dtype, torch.float32)
    return mean.chosen.to(dtype), mean.rejected.to(dtype)


@register_preference_loss("simpo", needs_reference=False)
def simpo(pairs: PairLogps, beta: float, label_smoothing: float = 0.0, gamma: float = 0.5,
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al., 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward").

    pairs: [B] summed log-probs of the chosen / rejected completions and their token counts (no
    reference). With the length-normalized reward r(y) = beta * avg log p(y) (average over the
    completion's tokens) and the target margin gamma (`dpo.loss_kwargs: {gamma: ...}`, default 0.5 as
    TRL's CPOConfig.simpo_gamma), each pair's loss is

        z = beta * (avg log p(chosen) - avg log p(rejected)) - gamma
        loss = -(1 - eps) * logsigmoid(z) - eps * logsigmoid(-z)          eps = label_smoothing

    the paper's eq. 6 at eps = 0; eps > 0 smooths the label as TRL's CPOTrainer (loss_type="simpo")
    does. TRL's CPO also adds cpo_alpha (default 1.0) x an NLL term; pure SimPO is its cpo_alpha=0
    (here: dpo.rpo_alpha, 0 by default, adds a per-sequence NLL term instead). The paper uses a
    larger beta than DPO (2 to 10) and gamma/beta of about 0.3 to 0.8.

    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]), rewards = beta * avg log p, detached.
    """
    chosen, rejected = _average_logps(pairs)
    z = beta * (chosen - rejected) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def log_odds(avg_logps: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) of [B] per-token average log-probs log p, computed stably.

    log(1 - p) = log1p(-exp(x)) for x < -log 2 and log(-expm1(x)) above (no cancellation on either
    side). x is first clamped to at most -eps of its dtype, so that a completion the policy is
    certain of (x == 0 in float32, infinite odds) gives a finite value and a zero, not NaN, gradient
    through this term.
    """
    x = avg_logps.clamp(max=-torch.finfo(avg_logps.dtype).eps)
    log_one_minus_p = torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))
    return x - log_one_minus_p


def odds_ratio_term(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor) -> torch.Tensor:
    """ORPO's L_OR (its eq. 7) per pair: -logsigmoid(log odds(chosen) - log odds(rejected)), [B] -> [B]."""
    return -F.logsigmoid(log_odds(chosen_avg_logps) - log_odds(rejected_avg_logps))


@register_preference_loss("orpo", needs_reference=False)
def orpo(pairs: PairLogps, beta: float, label_smoothing: float = 0.0,
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO (Hong et al., 2024, "ORPO: Monolithic Preference Optimization without Reference Model").

    pairs: [B] summed log-probs of the chosen / rejected completions and their token counts (no
    reference). With p(y) = exp(avg log p(y)), the per-token average probability of a completion, and
    odds(y) = p / (1 - p), each pair's loss is the paper's eq. 6,

        loss = L_SFT + lambda * L_OR
        L_SFT = -avg log p(chosen)                         (the chosen completion's mean NLL per token)
        L_OR  = -logsigmoid(log odds(chosen) - log odds(rejected))

    with lambda = beta (`dpo.beta`, as TRL's ORPOConfig.beta; the paper uses 0.1 to 0.25). The
    trainer averages over the pairs, so every sequence's NLL counts once. TRL's ORPOTrainer instead
    averages the NLL over all chosen tokens of the batch (a token-weighted mean), which equals this
    when the chosen completions have equal lengths; it also counts the prompt's tokens in its NLL
    (its labels are the whole input), here only the completion's are. No label smoothing.

    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]), rewards = beta * avg log p,
    detached, as TRL's ORPOTrainer logs them.
    """
    if label_smoothing:
        raise ValueError(f"orpo has no label smoothing; got label_smoothing={label_smoothing}")
    chosen, rejected = _average_logps(pairs)
    losses = -chosen + beta * odds_ratio_term(chosen, rejected)
    return losses, beta * chosen.detach(), beta * rejected.detach()
