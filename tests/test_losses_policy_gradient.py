import collections
import math
import statistics
import types

import pytest
import torch

from align.errors import AlignError
from align.losses import aggregate_loss, clipped_policy_loss, group_advantages, grpo_loss, k3_kl

F64 = torch.float64


def t(x, grad=False):
    return torch.tensor(x, dtype=F64, requires_grad=grad)


# --- group advantages ----------------------------------------------------------------------------

def test_group_advantages_by_hand_unbiased_std():
    rewards = t([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])  # group means 2 and 2; unbiased stds 1 and sqrt(12)
    adv = group_advantages(rewards, group_size=3)
    expected = [-1 / (1 + 1e-4), 0.0, 1 / (1 + 1e-4)] + [x / (math.sqrt(12) + 1e-4) for x in (-2.0, -2.0, 4.0)]
    torch.testing.assert_close(adv, t(expected))
    torch.testing.assert_close(group_advantages(rewards.view(2, 3), group_size=3), adv)  # [N, G] input


def test_group_advantages_batch_and_none_scales():
    r = [1.0, 2.0, 3.0, 0.0, 0.0, 6.0]
    centered = [-1.0, 0.0, 1.0, -2.0, -2.0, 4.0]
    batch = group_advantages(t(r), 3, scale="batch", eps=0.0)  # group mean, but std over the whole batch
    torch.testing.assert_close(batch, t([c / statistics.stdev(r) for c in centered]))
    torch.testing.assert_close(group_advantages(t(r), 3, scale="none"), t(centered))


def test_group_advantages_constant_group_and_group_of_one_are_zero():
    adv = group_advantages(t([5.0, 5.0, 5.0, 1.0, 2.0, 3.0]), 3)
    assert adv[:3].tolist() == [0.0, 0.0, 0.0] and adv[3:].abs().sum() > 1
    assert group_advantages(t([1.0, 4.0]), 1).tolist() == [0.0, 0.0]


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="7 rewards.*group_size=3"):
        group_advantages(torch.zeros(7), 3)
    with pytest.raises(ValueError, match="'global'.*group"):
        group_advantages(torch.zeros(6), 3, scale="global")


@pytest.mark.parametrize("scale", ["group", "batch"])
def test_group_advantages_match_trl_formula(scale):
    pytest.importorskip("trl")
    from trl.trainer.utils import nanstd

    torch.manual_seed(0)
    rewards, G = torch.randn(12), 4
    mean = rewards.view(-1, G).mean(1).repeat_interleave(G)
    std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G) if scale == "group" else nanstd(rewards)
    torch.testing.assert_close(group_advantages(rewards, G, scale), (rewards - mean) / (std + 1e-4))


def test_group_advantages_leave_unscorable_completions_out_by_hand():
    # NaN = every reward function returned None: left out of its group's mean and std, advantage 0
    nan = math.nan
    rewards = t([1.0, nan, 3.0, 2.0] + [nan] * 4 + [nan, 4.0, nan, nan])
    eps = 1e-4  # group 0: scored values 1, 3, 2 -> mean 2, unbiased std 1; group 2: one scored value
    torch.testing.assert_close(group_advantages(rewards, 4),
                               t([-1 / (1 + eps), 0.0, 1 / (1 + eps), 0.0] + [0.0] * 8))
    torch.testing.assert_close(group_advantages(rewards, 4, scale="none"), t([-1.0, 0.0, 1.0, 0.0] + [0.0] * 8))
    batch_std = statistics.stdev([1.0, 3.0, 2.0, 4.0])  # the batch's scored values
    torch.testing.assert_close(group_advantages(rewards, 4, scale="batch", eps=0.0),
                               t([-1 / batch_std, 0.0, 1 / batch_std, 0.0] + [0.0] * 8))


def _trl_advantages(rewards: torch.Tensor, G: int, scale: str) -> torch.Tensor:
    """TRL 1.16 GRPOTrainer._generate_and_score_completions (sum_then_normalize), line for line, on
    combined rewards where NaN marks an unscorable completion."""
    from trl.trainer.utils import nanstd

    mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0) if scale == "group" else nanstd(rewards)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_with_unscorable_completions_match_trl(scale):
    pytest.importorskip("trl")
    torch.manual_seed(0)
    rewards, G = torch.randn(24), 4
    rewards[torch.tensor([1, 5, 6, 8, 9, 10, 11, 13, 14, 15])] = math.nan  # one empty group, one with a single value
    torch.testing.assert_close(group_advantages(rewards, G, scale), _trl_advantages(rewards, G, scale))


# --- k3 KL ---------------------------------------------------------------------------------------

def test_k3_kl_by_hand():
    kl = k3_kl(t([[-1.0, -2.0, -0.5]]), t([[-2.0, -1.0, -0.5]]))
    torch.testing.assert_close(kl, t([[math.exp(-1) + 1 - 1, math.exp(1) - 1 - 1, 0.0]]))
    assert (k3_kl(torch.randn(50, dtype=F64), torch.randn(50, dtype=F64)) >= 0).all()


def test_k3_kl_is_unbiased_for_kl_under_policy_samples():
    p, q = t([0.7, 0.2, 0.1]), t([0.4, 0.4, 0.2])  # E_p[k3(log p, log q)] = KL(p || q)
    expected = (p * (p / q).log()).sum()
    torch.testing.assert_close((p * k3_kl(p.log(), q.log())).sum(), expected)


# --- clipped surrogate ---------------------------------------------------------------------------

def test_clipped_policy_loss_by_hand_values_gradients_and_clip_metrics():
    ratios = [1.5, 0.5, 0.5, 1.1, 2.0]  # with A = +1, +1, -1, -1, and a padded token
    logps = t([[math.log(r) for r in ratios]], grad=True)
    old = torch.zeros(1, 5, dtype=F64)
    adv = t([[1.0, 1.0, -1.0, -1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, metrics = clipped_policy_loss(logps, old, adv, mask, eps_low=0.2, eps_high=0.3)
    torch.testing.assert_close(loss[0, :4], t([-1.3, -0.5, 0.8, 1.1]))
    (grad,) = torch.autograd.grad((loss * mask).sum(), logps)
    # d(-ratio * A)/d logp = -ratio * A where unclipped; zero where the clipped term is used
    torch.testing.assert_close(grad[0, :4], t([0.0, -0.5, 0.0, 1.1]))
    assert metrics == pytest.approx({"clip_ratio/low": 0.25, "clip_ratio/high": 0.25, "clip_ratio/region": 0.5})


def test_clipped_policy_loss_on_policy_default_is_minus_advantage():
    logps = t([[-1.0, -2.0], [-0.3, -0.1]], grad=True)
    loss, metrics = clipped_policy_loss(logps, None, t([2.0, -1.0]), torch.ones(2, 2))
    torch.testing.assert_close(loss, t([[-2.0, -2.0], [1.0, 1.0]]))
    assert metrics["clip_ratio/region"] == 0.0


def test_sequence_level_ratio_is_gspo():
    logps = t([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]], grad=True)
    old = t([[-1.2, -1.9, -3.4], [-0.4, -0.7, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = t([1.0, -2.0])
    loss, _ = clipped_policy_loss(logps, old, adv, mask, 0.2, 0.2, importance="sequence")
    s = [math.exp((0.2 - 0.1 + 0.4) / 3), math.exp((-0.1 + 0.2) / 2)]  # exp(mean masked log-ratio)
    torch.testing.assert_close(loss[0], t([-s[0]] * 3))
    torch.testing.assert_close(loss[1, :2], t([2 * s[1]] * 2))
    # grpo-normalized loss = mean_i -s_i * A_i, so d/dlogp_it = -A_i * s_i / |y_i| on masked tokens
    (grad,) = torch.autograd.grad(aggregate_loss(loss, mask, "grpo"), logps)
    torch.testing.assert_close(grad, t([[-s[0] / 6] * 3, [s[1] / 2, s[1] / 2, 0.0]]))


def test_sequence_level_with_token_advantages_uses_gspo_token_gradient():
    logps = t([[-1.0, -2.0]], grad=True)
    old = t([[-1.1, -1.9]])
    adv = t([[1.0, 3.0]])
    loss, _ = clipped_policy_loss(logps, old, adv, torch.ones(1, 2), importance="sequence")
    (grad,) = torch.autograd.grad(loss.sum(), logps)
    torch.testing.assert_close(grad, -adv)  # s = exp(0) = 1; d ratio_t / d logp_t = s, no cross terms


def test_clipped_policy_loss_rejects_unknown_importance():
    with pytest.raises(ValueError, match="'seq'"):
        clipped_policy_loss(torch.zeros(1, 2), None, torch.zeros(1), torch.ones(1, 2), importance="seq")


# --- aggregation ---------------------------------------------------------------------------------

LOSS = [[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0], [100.0] * 4]
MASK = [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]  # the last row is empty


@pytest.mark.parametrize("norm,kwargs,expected", [
    ("grpo", {}, (2.0 + 4.0 + 0.0) / 3),
    ("bnpo", {}, 10.0 / 4),
    ("dr_grpo", {"max_completion_length": 5}, 10.0 / 15),
    ("dapo", {}, 10.0 / 4),
    ("dapo", {"num_items": 8}, 10.0 / 8),
])
def test_aggregate_loss_by_hand(norm, kwargs, expected):
    assert aggregate_loss(t(LOSS), torch.tensor(MASK), norm, **kwargs).item() == pytest.approx(expected)


def test_dapo_over_accumulation_micro_batches_is_the_global_token_mean():
    torch.manual_seed(0)
    loss, mask = torch.randn(6, 5, dtype=F64), torch.rand(6, 5) > 0.4
    total = mask.sum().item()
    parts = sum(aggregate_loss(loss[i:i + 2], mask[i:i + 2], "dapo", num_items=total) for i in (0, 2, 4))
    torch.testing.assert_close(parts, aggregate_loss(loss, mask, "dapo"))
    torch.testing.assert_close(parts, loss[mask].mean())


def test_aggregate_loss_errors():
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate_loss(t(LOSS), torch.tensor(MASK), "dr_grpo")
    with pytest.raises(AlignError, match="unknown loss normalization 'mean'.*bnpo, dapo, dr_grpo, grpo"):
        aggregate_loss(t(LOSS), torch.tensor(MASK), "mean")


# --- grpo_loss -----------------------------------------------------------------------------------

def _batch(seed=0, B=4, T=5, seq_offsets=(-0.5, 0.6, 0.0, 0.05)):
    torch.manual_seed(seed)
    logps = (-2 * torch.rand(B, T, dtype=F64)).requires_grad_()
    offsets = torch.tensor(seq_offsets, dtype=F64)[:, None]  # makes some sequence-level ratios clip
    old = logps.detach() + offsets + 0.3 * torch.randn(B, T, dtype=F64)
    ref = logps.detach() + 0.3 * torch.randn(B, T, dtype=F64)
    adv = t([1.0, -0.7, 0.4, -1.2])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    return logps, old, ref, adv, mask


def test_grpo_loss_adds_beta_times_k3_and_reports_kl():
    logps, old, ref, adv, mask = _batch()
    per_token, _ = clipped_policy_loss(logps, old, adv, mask, 0.2, 0.28)
    loss0, m0 = grpo_loss(logps, old, None, adv, mask, 0.0, 0.2, 0.28, "bnpo")
    loss1, m1 = grpo_loss(logps, old, ref, adv, mask, 0.04, 0.2, 0.28, "bnpo")
    kl = k3_kl(logps, ref)
    torch.testing.assert_close(loss0, (per_token * mask).sum() / mask.sum())
    torch.testing.assert_close(loss1, loss0 + 0.04 * (kl * mask).sum() / mask.sum())
    assert "kl" not in m0 and m1["kl"] == pytest.approx(((kl * mask).sum() / mask.sum()).item())
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, old, None, adv, mask, beta=0.04)


def _trl_grpo_loss(logps, old, ref, adv, mask, loss_type, importance, beta, max_len, num_items, accum=1):
    """TRL's GRPOTrainer._compute_loss on a stand-in self: the model forward is replaced (on the
    stand-in only) by a function returning our fixed per-token log-probs."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    B, T = logps.shape
    acc = types.SimpleNamespace(num_processes=1, reduce=lambda x, reduction: x, gather=lambda x: x)
    fake_self = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros(B, T, dtype=F64), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=importance,
        beta=beta, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, use_vllm=False,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=accum),
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=accum,
        max_completion_length=max_len, accelerator=acc, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics={"train": collections.defaultdict(list)})
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": torch.tensor(num_items)}
    return GRPOTrainer._compute_loss(fake_self, None, inputs), fake_self._metrics["train"]


@pytest.mark.parametrize("importance", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("norm", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_loss_matches_trl(norm, beta, importance):
    pytest.importorskip("trl")
    logps, old, ref, adv, mask = _batch()
    trl_loss, trl_metrics = _trl_grpo_loss(logps, old, ref, adv, mask, norm, importance, beta, 8,
                                           float(mask.sum()))
    loss, metrics = grpo_loss(logps, old, ref if beta else None, adv, mask, beta, 0.2, 0.28, norm, importance,
                              max_completion_length=8)
    torch.testing.assert_close(loss, trl_loss)
    torch.testing.assert_close(torch.autograd.grad(loss, logps)[0], torch.autograd.grad(trl_loss, logps)[0])
    for name in ("low", "high", "region"):
        assert metrics[f"clip_ratio/{name}"] == pytest.approx(trl_metrics[f"clip_ratio/{name}_mean"][0], abs=1e-6)
    assert metrics["clip_ratio/region"] > 0  # the batch does exercise clipping
    if beta:
        assert metrics["kl"] == pytest.approx(trl_metrics["kl"][0])


@pytest.mark.parametrize("norm", ["grpo", "dapo"])
def test_grpo_gradient_accumulation_convention_vs_trl(norm):
    # Two accumulation micro-batches. TRL's dapo divides by the step's token count (num_items_in_batch),
    # as ours does with num_items; for the other norms TRL divides by the number of accumulation
    # steps, as ours does given the step's sequence count (the norm owns the micro-batch's share).
    pytest.importorskip("trl")
    logps, old, ref, adv, mask = _batch()
    tokens = float(mask.sum() + 7)  # the other micro-batch holds 7 more tokens
    trl_loss, _ = _trl_grpo_loss(logps, old, ref, adv, mask, norm, "token", 0.0, 8, tokens, accum=2)
    num_items = tokens if norm == "dapo" else 2.0 * mask.shape[0]  # the step's tokens / sequences
    loss, _ = grpo_loss(logps, old, None, adv, mask, 0.0, 0.2, 0.28, norm, num_items=num_items)
    torch.testing.assert_close(loss, trl_loss)
