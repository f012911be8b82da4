"""Activation checkpointing: which decoder layers recompute activations in the backward, and what
a checkpointed layer keeps.

- `full`: a checkpointed layer keeps only its input and runs its whole forward again in the
  backward (torch.utils.checkpoint, non-reentrant): about a third more compute for that layer.
- `selective`: a checkpointed layer also keeps the outputs of its matrix multiplications and
  attention kernels, and only the elementwise ops between them run again (norms, activation
  functions, rotary embeddings, dtype casts, residual adds). No matmul runs twice; the layer holds
  about half the activations it holds without checkpointing (what remains is mostly the MLP's
  gate and up projections). This is op-level selective activation checkpointing
  (`torch.utils.checkpoint.create_selective_checkpoint_contexts`), with the policy "keep what is
  expensive to compute, recompute what is cheap" (the elementwise ops are memory-bound: on a GPU
  they cost little time next to the matmuls, but their outputs are most of a layer's activations).

The choice reaches transformers' own checkpointing of each `GradientCheckpointingLayer` through the
keyword arguments it passes to torch.utils.checkpoint, so no model code is patched.
"""

from __future__ import annotations

import functools
import math

from align.errors import AlignError

CHECKPOINT_MODES = ("full", "selective")

SAVED_OPS = frozenset({
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm", "aten::_int_mm",
    "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_fused_attention_overrideable", "aten::_flash_attention_forward",
    "aten::_efficient_attention_forward", "aten::_cudnn_attention_forward",
    "torch_attn::_varlen_attn",  # torch.nn.attention.varlen (align/models/varlen.py)
})
"""The ops whose outputs a selectively checkpointed layer keeps: matrix multiplications and
attention kernels. (`linear` and `matmul` reach the dispatcher as mm/addmm/bmm; SDPA's math
fallback as bmm.)"""


def keep_matmuls_and_attention(context, op, *args, **kwargs):
    """The selective policy: keep the outputs of SAVED_OPS, recompute everything else."""
    from torch.utils.checkpoint import CheckpointPolicy

    if op.name() in SAVED_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_kwargs(mode: str = "full") -> dict:
    """What transformers passes to torch.utils.checkpoint for each checkpointed layer."""
    if mode not in CHECKPOINT_MODES:
        raise ValueError(f"checkpoint mode must be one of {CHECKPOINT_MODES}, got {mode!r}")
    kwargs = {"use_reentrant": False}
    if mode == "selective":
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, keep_matmuls_and_attention)
    return kwargs


def enable_activation_checkpointing(model, mode: str = "full") -> None:
    """Recompute activations in the backward (non-reentrant; `mode` as in this module's docstring),
    under the name this transformers version has: `activation_checkpointing_enable` (newer),
    `gradient_checkpointing_enable` (older)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs(mode))
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs(mode))


def checkpoint_some_layers(model, fraction: float) -> None:
    """Keep activation checkpointing on `fraction` of the decoder's layers, spread evenly (layer i of
    n is checkpointed when floor((i + 1) * fraction) > floor(i * fraction): floor(n * fraction)
    layers), through each layer's own `gradient_checkpointing` switch (transformers'
    GradientCheckpointingLayer); other checkpointed modules (a vision tower's) are left as they are."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base
    layers = [m for m in decoder.modules() if isinstance(m, GradientCheckpointingLayer)]
    count = math.floor(round(len(layers) * fraction, 9))  # (round: 100 x 0.29 is 28.999... in floats)
    if count == 0:
        raise AlignError(f"model.checkpointed_layers={fraction} checkpoints none of this model's {len(layers)} "
                         "layers that can be checkpointed one by one; raise it (1.0: every layer)")
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = math.floor(round((i + 1) * fraction, 9)) > math.floor(round(i * fraction, 9))


def forward_ops_counter():
    """A dispatch mode counting the forward ops that run while it is active, by name ("aten::mm"):
    those of the forward and of its recomputation in the backward (which runs with gradients on),
    not the backward's own. A diagnostic: the tests and benchmarks/gpu_checks.py check with it that
    selective checkpointing recomputes no matmul or attention. Use: `with forward_ops_counter() as
    ops: ...`, then `ops.counts`."""
    from collections import Counter

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class ForwardOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if torch.is_grad_enabled():
                self.counts[func.name()] += 1
            return func(*args, **(kwargs or {}))

    return ForwardOps()
