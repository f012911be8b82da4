"""Decoding steps of fixed shape, replayed from a CUDA graph.

A decoding step of a small model is a few hundred small kernels. Launched one by one from Python
(transformers' forward), the GPU waits on the host: on an H200 a GRPO rollout of the 0.5B benchmark
model (64 rows) spent ~20 ms per step, mostly launching. Here every row keeps its place until the
rollout ends (finished rows ride along, their tokens unused), keys and values live in preallocated
[B, kv_heads, S, D] buffers written at one slot per step, and the slot, the positions and the mask
are device tensors updated in place. Every step then has the same shapes and addresses, so on CUDA
it is captured once per rollout in a CUDA graph and replayed: one launch per step. Where no graph
is captured (a CPU, or a capture that failed) the same step runs eagerly, with the same numbers.

`StaticDecoder` is the KV cache the model is handed (`update(keys, values, layer_idx)`, what
transformers' attention layers call) and runs the steps. `static_decoding_refusal` says which
models it cannot decode exactly (sliding windows, a cache layout other than plain keys and values):
those decode the usual way.
"""

from __future__ import annotations

import logging

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from align.models.packed import _MASKS_BY_IMPLEMENTATION, attention_implementation, layer_windows, shared_prompt_masks
from align.rollout.sampling import with_cache

logger = logging.getLogger(__name__)


def static_decoding_refusal(model: torch.nn.Module, cache: DynamicCache) -> str | None:
    """Why `model`, prefilled into `cache`, cannot decode through a `StaticDecoder` (None: it can)."""
    config = getattr(model, "config", None)
    if config is None:
        return "the model has no config"
    if attention_implementation(config) not in _MASKS_BY_IMPLEMENTATION:
        return f"attention implementation {attention_implementation(config)!r} takes no ready 4-D mask"
    try:
        windows = layer_windows(config)
    except Exception as error:  # noqa: BLE001 (an unknown layer type: AlignError)
        return str(error)
    if any(window is not None for window in windows.values()):
        return "sliding-window layers (the static cache keeps every column)"
    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        return f"cache layers {sorted({type(layer).__name__ for layer in cache.layers})} (plain keys and values only)"
    hooked = next((name for name, module in model.named_modules() if _gathers_weights(module)), None)
    if hooked is not None:
        return (f"module {hooked or 'the model'} gathers or moves its weights in hooks (fsdp, DeepSpeed, "
                "accelerate offload), which a CUDA graph would not replay")
    return None


def _gathers_weights(module: torch.nn.Module) -> bool:
    """FSDP2 modules, DeepSpeed ZeRO-3 parameters, DTensor weights, accelerate's device-map hooks."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    if isinstance(module, FSDPModule) or hasattr(module, "_hf_hook"):
        return True
    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in module.parameters(recurse=False))


def check_first_step(logits: torch.Tensor, expected: torch.Tensor, compute_dtype: torch.dtype) -> None:
    """The static decoder's first logits [B, V] against the usual step's: their log-probs agree
    within float noise (1e-3 when the model computes in float32, its keys' dtype; 5e-2 in a 16-bit
    dtype, whatever dtype its logits come out in), or StaticDecodingError."""
    tolerance = 1e-3 if compute_dtype in (torch.float32, torch.float64) else 5e-2
    difference = (torch.log_softmax(logits.float(), -1) - torch.log_softmax(expected.float(), -1)).abs().max()
    if not difference <= tolerance:  # (NaN included)
        raise StaticDecodingError(f"its first step's log-probs differ from the usual step's by {float(difference):.3g}")


class StaticDecoder:
    """Decoding over preallocated keys and values; on CUDA each step replays a CUDA graph.

    prompt_cache: the prefill's keys and values of the B rows ([B, kv_heads, L, D] per layer); mask
    [B, L]: 1 on prompt tokens, 0 on left padding; positions [B]: each row's next position id; graphs:
    capture the steps (CUDA). Steps write columns L, L+1, ... of the buffers.
    """

    def __init__(self, model: torch.nn.Module, prompt_cache: DynamicCache, mask: torch.Tensor,
                 positions: torch.Tensor, max_new_tokens: int, graphs: bool):
        self.model, self.graphs = model, graphs
        rows, length = mask.shape
        size = length + max_new_tokens  # every column a rollout can feed
        self.keys, self.values = [], []
        for layer in prompt_cache.layers:
            for prompt, buffers in ((layer.keys, self.keys), (layer.values, self.values)):
                buffer = prompt.new_zeros(rows, prompt.shape[1], size, prompt.shape[3])
                buffer[:, :, :length] = prompt
                buffers.append(buffer)
        self.allowed = torch.zeros(rows, 1, 1, size, dtype=torch.bool, device=mask.device)
        self.allowed[:, 0, 0, :length] = mask.bool()
        self.slot = torch.tensor([length], device=mask.device)
        self.positions = positions[:, None].clone()
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=mask.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.stream = torch.cuda.Stream(mask.device) if graphs else None  # where the graph is captured
        self.logits: torch.Tensor | None = None  # the graph's output
        self.capture_failed = False
        self.updates = 0

    # ---- the cache protocol (what the model's attention layers call) --------------------------------
    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write the step's [B, kv_heads, 1, D] keys and values at the slot; return all columns."""
        self.keys[layer_idx].index_copy_(2, self.slot, keys)
        self.values[layer_idx].index_copy_(2, self.slot, values)
        self.updates += 1
        return self.keys[layer_idx], self.values[layer_idx]

    # ---- steps --------------------------------------------------------------------------------------
    def step(self, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Feed `tokens` [B'] to the live rows `rows` [B'] (the others ride along); returns the live
        rows' next-token logits [B', V]. The first step runs eagerly and is checked (every layer
        must have used this cache), then captured; the later ones replay the graph."""
        self.ids.index_copy_(0, rows, tokens[:, None])
        if self.graph is not None:
            self.graph.replay()
            return self.logits[rows]
        first = self.updates == 0
        if first and self.graphs:  # the first step on the stream the graph is captured on (lazy setup)
            self.stream.wait_stream(torch.cuda.current_stream(self.ids.device))
            try:
                with torch.cuda.stream(self.stream):
                    logits = self._forward()
            finally:
                torch.cuda.current_stream(self.ids.device).wait_stream(self.stream)
        else:
            logits = self._forward()
        if first and self.updates != len(self.keys):
            raise StaticDecodingError(f"{self.updates} cache updates for {len(self.keys)} layers")
        if first and self.graphs:
            self._capture()
        return logits[rows]

    def _forward(self) -> torch.Tensor:
        """One step for every row: the slot becomes visible, the model runs, slot and positions advance."""
        self.allowed.index_fill_(-1, self.slot, True)
        config = self.model.config
        mask = shared_prompt_masks(config, self.allowed, self.positions, self.keys[0].dtype)
        logits = self.model(input_ids=self.ids, attention_mask=mask, position_ids=self.positions,
                            **with_cache(self.model, self)).logits[:, -1]
        self.slot += 1
        self.positions += 1
        return logits

    def _capture(self) -> None:
        """Record `_forward` in a CUDA graph (the kernels are recorded, not run), on the stream the
        first step ran on. (`torch.cuda.graph` would also empty the allocator's cache, which the
        training step after the rollout would then refill.) A capture that fails (an operation that
        reads the device, say) leaves the steps eager, with a warning naming the operation's error."""
        graph, cause = torch.cuda.CUDAGraph(), None
        try:
            with torch.cuda.stream(self.stream):
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    self.logits = self._forward()
                except Exception as error:  # noqa: BLE001 (capture_end's own error would hide it)
                    cause = error
                    raise
                finally:
                    graph.capture_end()
        except Exception as error:  # noqa: BLE001
            error = cause or error
            logger.warning("decoding without a CUDA graph: capture failed (%s: %s)", type(error).__name__, error)
            self.graphs, self.capture_failed, self.logits = False, True, None
            return
        self.graph = graph


class StaticDecodingError(RuntimeError):
    """The model did not decode through the static cache as expected (the engine decodes the usual way)."""
