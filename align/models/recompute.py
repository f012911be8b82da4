"""Activation checkpointing: which decoder layers recompute activations in the backward, and what
a checkpointed layer keeps.

- `full`: a checkpointed layer keeps only its input and runs its whole forward again in the
  backward (torch.utils.checkpoint, non-reentrant): about a third more compute for that layer.
- `selective`: a checkpointed layer also keeps the outputs of its matrix multiplications and
  attention kernels, and only the elementwise ops between them run again (norms, activation
  functions, rotary embeddings, dtype casts, residual adds). No matmul runs twice; the layer holds
  about 0.6x the activations it holds without checkpointing under bf16 autocast (0.63x measured in
  tests/test_recompute.py; what remains is mostly the MLP's gate and up projections). The
  recomputed ops are memory-bound: cheaper than the matmuls, though not free on a GPU, where
  unfused elementwise kernels take a real share of a step (benchmarks/gpu_checks.py `recompute`
  measures both sides). This is op-level selective activation checkpointing
  (`torch.utils.checkpoint.create_selective_checkpoint_contexts`) with the policy "keep what is
  expensive to compute, recompute what is cheap"; a guard makes writing into a kept output an
  error, as it would otherwise make the recomputation silently wrong.

The choice reaches transformers' own checkpointing of each `GradientCheckpointingLayer` through the
keyword arguments it passes to torch.utils.checkpoint, so no model code is patched.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from align.errors import AlignError
from align.models.head import decoder_of

CHECKPOINT_MODES = ("full", "selective")

MATMULS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm", "aten::_int_mm",
                     "aten::_grouped_mm"})
ATTENTION = frozenset({
    "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_fused_attention_overrideable", "aten::_flash_attention_forward",
    "aten::_efficient_attention_forward", "aten::_cudnn_attention_forward",
    "torch_attn::_varlen_attn",  # torch.nn.attention.varlen (align/models/varlen.py)
    "flash_attn::_flash_attn_forward", "flash_attn::_flash_attn_varlen_forward",  # attn_implementation: flash_attention_2
})
SAVED_OPS = MATMULS | ATTENTION
"""The ops whose outputs a selectively checkpointed layer keeps: matrix multiplications and
attention kernels (`linear` and `matmul` reach the dispatcher as mm/addmm/bmm; SDPA's math
fallback as bmm). An attention kernel with dropout is recomputed instead: on CUDA it advances the
random generator, and keeping its output would shift every later random draw of the recomputation."""


def op_name(op) -> str:
    """"aten::mm" for aten.mm.default and every other overload of it ("" for higher-order ops)."""
    schema = getattr(op, "_schema", None)
    return schema.name if schema is not None else ""


def keeps(op, args: tuple, kwargs: dict) -> bool:
    """Whether selective checkpointing keeps this op's output (SAVED_OPS, attention without dropout)."""
    name = op_name(op)
    if name not in SAVED_OPS:
        return False
    if name in ATTENTION:
        for i, argument in enumerate(op._schema.arguments):
            if argument.name in ("dropout_p", "dropout"):
                value = kwargs.get(argument.name, args[i] if i < len(args) else argument.default_value)
                return not value
    return True


def keep_matmuls_and_attention(context, op, *args, **kwargs) -> CheckpointPolicy:
    """The selective policy: keep what `keeps` says, recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if keeps(op, args, kwargs) else CheckpointPolicy.PREFER_RECOMPUTE


class KeptOutputsGuard(TorchDispatchMode):
    """Raises AlignError where a forward op writes into the memory of an output that selective
    checkpointing keeps. torch's own check (the kept tensor's version counter) misses writes through
    an `_unsafe_view` of it (what `matmul` returns), e.g. DeepSpeed ZeRO-3's linear adding its bias
    in place; the recomputation would then read the changed output: wrong gradients, no error."""

    def __init__(self):
        super().__init__()
        self.kept: set[int] = set()  # data pointers of the kept outputs' storages

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.kept and getattr(func, "_schema", None) is not None and func._schema.is_mutable:
            for i, argument in enumerate(func._schema.arguments):
                value = kwargs.get(argument.name, args[i] if i < len(args) else None)
                written = argument.alias_info is not None and argument.alias_info.is_write
                if written and isinstance(value, torch.Tensor) and _storage(value) in self.kept:
                    raise AlignError(
                        f"model.checkpoint_mode: selective: {op_name(func)} writes in place into the output of a "
                        "matmul or attention kernel that selective checkpointing keeps for the backward, which "
                        "would then recompute from the changed values (DeepSpeed ZeRO-3's linear adds a model's "
                        "linear biases so); use model.checkpoint_mode: full")
        out = func(*args, **kwargs)
        if keeps(func, args, kwargs):
            self.kept.update(_storage(t) for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


class _Entered:
    """Context managers entered as one, in order: of dispatch modes, the last entered handles ops first."""

    def __init__(self, *managers):
        self.managers, self.stack = managers, contextlib.ExitStack()

    def __enter__(self):
        self.stack.__enter__()
        for manager in self.managers:
            self.stack.enter_context(manager)
        return self

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)


def selective_contexts():
    """torch.utils.checkpoint's `context_fn` for one checkpointed call: the forward under torch's
    caching mode with the policy and a KeptOutputsGuard above it; the recomputation under its
    cached mode. In a layer that torch.compile traces (`model.compile`) the policy alone: AOTAutograd
    applies it to the layer's functional graph, where a write into a kept output is a new value the
    backward tells apart (tests/test_compile.py), and the recomputed elementwise ops are fused into
    the backward's kernels. (The guard, a dispatch mode, is not traceable.)"""
    caching, cached = create_selective_checkpoint_contexts(keep_matmuls_and_attention)
    if _traced():
        return caching, cached
    return _Entered(caching, KeptOutputsGuard()), cached


try:
    selective_contexts.cache_hash = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    """What AOTAutograd's cache keys a compiled graph with selective checkpointing by: it cannot hash
    a `context_fn`'s code, so without this attribute it compiles such graphs anew in every process
    (`autograd_cache_bypass`). This module's source holds the whole policy."""
except OSError:  # no source file to read (a zip or frozen install): the cache is bypassed, as before
    pass


def _traced() -> bool:
    """Whether torch.compile is tracing the current call: dynamo's passes (`is_compiling`), and
    AOTAutograd's, by the test torch.utils.checkpoint itself makes there (a proxy dispatch mode is
    active) before it requires `context_fn` to return two dispatch modes: `is_compiling()` covers
    AOTAutograd's tracing only on recent torch versions."""
    return (torch.compiler.is_compiling()
            or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None)


def checkpoint_kwargs(mode: str = "full") -> dict:
    """What transformers passes to torch.utils.checkpoint for each checkpointed layer."""
    if mode not in CHECKPOINT_MODES:
        raise ValueError(f"checkpoint mode must be one of {CHECKPOINT_MODES}, got {mode!r}")
    kwargs = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = selective_contexts
    return kwargs


def enable_activation_checkpointing(model, mode: str = "full") -> None:
    """Recompute activations in the backward (non-reentrant; `mode` as in this module's docstring),
    under the name this transformers version has: `activation_checkpointing_enable` (newer),
    `gradient_checkpointing_enable` (older). Selective needs the layers to take torch.utils.checkpoint's
    arguments (transformers' `GradientCheckpointingLayer`); a model that drops them is refused."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs(mode))
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs(mode))
    if mode == "selective" and not any(
            getattr(getattr(m, "_gradient_checkpointing_func", None), "keywords", {}).get("context_fn")
            is selective_contexts for m in model.modules()):
        raise AlignError(f"model.checkpoint_mode: selective: {type(model).__name__}'s layers do not take "
                         "torch.utils.checkpoint's arguments (a model with the old checkpointing format); use "
                         "model.checkpoint_mode: full")


def checkpoint_some_layers(model, fraction: float) -> None:
    """Keep activation checkpointing on `fraction` of the decoder's layers, spread evenly (layer i of
    n is checkpointed when floor((i + 1) * fraction) > floor(i * fraction): floor(n * fraction)
    layers), through each layer's own `gradient_checkpointing` switch (transformers'
    GradientCheckpointingLayer); other checkpointed modules (a vision tower's) are left as they are."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = decoder_of(base) if hasattr(base, "get_decoder") else base
    layers = [m for m in decoder.modules() if isinstance(m, GradientCheckpointingLayer)]
    count = math.floor(round(len(layers) * fraction, 9))  # (round: 100 x 0.29 is 28.999... in floats)
    if count == 0:
        raise AlignError(f"model.checkpointed_layers={fraction} checkpoints none of this model's {len(layers)} "
                         "layers that can be checkpointed one by one; raise it (1.0: every layer)")
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = math.floor(round((i + 1) * fraction, 9)) > math.floor(round(i * fraction, 9))


class OpCounts(TorchDispatchMode):
    """Counts the ops that run while it is active, by name ("aten::mm"): `all` of them, and `with_grad`,
    those run with gradients on: the forward's and its recomputation's in the backward, without
    the backward's own ops (nor what custom ops and autograd Functions run inside, with gradients
    off). A diagnostic: the tests and benchmarks/gpu_checks.py check with it that selective
    checkpointing runs no matmul (`with_grad`) or attention kernel (`all`) twice."""

    def __init__(self):
        super().__init__()
        self.all, self.with_grad = Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = op_name(func)
        self.all[name] += 1
        if torch.is_grad_enabled():
            self.with_grad[name] += 1
        return func(*args, **(kwargs or {}))

    def matmuls(self) -> int:
        return sum(self.with_grad[name] for name in MATMULS)

    def attention(self) -> int:
        return sum(self.all[name] for name in ATTENTION)
