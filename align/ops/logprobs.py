"""Memory-lean token log-probs: lm-head + log-softmax + gather, computed in chunks of tokens.

A plain `log_softmax(hidden @ W.T)` holds a [tokens, vocab] float32 tensor (and another for its
gradient). Here only one chunk's [chunk, vocab] blocks live at a time (about two), in the forward and
in the backward, which recomputes the chunk's logits instead of storing them.

The logits are the model's own: `LogitTransform` applies what a family does after its lm-head
(Gemma-2/3's tanh soft-cap, Cohere's and Granite's scaling) and the sampling temperature, in the
order the model and the sampler do, so the log-probs equal `log_softmax(model(...).logits / T)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
CHUNK_SIZE = 1024
"""Tokens per lm-head block on a CPU when a caller gives no chunk size."""
ACCELERATOR_CHUNK_BYTES = 1 << 30
"""On a GPU, the float32 [chunk, vocab] blocks one chunk holds at once come to about this many
bytes: few large chunks, as each chunk costs a handful of kernel launches whatever its size, yet
small beside a long row's activations, on top of which the last chunks of the forward run. The
log-prob ops hold about two blocks at once (a log-softmax's input and output; a soft-capped model's
derivative a third where a gradient is made; tests/test_logprobs.py), so their blocks are ~512 MiB: ~1.2
GiB at the 152k vocabulary of Qwen2.5 (1024-token chunks), where 1 GiB blocks had held ~3.6 GiB
before the blocks were released early. Distillation's divergences hold up to eight
(`align.ops.distill`). Above a 131k vocabulary the token floor makes chunks larger than this."""


@dataclass(frozen=True)
class TokenWeights:
    """Gradient weights of a weighted log-prob sum whose weights may depend on each token's own
    log-prob l: weight = constant + exp_coefficient * exp(reference - l), all [B, T]. The second
    term is what GRPO's k3 KL adds (d k3 / d l = 1 - exp(reference - l)); it is evaluated in the
    forward's chunk loop, where l is known, so such a loss keeps the fused path."""

    constant: torch.Tensor
    exp_coefficient: torch.Tensor | None = None
    reference: torch.Tensor | None = None

    def map(self, fn) -> "TokenWeights":
        """The same weights with `fn` applied to each tensor (e.g. a change of layout)."""
        return TokenWeights(*(None if t is None else fn(t) for t in (self.constant, self.exp_coefficient,
                                                                       self.reference)))


def default_chunk_size(device: torch.device, vocab_size: int, blocks: int = 2) -> int:
    """Tokens per lm-head chunk: CHUNK_SIZE on a CPU; on an accelerator as many as keep the `blocks`
    [chunk, vocab] float32 blocks a chunk holds at once within ACCELERATOR_CHUNK_BYTES, never fewer
    than CHUNK_SIZE * 2 / blocks (1024 tokens for the log-prob ops' two blocks)."""
    if device.type == "cpu":
        return CHUNK_SIZE
    return max(CHUNK_SIZE * 2 // blocks, ACCELERATOR_CHUNK_BYTES // (blocks * 4 * vocab_size))


@dataclass(frozen=True)
class LogitTransform:
    """logits = softcap(scale * z) / temperature, where z = W h + b is the lm-head's output and
    softcap(x) = cap * tanh(x / cap) (no cap: the identity).

    scale: Cohere's `logit_scale` (multiplies), Granite's 1 / `logits_scaling`; softcap: Gemma-2/3's
    `final_logit_softcapping`; temperature: sampling temperature (divides the final logits, so an
    lm-head bias is divided too, as in the sampler).
    """

    scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"softcap must be > 0, got {self.softcap}")

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None and self.temperature == 1.0

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """z [n, V] float32 (overwritten) -> logits [n, V], as `__call__` gives them, without the
        derivative (a soft-cap's is another [n, V] block) for a pass that takes no gradient."""
        if self.softcap is None:
            factor = self.scale / self.temperature
            return z.mul_(factor) if factor != 1.0 else z
        return z.mul_(self.scale / self.softcap).tanh_().mul_(self.softcap / self.temperature)

    def __call__(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        """z [n, V] float32 (overwritten) -> (logits [n, V], d logits / d z: a [n, V] tensor or a float)."""
        if self.softcap is None:
            return self.logits(z), self.scale / self.temperature
        t = z.mul_(self.scale / self.softcap).tanh_()
        derivative = (1 - t * t).mul_(self.scale / self.temperature)
        return t.mul(self.softcap / self.temperature), derivative


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, transform, chunk_size, with_entropy):
        # hidden: [N, H], weight: [V, H], bias: [V] | None, targets: [N] (valid ids)
        out = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        entropy = hidden.new_zeros(hidden.shape[0] if with_entropy else 0, dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            logits = transform.logits(_lm_head(hidden[start:start + chunk_size], weight, bias))
            target = targets[start:start + chunk_size, None]
            lse = logits.logsumexp(-1, keepdim=True)
            out[start:start + chunk_size] = (logits.gather(1, target) - lse)[:, 0]
            if with_entropy:  # H = -sum(p * log p)
                logp = logits.sub_(lse)
                entropy[start:start + chunk_size] = -logp.exp().mul_(logp).sum(-1)
                del logp  # (logits' block, written in place)
            del logits  # (so the next chunk's blocks do not come on top of this one's)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.transform, ctx.chunk_size = transform, chunk_size
        ctx.autocast = _autocast_state(hidden.device.type)
        ctx.mark_non_differentiable(entropy)
        return out, entropy

    @staticmethod
    def backward(ctx, grad_out, _grad_entropy):
        hidden, weight, bias, targets = ctx.saved_tensors
        grads = _new_grads(ctx, hidden, weight, bias)
        # autograd runs backward outside the forward's autocast: recompute the logits (and run the
        # gradient matmuls) under the same autocast as the forward, as a plain lm-head's backward does
        device_type, dtype = ctx.autocast
        with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            for start in range(0, hidden.shape[0], ctx.chunk_size):
                h = hidden[start:start + ctx.chunk_size]
                g = grad_out[start:start + ctx.chunk_size, None]
                logits, derivative = ctx.transform(_lm_head(h, weight, bias))
                # d logp[target] / d logits = onehot(target) - softmax
                grad_logits = logits.softmax(-1).mul_(-g)
                del logits  # (one [chunk, V] float32 block less while the gradient GEMMs run)
                grad_logits.scatter_add_(1, targets[start:start + ctx.chunk_size, None], g)
                add_chunk_grads(grads, start, chain_derivative(grad_logits, derivative), h, weight)
                del grad_logits, derivative  # (so the next chunk's blocks do not come on top of these)
        return *finish_grads(grads, weight, bias), None, None, None, None


class _ChunkedWeightedLogprobSum(torch.autograd.Function):
    """sum_i w_i * logp[i] with its gradient computed during the forward, chunk by chunk (the
    weights are known then, as in SFT's cross-entropy): the backward only scales it, so the
    lm-head runs three matmuls per token (logits, d hidden, d weight) instead of four. Also
    returns the token log-probs and entropies themselves, without gradient.
    w_i = weights[i] + exp_coefficient[i] * exp(reference[i] - logp[i]) (`TokenWeights`), taken
    as constants: the gradient is sum_i w_i * d logp[i]."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, weights, exp_coefficient, reference, transform, chunk_size,
                with_entropy, grad_mode):
        # hidden: [N, H], weight: [V, H], bias: [V] | None, targets: [N] (valid ids); weights,
        # exp_coefficient, reference: [N] float32 (the last two None for weights known beforehand);
        # grad_mode: the caller's (a forward runs in no-grad mode, and needs_input_grad ignores it)
        grads = _new_grads(ctx, hidden, weight, bias) if grad_mode else (None, None, None)
        makes_grads = any(g is not None for g in grads)
        values = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        used = hidden.new_empty(hidden.shape[0], dtype=torch.float32)  # the weights w_i
        entropy = hidden.new_zeros(hidden.shape[0] if with_entropy else 0, dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            h, w = hidden[start:end], weights[start:end].float()
            target = targets[start:end, None]
            logits = _lm_head(h, weight, bias)
            logits, derivative = transform(logits) if makes_grads else (transform.logits(logits), None)
            logp = logits.log_softmax(-1)
            del logits  # (one [chunk, V] float32 block less for the rest of the chunk: its peak under autocast)
            values[start:end] = logp.gather(1, target)[:, 0]
            if exp_coefficient is not None:
                w = w + exp_coefficient[start:end] * torch.exp(reference[start:end] - values[start:end])
            used[start:end] = w
            w = w[:, None]
            if with_entropy:
                entropy[start:start + chunk_size] = -logp.exp().mul_(logp).sum(-1)
            if makes_grads:
                grad_logits = logp.exp_().mul_(-w)  # d(w * logp[target]) / d logits = w * (onehot - softmax)
                grad_logits.scatter_add_(1, target, w)
                add_chunk_grads(grads, start, chain_derivative(grad_logits, derivative), h, weight)
                del grad_logits  # (logp's block, written in place)
            del logp, derivative  # (so the next chunk's blocks do not come on top of these)
        ctx.grads = finish_grads(grads, weight, bias)
        ctx.mark_non_differentiable(values, entropy)
        return (used * values).sum(), values, entropy

    @staticmethod
    def backward(ctx, grad_total, _grad_values, _grad_entropy):
        grads = tuple(None if g is None else g.mul_(grad_total.to(g.dtype)) for g in ctx.grads)
        ctx.grads = None
        return *grads, None, None, None, None, None, None, None, None


def _new_grads(ctx, hidden, weight, bias) -> tuple:
    """(d hidden, d weight, d bias) buffers for the inputs that need a gradient, else None; the
    weight and bias sums accumulate in float32."""
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    return (torch.empty_like(hidden) if need_h else None,
            torch.zeros_like(weight, dtype=torch.float32) if need_w else None,
            torch.zeros_like(bias, dtype=torch.float32) if need_b else None)


def _autocast_state(device_type: str) -> tuple[str, torch.dtype | None]:
    """(device type, the autocast dtype there, None when autocast is off)."""
    return device_type, torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def add_weight_grad(grad_w: torch.Tensor, grad_out: torch.Tensor, inputs: torch.Tensor) -> None:
    """grad_w [V, H] (float32) += grad_out.T [V, n] @ inputs [n, H]: under autocast a GEMM in its
    dtype (bf16 on tensor cores, what autocast gives a plain lm-head's weight gradient; an in-place
    `addmm_` is not autocast and would run in float32, ~15x slower on a GPU), else in float32."""
    if torch.is_autocast_enabled(inputs.device.type) and inputs.dtype != torch.float64:  # (autocast leaves fp64 be)
        grad_w += torch.mm(grad_out.T, inputs)
    else:
        grad_w.addmm_(grad_out.T, inputs.to(grad_w.dtype))


def add_chunk_grads(grads: tuple, start: int, grad_logits: torch.Tensor, h: torch.Tensor,
                    weight: torch.Tensor) -> None:
    """One chunk's share of (d hidden, d weight, d bias), each None where not needed (the lm-head
    ops of logprobs and distill share it): grad_logits [n, V] float32 (float64 for float64 inputs)
    -> rows start:start+n of d hidden, += d weight, d bias. Under autocast grad_logits is cast to
    its dtype once for both GEMMs, as autocast would cast it for each, so a 16-bit weight in
    another dtype sees the gradient rounded once, as a plain lm-head's backward does."""
    grad_h, grad_w, grad_b = grads
    if grad_b is not None:
        grad_b += grad_logits.sum(0)
    autocast = torch.is_autocast_enabled(h.device.type) and h.dtype != torch.float64  # (autocast leaves fp64 be)
    if autocast:
        grad_logits = grad_logits.to(torch.get_autocast_dtype(h.device.type))
    if grad_h is not None:
        product = grad_logits @ weight if autocast else grad_logits.to(weight.dtype) @ weight
        grad_h[start:start + len(h)] = product.to(grad_h.dtype)
    if grad_w is not None:
        add_weight_grad(grad_w, grad_logits, h)


def finish_grads(grads: tuple, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    """The accumulated (d hidden, d weight, d bias) in the dtypes of the inputs."""
    grad_h, grad_w, grad_b = grads
    return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype))


def _lm_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[n, H] -> [n, V] float32 lm-head outputs (in the head's dtype, then upcast, as the model does)."""
    return torch.nn.functional.linear(hidden, weight, bias).float()


def chain_derivative(grad_logits: torch.Tensor, derivative: torch.Tensor | float) -> torch.Tensor:
    """d loss / d logits [n, V] -> d loss / d (lm-head output), in place."""
    return grad_logits if isinstance(derivative, float) and derivative == 1.0 else grad_logits.mul_(derivative)


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """[n] flat indices into labels [B, T] of the labelled positions (label != IGNORE_INDEX), in order.

    Their number depends on the data, so on a GPU this waits for the device: compute it on the host
    batch before it moves (`Trainer._to_device` does) and pass it as `positions`."""
    return (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)


def _labelled(hidden: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None):
    """(positions [n], hidden [n, H], labels [n]) at the labelled positions, gathered by index (no
    boolean mask, whose output size only the device knows)."""
    if positions is None:
        positions = label_positions(labels)
    positions = positions.to(hidden.device)
    return positions, hidden.flatten(0, 1).index_select(0, positions), labels.reshape(-1).index_select(0, positions)


def _scatter(values: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """values [n] at flat positions [n] of a [B, T] float32 tensor shaped like labels, 0 elsewhere
    (a tensor of its own, not a view: FSDP2 warns about views returned from a sharded module's forward)."""
    out = torch.zeros(labels.shape, dtype=torch.float32, device=values.device)
    out.view(-1).index_put_((positions,), values)  # written through a flat view; `out` itself is returned
    return out


def token_logprobs(hidden: torch.Tensor, lm_head: torch.nn.Linear, labels: torch.Tensor,
                   chunk_size: int | None = None, temperature: float = 1.0, return_entropy: bool = False,
                   transform: LogitTransform | None = None, positions: torch.Tensor | None = None):
    """Log-probability of each label under the model, chunked over tokens.

    hidden: [B, T, H] final hidden states; labels: [B, T] next-token ids aligned with `hidden`
    (labels[b, t] is the token that follows position t), IGNORE_INDEX where there is none.
    Returns [B, T] float32 log-probs, 0 where the label is ignored. Only labelled positions reach
    the lm-head, so prompt and padding tokens cost nothing here. With return_entropy, also the
    [B, T] entropy of each labelled position's next-token distribution (no gradient).
    transform: the model's logit post-processing (`LogitTransform`); its temperature is replaced
    by `temperature`. positions: `label_positions(labels)` if the caller has it (computed here
    otherwise, which makes a GPU wait); chunk_size: tokens per block (default: `default_chunk_size`).
    """
    transform = _with_temperature(transform, temperature)
    positions, selected, targets = _labelled(hidden, labels, positions)
    chunk_size = chunk_size or default_chunk_size(selected.device, lm_head.weight.shape[0])
    values, entropy = _ChunkedLogprobs.apply(selected, lm_head.weight, lm_head.bias, targets, transform,
                                             chunk_size, return_entropy)
    out = _scatter(values, positions, labels)
    if return_entropy:
        return out, _scatter(entropy, positions, labels)
    return out


def weighted_logprob_sum(hidden: torch.Tensor, lm_head: torch.nn.Linear, labels: torch.Tensor,
                         weights: torch.Tensor | TokenWeights, chunk_size: int | None = None,
                         return_entropy: bool = False,
                         temperature: float = 1.0, transform: LogitTransform | None = None,
                         positions: torch.Tensor | None = None):
    """sum(weights * log-probs of labels), a scalar, for losses whose per-token weights are known
    before the forward (SFT: 1 / trained tokens of the step; on-policy GRPO: advantage x norm).
    Same value and gradient as `(weights * token_logprobs(hidden, lm_head, labels)).sum()`, but
    the gradient is computed in the forward's chunk loop, so the logits are never recomputed (in
    grad mode only: a no-grad pass, an evaluation, makes none).

    hidden: [B, T, H]; labels: [B, T] (IGNORE_INDEX where there is none); weights: [B, T], no grad,
    or `TokenWeights` (weights that depend on each token's log-prob, e.g. GRPO's KL term: the
    gradient is then that of sum(w * log-probs) with w evaluated at the current log-probs);
    positions, chunk_size: as in `token_logprobs`.
    Returns (the sum, the [B, T] log-probs without gradient, 0 where the label is ignored, and the
    [B, T] next-token entropies with return_entropy, else None).
    """
    transform = _with_temperature(transform, temperature)
    positions, selected, targets = _labelled(hidden, labels, positions)
    weights = weights if isinstance(weights, TokenWeights) else TokenWeights(weights)
    at_labels = lambda t: None if t is None else t.detach().reshape(-1).index_select(0, positions).float()
    chunk_size = chunk_size or default_chunk_size(selected.device, lm_head.weight.shape[0])
    total, values, entropy = _ChunkedWeightedLogprobSum.apply(
        selected, lm_head.weight, lm_head.bias, targets, at_labels(weights.constant),
        at_labels(weights.exp_coefficient), at_labels(weights.reference), transform, chunk_size, return_entropy,
        torch.is_grad_enabled())
    return (total, _scatter(values, positions, labels),
            _scatter(entropy, positions, labels) if return_entropy else None)


def _with_temperature(transform: LogitTransform | None, temperature: float) -> LogitTransform:
    transform = transform or LogitTransform()
    return LogitTransform(transform.scale, transform.softcap, temperature)
