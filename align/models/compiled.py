"""Regional compilation: `model.compile` compiles each decoder layer with torch.compile.

On a GPU about half of a training step's device time went to unfused elementwise kernels between
the matmuls (norms, SiLU x up, rotary, residual adds, casts: the 0.5b profile in
benchmarks/results/). Inductor fuses them. Compiling the layers rather than the whole model keeps
what is ours eager (the chunked lm-head log-probs, the losses, the loop), and every layer of a class
shares its compiled graphs: a 28-layer model compiles like a 1-layer one. A class gets one graph per
variant of its call (training or no-grad, train or eval mode, adapter on or off, checkpointed or
not, fixed or varying lengths): 5 to 8 in a run with evaluation and a reference. This is
torchtune's and accelerate's `compile_regions` approach; `nn.Module.compile` compiles in place, so
module names, state dicts, peft and checkpoints see the same modules as before.

Two graphs of the same layer (say the training forward and a no-grad reference or old-log-prob
pass) are compiled apart and may round differently under bf16 autocast (log-probs ~1e-3 apart, where
the eager layer gives the same bits), and compiled dropout draws other masks than eager dropout.

Decoding changes shapes at every step (and runs its own CUDA graphs), so every sampling runs the
layers eagerly (`eager`, entered by `align.rollout.sampling.inference`): torch's compile stance is
process-wide, so any other compiled code run during sampling runs eagerly too.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from align.errors import AlignError

RECOMPILE_LIMIT = 64
"""Graphs dynamo keeps per code object before it runs the rest eagerly (torch's default, 8, is
reached by a LoRA run with partial checkpointing, evaluation and its reference; every layer class
shares one code object)."""


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder layers of `model` (and of any other transformers model inside it, e.g.
    PPO's critic): the modules transformers checkpoints layer by layer."""
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_layers(model: nn.Module) -> int:
    """Compile every decoder layer of `model` in place (`nn.Module.compile`); returns how many.
    Raises dynamo's recompile limit to `RECOMPILE_LIMIT` (process-wide). AlignError if it has none (a
    model class transformers does not split into layers)."""
    layers = decoder_layers(model)
    if not layers:
        raise AlignError(f"model.compile: {type(model).__name__} has no decoder layers transformers knows "
                         "(GradientCheckpointingLayer) to compile; set model.compile: false")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for layer in layers:
        layer.compile()
    return len(layers)


@contextlib.contextmanager
def eager():
    """Compiled layers run their eager forward inside (nothing changes for a model without any)."""
    with torch.compiler.set_stance("force_eager"):
        yield
