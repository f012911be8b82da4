"""The logits a model really samples from: its lm-head plus the family's own post-processing.

Align computes log-probs from the last hidden state and the lm-head's weight in chunks
(`align.ops.logprobs`), so whatever a family does to its logits after the head must be applied
there too: Gemma-2/3 soft-cap them (`final_logit_softcapping`), Cohere multiplies them by
`logit_scale`, Granite divides them by `logits_scaling`. `logit_transform` reads these settings;
`check_logprobs_match_forward` runs the model once on a short probe and refuses, with an error
naming the model type, a model whose own `forward()` gives other log-probs than Align's path (a
family with post-processing Align does not know), so no run trains on silently wrong numbers.
"""

from __future__ import annotations

import torch
from torch import nn

from align.errors import AlignError
from align.ops.logprobs import LogitTransform, token_logprobs

# config attribute -> how it enters the LogitTransform; families share these names
# (gemma2/gemma3 final_logit_softcapping, cohere/cohere2 logit_scale, granite/granitemoe logits_scaling)
_POST_PROCESSING = {
    "final_logit_softcapping": lambda t, v: LogitTransform(t.scale, v, t.temperature),
    "logit_scale": lambda t, v: LogitTransform(t.scale * v, t.softcap, t.temperature),
    "logits_scaling": lambda t, v: LogitTransform(t.scale / v, t.softcap, t.temperature),
}


def logit_transform(config) -> LogitTransform:
    """The post-processing `config`'s family applies to its lm-head's output (temperature 1)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    transform = LogitTransform()
    for key, apply in _POST_PROCESSING.items():
        value = getattr(text_config, key, None)
        if value is not None:
            transform = apply(transform, float(value))
    return transform


def probe_tolerance(dtype: torch.dtype) -> float:
    """Largest |Align - forward()| log-prob difference (nats) accepted by the probe: rounding only.
    In half precision the model rounds its post-processed logits to 8 bits of mantissa, Align does
    not; a missing soft-cap or scale is off by far more on any real model."""
    return 1e-3 if dtype == torch.float32 else 0.25


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The precision a model computes in, for a probe's tolerance: autocast's dtype when autocast is
    on; bf16 for a quantized model (its 4-bit layers compute in 16 bits while its norms may be
    float32); else the least precise of its floating-point weights."""
    device = next(model.parameters()).device
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        return torch.bfloat16
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return min(dtypes, key=lambda dtype: torch.finfo(dtype).bits, default=torch.float32)


def decoder_of(lm: nn.Module) -> nn.Module:
    """The decoder of a causal LM or a score model: `get_decoder()`, except where transformers' lookup
    returns the model itself (Llama 4's text model keeps its decoder in `model` under the prefix
    `language_model`), then its `model`."""
    decoder = lm.get_decoder()
    return getattr(lm, "model", decoder) if decoder is lm else decoder


@torch.no_grad()
def check_logprobs_match_forward(lm: nn.Module, temperature: float = 0.7, length: int = 12) -> None:
    """Compare Align's chunked log-probs (`LogitTransform` included) with `log_softmax` of the
    model's own `forward()` logits on a probe of `length` tokens; raise AlignError if they differ.

    lm: the transformers causal LM (adapters injected). Runs in eval mode; a few ms on any model.
    """
    was_training = lm.training
    lm.eval()
    try:
        device = lm.get_output_embeddings().weight.device
        vocab = lm.get_output_embeddings().weight.shape[0]
        ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0)).to(device)
        positions = torch.arange(length, device=device)[None]
        logits = lm(input_ids=ids, position_ids=positions, use_cache=False).logits.float()
        want = torch.log_softmax(logits[:, :-1] / temperature, -1).gather(-1, ids[:, 1:, None])[..., 0]
        hidden = decoder_of(lm)(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
        labels = torch.cat([ids[:, 1:], ids.new_full((1, 1), -100)], 1)
        ours = token_logprobs(hidden, lm.get_output_embeddings(), labels, temperature=temperature,
                              transform=logit_transform(lm.config))[:, :-1]
    finally:
        lm.train(was_training)
    error = (ours - want).abs().max().item()
    dtype = lm.get_output_embeddings().weight.dtype
    if not error <= probe_tolerance(dtype):
        raise AlignError(
            f"model type {lm.config.model_type!r}: Align's log-probs differ from the model's own forward() by "
            f"{error:.3g} nats on a probe (tolerance {probe_tolerance(dtype)} in {dtype}); the family post-processes "
            "its logits in a way Align does not know (supported: final_logit_softcapping, logit_scale, "
            "logits_scaling, an lm-head bias), so training would use wrong log-probs. Please report the model.")
