"""Running a causal LM's decoder over packed rows, shared-prompt groups included.

Packed rows without a mask (position ids restarting at 0 per example) are masked by transformers
itself. Shared-prompt groups (`align.data.groups`) come with a [1, 1, N, N] bool mask (True =
attend), and transformers hands a ready 4-D mask to every layer unchanged, so it must already be
what each layer's attention needs:

- eager attention *adds* the mask to its scores: it gets 0 where allowed and the dtype's minimum
  elsewhere (a bool mask would add +1/+0 and mask nothing);
- sliding-window layers (Mistral, Phi-3, Gemma-2/3, Qwen with `use_sliding_window`) see only the
  last `sliding_window` positions: the window is built into their mask, measured in position ids
  (a branch's tokens continue the shared prompt's positions);
- models whose layers differ (Gemma's sliding and full layers) take one mask per layer type.
"""

from __future__ import annotations

import torch
from torch import nn

from align.errors import AlignError

_MASKS_BY_IMPLEMENTATION = {
    "sdpa": lambda allowed, dtype: allowed,
    "eager": lambda allowed, dtype: torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min),
}
"""attention implementation -> (bool mask, model dtype) -> the mask its layers take."""


def layer_windows(config) -> dict[str, int | None]:
    """{layer type: its sliding window, None for full attention} for the decoder's layers; a model
    without `layer_types` has one type, `all`."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:
        return {"all": window}
    windows = {}
    for layer_type in set(layer_types):
        if layer_type not in ("full_attention", "sliding_attention"):
            raise AlignError(f"model type {config.model_type!r} has {layer_type!r} layers, which shared-prompt "
                             "batches cannot mask; set shared_prompt: false in the algorithm's section")
        windows[layer_type] = window if layer_type == "sliding_attention" else None
    return windows


def shared_prompt_masks(config, allowed: torch.Tensor, position_ids: torch.Tensor,
                        dtype: torch.dtype) -> torch.Tensor | dict[str, torch.Tensor]:
    """allowed: [1, 1, N, N] bool; position_ids: [1, N] -> the 4-D mask(s) to pass as attention_mask:
    one tensor, or {layer type: tensor} when the layer types need different masks."""
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in _MASKS_BY_IMPLEMENTATION:
        raise AlignError(f"model.attn_implementation={implementation!r} cannot run shared-prompt batches (a custom "
                         f"4-D mask); use one of {sorted(_MASKS_BY_IMPLEMENTATION)}, or set shared_prompt: false in "
                         "the algorithm's section")
    to_mask = _MASKS_BY_IMPLEMENTATION[implementation]
    distance = position_ids[0, :, None] - position_ids[0, None, :]  # query position - key position, [N, N]
    windows = layer_windows(config)
    masks = {window: to_mask(allowed if window is None else allowed & (distance < window), dtype)
             for window in set(windows.values())}
    if len(masks) == 1:
        return next(iter(masks.values()))
    return {layer_type: masks[window] for layer_type, window in windows.items()}


def decoder_hidden(lm: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor | None,
                   attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The decoder's last hidden states [B, T, H] for packed rows; attention_mask: None (rows
    separated by position ids restarting at 0), or a shared-prompt [B, 1, T, T] bool mask."""
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.dtype == torch.bool:
        dtype = lm.get_input_embeddings().weight.dtype
        dtype = dtype if dtype.is_floating_point else torch.float32
        attention_mask = shared_prompt_masks(lm.config, attention_mask, position_ids, dtype)
    return lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False).last_hidden_state
