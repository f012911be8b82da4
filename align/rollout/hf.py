"""transformers' `generate` as a rollout engine: the correctness reference for our sampler."""

from __future__ import annotations

import contextlib

import torch

from align.rollout.sampling import (Rollout, SamplingParams, StopRule, check_prompts, eos_token_ids, inference,
                                    left_pad, model_device)


class HFGenerateEngine:
    """Each prompt repeated G times, left-padded, through `model.generate` (so every prompt is
    prefilled G times). Note that transformers' repetition penalty also counts the pad token of
    padded rows."""

    def __init__(self, model: torch.nn.Module, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def sync_weights(self) -> None:
        """The engine runs the trained modules themselves."""

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, group_size: int = 1) -> Rollout:
        check_prompts(prompt_ids, group_size)
        rollout = Rollout([list(p) for p in prompt_ids], [], [], group_size)
        if not prompt_ids:
            return rollout
        device = model_device(self.model)
        stop = StopRule(self.tokenizer, params, eos_token_ids(self.tokenizer, self.model))
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        ids, mask = left_pad([p for p in prompt_ids for _ in range(group_size)], pad_id, device)
        kwargs = dict(max_new_tokens=params.max_new_tokens, do_sample=not params.greedy, pad_token_id=pad_id,
                      eos_token_id=sorted(stop.ids), repetition_penalty=params.repetition_penalty, use_cache=True)
        if not params.greedy:  # explicit values, so the model's own generation_config defaults do not leak in
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                          min_p=params.min_p or None)
        if params.stop:
            kwargs.update(stop_strings=params.stop, tokenizer=self.tokenizer)
        with inference(self.model), self.seeded(params, device):
            out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        for row in out[:, ids.shape[1]:].tolist():
            completion, finished = stop.cut(row)
            rollout.completion_ids.append(completion)
            rollout.finished.append(finished)
        return rollout

    @staticmethod
    @contextlib.contextmanager
    def seeded(params: SamplingParams, device: torch.device):
        """With a seed, sample from a forked global RNG seeded with it (the caller's RNG state is
        left as it was); without one, from the global RNG itself."""
        if params.seed is None or params.greedy:
            yield
            return
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(params.seed)
            yield
