import collections
import math
import types

import pytest
import torch

from align.losses import bradley_terry_loss, dpo_loss, preference_metrics, rpo_sft_loss


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


# policy_chosen, policy_rejected, ref_chosen, ref_rejected -> h = [2.0, -1.5, -0.5]
PC, PR, RC, RR = [-3.0, -8.0, -4.0], [-6.0, -5.0, -4.5], [-4.0, -7.5, -4.0], [-5.0, -6.0, -5.0]
H = [(pc - rc) - (pr - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR)]


def tensors(*rows, grad=False):
    return [torch.tensor(r, dtype=torch.float64, requires_grad=grad) for r in rows]


@pytest.mark.parametrize("loss_type,eps,expected", [
    ("sigmoid", 0.0, lambda h, b, e: -logsig(b * h)),
    ("sigmoid", 0.2, lambda h, b, e: -(1 - e) * logsig(b * h) - e * logsig(-b * h)),
    ("robust", 0.2, lambda h, b, e: (-(1 - e) * logsig(b * h) + e * logsig(-b * h)) / (1 - 2 * e)),
    ("ipo", 0.0, lambda h, b, e: (h - 1 / (2 * b)) ** 2),
    ("hinge", 0.0, lambda h, b, e: max(0.0, 1 - b * h)),
])
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_dpo_losses_match_hand_formulas(loss_type, eps, expected, beta):
    losses, chosen, rejected = dpo_loss(*tensors(PC, PR, RC, RR), beta=beta, loss_type=loss_type,
                                        label_smoothing=eps)
    assert losses.shape == (3,)
    torch.testing.assert_close(losses, torch.tensor([expected(h, beta, eps) for h in H], dtype=torch.float64))
    torch.testing.assert_close(chosen, beta * torch.tensor([1.0, -0.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(rejected, beta * torch.tensor([-1.0, 1.0, 0.5], dtype=torch.float64))


def test_dpo_rewards_are_detached_and_loss_gradient_has_closed_form():
    pc, pr, rc, rr = tensors(PC, PR, RC, RR, grad=True)
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert not chosen.requires_grad and not rejected.requires_grad
    losses.sum().backward()
    # d/dpc -logsigmoid(beta h) = -beta * sigmoid(-beta h); the rejected gradient is its negative
    expected = torch.tensor([-0.5 / (1 + math.exp(0.5 * h)) for h in H], dtype=torch.float64)
    torch.testing.assert_close(pc.grad, expected)
    torch.testing.assert_close(pr.grad, -expected)
    torch.testing.assert_close(rc.grad, -expected)


def test_robust_with_no_noise_is_sigmoid_and_rejects_half():
    args = tensors(PC, PR, RC, RR)
    torch.testing.assert_close(dpo_loss(*args, loss_type="robust")[0], dpo_loss(*args)[0])
    with pytest.raises(ValueError, match="robust"):
        dpo_loss(*args, loss_type="robust", label_smoothing=0.5)


def test_ipo_minimum_at_target_margin_and_hinge_flat_beyond_margin():
    beta = 0.25
    pc, pr, rc, rr = tensors([2.0, 4.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], grad=True)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")  # h = 2 = 1/(2 beta), h = 4
    losses.sum().backward()
    assert losses[0].item() == 0.0 and pc.grad[0].item() == 0.0 and pc.grad[1].item() > 0
    pc.grad = None
    hinge, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="hinge")  # beta h = 0.5, 1.0
    hinge.sum().backward()
    assert hinge.tolist() == [0.5, 0.0] and pc.grad.tolist() == [-beta, 0.0]


def test_dpo_unknown_type_and_misplaced_smoothing():
    args = tensors(PC, PR, RC, RR)
    with pytest.raises(ValueError, match=r"'kto'.*hinge.*ipo.*robust.*sigmoid"):
        dpo_loss(*args, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*args, loss_type="hinge", label_smoothing=0.1)


def test_rpo_sft_loss_is_per_sequence_mean_nll():
    out = rpo_sft_loss(torch.tensor([-6.0, -1.0, 0.0]), torch.tensor([3, 4, 0]))
    assert out.tolist() == [2.0, 0.25, 0.0]


def test_bradley_terry_loss_by_hand_with_margin_and_centering():
    rc, rr, margin = [1.0, -0.5, 2.0], [0.0, 0.5, 2.5], [0.5, 0.0, -1.0]
    loss = bradley_terry_loss(*tensors(rc, rr))
    assert loss.item() == pytest.approx(sum(-logsig(c - r) for c, r in zip(rc, rr)) / 3)
    loss = bradley_terry_loss(*tensors(rc, rr, margin), center_coef=0.01)
    expected = sum(-logsig(c - r - m) for c, r, m in zip(rc, rr, margin)) / 3
    expected += 0.01 * sum((c + r) ** 2 for c, r in zip(rc, rr)) / 3
    assert loss.item() == pytest.approx(expected)


def test_bradley_terry_gradient_pushes_chosen_up_rejected_down():
    rc, rr = tensors([0.3, -1.0], [0.1, 2.0], grad=True)
    bradley_terry_loss(rc, rr).backward()
    assert (rc.grad < 0).all() and (rr.grad > 0).all()
    torch.testing.assert_close(rc.grad, -rr.grad)


def test_preference_metrics():
    m = preference_metrics(torch.tensor([1.0, 0.0, 2.0, 1.0]), torch.tensor([0.0, 1.0, 1.0, 1.0]))
    assert m == pytest.approx({"accuracy": 0.5, "margin": 0.25, "chosen": 1.0, "rejected": 0.75})


# --- parity with TRL 1.16 ------------------------------------------------------------------------

def _identity(x, **_):
    return x


def _trl_dpo_loss(loss_type, beta, eps, chosen_tok, rejected_tok, ref_c, ref_r, completion_mask):
    """Run TRL's DPOTrainer._compute_loss on a stand-in self and model that returns fixed per-token
    log-probs (zero off the completion, as TRL's labels=-100 gives)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    per_token = torch.cat([chosen_tok, rejected_tok])  # [2B, T - 1], TRL's layout: [chosen; rejected]
    zeros = torch.zeros_like(per_token.detach())
    outputs = types.SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    acc = types.SimpleNamespace(device="cpu", gather=_identity, gather_for_metrics=_identity)
    fake_self = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=acc, aux_loss_enabled=False,
        precompute_ref_logps=True, ld_alpha=None, f_divergence_type="reverse_kl", loss_types=[loss_type],
        loss_weights=[1.0], beta=beta, label_smoothing=eps, use_weighting=False,
        _metrics={"train": collections.defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    loss = DPOTrainer._compute_loss(fake_self, lambda **kw: outputs, inputs, False)
    return loss, fake_self._metrics["train"]


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("hinge", 0.0), ("robust", 0.1), ("ipo", 0.0)])
def test_dpo_matches_trl(loss_type, eps):
    pytest.importorskip("trl")
    torch.manual_seed(0)
    B, T, beta = 4, 6, 0.3
    completion_mask = torch.zeros(2 * B, T + 1, dtype=torch.long)  # one prompt token, then the completion
    for row, length in enumerate([6, 3, 5, 1, 2, 6, 4, 4]):
        completion_mask[row, 1:1 + length] = 1
    shift_mask = completion_mask[:, 1:].double()
    tok = ((-3 * torch.rand(2 * B, T, dtype=torch.float64)) * shift_mask).requires_grad_()
    ref_c, ref_r = -10 * torch.rand(B, dtype=torch.float64), -10 * torch.rand(B, dtype=torch.float64)
    trl_loss, trl_metrics = _trl_dpo_loss(loss_type, beta, eps, tok[:B], tok[B:], ref_c, ref_r, completion_mask)
    (trl_grad,) = torch.autograd.grad(trl_loss, tok)

    seq = tok.sum(-1)
    refs = torch.cat([ref_c, ref_r])
    if loss_type == "ipo":  # TRL's IPO works on per-token average log-ratios
        counts = completion_mask.sum(-1)
        seq, refs = seq / counts, refs / counts
    losses, chosen, rejected = dpo_loss(seq[:B], seq[B:], refs[:B], refs[B:], beta, loss_type, eps)
    (grad,) = torch.autograd.grad(losses.mean(), tok)
    torch.testing.assert_close(losses.mean(), trl_loss)
    torch.testing.assert_close(grad, trl_grad)
    if loss_type != "ipo":  # TRL's logged rewards use the summed log-ratios
        m = preference_metrics(chosen, rejected)
        assert m["accuracy"] == pytest.approx(trl_metrics["rewards/accuracies"][0])
        assert m["margin"] == pytest.approx(trl_metrics["rewards/margins"][0])
        assert m["chosen"] == pytest.approx(trl_metrics["rewards/chosen"][0])


@pytest.mark.parametrize("with_margin,center", [(False, None), (True, None), (True, 0.01)])
def test_bradley_terry_matches_trl_reward_trainer(with_margin, center):
    pytest.importorskip("trl")
    from trl.trainer.reward_trainer import RewardTrainer

    torch.manual_seed(1)
    logits = torch.randn(10, 1, dtype=torch.float64, requires_grad=True)  # [chosen x5; rejected x5]
    margin = torch.rand(5, dtype=torch.float64)
    inputs = {"input_ids": torch.zeros(10, 3, dtype=torch.long), "attention_mask": torch.ones(10, 3)}
    if with_margin:
        inputs["margin"] = margin
    acc = types.SimpleNamespace(gather=_identity, gather_for_metrics=_identity)
    fake_self = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=acc,
        args=types.SimpleNamespace(center_rewards_coefficient=center),
        _metrics={"train": collections.defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    trl_loss = RewardTrainer.compute_loss(fake_self, lambda **kw: types.SimpleNamespace(logits=logits), inputs)
    rewards = logits.squeeze(-1)
    ours = bradley_terry_loss(rewards[:5], rewards[5:], margin if with_margin else None, center or 0.0)
    torch.testing.assert_close(ours, trl_loss)
    torch.testing.assert_close(torch.autograd.grad(ours, logits)[0], torch.autograd.grad(trl_loss, logits)[0])
    m = preference_metrics(rewards[:5].detach(), rewards[5:].detach())
    assert m["accuracy"] == pytest.approx(fake_self._metrics["train"]["accuracy"][0])
    assert m["margin"] == pytest.approx(fake_self._metrics["train"]["margin"][0])
