"""transformers' `generate` as a rollout engine: the correctness reference for our sampler."""

from __future__ import annotations

import torch

from align.rollout.prefix_shared import inference, left_pad
from align.rollout.sampling import Rollout, SamplingParams, hits_stop_string, stop_ids


class HFGenerateEngine:
    """Each prompt repeated G times through `model.generate` (the prompt is prefilled G times)."""

    def __init__(self, model: torch.nn.Module, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def sync_weights(self) -> None:
        """The engine runs the trained modules themselves."""

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, group_size: int = 1) -> Rollout:
        device = next(self.model.parameters()).device
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids, mask = left_pad([p for p in prompt_ids for _ in range(group_size)], pad_id, device)
        stops = stop_ids(self.tokenizer, params)
        kwargs = dict(max_new_tokens=params.max_new_tokens, do_sample=not params.greedy, pad_token_id=pad_id,
                      eos_token_id=sorted(stops), repetition_penalty=params.repetition_penalty, use_cache=True)
        if not params.greedy:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None,
                          min_p=params.min_p or None)
        if params.stop:
            kwargs.update(stop_strings=params.stop, tokenizer=self.tokenizer)
        with inference(self.model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if params.seed is not None:
                torch.manual_seed(params.seed)
            out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        completions, finished = [], []
        for row in out[:, ids.shape[1]:].tolist():
            tokens, done = [], False
            for token in row:
                tokens.append(token)
                if token in stops or hits_stop_string(self.tokenizer, tokens, params.stop):
                    done = True
                    break
            completions.append(tokens)
            finished.append(done)
        return Rollout(prompt_ids=[list(p) for p in prompt_ids], completion_ids=completions, finished=finished,
                       group_size=group_size)
