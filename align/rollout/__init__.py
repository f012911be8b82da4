"""Rollout engines: sample G completions per prompt behind one interface.

- `PrefixSharedEngine` (default): prompt KV computed once per group, finished rows leave the batch.
- `HFGenerateEngine`: transformers' generate, the correctness reference.
- vLLM: optional, on a GPU (`sampling.engine: vllm`).
"""

from __future__ import annotations

from typing import Protocol

from align.errors import AlignError
from align.rollout.hf import HFGenerateEngine
from align.rollout.prefix_shared import PrefixSharedEngine
from align.rollout.sampling import Rollout, SamplingParams


class RolloutEngine(Protocol):
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, group_size: int = 1) -> Rollout: ...

    def sync_weights(self) -> None:
        """Make the engine sample from the policy's current weights."""


def make_engine(name: str, model, tokenizer) -> RolloutEngine:
    """`prefix_shared` | `hf` | `vllm` for the (peft or plain) causal LM `model`."""
    if name == "prefix_shared":
        return PrefixSharedEngine(model, tokenizer)
    if name == "hf":
        return HFGenerateEngine(model, tokenizer)
    if name == "vllm":
        raise AlignError("sampling.engine: vllm is not available in this version of Align (it needs a CUDA GPU and "
                         "`pip install vllm`); use prefix_shared")
    raise AlignError(f"sampling.engine: unknown engine {name!r}; use prefix_shared, hf or vllm")


__all__ = ["HFGenerateEngine", "PrefixSharedEngine", "Rollout", "RolloutEngine", "SamplingParams", "make_engine"]
