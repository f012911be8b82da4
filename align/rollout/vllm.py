"""vLLM as a rollout engine: not supported yet.

An engine outside the trained modules must receive the policy's weights before every rollout
(`sync_weights`: merge the LoRA adapter, dequantize a QLoRA base, load the result into vLLM's
model) and must map our SamplingParams and Rollout onto vLLM's exactly. Align has no tested
implementation of that against vLLM's API, so asking for it is a clear error rather than an
engine that might sample from stale weights.
"""

from __future__ import annotations

import importlib.util

from align.errors import AlignError


def make_vllm_engine(model, tokenizer):
    """Raise AlignError saying why the vLLM engine cannot be used and what to use instead."""
    if importlib.util.find_spec("vllm") is None:
        raise AlignError("sampling.engine: vllm is not installed (pip install vllm; needs a CUDA GPU); "
                         "use prefix_shared, which samples on the policy's own modules")
    raise AlignError("sampling.engine: vllm is installed, but this version of Align has no tested vLLM engine "
                     "(weight sync from the trained policy is not implemented); use prefix_shared")
