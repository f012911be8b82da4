"""Turning a model's dropout off for training, as preference and RL trainers need.

DPO's implicit rewards and PPO/GRPO's importance ratios compare the training forward with a
reference or old-log-prob forward of the same weights; with dropout on in one and off in the other
they start away from 0 and 1. TRL's DPO turns dropout off the same way (`disable_dropout`).
"""

from __future__ import annotations

from torch import nn


def disable_dropout(module: nn.Module) -> None:
    """Set every dropout in `module` to 0: `nn.Dropout` layers (LoRA's adapter dropout included) and
    the `attention_dropout` rate transformers' attention layers read in training mode."""
    for layer in module.modules():
        if isinstance(layer, nn.Dropout):
            layer.p = 0.0
        if isinstance(getattr(layer, "attention_dropout", None), float):
            layer.attention_dropout = 0.0


def drops_out(layer: nn.Module) -> bool:
    """Whether `layer` itself drops out in training mode: an `nn.Dropout` of p > 0, or a transformers
    attention layer's `attention_dropout` rate."""
    rate = getattr(layer, "attention_dropout", None)
    return (isinstance(layer, nn.Dropout) and layer.p > 0) or (isinstance(rate, float) and rate > 0)


def has_dropout(module: nn.Module) -> bool:
    """Whether any dropout in `module` is active in training mode."""
    return any(drops_out(layer) for layer in module.modules())
