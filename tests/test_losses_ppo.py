import statistics

import pytest
import torch

from align.losses import (aggregate_loss, clipped_policy_loss, gae, missing_eos_penalty, ppo_policy_loss,
                          ppo_value_loss, token_level_rewards, whiten)

F64 = torch.float64


def t(x, grad=False):
    return torch.tensor(x, dtype=F64, requires_grad=grad)


MASK = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])


def test_missing_eos_penalty():
    out = missing_eos_penalty(t([1.0, 2.0, -1.0]), torch.tensor([True, False, False]), 3.0)
    assert out.tolist() == [1.0, -1.0, -4.0]


def test_token_level_rewards_by_hand():
    logps = t([[-1.0, -2.0, -9.0, -9.0], [-1.0, -1.0, -1.0, -1.0], [-0.5, -9.0, -9.0, -9.0]])
    ref = t([[-1.5, -1.0, 0.0, 0.0], [-1.0, -2.0, -1.0, 0.0], [-1.0, 0.0, 0.0, 0.0]])
    out = token_level_rewards(t([10.0, 20.0, 30.0]), logps, ref, MASK, kl_coef=0.1)
    expected = t([[-0.05, 0.1 + 10.0, 0, 0], [0, -0.1, 0, 0.1 + 20.0], [-0.05 + 30.0, 0, 0, 0]])
    torch.testing.assert_close(out, expected)


def test_token_level_rewards_empty_row_gets_nothing():
    mask = torch.tensor([[0, 0], [1, 0]])
    out = token_level_rewards(t([5.0, 7.0]), torch.zeros(2, 2, dtype=F64), torch.zeros(2, 2, dtype=F64), mask, 0.1)
    assert out.tolist() == [[0.0, 0.0], [7.0, 0.0]]


def _gae_reference(rewards, values, length, gamma, lam):
    """Plain-python GAE over one row's first `length` steps; the value after the last step is 0."""
    adv, running = [0.0] * length, 0.0
    for step in reversed(range(length)):
        next_value = values[step + 1] if step + 1 < length else 0.0
        running = rewards[step] + gamma * next_value - values[step] + gamma * lam * running
        adv[step] = running
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_matches_plain_python(gamma, lam):
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    adv, ret = gae(rewards, values, MASK, gamma, lam)
    for row, length in enumerate(MASK.sum(-1).tolist()):
        expected = _gae_reference(rewards[row].tolist(), values[row].tolist(), length, gamma, lam)
        torch.testing.assert_close(adv[row, :length], t(expected))
        torch.testing.assert_close(ret[row, :length], t(expected) + values[row, :length])
    assert (adv[MASK == 0] == 0).all() and (ret[MASK == 0] == 0).all()


def test_gae_closed_forms():
    rewards, values = t([[1.0, 0.0, 2.0]]), t([[0.5, 0.25, 1.0]])
    mask = torch.ones(1, 3)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)  # Monte Carlo: returns = reward-to-go
    torch.testing.assert_close(ret, t([[3.0, 2.0, 2.0]]))
    torch.testing.assert_close(adv, t([[2.5, 1.75, 1.0]]))
    adv, _ = gae(rewards, values, mask, gamma=0.5, lam=0.0)  # one-step TD residuals
    torch.testing.assert_close(adv, t([[1 + 0.5 * 0.25 - 0.5, 0.5 * 1.0 - 0.25, 2.0 - 1.0]]))


def test_kl_shaped_rewards_and_gae_returns_by_hand():
    """The experience of PPO for two rows, written out: per-token reward -kl_coef * (logp - ref_logp),
    plus the score at the last token; then GAE with gamma = 0.9, lam = 0.8 (gamma * lam = 0.72)."""
    logps = t([[-1.0, -0.5, -2.0], [-0.3, -0.7, -9.0]])
    ref = t([[-1.5, -0.5, -1.0], [-0.1, -1.7, 0.0]])  # logp - ref: [0.5, 0, -1] and [-0.2, 1.0]
    values = t([[0.2, 0.4, 0.5], [0.1, -0.2, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards = token_level_rewards(t([1.0, -0.5]), logps, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, t([[-0.05, 0.0, 0.1 + 1.0], [0.02, -0.1 - 0.5, 0.0]]))
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: deltas 1.1 - 0.5 = 0.6; 0 + 0.9 * 0.5 - 0.4 = 0.05; -0.05 + 0.9 * 0.4 - 0.2 = 0.11
    a0 = [0.11 + 0.72 * (0.05 + 0.72 * 0.6), 0.05 + 0.72 * 0.6, 0.6]
    # row 1: deltas -0.6 + 0.2 = -0.4; 0.02 + 0.9 * (-0.2) - 0.1 = -0.26 (the padded value 7 is never read)
    a1 = [-0.26 + 0.72 * -0.4, -0.4, 0.0]
    torch.testing.assert_close(advantages, t([a0, a1]))
    torch.testing.assert_close(advantages, t([[0.45704, 0.482, 0.6], [-0.548, -0.4, 0.0]]))
    torch.testing.assert_close(returns, t([[0.65704, 0.882, 1.1], [-0.448, -0.6, 0.0]]))


def test_whiten_masked_stats():
    torch.manual_seed(1)
    x = torch.randn(3, 4, dtype=F64) * 3 + 2
    out = whiten(x, MASK)
    valid = out[MASK.bool()].tolist()
    assert statistics.mean(valid) == pytest.approx(0.0, abs=1e-9)
    assert statistics.stdev(valid) == pytest.approx(1.0, abs=1e-6)  # unbiased
    assert (out[MASK == 0] == 0).all()
    kept = whiten(x, MASK, shift_mean=False)[MASK.bool()]
    assert kept.mean().item() == pytest.approx(x[MASK.bool()].mean().item())


def test_whiten_by_hand_and_single_token():
    out = whiten(t([[1.0, 3.0, 100.0]]), torch.tensor([[1, 1, 0]]), eps=0.0)  # mean 2, unbiased var 2
    torch.testing.assert_close(out, t([[-1 / 2 ** 0.5, 1 / 2 ** 0.5, 0.0]]))
    assert whiten(t([[4.0, 5.0]]), torch.tensor([[1, 0]])).tolist() == [[0.0, 0.0]]


def test_ppo_value_loss_by_hand():
    values = t([[1.0, 0.0, 2.0, 9.0]], grad=True)
    old = t([[0.5, 0.0, 1.0, 0.0]])
    returns = t([[0.0, 1.0, 3.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clipfrac = ppo_value_loss(values, old, returns, mask, clip_range=0.2)
    # token 0: max((1-0)^2, (0.7-0)^2) = 1; token 1: 1; token 2: max(1, (1.2-3)^2=3.24) = 3.24 (clipped)
    assert loss.item() == pytest.approx(0.5 * (1 + 1 + 3.24) / 3)
    assert clipfrac == pytest.approx(1 / 3)
    (grad,) = torch.autograd.grad(loss, values)
    torch.testing.assert_close(grad, t([[1 / 3, -1 / 3, 0.0, 0.0]]))  # clipped token has no gradient


def test_ppo_policy_loss_is_token_mean_of_clipped_surrogate_with_token_advantages():
    torch.manual_seed(2)
    logps = (-torch.rand(3, 4, dtype=F64)).requires_grad_()
    old = logps.detach() + 0.3 * torch.randn(3, 4, dtype=F64)
    adv = torch.randn(3, 4, dtype=F64)
    loss, metrics = ppo_policy_loss(logps, old, adv, MASK, clip_range=0.2)
    ratio = (logps - old).exp()
    per_token = torch.max(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    torch.testing.assert_close(loss, per_token[MASK.bool()].mean())
    _, clip_metrics = clipped_policy_loss(logps, old, adv, MASK, 0.2, 0.2)
    assert {k: metrics[k] for k in clip_metrics} == clip_metrics
    assert metrics["approx_kl"] == pytest.approx(0.5 * ((logps - old)[MASK.bool()] ** 2).mean().item())
    torch.testing.assert_close(loss, aggregate_loss(per_token, MASK, "bnpo"))
