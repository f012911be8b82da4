"""Running a causal LM's decoder over packed rows, shared-prompt groups included.

Packed rows come without a mask: position ids restart at 0 for each example. Transformers could
find the examples itself, but it asks the device whether any row restarts (a host read, per
forward), so for attention implementations that take a 4-D mask the block-diagonal causal mask is
built here, on the device, from the position ids (`packed_rows_mask`); flash-attention-2 gets the
position ids alone (its varlen kernel finds the examples). Shared-prompt groups
(`align.data.groups`) come with a [R, 1, L, L] bool mask (True = attend). Transformers hands a
ready 4-D mask to every layer unchanged, so it must already be what each layer's attention needs:

- eager attention *adds* the mask to its scores: it gets 0 where allowed and the dtype's minimum
  elsewhere (a bool mask would add +1/+0 and mask nothing);
- sliding-window layers (Mistral, Phi-3, Gemma-2/3, Qwen with `use_sliding_window`) see only the
  last `sliding_window` positions: the window is built into their mask, measured in position ids
  (a branch's tokens continue the shared prompt's positions);
- models whose layers differ (Gemma's sliding and full layers) take one mask per layer type.

On CUDA, Align's forwards (and its samplers) run SDPA without cuDNN's kernel (`attention_kernels`), and
packed rows whose boundaries come along take the varlen kernel (`align.models.varlen`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from align.errors import AlignError
from align.models import varlen
from align.models.head import decoder_of

_MASKS_BY_IMPLEMENTATION = {
    "sdpa": lambda allowed, dtype: allowed,
    varlen.NAME: lambda allowed, dtype: allowed,  # SDPA's own masks (`align.models.varlen`)
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
            raise AlignError(f"model type {config.model_type!r} has {layer_type!r} layers, which no attention mask "
                             "keeps inside one packed example or one shared-prompt branch")
        windows[layer_type] = window if layer_type == "sliding_attention" else None
    return windows


SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
"""The SDPA kernels Align's forwards may use on CUDA: every one but cuDNN's. cuDNN builds an
execution plan for each new shape, and packed rows (like decoding steps) take a new shape every
call: measured on an H200 (torch 2.11), ~2.4 ms of host time per attention call, forward and
backward, ~45% of an SFT step of the 0.5B benchmark model, while the GPU waited. The
memory-efficient kernel takes the same masks (flash takes unmasked causal rows) at ~20 us."""


KERNEL_CHOICE_DEVICES = {"cuda"}
"""Device types where `attention_kernels` restricts SDPA (a CPU has no cuDNN kernel)."""


def attention_kernels(device: torch.device):
    """The context every Align forward, and every backward, runs in: `sdpa_kernel(SDPA_BACKENDS)`
    on CUDA, nothing elsewhere. A backward reuses its forward's kernel, but activation checkpointing
    runs the forward again during the backward, where it must pick the same kernel (else its saved
    tensors differ: torch.utils.checkpoint raises), so `Trainer` runs backward in it too."""
    return sdpa_kernel(SDPA_BACKENDS) if device.type in KERNEL_CHOICE_DEVICES else contextlib.nullcontext()


def attention_implementation(config) -> str:
    return getattr(config, "_attn_implementation", None) or "eager"


def takes_4d_masks(config) -> bool:
    """Whether the model's attention implementation takes Align's 4-D masks (packed rows' blocks,
    shared-prompt groups); flash_attention_2 takes position ids alone."""
    return attention_implementation(config) in _MASKS_BY_IMPLEMENTATION


def packed_rows_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """position_ids [R, L] restarting at 0 for each packed example -> [R, 1, L, L] bool: causal
    attention inside each example (computed on the position ids' device, no host read)."""
    example = (position_ids == 0).cumsum(-1)  # which example of its row each token belongs to
    causal = torch.ones(position_ids.shape[-1], position_ids.shape[-1], dtype=torch.bool,
                        device=position_ids.device).tril()
    return ((example[:, :, None] == example[:, None, :]) & causal)[:, None]


def shared_prompt_masks(config, allowed: torch.Tensor, position_ids: torch.Tensor,
                        dtype: torch.dtype) -> torch.Tensor | dict[str, torch.Tensor]:
    """allowed: [R, 1, L, L] bool; position_ids: [R, L] -> the 4-D mask(s) to pass as attention_mask:
    one tensor, or {layer type: tensor} when the layer types need different masks."""
    implementation = attention_implementation(config)
    if implementation not in _MASKS_BY_IMPLEMENTATION:
        raise AlignError(f"model.attn_implementation={implementation!r} cannot run shared-prompt batches (a custom "
                         f"4-D mask); use one of {sorted(_MASKS_BY_IMPLEMENTATION)}, or set shared_prompt: false in "
                         "the algorithm's section")
    to_mask = _MASKS_BY_IMPLEMENTATION[implementation]
    windows = layer_windows(config)
    if any(window is not None for window in windows.values()):  # query - key position, [R, 1, L, L]
        distance = (position_ids[:, :, None] - position_ids[:, None, :])[:, None]
    masks = {window: to_mask(allowed if window is None else allowed & (distance < window), dtype)
             for window in set(windows.values())}
    if len(masks) == 1:
        return next(iter(masks.values()))
    return {layer_type: masks[window] for layer_type, window in windows.items()}


def decoder_hidden(lm: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor | None,
                   attention_mask: torch.Tensor | None, cu_seq_lens: torch.Tensor | None = None,
                   max_seq_len: int | None = None) -> torch.Tensor:
    """The decoder's last hidden states [B, T, H]; attention_mask: None (packed rows, examples
    separated by position ids restarting at 0), a shared-prompt [B, 1, T, T] bool mask, or a [B, T]
    padding mask. Packed rows may come with their examples' boundaries (`align.models.varlen.segments`:
    cu_seq_lens [N + 1], max_seq_len), which a model switched to varlen attention uses instead of a mask."""
    with attention_kernels(input_ids.device):
        decoder = decoder_of(lm)
        if attention_mask is None and cu_seq_lens is not None and varlen.uses_varlen(lm.config):
            return decoder(input_ids=input_ids, attention_mask=varlen.NO_MASK, position_ids=position_ids,
                           cu_seq_lens_q=cu_seq_lens, max_length_q=max_seq_len, use_cache=False).last_hidden_state
        if attention_mask is None and position_ids is not None and takes_4d_masks(lm.config):
            attention_mask = packed_rows_mask(position_ids)
        if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.dtype == torch.bool:
            dtype = lm.get_input_embeddings().weight.dtype
            dtype = dtype if dtype.is_floating_point else torch.float32
            attention_mask = shared_prompt_masks(lm.config, attention_mask, position_ids, dtype)
        return decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).last_hidden_state
