"""Our sampler: each prompt's KV cache is computed once and shared by its G samples, all live
rows decode together one token per step, and finished rows leave the batch."""

from __future__ import annotations

import contextlib

import torch
from transformers import DynamicCache

from align.rollout.sampling import (Rollout, SamplingParams, hits_stop_string, logits_processors, next_tokens,
                                    stop_ids)


@contextlib.contextmanager
def inference(model: torch.nn.Module):
    """Eval mode without gradients; the model's training mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> (input_ids [N, L], attention_mask [N, L]), left-padded."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = torch.tensor(prompt)
        mask[row, length - len(prompt):] = 1
    return ids.to(device), mask.to(device)


class PrefixSharedEngine:
    """Sampling on the policy's own modules (LoRA and QLoRA included); no weight sync needed."""

    def __init__(self, model: torch.nn.Module, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def sync_weights(self) -> None:
        """The engine runs the trained modules themselves."""

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, group_size: int = 1) -> Rollout:
        device = next(self.model.parameters()).device
        generator = None
        if params.seed is not None and not params.greedy:
            generator = torch.Generator(device).manual_seed(params.seed)
        processors = logits_processors(params)
        stops = stop_ids(self.tokenizer, params)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        with inference(self.model):
            # Prefill: every prompt once. Then the cache rows are repeated G times.
            ids, mask = left_pad(prompt_ids, pad_id, device)
            cache = DynamicCache(config=getattr(self.model, "config", None))
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                             cache=cache, use_cache=True, logits_to_keep=1)
            cache.batch_repeat_interleave(group_size)
            logits = out.logits[:, -1].repeat_interleave(group_size, 0)
            mask = mask.repeat_interleave(group_size, 0)
            sequences = ids.repeat_interleave(group_size, 0)  # what the repetition penalty looks at
            positions = mask.sum(-1)
            rows = torch.arange(len(prompt_ids) * group_size, device=device)  # which completion each live row is
            completions = [[] for _ in range(len(rows))]
            finished = [False] * len(rows)
            for step in range(params.max_new_tokens):
                tokens = next_tokens(processors(sequences, logits), params, generator)
                done = []
                for i, (row, token) in enumerate(zip(rows.tolist(), tokens.tolist())):
                    completions[row].append(token)
                    if token in stops or hits_stop_string(self.tokenizer, completions[row], params.stop):
                        finished[row] = True
                        done.append(i)
                if step == params.max_new_tokens - 1 or len(done) == len(rows):
                    break
                if done:  # finished rows stop costing compute: drop them from the batch and the cache
                    keep = torch.tensor([i for i in range(len(rows)) if i not in set(done)], device=device)
                    cache.batch_select_indices(keep)
                    rows, tokens, mask, sequences, positions = (x[keep] for x in (rows, tokens, mask, sequences,
                                                                                  positions))
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
                sequences = torch.cat([sequences, tokens[:, None]], 1)
                out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None],
                                 cache=cache, use_cache=True)
                logits = out.logits[:, -1]
                positions = positions + 1
        return Rollout(prompt_ids=[list(p) for p in prompt_ids], completion_ids=completions, finished=finished,
                       group_size=group_size)
