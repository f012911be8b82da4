"""Divergences between a student's and a teacher's next-token distributions, for distillation.

Each function takes the two models' logits at the same N positions, [N, V] over the FULL shared
vocabulary (the models' own logits: lm-head plus the family's post-processing, see
`align.models.head`), divides both by a temperature, and returns one divergence per position, [N].

- `reverse_kl`: KL(p_s || p_t) = sum_v p_s (log p_s - log p_t), mode-seeking: the student is
  penalised for mass where the teacher has none. Evaluated on the student's own samples, this is
  on-policy distillation (Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning
  from Self-Generated Mistakes", ICLR 2024, arXiv:2306.13649; Gu et al. 2024, MiniLLM; Thinking
  Machines' "On-Policy Distillation", 2025).
- `forward_kl`: KL(p_t || p_s), mean-seeking (the classic distillation loss of Hinton et al. 2015).
- `generalized_jsd`: GKD's generalized Jensen-Shannon divergence (Agarwal et al. 2024, eq. 1) with
  mixture m = (1 - beta) p_s + beta p_t:  beta KL(p_t || m) + (1 - beta) KL(p_s || m).

`beta` follows TRL's DistillationTrainer / GKDTrainer (`generalized_jsd_loss`): beta = 0 is the
forward KL and beta = 1 the reverse KL (the JSD itself tends to 0 at both ends, so the endpoints are
defined as those KLs, as TRL does); 0.5 is the symmetric JSD.

`divergence_grad` gives each divergence's gradient in the student's (temperature-scaled) logits in
closed form; the chunked computation (`align.ops.distill`) uses it to make the lm-head's gradient
during the forward, and tests/test_distill.py checks it against autograd. `distill_loss` reduces
per-token divergences to the loss: their sum over the trained tokens divided by `num_items`, the
trained tokens of the whole optimizer step (all micro-batches, all processes), so gradient
accumulation gives the update of one big batch (TRL divides by the step's `num_items_in_batch` too).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Divergence = Literal["reverse_kl", "forward_kl", "generalized_jsd"]
DIVERGENCES: tuple[str, ...] = ("reverse_kl", "forward_kl", "generalized_jsd")


def trl_beta(divergence: str, beta: float = 0.5) -> float:
    """The `beta` of TRL's DistillationConfig that selects `divergence` (reverse_kl: 1, forward_kl: 0)."""
    return {"reverse_kl": 1.0, "forward_kl": 0.0}.get(divergence, beta)


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """[N, V] logits -> float32 (or float64) log-softmax(logits / temperature)."""
    logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    return torch.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)


def _mixture_log_probs(log_ps: torch.Tensor, log_pt: torch.Tensor, beta: float) -> torch.Tensor:
    """log m, m = (1 - beta) p_s + beta p_t, stably."""
    return torch.logaddexp(log_ps + math.log1p(-beta), log_pt + math.log(beta))


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_s || p_t) per position. student_logits, teacher_logits: [N, V] -> [N]."""
    log_ps, log_pt = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    return (log_ps.exp() * (log_ps - log_pt)).sum(-1)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_t || p_s) per position. student_logits, teacher_logits: [N, V] -> [N]."""
    log_ps, log_pt = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5,
                    temperature: float = 1.0) -> torch.Tensor:
    """GKD's generalized JSD per position: beta KL(p_t || m) + (1 - beta) KL(p_s || m), with
    m = (1 - beta) p_s + beta p_t; beta = 0 is `forward_kl` and beta = 1 `reverse_kl` (TRL's
    convention). student_logits, teacher_logits: [N, V] -> [N]."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, temperature)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, temperature)
    log_ps, log_pt = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    log_m = _mixture_log_probs(log_ps, log_pt, beta)
    return (beta * log_pt.exp() * (log_pt - log_m) + (1 - beta) * log_ps.exp() * (log_ps - log_m)).sum(-1)


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, divergence: Divergence = "reverse_kl",
                     beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """The divergence named `divergence` (beta: generalized_jsd's) per position: [N, V] x2 -> [N]."""
    return generalized_jsd(student_logits, teacher_logits, check_divergence(divergence, beta), temperature)


def check_divergence(divergence: str, beta: float = 0.5) -> float:
    """The TRL beta of `divergence` (ValueError for an unknown name or a beta out of (0, 1) for the JSD)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}")
    if divergence == "generalized_jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"generalized_jsd needs 0 < beta < 1 (0 and 1 are forward_kl and reverse_kl), got {beta}")
    return trl_beta(divergence, beta)


def divergence_and_grad(log_ps: torch.Tensor, log_pt: torch.Tensor,
                        beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The divergence of TRL `beta` per position and its gradient in the student's logits z_s (the
    temperature-scaled ones: p_s = softmax(z_s)), from the two log-distributions [N, V].

    Returns (divergence [N], d divergence / d z_s [N, V], student entropy [N]). With g_v the
    gradient in p_s, d/dz_v = p_v (g_v - sum_u p_u g_u):
      reverse KL:  p_s (log p_s - log p_t - KL(p_s || p_t))
      forward KL:  p_s - p_t
      gen. JSD:    (1 - beta) p_s (log p_s - log m - KL(p_s || m))
    The teacher gets no gradient. `log_ps` may be overwritten."""
    ps = log_ps.exp()
    entropy = -(ps * log_ps).sum(-1)
    if beta == 0.0:
        pt = log_pt.exp()
        value = (pt * (log_pt - log_ps)).sum(-1)
        return value, ps.sub_(pt), entropy
    if beta == 1.0:
        gap = log_ps - log_pt
        value = (ps * gap).sum(-1)
        return value, gap.sub_(value[:, None]).mul_(ps), entropy
    log_m = _mixture_log_probs(log_ps, log_pt, beta)
    gap = log_ps - log_m
    kl_student = (ps * gap).sum(-1)
    value = beta * (log_pt.exp() * (log_pt - log_m)).sum(-1) + (1 - beta) * kl_student
    return value, gap.sub_(kl_student[:, None]).mul_(ps).mul_(1 - beta), entropy


def divergence_grad(student_logits: torch.Tensor, teacher_logits: torch.Tensor, divergence: Divergence = "reverse_kl",
                    beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """d token_divergence(...).sum() / d student_logits, [N, V], in closed form (the 1 / temperature
    of the scaling included)."""
    trl = check_divergence(divergence, beta)
    _, grad, _ = divergence_and_grad(_log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature),
                                     trl)
    return grad / temperature


def distill_loss(per_token: torch.Tensor, mask: torch.Tensor,
                 num_items: float | torch.Tensor | None = None) -> torch.Tensor:
    """sum(per_token * mask) / num_items: the distillation loss of one micro-batch.

    per_token: token divergences (any shape, e.g. [S, T]); mask: the trained tokens, same shape.
    num_items: the trained tokens of the whole optimizer step (default: mask.sum(), the plain mean)."""
    if num_items is None:
        num_items = mask.sum().clamp(min=1)
    return (per_token * mask).sum() / num_items


def distill_token_weights(mask: torch.Tensor, num_items: float | torch.Tensor | None = None) -> torch.Tensor:
    """d distill_loss / d per_token: mask / num_items (the loss is linear in the token divergences)."""
    if num_items is None:
        num_items = mask.sum().clamp(min=1)
    return mask.float() / num_items
