"""The weights a model computes with, as one plain checkpoint: what an engine outside the trained
modules (vLLM) must load to sample from the policy as it is now."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from align.models.policy import causal_lm


def merged_weights(model: nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs under the transformers checkpoint names of `model`'s causal LM:
    every LoRA delta added to its base weight, 4-bit (QLoRA) weights dequantized, and the trained
    copy of a `modules_to_save` module under the original module's name. Buffers are left out.

    Nothing in `model` changes (no merge and unmerge, which would re-quantize a 4-bit base), and
    the tensors are made one module at a time, so at most one extra weight is alive at once when
    the caller consumes them one by one. dtype: cast every tensor to it (default: as they are).
    """
    with torch.no_grad():
        for name, tensor in _walk(causal_lm(model), ""):
            yield name, tensor.to(dtype) if dtype is not None else tensor


def _walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    if isinstance(module, ModulesToSaveWrapper):
        (active,) = module.active_adapters
        yield from _walk(module.modules_to_save[active], prefix)
        return
    if isinstance(module, LoraLayer):
        deltas = {}  # parameter name -> the sum of the LoRA deltas on it
        while isinstance(module, LoraLayer):  # a layer, or MoE experts' parameters wrapped one by one
            target = getattr(module, "parameter_name", None) or "weight"
            for adapter in module.active_adapters:
                if adapter in module.lora_A and adapter not in module.merged_adapters:
                    delta = module.get_delta_weight(adapter)
                    deltas[target] = deltas[target] + delta if target in deltas else delta
            module = module.base_layer
        for name, param in module.named_parameters(recurse=False):
            tensor = dense(param)
            yield prefix + name, tensor + deltas[name].to(tensor.dtype) if name in deltas else tensor
        for name, child in module.named_children():
            yield from _walk(child, f"{prefix}{name}.")
        return
    for name, param in module.named_parameters(recurse=False):
        yield prefix + name, dense(param)
    for name, child in module.named_children():
        yield from _walk(child, f"{prefix}{name}.")


def dense(param: torch.Tensor) -> torch.Tensor:
    """A bitsandbytes 4-bit parameter dequantized to its compute shape and dtype; others as they are."""
    quant_state = getattr(param, "quant_state", None)
    if quant_state is None:
        return param.detach()
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(param.data, quant_state).to(quant_state.dtype)
