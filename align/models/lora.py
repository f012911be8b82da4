"""LoRA through peft: which modules an adapter takes, checked before anything trains, and applying it.

QLoRA is LoRA over a 4-bit base (`align.models.loading` loads the base quantized); peft prepares
it here.
"""

from __future__ import annotations

import contextlib
import re
import warnings

from align.config import AdapterConfig
from align.errors import AlignError
from align.models.recompute import checkpoint_kwargs


@contextlib.contextmanager
def peft_quietly():
    """peft asks transformers' deprecated `is_gradient_checkpointing`, a FutureWarning on every
    adapter a user can do nothing about; it is silenced around peft's calls only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def apply_adapter(model, adapter: AdapterConfig, checkpointing: str | None = None, task_type: str = "CAUSAL_LM"):
    """`model` with `adapter` applied; `checkpointing`: the activation checkpointing mode the model has
    (None: off), which QLoRA's preparation switches on again."""
    if adapter.kind == "none":
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    lora = LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                      target_modules=adapter.target_modules, modules_to_save=adapter.modules_to_save,
                      task_type=task_type)
    check_adapter(model, adapter, task_type)
    with peft_quietly():
        if adapter.kind == "qlora":
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=checkpointing is not None,
                gradient_checkpointing_kwargs=checkpoint_kwargs(checkpointing or "full"))
        try:
            model = get_peft_model(model, lora)
        except ValueError as error:
            raise AlignError(f"adapter.target_modules: {error}") from None
    return model


def check_adapter(model, adapter: AdapterConfig, task_type: str = "CAUSAL_LM") -> None:
    """AlignError for what peft would take silently or fail on obscurely: a `target_modules` name the
    model does not have (peft ignores one when another name matches), a `modules_to_save` name a
    causal LM does not have, a LoRA on the lm-head, or an `r` above the smaller width of a targeted layer.

    `model` may be the loaded model or its `model_skeleton`."""
    if adapter.kind == "none":
        return
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
    targets = adapter.target_modules
    if targets == "all-linear":  # as peft reads it: every linear layer but the output head
        targets = [name for name in widths if modules[name] is not head]
    targeted = [name for name in modules if _matches(name, targets)
                and not any(name.endswith(s) for s in saved)]
    if not targeted:
        raise AlignError(f"adapter.target_modules: {targets!r} matches no module of the model; its linear "
                         f"modules are {linear}")
    if task_type == "CAUSAL_LM" and any(modules[name] is head for name in targeted):
        raise AlignError("adapter.target_modules: a LoRA on the lm-head is not supported: Align computes log-probs "
                         "from the head's weight in chunks, which would bypass it; leave the head out of "
                         "target_modules, or train it fully with adapter.modules_to_save: [lm_head]")
    narrowest = min((name for name in targeted if name in widths), key=lambda n: min(widths[n]), default=None)
    if narrowest and adapter.r > min(widths[narrowest]):
        (n_in, n_out), most = widths[narrowest], min(widths[narrowest])
        raise AlignError(f"adapter.r: {adapter.r} is larger than the width of {narrowest} ({n_in} in, {n_out} out); "
                         f"a LoRA rank above {most} adds nothing: set adapter.r to at most {most}")


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
