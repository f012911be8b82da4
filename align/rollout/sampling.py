"""What every rollout engine shares: the sampling settings, the Rollout it returns, the logit
processing (transformers' own processors, in generate's order), the stop rule, and running a
model for inference."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
                                                    RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from align.data.chat import reply_closing_ids
from align.models.compiled import eager
from align.models.packed import attention_kernels

log = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0
    """0 means greedy decoding (argmax); the other warpers are then ignored."""
    top_p: float = 1.0
    top_k: int = 0
    """0 turns top-k off."""
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    """transformers' semantics: over the prompt and the completion so far."""
    stop: list[str] = field(default_factory=list)
    """Stop strings: a completion ends with the token that completes one (its decoded text then
    contains the string for the first time)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Stop ids besides the model's EOS ids (`eos_token_ids`)."""
    seed: int | None = None
    """Seeds the sampling generator: the same seed and weights give the same tokens."""

    def __post_init__(self):
        checks = {"max_new_tokens": self.max_new_tokens >= 1, "temperature": self.temperature >= 0,
                  "top_p": 0 < self.top_p <= 1, "top_k": self.top_k >= 0, "min_p": 0 <= self.min_p <= 1,
                  "repetition_penalty": self.repetition_penalty > 0}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"SamplingParams.{name}: {getattr(self, name)!r} is out of range")

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


def check_prompts(prompt_ids: list[list[int]], group_size: int) -> None:
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, got {group_size}")
    for i, prompt in enumerate(prompt_ids):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")


def logits_processors(params: SamplingParams) -> LogitsProcessorList:
    """transformers' processors in the order `generate` applies them: the repetition penalty, then
    (when sampling) temperature, top-k, top-p, min-p. Call as processors(input_ids [B, T], scores [B, V])."""
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


def sampling_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A generator on `device` seeded with params.seed (None: the global RNG is used)."""
    if params.seed is None or params.greedy:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def next_tokens(scores: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Processed float32 scores [B, V] -> next token ids [B]: argmax when greedy, else a sample."""
    if params.greedy:
        return scores.argmax(-1)
    return sample_categorical(torch.softmax(scores, -1), generator)


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One sample per row of probs [B, V] -> [B], by inverting the cumulative distribution: one
    uniform per row and a binary search. The same distribution as torch.multinomial, ~20x faster
    on a CPU for a 32k vocabulary. The sums run in float64 so the tail keeps its mass; a token of
    probability 0 is never drawn (the first cumulative sum above u is taken)."""
    cumulative = probs.double().cumsum(-1)
    u = torch.rand(len(probs), 1, generator=generator, device=probs.device, dtype=torch.float64)
    return torch.searchsorted(cumulative, u * cumulative[:, -1:], right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)


def eos_token_ids(tokenizer, model) -> list[int]:
    """The ids that end a completion: the tokenizer's EOS, then the EOS ids of the model's generation
    config (an instruct model's end of turn: Llama 3's <|eot_id|>, Gemma's <end_of_turn>, Qwen's
    <|im_end|> beside <|endoftext|>), as `generate`, vLLM and TRL stop at them. Where none of these
    closes a reply in the chat template (a base model given a template, or one SFT trained on it),
    also the template's end of turn, which is what the model learns to write when its reply ends;
    logged once. model: a transformers model (under a peft or compile wrapper), or its GenerationConfig."""
    generation_config = model if isinstance(model, GenerationConfig) else getattr(model, "generation_config", None)
    ids = list(dict.fromkeys(i for i in [tokenizer.eos_token_id, *configured_eos_ids(generation_config)]
                             if i is not None))
    closing = reply_closing_ids(tokenizer)
    if closing and not set(closing) & set(ids):
        seen = (str(tokenizer.chat_template), closing[0])  # (a dict of named templates is no key)
        if seen not in _LOGGED:
            _LOGGED.add(seen)
            log.info("completions also end at %r, which closes a reply in the chat template but is not among the "
                     "model's EOS ids %s", tokenizer.convert_ids_to_tokens(closing[0]), ids)
        ids.append(closing[0])
    return ids


_LOGGED: set[tuple[str, int]] = set()


def configured_eos_ids(generation_config) -> list:
    """A generation config's eos_token_id (an id, a list or tuple, a tensor, or None) as a list."""
    configured = getattr(generation_config, "eos_token_id", None)
    configured = configured.tolist() if isinstance(configured, torch.Tensor) else configured
    return list(configured) if isinstance(configured, (list, tuple)) else [configured]


def write_eos_ids(model: torch.nn.Module, tokenizer) -> None:
    """Set the generation config's EOS ids of `model` (a transformers model) to `eos_token_ids` where
    it lacks one of them (the chat template's end of turn, or the tokenizer's EOS), so that a saved
    model stops where Align's sampling stopped, in `generate` and vLLM too (a full model's save and
    `align export`: a peft adapter's save writes no generation config). A model that does not
    generate (a reward model) is left as it is."""
    generation_config = getattr(model, "generation_config", None)
    if generation_config is None or tokenizer is None or not model.can_generate():
        return
    ids = eos_token_ids(tokenizer, model)
    if not set(ids) <= set(configured_eos_ids(generation_config)):
        generation_config.eos_token_id = ids


class StopRule:
    """Whether a completion has ended: its last token is an EOS id (`eos_token_ids`) or a stop id, or
    its decoded text contains a stop string (checked after every token, so the first time it does,
    the last token completed it). Only the completion counts, never the prompt."""

    def __init__(self, tokenizer, params: SamplingParams, eos_ids: list[int]):
        self.tokenizer, self.strings = tokenizer, list(params.stop)
        self.ids = set(params.stop_token_ids) | set(eos_ids)
        # A stop string of L characters has at most 4L bytes, so it spans at most 4L byte-level tokens,
        # +3 so that a character cut at the window's start cannot hide it.
        self.window = 4 * max((len(s) for s in self.strings), default=0) + 3

    def __call__(self, completion: list[int]) -> bool:
        if completion[-1] in self.ids:
            return True
        if not self.strings:
            return False
        text = self.tokenizer.decode(completion[-self.window:], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)
        return any(s in text for s in self.strings)

    def cut(self, tokens: list[int]) -> tuple[list[int], bool]:
        """A completion generated past its end (no stop checks on the way) -> (it up to and
        including the token that ended it, True), or (it unchanged, False) if nothing ended it."""
        end = next((i + 1 for i in range(len(tokens)) if self(tokens[:i + 1])), None)
        return (tokens[:end], True) if end else (tokens, False)


def with_cache(model: torch.nn.Module, cache) -> dict:
    """The keyword arguments that hand `model` (a transformers causal LM, under any peft wrapper)
    its KV cache: `cache=` in newer transformers, `past_key_values=` before (a model ignores the
    name it does not know, which would silently run every step without the earlier tokens)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {_cache_keyword(type(lm)): cache, "use_cache": True}


@functools.cache
def _cache_keyword(model_class: type) -> str:
    """Looked up once per model class: with_cache runs at every decoding step."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's inputs go (the device of its first parameter: the embeddings)."""
    return next(model.parameters()).device


@contextlib.contextmanager
def inference(model: torch.nn.Module):
    """Eval mode without gradients, SDPA without cuDNN on CUDA (a new plan per decoding step, see
    `align.models.packed.SDPA_BACKENDS`), compiled layers run eagerly (`align.models.compiled`); the
    model's training mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), attention_kernels(model_device(model)), eager():
            yield
    finally:
        model.train(was_training)


def left_pad(prompts: list[list[int]], pad_id: int | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> (input_ids [N, L], attention_mask [N, L]), left-padded to the longest.

    pad_id None pads each row with its own first token: the pads are masked out of attention
    anyway, and a token the row already holds leaves the repetition penalty (a set of seen tokens)
    exactly as without padding.
    """
    length = max(len(p) for p in prompts)
    ids = torch.empty((len(prompts), length), dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row] = prompt[0] if pad_id is None else pad_id
        ids[row, length - len(prompt):] = torch.tensor(prompt)
        mask[row, length - len(prompt):] = 1
    return ids.to(device), mask.to(device)
