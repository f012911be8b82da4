"""KTO: Kahneman-Tversky Optimization (Ethayarajh et al., 2024, "KTO: Model Alignment as Prospect
Theoretic Optimization", arXiv:2402.01306), and the unpaired APO-zero loss (D'Oosterlinck et al.,
2024, arXiv:2408.06266), on unpaired rows: a prompt, one completion and a label saying whether the
completion is desirable.

With the implicit reward r = log pi(y|x) - log pi_ref(y|x) of a row and the reference point z0 (an
estimate of KL(pi || pi_ref), detached and clamped at 0), eq. 7 of the paper gives each row the loss

    desirable:    desirable_weight   * (1 - sigmoid(beta * (r - z0)))
    undesirable:  undesirable_weight * (1 - sigmoid(beta * (z0 - r)))

and the batch's loss is their sum over all its rows divided by the number of rows: one mean over
desirable and undesirable rows together (not a mean of each kind), as TRL's KTOTrainer computes it
(`losses.nanmean()` of the weighted losses concatenated). z0 is estimated from mismatched pairs,
each prompt x_i with the completion y_j of another row of the batch: the mean over them of
log pi(y_j|x_i) - log pi_ref(y_j|x_i) (`kl_sums`, `kl_reference_point`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def kl_sums(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """[2] (sum of the log-ratios, number of pairs) of K mismatched pairs, detached, in float32 at
    least: what `kl_reference_point` averages. Sums, not a mean, so that the sums of several
    micro-batches (and, all-reduced, of several processes) give the mean of all their pairs.

    policy_kl_logps, ref_kl_logps: [K] sequence log-probs (summed over the completion's tokens) of
    the mismatched completions under the policy and the reference.
    """
    ratios = (policy_kl_logps.detach() - ref_kl_logps.detach()).float()
    return torch.stack([ratios.sum(), ratios.new_full((), ratios.numel())])  # no host-to-device copy


def kl_reference_point(sums: torch.Tensor) -> torch.Tensor:
    """z0 = max(0, mean log-ratio of the mismatched pairs): `sums` [2] as `kl_sums` gives (summed over
    micro-batches and processes first). A 0-dim detached tensor; 0 when there are no pairs. The clamp
    at 0 comes after the mean over every pair, as TRL clamps its gathered mean."""
    total, count = sums.detach().unbind()
    return (total / count.clamp(min=1)).clamp(min=0)


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor, kl: torch.Tensor | float,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             num_items: float | torch.Tensor | None = None, loss_type: str = "kto",
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The KTO loss of B unpaired rows, a share of an optimizer step of `num_items` rows (default: B,
    this batch alone), so that the shares of a step's micro-batches sum to the loss of the whole step.

    policy_logps: [B] sequence log-probs of each row's completion under the policy (with gradient);
    ref_logps: [B] the same under the reference; labels: [B] bool, True for a desirable completion;
    kl: the reference point z0, a 0-dim tensor (or a number): detached and clamped at 0 here, as the
    paper and TRL do (see `kl_reference_point` for its estimate). loss_type "apo_zero_unpaired" uses
    no z0: desirable rows 1 - sigmoid(beta r), undesirable rows sigmoid(beta r).

    Returns (loss, metrics): loss = sum of the weighted per-row losses / num_items, a 0-dim tensor;
    metrics, detached 0-dim tensors over this batch's rows: rewards/chosen and rewards/rejected (the
    mean implicit reward beta * (policy - reference) of its desirable / undesirable rows, 0 if it has
    none: the trainer logs no such metric for a step without either kind), rewards/margin (their
    difference), logps/chosen, logps/rejected (mean policy log-probs) and kl (z0).
    """
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"unknown KTO loss_type {loss_type!r}; valid: {list(KTO_LOSS_TYPES)}")
    labels = labels.to(device=policy_logps.device, dtype=torch.bool)
    z0 = kl.detach().to(policy_logps.dtype) if isinstance(kl, torch.Tensor) else policy_logps.new_full((), kl)
    z0 = z0.clamp(min=0)
    logratios = policy_logps - ref_logps
    if loss_type == "kto":
        desirable = 1 - F.sigmoid(beta * (logratios - z0))
        undesirable = 1 - F.sigmoid(beta * (z0 - logratios))
    else:
        desirable = 1 - F.sigmoid(beta * logratios)
        undesirable = F.sigmoid(beta * logratios)
    losses = torch.where(labels, desirable_weight * desirable, undesirable_weight * undesirable)
    loss = losses.sum() / (len(losses) if num_items is None else num_items)

    rewards, logps = beta * logratios.detach(), policy_logps.detach()
    chosen, rejected = labels.to(rewards.dtype), (~labels).to(rewards.dtype)
    n_chosen, n_rejected = chosen.sum().clamp(min=1), rejected.sum().clamp(min=1)
    metrics = {
        "rewards/chosen": (rewards * chosen).sum() / n_chosen,
        "rewards/rejected": (rewards * rejected).sum() / n_rejected,
        "logps/chosen": (logps * chosen).sum() / n_chosen,
        "logps/rejected": (logps * rejected).sum() / n_rejected,
    }
    metrics["rewards/margin"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    metrics["kl"] = z0.detach() if loss_type == "kto" else torch.zeros_like(z0)
    return loss, metrics


def desirable_weight_advice(num_desirable: int, num_undesirable: int, desirable_weight: float,
                            undesirable_weight: float) -> str | None:
    """None if the weights suit the data's balance, else advice: eq. 8 of the paper asks for
    1 <= desirable_weight * n_D / (undesirable_weight * n_U) <= 4/3; TRL's ranges (rounded to 2
    decimals), one of the two weights within its range sufficing."""
    n_d, n_u = max(num_desirable, 1), max(num_undesirable, 1)
    if n_d == n_u:
        return None
    d_low, d_high = round(n_u * undesirable_weight / n_d, 2), round(n_u * undesirable_weight / n_d * 1.33, 2)
    u_low, u_high = round(n_d * desirable_weight / n_u / 1.33, 2), round(n_d * desirable_weight / n_u, 2)
    if d_low <= desirable_weight <= d_high or u_low <= undesirable_weight <= u_high:
        return None
    return (f"{num_desirable} desirable and {num_undesirable} undesirable rows, but kto.desirable_weight="
            f"{desirable_weight} and kto.undesirable_weight={undesirable_weight} do not balance them (eq. 8 of the "
            f"KTO paper); set EITHER desirable_weight in [{d_low}, {d_high}] OR undesirable_weight in "
            f"[{u_low}, {u_high}]")
