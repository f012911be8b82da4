"""Rollout engines: sample G completions per prompt behind one interface.

- `PrefixSharedEngine`: each prompt prefilled once for its group, finished rows leave the batch; on
  CUDA the decoding steps replay a CUDA graph (`align.rollout.static_decoder`).
- `HFGenerateEngine`: transformers' generate, the correctness reference.
- `auto` (the default): PrefixSharedEngine where its probe at start finds it samples the model
  exactly, transformers' generate where not (Mamba and linear-attention hybrids, BART-style decoders).
- `VLLMEngine` (`align.rollout.vllm`, imported only when asked): vLLM on a copy of the policy's
  weights, loaded before every rollout.
- `RemoteEngine` (`align.rollout.remote`): an `align serve-rollouts` process (`align.rollout.server`),
  sent the policy's weights before every rollout.

Each engine is made by a function registered in ROLLOUT_ENGINES: (model, tokenizer, sampling,
max_model_len), sampling being the recipe's SamplingConfig (or None: defaults).
"""

from __future__ import annotations

import logging
from typing import Protocol

from align.errors import AlignError
from align.models.layouts import inexact_layouts
from align.registry import ROLLOUT_ENGINES
from align.rollout.hf import HFGenerateEngine
from align.rollout.prefix_shared import ENGINE_FIX, PrefixSharedEngine
from align.rollout.sampling import Rollout, SamplingParams

logger = logging.getLogger(__name__)


class RolloutEngine(Protocol):
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, group_size: int = 1) -> Rollout:
        """G completions for each of the N prompts, grouped by prompt (see `Rollout`)."""

    def sync_weights(self) -> None:
        """Make the engine sample from the policy's current weights (a no-op for in-process engines)."""


@ROLLOUT_ENGINES.register("prefix_shared")
def prefix_shared(model, tokenizer, sampling=None, max_model_len: int = 2048) -> RolloutEngine:
    return PrefixSharedEngine(model, tokenizer, static=None if getattr(sampling, "cuda_graphs", True) else False)


@ROLLOUT_ENGINES.register("hf")
def hf(model, tokenizer, sampling=None, max_model_len: int = 2048) -> RolloutEngine:
    return HFGenerateEngine(model, tokenizer)


@ROLLOUT_ENGINES.register("auto")
def auto(model, tokenizer, sampling=None, max_model_len: int = 2048) -> RolloutEngine:
    """prefix_shared, or transformers' generate where prefix_shared's probe
    (`PrefixSharedEngine.check_matches_forward`) finds it cannot sample the model exactly. A probe
    that fails with an error on a model whose batch layouts are exact (`inexact_layouts`: the
    families prefix_shared cannot run fail those too) is raised, not sampled around: a bug to see."""
    try:
        return prefix_shared(model, tokenizer, sampling, max_model_len)
    except AlignError as refusal:
        if refusal.__cause__ is not None and not inexact_layouts(getattr(model, "get_base_model", lambda: model)()):
            raise
        logger.warning("sampling with transformers' generate (engine auto), as prefix_shared cannot: %s",
                       str(refusal).removesuffix(f"; {ENGINE_FIX}"))
        return hf(model, tokenizer, sampling, max_model_len)


@ROLLOUT_ENGINES.register("vllm")
def vllm(model, tokenizer, sampling=None, max_model_len: int = 2048) -> RolloutEngine:
    from align.rollout.vllm import make_vllm_engine  # vLLM is imported only when asked for

    return make_vllm_engine(model, tokenizer, getattr(sampling, "vllm", None), max_model_len)


@ROLLOUT_ENGINES.register("server")
def server(model, tokenizer, sampling=None, max_model_len: int = 2048) -> RolloutEngine:
    from align.config import ServerConfig
    from align.rollout.remote import RemoteEngine

    return RemoteEngine(model, tokenizer, getattr(sampling, "server", None) or ServerConfig())


def in_process_engine(model, tokenizer) -> RolloutEngine:
    """The `auto` engine on `model`, for eval samples and `align generate`, which have no engine setting."""
    return auto(model, tokenizer)


def make_engine(name: str, model, tokenizer, sampling=None, max_model_len: int = 2048) -> RolloutEngine:
    """The registered engine `name` (prefix_shared, hf, vllm, server, or a plug-in) for the (peft or
    plain) causal LM `model`; sampling: the recipe's SamplingConfig (vllm's and server's settings), and
    max_model_len the default longest prompt + completion."""
    return ROLLOUT_ENGINES.get(name)(model, tokenizer, sampling, max_model_len)


__all__ = ["HFGenerateEngine", "PrefixSharedEngine", "Rollout", "RolloutEngine", "SamplingParams", "in_process_engine",
           "make_engine"]
