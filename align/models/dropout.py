"""Turning a model's dropout off for training, as preference and RL trainers need.

DPO's implicit rewards and PPO/GRPO's importance ratios compare the training forward with a
reference or old-log-prob forward of the same weights; with dropout on in one and off in the other
they start away from 0 and 1. TRL's DPO turns dropout off the same way (`disable_dropout`), on
`nn.Dropout` layers; here also on the rates models read as numbers in training mode.
"""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

RATE_WORDS = ("dropout", "pdrop", "layerdrop", "jitter_noise")
"""What the name of a rate read in training mode holds, besides `nn.Dropout`'s p: attention layers'
`attention_dropout`; OPT, XGLM and BioGPT layers' `dropout`, `activation_dropout` and `layerdrop`
(`nn.functional.dropout(p=self.dropout)`); Falcon's `config.hidden_dropout`; GPT-2's `resid_pdrop`;
the noise Mixtral's and PhiMoE's MoE blocks multiply their input by (`jitter_noise`,
`input_jitter_noise`)."""
NOT_RATES = ("router_jitter_noise",)
"""PhiMoE's also sets its eval-mode routing threshold: never changed (it samples experts in training
mode: left alone, see the README)."""


def _rates(obj) -> list[str]:
    """The names of `obj`'s own float attributes that are dropout rates."""
    return [name for name, value in vars(obj).items()
            if type(value) is float and any(word in name.lower() for word in RATE_WORDS) and name not in NOT_RATES]


def _configs(module: nn.Module) -> list[PretrainedConfig]:
    """The transformers configs `module`'s layers read (each once, sub-configs included)."""
    found: dict[int, PretrainedConfig] = {}
    pending = [getattr(layer, "config", None) for layer in module.modules()]
    while pending:
        config = pending.pop()
        if isinstance(config, PretrainedConfig) and id(config) not in found:
            found[id(config)] = config
            pending.extend(v for v in vars(config).values() if isinstance(v, PretrainedConfig))
    return list(found.values())


def disable_dropout(module: nn.Module) -> None:
    """Set every dropout in `module` to 0: `nn.Dropout` layers (LoRA's adapter dropout included), the
    rates layers keep as numbers, and those their configs hold (which a saved model then keeps: it
    trained without them)."""
    for layer in module.modules():
        if isinstance(layer, nn.Dropout):
            layer.p = 0.0
        for name in _rates(layer):
            setattr(layer, name, 0.0)
    for config in _configs(module):
        for name in _rates(config):
            setattr(config, name, 0.0)


def drops_out(layer: nn.Module) -> bool:
    """Whether `layer` itself drops out in training mode: an `nn.Dropout` of p > 0, or a rate it keeps
    as a number (a transformers attention layer's `attention_dropout`, OPT's `dropout`, ...)."""
    return (isinstance(layer, nn.Dropout) and layer.p > 0) or any(getattr(layer, name) > 0 for name in _rates(layer))


def has_dropout(module: nn.Module) -> bool:
    """Whether any dropout in `module` (or in a config its layers read) is active in training mode."""
    return any(drops_out(layer) for layer in module.modules()) or \
        any(getattr(config, name) > 0 for config in _configs(module) for name in _rates(config))
