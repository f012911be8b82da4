"""Regional compilation: `model.compile` compiles each decoder layer with torch.compile.

On a GPU about half of a training step's device time went to unfused elementwise kernels between
the matmuls (norms, SiLU x up, rotary, residual adds, casts: the 0.5b profile in
benchmarks/results/). Inductor fuses them. Compiling the layers rather than the whole model keeps
what is ours eager (the chunked lm-head log-probs, the losses, the loop) and compiles one graph per
layer class, which every layer of that class reuses: a 28-layer model compiles like a 1-layer one.
This is torchtune's and accelerate's `compile_regions` approach; `nn.Module.compile` compiles in
place, so module names, state dicts, peft and checkpoints see the same modules as before.

Decoding changes shapes at every step (and runs its own CUDA graphs), so every sampling runs the
layers eagerly (`eager`, entered by `align.rollout.sampling.inference`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from align.errors import AlignError


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder layers of `model` (and of any other transformers model inside it, e.g.
    PPO's critic): the modules transformers checkpoints layer by layer."""
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_layers(model: nn.Module) -> int:
    """Compile every decoder layer of `model` in place (`nn.Module.compile`); returns how many.
    AlignError if it has none (a model class transformers does not split into layers)."""
    layers = decoder_layers(model)
    if not layers:
        raise AlignError(f"model.compile: {type(model).__name__} has no decoder layers transformers knows "
                         "(GradientCheckpointingLayer) to compile; set model.compile: false")
    for layer in layers:
        layer.compile()
    return len(layers)


@contextlib.contextmanager
def eager():
    """Compiled layers run their eager forward inside (nothing changes for a model without any)."""
    with torch.compiler.set_stance("force_eager"):
        yield
