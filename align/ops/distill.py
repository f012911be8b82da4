"""The distillation loss over the full vocabulary, chunked over tokens.

At every trained position both models' logits over the whole vocabulary enter the divergence
(`align.losses.distill`). Materialising them for a batch costs 2 x [tokens, vocab] float32 (and
as much again for the gradient): 2 x 4096 tokens x 152k vocab is 5 GB. Here the blocks of one
chunk of labelled positions live at a time: the student's and the teacher's lm-heads (plus the
family's logit post-processing and the temperature, `LogitTransform`) make a block each, their
log-softmaxes and the divergence's terms more (`CHUNK_BLOCKS` at most), and, since each token's weight in the loss is
known before the forward (1 / the step's trained tokens), the student's gradient too: the
backward only scales the gradients made here, so no logits are recomputed. The teacher gets no
gradient (its hidden states are taken without one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from align.losses.distill import divergence_and_grad
from align.ops.logprobs import (LogitTransform, add_chunk_grads, chain_derivative, default_chunk_size,
                                finish_grads, label_positions)


@dataclass
class DistillOutput:
    """What `chunked_divergence` returns: `total` = sum(token_weights * divergence), a scalar whose
    gradient reaches the student only; the rest per token [B, T] float32 without gradient, 0 where
    the label is ignored: the divergence, the student's entropy (at the temperature), and the
    log-probs of the label token under the student and under the teacher (at the temperature)."""

    total: torch.Tensor
    divergence: torch.Tensor
    entropy: torch.Tensor
    student_logps: torch.Tensor
    teacher_logps: torch.Tensor


CHUNK_BLOCKS = 8
"""[chunk, vocab] float32 blocks a chunk holds at once at most (the generalized JSD, with a
soft-capped student; the reverse KL ~5, the forward KL ~6: tests/test_distill.py), which sizes its
chunks on a GPU (`default_chunk_size`): 256 tokens at a 152k vocabulary, ~1.2 GiB."""


def _accumulation_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[n, H] -> [n, V] lm-head outputs, computed in the head's dtype, then at least float32."""
    z = torch.nn.functional.linear(hidden, weight, bias)
    return z.to(_accumulation_dtype(z))


class _ChunkedDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, targets, token_weights,
                transform, teacher_transform, beta, chunk_size, need_grad):
        # hidden: [N, H], weight: [V, H], bias: [V] | None (the student's); teacher_hidden: [N, H_t],
        # teacher_weight: [V, H_t], teacher_bias: [V] | None; targets: [N]; token_weights: [N]
        n, dtype = hidden.shape[0], _accumulation_dtype(weight)
        need_h, need_w, need_b = (need_grad and needs for needs in ctx.needs_input_grad[:3])
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=dtype) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=dtype) if need_b else None
        divergence, entropy, student_logps, teacher_logps = (hidden.new_zeros(n, dtype=dtype) for _ in range(4))
        needs_grads = need_h or need_w or need_b
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            h, target = hidden[start:end], targets[start:end, None]
            z = _head(h, weight, bias)  # (a soft-cap's derivative, another block, only where a gradient is made)
            z, derivative = transform(z) if needs_grads else (transform.logits(z), None)
            zt = teacher_transform.logits(_head(teacher_hidden[start:end], teacher_weight, teacher_bias))
            log_ps, log_pt = z.log_softmax(-1), zt.log_softmax(-1)
            del z, zt
            student_logps[start:end] = log_ps.gather(1, target)[:, 0]
            teacher_logps[start:end] = log_pt.gather(1, target)[:, 0]
            value, grad, chunk_entropy = divergence_and_grad(log_ps, log_pt, beta)
            divergence[start:end], entropy[start:end] = value, chunk_entropy
            if needs_grads:
                grad = chain_derivative(grad.mul_(token_weights[start:end, None].to(grad.dtype)), derivative)
                add_chunk_grads((grad_h, grad_w, grad_b), start, grad, h, weight)
            del log_ps, log_pt, grad, derivative  # (so the next chunk's blocks do not come on top of these)
        ctx.grads = finish_grads((grad_h, grad_w, grad_b), weight, bias)
        ctx.mark_non_differentiable(divergence, entropy, student_logps, teacher_logps)
        total = (token_weights.to(dtype) * divergence).sum()
        return total, divergence, entropy, student_logps, teacher_logps

    @staticmethod
    def backward(ctx, grad_total, *_):
        grads = tuple(None if g is None else g.mul_(grad_total.to(g.dtype)) for g in ctx.grads)
        ctx.grads = None
        return *grads, *(None,) * 10


def chunked_divergence(hidden: torch.Tensor, lm_head: torch.nn.Module, teacher_hidden: torch.Tensor,
                       teacher_head: torch.nn.Module, labels: torch.Tensor, token_weights: torch.Tensor | None = None,
                       beta: float = 1.0, temperature: float = 1.0, transform: LogitTransform | None = None,
                       teacher_transform: LogitTransform | None = None, positions: torch.Tensor | None = None,
                       chunk_size: int | None = None) -> DistillOutput:
    """Per-token divergence between the student's and the teacher's next-token distributions over
    the full vocabulary, and sum(token_weights * divergence) with its gradient, chunk by chunk.

    hidden: [B, T, H] the student's last hidden states (with gradient); teacher_hidden: [B, T, H_t]
    the teacher's on the same tokens (no gradient; H_t may differ from H); lm_head, teacher_head:
    their output embeddings (weights [V, H] and [V_t, H_t]: the vocabularies must be the same
    tokens; when the matrices differ in size, as padded vocabularies do, both are cut to the
    shorter one, which must cover the tokenizer); labels: [B, T] next-token ids, IGNORE_INDEX where
    there is no label (only labelled positions reach the lm-heads); token_weights: [B, T] each
    token's weight in the loss (default 1), no gradient; beta: TRL's (1 reverse KL, 0 forward KL,
    else the generalized JSD, `align.losses.distill`); temperature divides both models' logits
    after their own post-processing (`transform`, `teacher_transform`: `align.models.head.logit_transform`);
    positions: `label_positions(labels)` if the caller has it (a GPU waits for it otherwise);
    chunk_size: positions per block (default `default_chunk_size`).

    The gradient of `total` (to hidden, the student's lm-head weight and bias) is computed during
    the forward when grad mode is on; `backward` scales it by the incoming gradient.
    """
    if positions is None:
        positions = label_positions(labels)
    positions = positions.to(hidden.device)
    selected = hidden.flatten(0, 1).index_select(0, positions)
    teacher_selected = teacher_hidden.detach().flatten(0, 1).index_select(0, positions.to(teacher_hidden.device))
    targets = labels.reshape(-1).index_select(0, positions)
    if token_weights is None:
        weights = torch.ones(len(positions), dtype=torch.float32, device=hidden.device)
    else:
        weights = token_weights.detach().reshape(-1).index_select(0, positions).to(hidden.device)
    weight, bias = lm_head.weight, lm_head.bias
    teacher_weight, teacher_bias = teacher_head.weight.detach(), teacher_head.bias
    teacher_bias = None if teacher_bias is None else teacher_bias.detach()
    vocab = min(weight.shape[0], teacher_weight.shape[0])
    if weight.shape[0] != vocab:
        weight, bias = weight[:vocab], None if bias is None else bias[:vocab]
    if teacher_weight.shape[0] != vocab:
        teacher_weight, teacher_bias = teacher_weight[:vocab], None if teacher_bias is None else teacher_bias[:vocab]
    teacher_selected = teacher_selected.to(teacher_weight.device)
    transform = _with_temperature(transform, temperature)
    teacher_transform = _with_temperature(teacher_transform, temperature)
    chunk_size = chunk_size or default_chunk_size(selected.device, vocab, blocks=CHUNK_BLOCKS)
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (selected, weight, bias))
    total, *values = _ChunkedDivergence.apply(selected, weight, bias, teacher_selected, teacher_weight, teacher_bias,
                                              targets, weights, transform, teacher_transform, float(beta),
                                              chunk_size, need_grad)
    return DistillOutput(total, *(_scatter(v, positions, labels) for v in values))


def _scatter(values: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """values [n] at flat positions [n] of a [B, T] tensor shaped like labels, 0 elsewhere."""
    out = torch.zeros(labels.numel(), dtype=values.dtype, device=values.device)
    return out.index_put((positions,), values).view(labels.shape)


def _with_temperature(transform: LogitTransform | None, temperature: float) -> LogitTransform:
    transform = transform or LogitTransform()
    return LogitTransform(transform.scale, transform.softcap, temperature)
