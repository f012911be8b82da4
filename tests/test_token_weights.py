"""The token-weight functions of the losses linear in the log-probs equal their autograd gradient:
the fused path (`Trainer.linear_loss`) trains with them, so a wrong one would be a silent bug."""

import pytest
import torch

from align.losses.policy_gradient import grpo_loss, on_policy_token_weights
from align.losses.sft import masked_nll, masked_nll_token_weights


def autograd_weights(loss_of_logprobs, shape) -> torch.Tensor:
    """d loss / d logps at random log-probs (a linear loss has the same gradient everywhere)."""
    logps = (-torch.rand(shape, dtype=torch.float64) * 5).requires_grad_()
    (grad,) = torch.autograd.grad(loss_of_logprobs(logps), logps)
    return grad


@pytest.mark.parametrize("num_items", [None, 37.0])
def test_masked_nll_token_weights(num_items):
    torch.manual_seed(0)
    mask = torch.rand(3, 8) > 0.3
    want = autograd_weights(lambda logps: masked_nll(logps, mask, num_items), mask.shape)
    torch.testing.assert_close(masked_nll_token_weights(mask, num_items).double(), want, atol=0, rtol=1e-6)


@pytest.mark.parametrize("norm", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("num_items", [None, 29.0])
def test_on_policy_grpo_token_weights(norm, num_items):
    """On-policy (old log-probs = the log-probs themselves), beta 0, token ratios."""
    torch.manual_seed(1)
    mask = (torch.rand(4, 7) > 0.25).double()
    advantages = torch.randn(4, dtype=torch.float64)
    loss = lambda logps: grpo_loss(logps, None, None, advantages, mask, eps_low=0.2, eps_high=0.28, norm=norm,
                                   max_completion_length=9, num_items=num_items)[0]
    want = autograd_weights(loss, mask.shape)
    got = on_policy_token_weights(advantages, mask, norm, max_completion_length=9, num_items=num_items)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("norm", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_on_policy_grpo_with_kl_token_weights(norm):
    """With the k3 KL (beta > 0) the loss is not linear in the log-probs: its gradient at the current
    log-probs is constant + exp_coefficient * exp(ref - logp), which the fused path evaluates there."""
    from align.losses.policy_gradient import k3_token_weights

    torch.manual_seed(2)
    mask = (torch.rand(4, 7) > 0.25).double()
    advantages, beta = torch.randn(4, dtype=torch.float64), 0.04
    logps = -torch.rand(4, 7, dtype=torch.float64) * 5
    ref = logps + torch.randn(4, 7, dtype=torch.float64) * 0.3
    at = logps.clone().requires_grad_()
    loss = grpo_loss(at, None, ref, advantages, mask, beta=beta, norm=norm, max_completion_length=9, num_items=29.0)[0]
    (want,) = torch.autograd.grad(loss, at)
    constant, exp_coefficient = k3_token_weights(mask, beta, norm, max_completion_length=9, num_items=29.0)
    linear = on_policy_token_weights(advantages, mask, norm, max_completion_length=9, num_items=29.0)
    got = linear + constant + exp_coefficient * torch.exp(ref - logps)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-9)
