"""Packed rows through FlashAttention's variable-length kernel (`torch.nn.attention.varlen`).

SDPA keeps packed examples apart with a block-diagonal [R, 1, L, L] mask (`align.models.packed`),
and a masked kernel computes every block of it: attention quadratic in the row's length, however
short its examples (an 8k-token row of 75 chats pays ~75x what the chats need). The varlen kernel
takes the examples' boundaries instead and computes inside each example only.

Transformers picks a model's attention function by name (`AttentionInterface`). Align registers
`align_sdpa`: transformers' own SDPA function and masks for every call, unless the forward passes
`cu_seq_lens_q` (transformers' own keyword for example boundaries), then the varlen kernel. A
model loaded where CUDA is, whose attention is plain SDPA (`varlen_refusal` says why not), is
switched to it (`use_varlen`); its outputs elsewhere are transformers' SDPA unchanged.

The boundaries come from the host (`segments`, at `Trainer._to_device`), so the forward never
reads the device to find them. Where the kernel cannot run (a CPU, fp32, a head wider than 256),
the attention falls back to SDPA with the block-diagonal mask built from the same boundaries on
the device: exact either way, fast where the kernel runs.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from align.errors import AlignError
from align.models.dropout import drops_out

NAME = "align_sdpa"

NAMED_SDPA_FAMILIES = frozenset({"falcon", "gemma4", "gemma4_unified", "glm5_next"})
"""Model types whose code compares `_attn_implementation` with "sdpa" by name (another name would
change their behaviour): never switched. tests/test_varlen.py checks the installed transformers has
no other."""

NO_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)
"""Handed to the model as its attention mask with the boundaries: transformers passes a 4-D mask
through without building one (building one would read the device to find the packed examples);
`attention` ignores it when boundaries come with it."""

try:
    import torch.nn.attention.varlen
    _VARLEN_PARAMETERS = set(inspect.signature(torch.nn.attention.varlen.varlen_attn).parameters)
except ImportError:  # torch < 2.10
    _VARLEN_PARAMETERS = set()
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_DEVICES = {"cuda"}
"""Device types the varlen kernel runs on (where `Trainer._to_device` hands the boundaries over)."""


def varlen_refusal(config) -> str | None:
    """Why a model with this config cannot take the varlen kernel (None: it can)."""
    if not _VARLEN_PARAMETERS or "window_size" not in _VARLEN_PARAMETERS:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen with windows (torch >= 2.11)"
    if getattr(config, "_attn_implementation", None) not in ("sdpa", NAME):
        return f"attention implementation {config._attn_implementation!r} (varlen replaces sdpa only)"
    if config.model_type in NAMED_SDPA_FAMILIES:
        return f"model type {config.model_type!r} branches on the name 'sdpa'"
    layer_types = set(getattr(config, "layer_types", None) or ())
    if layer_types - {"full_attention"}:
        return f"layer types {sorted(layer_types - {'full_attention'})} (the kernel runs full causal attention only)"
    if not layer_types and getattr(config, "sliding_window", None) is not None and \
            getattr(config, "use_sliding_window", True):
        return "sliding-window layers"
    for key in ("attn_logit_softcapping", "attention_sink", "sinks"):
        if getattr(config, key, None):
            return f"config.{key}"
    if getattr(config, "attention_dropout", 0.0):
        return "attention dropout (the kernel has none)"
    return None


def use_varlen(model: nn.Module) -> bool:
    """Switch `model` (a transformers model) to `align_sdpa` where `varlen_refusal` allows and a
    short probe finds the examples' boundaries reaching its every attention call (the decoder layers
    of some families, StableLM and Nemotron among them, drop the keyword arguments that carry them);
    -> whether it was switched."""
    config = getattr(model, "config", None)
    if config is None or varlen_refusal(config) is not None or not model._can_set_attn_implementation() \
            or not _gpu_takes_kernel():
        return False
    previous = config._attn_implementation
    model.set_attn_implementation(NAME)
    if not _boundaries_reach_attention(model):
        model.set_attn_implementation(previous)
        return False
    return True


def _gpu_takes_kernel() -> bool:
    """Whether this process's CUDA device, if any, runs FlashAttention's kernel (compute capability 8.0,
    Ampere, or newer); without CUDA, a device a test makes count as a kernel device."""
    return not torch.cuda.is_available() or torch.cuda.get_device_capability() >= (8, 0)


_PROBED: list[bool] | None = None
"""While `_boundaries_reach_attention` runs: whether each attention call got the boundaries."""


def _boundaries_reach_attention(model: nn.Module) -> bool:
    """Two packed 2-token examples through the decoder with their boundaries: whether every attention
    call received them."""
    global _PROBED
    from align.models.head import decoder_of

    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    _PROBED = []
    try:
        with torch.no_grad():
            decoder_of(model)(input_ids=torch.zeros(1, 4, dtype=torch.long, device=device), attention_mask=NO_MASK,
                              position_ids=torch.tensor([[0, 1, 0, 1]], device=device),
                              cu_seq_lens_q=torch.tensor([0, 2, 4], dtype=torch.int32, device=device),
                              max_length_q=2, use_cache=False)
        return bool(_PROBED) and all(_PROBED)
    except Exception:  # noqa: BLE001  (a family the probe cannot run keeps SDPA, which needs no probe)
        return False
    finally:
        _PROBED = None


def uses_varlen(config) -> bool:
    return getattr(config, "_attn_implementation", None) == NAME


def one_row(model: nn.Module, device: torch.device, autocast_dtype: torch.dtype | None) -> bool:
    """Whether `model`'s packed examples on `device` all take the varlen kernel in training
    (`_kernel_runs`' conditions that the model decides), under autocast to `autocast_dtype` (None: no
    autocast; then every floating-point weight but LoRA's must be in one 16-bit dtype, so that
    queries are too: peft casts an adapter's output to its base layer's dtype). The kernel computes
    inside each example whatever the rows, so there a micro-batch is best one row: more rows would
    only add padding (and, in compiled layers, a batch dimension that changes). Elsewhere, and in a
    call the kernel does not take (attention dropout: GPT-2's attn_pdrop), SDPA's block-diagonal
    mask is quadratic in a row's length."""
    config = getattr(model, "config", None)
    if device.type not in KERNEL_DEVICES or config is None or not uses_varlen(config):
        return False
    dtypes = {p.dtype for name, p in model.named_parameters()
              if p.is_floating_point() and not any(part.startswith("lora_") for part in name.split("."))}
    if (autocast_dtype or (dtypes.pop() if len(dtypes) == 1 else None)) not in _KERNEL_DTYPES:
        return False
    # transformers' attention modules; none found: nothing says the kernel runs
    attentions = [m for m in model.modules() if hasattr(m, "scaling") and hasattr(m, "head_dim")]
    # dropout of an attention module's own (its rate, or a layer such as GPT-2's attn_dropout; not that
    # of a LoRA adapter inside its projections) sends its training calls to SDPA's mask
    own_dropout = lambda m: drops_out(m) or any(drops_out(child) for child in m.children())  # noqa: E731
    return bool(attentions) and all(_heads_taken(m.head_dim, m.scaling) and not own_dropout(m) for m in attentions)


def segments(position_ids: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """position_ids [R, L] of packed rows (restarting at 0 for each example, and for each row's
    padding) -> (cu_seq_lens [N + 1] int32: where each of the N examples starts in the flattened
    [R * L] tokens, then R * L; the longest example's length), or None for rows that are not
    packed examples (a row not starting at position 0). Reads position_ids: call it on the host."""
    if position_ids.dim() != 2 or position_ids.shape[-1] == 0 or bool((position_ids[:, 0] != 0).any()):
        return None
    flat = position_ids.reshape(-1)
    starts = torch.cat([(flat == 0).nonzero().flatten(), torch.tensor([flat.numel()], device=flat.device)])
    return starts.to(torch.int32), int(starts.diff().max())


def _segment_mask(cu_seq_lens: torch.Tensor, rows: int, length: int) -> torch.Tensor:
    """The block-diagonal causal mask [R, 1, L, L] (True = attend) of the examples `cu_seq_lens` marks."""
    token = torch.arange(rows * length, device=cu_seq_lens.device, dtype=cu_seq_lens.dtype)
    example = (torch.searchsorted(cu_seq_lens, token, right=True)).view(rows, length)
    causal = torch.ones(length, length, dtype=torch.bool, device=cu_seq_lens.device).tril()
    return ((example[:, :, None] == example[:, None, :]) & causal)[:, None]


def _kernel_runs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float,
                 scaling: float | None, kwargs: dict) -> bool:
    """Whether the varlen kernel computes this call exactly as SDPA would: CUDA, half precision,
    head width the kernel takes, no dropout, the default scale (unless this torch takes a scale),
    none of the extras SDPA's path handles (soft-capping, sinks, a position bias)."""
    width = query.shape[-1]
    return (query.is_cuda and query.dtype in _KERNEL_DTYPES and _heads_taken(width, scaling) and not dropout
            and key.shape[-1] == value.shape[-1] == width and query.shape[1] % key.shape[1] == 0
            and all(kwargs.get(name) is None for name in ("softcap", "s_aux", "position_bias")))


def _heads_taken(width: int, scaling: float | None) -> bool:
    """Whether the kernel takes heads of this width with this scale: at most 256 wide, a multiple of
    8, and the default scale unless this torch's kernel takes a scale."""
    default_scale = scaling is None or abs(scaling - width ** -0.5) <= 1e-6 * width ** -0.5
    return width <= 256 and width % 8 == 0 and ("scale" in _VARLEN_PARAMETERS or default_scale)


def _autocast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors as autocast hands them to SDPA (one of its lower-precision ops): in autocast's
    dtype where it is on. (Under autocast with fp32 weights, rotary embeddings leave query and key
    in fp32.)"""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors)


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None, **kwargs):
    """Transformers' attention-function signature: query [R, Hq, L, D], key/value [R, Hkv, L, D] ->
    ([R, L, Hq, D], None). With cu_seq_lens_q (and max_length_q) the rows are packed examples:
    varlen kernel, or SDPA with their mask; without, transformers' SDPA as it is."""
    if _PROBED is not None:
        _PROBED.append(cu_seq_lens_q is not None)
    if cu_seq_lens_q is None:
        if attention_mask is NO_MASK:  # (what `use_varlen`'s probe rules out: never attend to all of a row)
            raise AlignError(f"align_sdpa: packed rows reached {type(module).__name__} without their boundaries "
                             "(its layer dropped them); this model should not have been switched to the varlen "
                             "kernel (align.models.varlen.use_varlen)")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("sliding_window") is not None:
        raise ValueError("align_sdpa: packed examples with a sliding window (use_varlen refuses such models)")
    rows, heads, length, width = query.shape
    q, k, v = _autocast(query, key, value)
    if not _kernel_runs(q, k, v, dropout, scaling, kwargs):
        mask = _segment_mask(cu_seq_lens_q, rows, length)
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    query, key, value = q, k, v
    groups = heads // key.shape[1]
    if groups > 1 and "enable_gqa" not in _VARLEN_PARAMETERS:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    flat = lambda t: t.transpose(1, 2).reshape(rows * length, t.shape[1], width)  # noqa: E731  [R*L, H, D]
    extra = {"enable_gqa": True} if groups > 1 and "enable_gqa" in _VARLEN_PARAMETERS else {}
    if "scale" in _VARLEN_PARAMETERS:
        extra["scale"] = scaling
    out = torch.nn.attention.varlen.varlen_attn(
        flat(query), flat(key), flat(value), cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q,
        window_size=(-1, 0), **extra)
    return out.view(rows, length, heads, width), None


AttentionInterface.register(NAME, attention)
AttentionMaskInterface.register(NAME, sdpa_mask)
