"""What every rollout engine shares: sampling settings, the Rollout it returns, the logit
processing (transformers' own processors, in generate's order) and the stop rules."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
                                                    RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    top_k: int = 0
    """0 turns top-k off."""
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    """Stop strings: a completion ends with the token that completes one."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Stop ids besides the tokenizer's EOS."""
    seed: int | None = None
    """Seeds the sampling generator: the same seed and weights give the same tokens."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Rollout:
    """Completions of N prompts, G per prompt, grouped: rows i*G .. i*G+G-1 belong to prompt i.

    completion_ids hold the generated tokens up to and including the EOS / stop token that ended
    them (nothing after, no padding); finished[i] is False when a row hit max_new_tokens instead.
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    finished: list[bool]
    group_size: int

    def prompt_index(self, row: int) -> int:
        return row // self.group_size

    def __len__(self) -> int:
        return len(self.completion_ids)


def logits_processors(params: SamplingParams) -> LogitsProcessorList:
    """transformers' processors in the order `generate` applies them (penalty, then the warpers)."""
    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.greedy:
        return processors
    if params.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        processors.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        processors.append(TopPLogitsWarper(params.top_p))
    if params.min_p:
        processors.append(MinPLogitsWarper(params.min_p))
    return processors


def next_tokens(scores: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Processed scores [B, V] -> next token ids [B]: argmax when greedy, else a sample."""
    if params.greedy:
        return scores.argmax(-1)
    probs = torch.softmax(scores.float(), -1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def stop_ids(tokenizer, params: SamplingParams) -> set[int]:
    ids = set(params.stop_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def hits_stop_string(tokenizer, tokens: list[int], stops: list[str]) -> bool:
    """Whether the decoded completion contains a stop string (checked after every token, so the
    first time it is true the last token completed it)."""
    if not stops:
        return False
    text = tokenizer.decode(tokens[-64:], skip_special_tokens=False)
    return any(s in text for s in stops)
