"""LoRA through peft: which layers an adapter takes, checked before anything trains, and applying it.

`target_modules: all-linear` means what it means to peft, every linear layer but the output head,
less the layers a LoRA cannot sit on (`unadaptable`: they are left out, and naming one is an
error). transformers 5 stores the experts of most MoE families as 3-D parameters; peft adapts
those as parameters (its own translation of the v4 targets), which take no LoRA dropout
(`lora_dropout`). QLoRA is LoRA over a 4-bit base (`align.models.loading` loads it), prepared here.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import itertools
import logging
import math
import re
import warnings

import torch
from torch import nn

from align.config import AdapterConfig
from align.errors import AlignError
from align.models.recompute import checkpoint_kwargs

log = logging.getLogger(__name__)

DEFAULT_DROPOUT = 0.05
"""LoRA dropout when `adapter.dropout` is unset and the model allows it (`lora_dropout`)."""


@contextlib.contextmanager
def peft_quietly():
    """peft asks transformers' deprecated `is_gradient_checkpointing`, a FutureWarning on every
    adapter a user can do nothing about; it is silenced around peft's calls only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        # peft's own translation of MoE targets sets a doubled rank for fused gate_up_proj experts (which
        # applies: tests/test_lora.py) and then warns that the pattern matched no module, on every MoE LoRA
        warnings.filterwarnings("ignore", message=r"The following (rank|alpha)_pattern keys did not match any "
                                r"targeted module and were ignored: \[.*gate_up_proj'\]", category=RuntimeWarning)
        yield


def apply_adapter(model, adapter: AdapterConfig, checkpointing: str | None = None, task_type: str = "CAUSAL_LM"):
    """`model` with `adapter` applied; `checkpointing`: the activation checkpointing mode the model has
    (None: off), which QLoRA's preparation switches on again.

    QLoRA's preparation (peft's) freezes the base and holds its unquantized weights in float32:
    norms, embeddings, the lm-head, small next to the 4-bit layers. Not so a model's MoE experts
    stored as 3-D parameters, which bitsandbytes does not quantize and which are most of its weights
    (`unquantized_experts`): such a base is only frozen and stays in its dtype, as under a LoRA (the
    experts and the activations that reach them must share one dtype)."""
    if adapter.kind == "none":
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    lora = lora_config(model, adapter, task_type)
    with peft_quietly():
        if adapter.kind == "qlora" and unquantized_experts(model):
            model.requires_grad_(False)  # (activation checkpointing is on already: load_model)
        elif adapter.kind == "qlora":
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=checkpointing is not None,
                gradient_checkpointing_kwargs=checkpoint_kwargs(checkpointing or "full"))
        try:
            model = get_peft_model(model, lora)
        except ValueError as error:
            raise AlignError(f"adapter.target_modules: {error}") from None
    return model


def lora_config(model, adapter: AdapterConfig, task_type: str = "CAUSAL_LM"):
    """peft's LoraConfig for `adapter` on `model` (the loaded model or its `model_skeleton`), after
    `check_adapter`; AlignError for what cannot be applied as asked."""
    from peft import LoraConfig

    unfit = check_adapter(model, adapter, task_type)
    skipped = unfit if adapter.target_modules == "all-linear" else {}
    if skipped:
        log.warning("adapter: all-linear leaves out %d layers a LoRA cannot sit on, e.g. %s: %s",
                    len(skipped), *next(iter(skipped.items())))
    lora = LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=0.0, target_modules=adapter.target_modules,
                      exclude_modules=sorted(skipped) or None, modules_to_save=adapter.modules_to_save,
                      task_type=task_type)
    adapted_parameters = parameter_targets(model, lora)
    lora.lora_dropout = lora_dropout(model, adapter, adapted_parameters)
    experts = unquantized_experts(model)
    if experts and not adapted_parameters:
        log.warning("adapter: model type %r keeps its MoE experts in 3-D parameters (e.g. %s) that peft adapts for "
                    "no target here: the LoRA covers the other layers only, the experts stay as they are",
                    model.config.model_type, experts[0])
    if experts and adapter.kind == "qlora":
        share = sum(dict(model.named_parameters())[name].numel() for name in experts) / weight_count(model)
        log.warning("adapter: qlora quantizes linear layers only (bitsandbytes), and model type %r keeps its MoE "
                    "experts in 3-D parameters (%.0f%% of the weights, e.g. %s): they stay unquantized, in "
                    "model.dtype (bfloat16: 2 bytes a weight, where 4-bit layers take ~0.55)",
                    model.config.model_type, 100 * share, experts[0])
    return lora


def unquantized_experts(model) -> list[str]:
    """The names of the model's MoE experts stored as 3-D parameters (transformers 5), which a 4-bit
    load leaves unquantized (bitsandbytes quantizes linear layers only)."""
    return [name for name, p in model.named_parameters() if p.dim() == 3 and ".experts." in name]


def weight_count(model) -> int:
    """The model's weights, a 4-bit layer's counted unpacked (bitsandbytes packs two in a byte)."""
    return sum(math.prod(p.quant_state.shape) if getattr(p, "quant_state", None) is not None else p.numel()
               for p in model.parameters())


def lora_dropout(model, adapter: AdapterConfig, adapted_parameters: set[str]) -> float:
    """`adapter.dropout`, by default DEFAULT_DROPOUT, or 0 where peft adapts parameters
    (`parameter_targets`: fused MoE experts, whose wrapper takes no dropout); an explicit non-zero
    dropout there is an error."""
    if not adapted_parameters:
        return DEFAULT_DROPOUT if adapter.dropout is None else adapter.dropout
    if adapter.dropout:
        raise AlignError(f"adapter.dropout: {adapter.dropout} cannot apply to model type "
                         f"{model.config.model_type!r}: peft adapts its MoE layers as parameters "
                         f"({', '.join(sorted(adapted_parameters))}), which take no LoRA dropout; set adapter.dropout: 0 "
                         "(or leave it unset), or name target_modules that leave the experts out")
    return 0.0


def parameter_targets(model, lora) -> set[str]:
    """The parameter names peft will adapt as parameters rather than as modules: under transformers 5
    peft translates a config's targets for MoE families whose experts became 3-D parameters (Mixtral,
    Qwen3-MoE, DeepSeek-V3, ...). Asked of peft's own translation, on a copy of `lora`."""
    try:
        from peft.utils.transformers_weight_conversion import (convert_peft_config_for_transformers,
                                                               get_model_conversion_mapping)
    except ImportError:  # a peft without the translation adapts modules only
        return set()
    probe = copy.deepcopy(lora)
    try:
        convert_peft_config_for_transformers(probe, model=model, conversions=get_model_conversion_mapping(model))
    except ValueError as error:  # e.g. half of a fused pair named: "Cannot convert PEFT target(s) gate_proj ..."
        raise AlignError(f"adapter.target_modules: {error}") from None
    return set(probe.target_parameters or ())


def unadaptable(model) -> dict[str, str]:
    """{name: why} of the linear layers a LoRA cannot sit on:

    - a layer whose parent reads its `.weight` in its own code, so that a LoRA on the layer would be
      skipped there, silently: fused Mamba kernels (`out_proj`; Mamba-1's `x_proj` and `dt_proj`),
      Gemma 3n's clamped AltUp coefficients, LongCat's router;
    - a subclass of nn.Linear in a model's code whose forward returns no [..., out_features] tensor
      (Llama 4's and PhiMoE's routers return a tuple, which peft's wrapper fails on).
    """
    out = {}
    for parent_name, parent in model.named_modules():
        read = weights_read_directly(type(parent))
        for child_name, child in parent.named_children():
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if child_name in read and _width(child):
                out[name] = f"{type(parent).__name__} reads {child_name}.weight directly, which would skip a LoRA"
            elif isinstance(child, nn.Linear) and not _computes_a_linear_map(child):
                out[name] = f"{type(child).__name__}.forward returns no [..., out_features] tensor"
    return out


_WEIGHT_READ = re.compile(r"self\.(\w+)\.weight\b(?!\s*\.\s*(?:dtype|device|shape|data|requires_grad)\b)")
"""`self.<child>.weight` used for its values (not only its dtype, device or shape)."""


@functools.cache
def weights_read_directly(cls: type) -> frozenset[str]:
    """Names of the children whose `.weight` the code of `cls` (its classes outside torch) reads."""
    names = set()
    for klass in cls.__mro__:
        if klass.__module__.split(".")[0] in ("torch", "builtins"):
            continue
        try:
            names.update(_WEIGHT_READ.findall(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source to read (e.g. a compiled class): nothing known
            pass
    return frozenset(names)


MODEL_CODE = ("transformers.models.", "transformers_modules.")
"""Where models' own classes live (transformers' families, remote code); quantized and adapter
layers (bitsandbytes, transformers.integrations, peft) compute a linear map by design."""


def _computes_a_linear_map(module: nn.Linear) -> bool:
    """Whether `module` maps [2, in_features] to [2, out_features]: nn.Linear's forward, or a model's
    subclass whose forward, run on the meta device (no compute), returns a tensor of that shape."""
    if type(module).forward is nn.Linear.forward or not type(module).__module__.startswith(MODEL_CODE):
        return True
    state = {name: torch.empty_like(t, device="meta")
             for name, t in itertools.chain(module.named_parameters(), module.named_buffers())}
    try:
        out = torch.func.functional_call(module, state, (torch.empty(2, module.in_features, device="meta"),))
    except Exception:  # noqa: BLE001 - a forward that cannot take a plain input is no linear map
        return False
    return isinstance(out, torch.Tensor) and tuple(out.shape) == (2, module.out_features)


def check_adapter(model, adapter: AdapterConfig, task_type: str = "CAUSAL_LM") -> dict[str, str]:
    """AlignError for what peft would take silently or fail on obscurely: a `target_modules` name the
    model does not have (peft ignores one when another name matches), a `modules_to_save` name a
    causal LM does not have, a LoRA on the lm-head or on another layer it cannot sit on
    (`unadaptable`), or an `r` above the width of every targeted layer. Returns `unadaptable(model)`.

    `model` may be the loaded model or its `model_skeleton`."""
    if adapter.kind == "none":
        return {}
    modules = dict(model.named_modules())
    widths = {name: _width(module) for name, module in modules.items() if _width(module)}
    linear = sorted({name.rsplit(".", 1)[-1] for name in widths})
    for target in adapter.target_modules if isinstance(adapter.target_modules, list) else []:
        if not any(_matches(name, [target]) for name in modules):
            raise AlignError(f"adapter.target_modules: the model has no module {target!r}; its linear modules "
                             f"are {linear} (or use all-linear)")
    saved = adapter.modules_to_save or []
    for target in saved if task_type == "CAUSAL_LM" else []:
        # a score model may lack one: PPO's critic takes the policy's settings, [lm_head] included
        if not any(name.endswith(target) for name in modules):
            raise AlignError(f"adapter.modules_to_save: the model has no module {target!r}; its linear modules "
                             f"are {linear}")
    head = model.get_output_embeddings() if task_type == "CAUSAL_LM" else getattr(model, "score", None)
    skipped = unadaptable(model)
    targets = adapter.target_modules
    if targets == "all-linear":  # peft's reading (every linear layer but the output head), less `unadaptable`
        targets = [name for name in widths if modules[name] is not head and name not in skipped]
    targeted = [name for name in modules if _matches(name, targets)
                and not any(name.endswith(s) for s in saved)]
    if not targeted:
        raise AlignError(f"adapter.target_modules: {targets!r} matches no module of the model; its linear "
                         f"modules are {linear}")
    if task_type == "CAUSAL_LM" and any(modules[name] is head for name in targeted):
        raise AlignError("adapter.target_modules: a LoRA on the lm-head is not supported: Align computes log-probs "
                         "from the head's weight in chunks, which would bypass it; leave the head out of "
                         "target_modules, or train it fully with adapter.modules_to_save: [lm_head]")
    refused = [name for name in targeted if name in skipped]
    if refused:
        raise AlignError(f"adapter.target_modules: a LoRA cannot sit on {refused[0]} ({len(refused)} such layers "
                         f"targeted): {skipped[refused[0]]}; leave it out of target_modules (all-linear does)")
    layer_widths = [min(widths[name]) for name in targeted if name in widths]
    if layer_widths and adapter.r > max(layer_widths):
        raise AlignError(f"adapter.r: {adapter.r} is larger than every targeted layer's narrower side (the widest "
                         f"is {max(layer_widths)}): a LoRA rank above that adds nothing; set adapter.r to at most "
                         f"{max(layer_widths)}")
    return skipped


def _matches(name: str, targets: str | list[str]) -> bool:
    """peft's rule: a string is a regex for the full module name, a list entry a name or a name's tail."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _width(module) -> tuple[int, int] | None:
    """(in, out) of a linear layer (also a 4-bit one, or GPT-2's Conv1D), else None."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        return tuple(module.weight.shape)
    return None
