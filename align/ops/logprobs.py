"""Memory-lean token log-probs: lm-head + log-softmax + gather, computed in chunks of tokens.

A plain `log_softmax(hidden @ W.T)` holds a [tokens, vocab] float32 tensor (and another for its
gradient). Here only one [chunk, vocab] block lives at a time, in the forward and in the backward,
which recomputes the block's logits instead of storing them.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, with_entropy):
        # hidden: [N, H], weight: [V, H], bias: [V] | None, targets: [N] (valid ids)
        out = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        entropy = hidden.new_zeros(hidden.shape[0] if with_entropy else 0, dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            logits = _logits(hidden[start:start + chunk_size], weight, bias)
            target = targets[start:start + chunk_size, None]
            lse = logits.logsumexp(-1, keepdim=True)
            out[start:start + chunk_size] = (logits.gather(1, target) - lse)[:, 0]
            if with_entropy:  # H = -sum(p * log p)
                logp = logits.sub_(lse)
                entropy[start:start + chunk_size] = -logp.exp().mul_(logp).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(entropy)
        return out, entropy

    @staticmethod
    def backward(ctx, grad_out, _grad_entropy):
        hidden, weight, bias, targets = ctx.saved_tensors
        grads = _new_grads(ctx, hidden, weight, bias)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            h = hidden[start:start + ctx.chunk_size]
            g = grad_out[start:start + ctx.chunk_size, None]
            # d logp[target] / d logits = onehot(target) - softmax
            grad_logits = _logits(h, weight, bias).softmax(-1).mul_(-g)
            grad_logits.scatter_add_(1, targets[start:start + ctx.chunk_size, None], g)
            _add_chunk_grads(grads, start, grad_logits, h, weight)
        return *_finish_grads(grads, weight, bias), None, None, None


class _ChunkedWeightedLogprobSum(torch.autograd.Function):
    """sum_i weights[i] * logp[i] with its gradient computed during the forward, chunk by chunk
    (the weights are known then, as in SFT's cross-entropy): the backward only scales it, so the
    lm-head runs three matmuls per token (logits, d hidden, d weight) instead of four. Also
    returns the token log-probs and entropies themselves, without gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, weights, chunk_size, with_entropy):
        # hidden: [N, H], weight: [V, H], bias: [V] | None, targets: [N] (valid ids), weights: [N]
        grads = _new_grads(ctx, hidden, weight, bias)
        values = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        entropy = hidden.new_zeros(hidden.shape[0] if with_entropy else 0, dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            h, w = hidden[start:start + chunk_size], weights[start:start + chunk_size, None].float()
            target = targets[start:start + chunk_size, None]
            logp = _logits(h, weight, bias).log_softmax(-1)
            values[start:start + chunk_size] = logp.gather(1, target)[:, 0]
            if with_entropy:
                entropy[start:start + chunk_size] = -logp.exp().mul_(logp).sum(-1)
            if any(g is not None for g in grads):
                grad_logits = logp.exp_().mul_(-w)  # d(w * logp[target]) / d logits = w * (onehot - softmax)
                grad_logits.scatter_add_(1, target, w)
                _add_chunk_grads(grads, start, grad_logits, h, weight)
        ctx.grads = _finish_grads(grads, weight, bias)
        ctx.mark_non_differentiable(values, entropy)
        return (weights.float() * values).sum(), values, entropy

    @staticmethod
    def backward(ctx, grad_total, _grad_values, _grad_entropy):
        grads = tuple(None if g is None else g.mul_(grad_total.to(g.dtype)) for g in ctx.grads)
        ctx.grads = None
        return *grads, None, None, None, None


def _new_grads(ctx, hidden, weight, bias) -> tuple:
    """(d hidden, d weight, d bias) buffers for the inputs that need a gradient, else None; the
    weight and bias sums accumulate in float32."""
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    return (torch.empty_like(hidden) if need_h else None,
            torch.zeros_like(weight, dtype=torch.float32) if need_w else None,
            torch.zeros_like(bias, dtype=torch.float32) if need_b else None)


def _add_chunk_grads(grads: tuple, start: int, grad_logits: torch.Tensor, h: torch.Tensor,
                     weight: torch.Tensor) -> None:
    """One chunk's share: grad_logits [n, V] -> rows start:start+n of d hidden, += d weight, d bias."""
    grad_h, grad_w, grad_b = grads
    if grad_h is not None:
        grad_h[start:start + len(h)] = (grad_logits.to(weight.dtype) @ weight).to(grad_h.dtype)
    if grad_w is not None:
        grad_w.addmm_(grad_logits.T, h.float())
    if grad_b is not None:
        grad_b += grad_logits.sum(0)


def _finish_grads(grads: tuple, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    grad_h, grad_w, grad_b = grads
    return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype))


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[n, H] -> [n, V] float32 logits."""
    return torch.nn.functional.linear(hidden, weight, bias).float()


def token_logprobs(hidden: torch.Tensor, lm_head: torch.nn.Linear, labels: torch.Tensor,
                   chunk_size: int = 1024, temperature: float = 1.0, return_entropy: bool = False):
    """Log-probability of each label under the model, chunked over tokens.

    hidden: [B, T, H] final hidden states; labels: [B, T] next-token ids aligned with `hidden`
    (labels[b, t] is the token that follows position t), IGNORE_INDEX where there is none.
    Returns [B, T] float32 log-probs, 0 where the label is ignored. Only labelled positions reach
    the lm-head, so prompt and padding tokens cost nothing here. With return_entropy, also the
    [B, T] entropy of each labelled position's next-token distribution (no gradient).
    """
    mask = labels != IGNORE_INDEX
    selected = hidden[mask]
    if temperature != 1.0:
        selected = selected / temperature
    values, entropy = _ChunkedLogprobs.apply(selected, lm_head.weight, lm_head.bias, labels[mask], chunk_size,
                                             return_entropy)
    out = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
    out = out.masked_scatter(mask, values)
    if return_entropy:
        return out, torch.zeros_like(out).masked_scatter(mask, entropy)
    return out


def weighted_logprob_sum(hidden: torch.Tensor, lm_head: torch.nn.Linear, labels: torch.Tensor,
                         weights: torch.Tensor, chunk_size: int = 1024, return_entropy: bool = False):
    """sum(weights * log-probs of labels), a scalar, for losses whose per-token weights are known
    before the forward (SFT: 1 / trained tokens of the step; on-policy GRPO: advantage x norm).
    Same value and gradient as `(weights * token_logprobs(hidden, lm_head, labels)).sum()`, but
    the gradient is computed in the forward's chunk loop, so the logits are never recomputed.

    hidden: [B, T, H]; labels: [B, T] (IGNORE_INDEX where there is none); weights: [B, T], no grad.
    Returns (the sum, the [B, T] log-probs without gradient, 0 where the label is ignored, and the
    [B, T] next-token entropies with return_entropy, else None).
    """
    mask = labels != IGNORE_INDEX
    total, values, entropy = _ChunkedWeightedLogprobSum.apply(hidden[mask], lm_head.weight, lm_head.bias,
                                                              labels[mask], weights[mask].detach(), chunk_size,
                                                              return_entropy)
    out = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
    return (total, out.masked_scatter(mask, values),
            out.masked_scatter(mask, entropy) if return_entropy else None)
