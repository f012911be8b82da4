"""Rollout engines: sample G completions per prompt behind one interface.

- `PrefixSharedEngine` (default): each prompt prefilled once for its group, finished rows leave the batch.
- `HFGenerateEngine`: transformers' generate, the correctness reference.
- `VLLMEngine` (`align.rollout.vllm`, imported only when asked): vLLM on a copy of the policy's
  weights, loaded before every rollout.
"""

from __future__ import annotations

from typing import Protocol

from align.errors import AlignError
from align.rollout.hf import HFGenerateEngine
from align.rollout.prefix_shared import PrefixSharedEngine
from align.rollout.sampling import Rollout, SamplingParams


class RolloutEngine(Protocol):
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, group_size: int = 1) -> Rollout:
        """G completions for each of the N prompts, grouped by prompt (see `Rollout`)."""

    def sync_weights(self) -> None:
        """Make the engine sample from the policy's current weights (a no-op for in-process engines)."""


def make_engine(name: str, model, tokenizer, vllm=None, max_model_len: int = 2048) -> RolloutEngine:
    """`prefix_shared` | `hf` | `vllm` for the (peft or plain) causal LM `model`; vllm: the
    VLLMConfig, and max_model_len its default longest prompt + completion."""
    if name == "prefix_shared":
        return PrefixSharedEngine(model, tokenizer)
    if name == "hf":
        return HFGenerateEngine(model, tokenizer)
    if name == "vllm":
        from align.rollout.vllm import make_vllm_engine

        return make_vllm_engine(model, tokenizer, vllm, max_model_len)
    raise AlignError(f"sampling.engine: unknown engine {name!r}; use prefix_shared, hf or vllm")


__all__ = ["HFGenerateEngine", "PrefixSharedEngine", "Rollout", "RolloutEngine", "SamplingParams", "make_engine"]
