"""The answering model of a feedback task: loaded once, sampled through any rollout engine."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from align.errors import AlignError


@dataclass
class Sampler:
    """A causal LM, its tokenizer and a rollout engine (`sampling.engine`) on it."""

    model: torch.nn.Module
    tokenizer: object
    engine: object
    sampling: object
    """A SamplingConfig (with `seed` and `batch_size`)."""

    @classmethod
    def load(cls, model_config, sampling) -> "Sampler":
        from align.generate import load_for_sampling
        from align.rollout import make_engine

        model, tokenizer = load_for_sampling(model_config)
        max_len = (sampling.max_prompt_length or 1024) + sampling.max_new_tokens
        return cls(model, tokenizer, make_engine(sampling.engine, model, tokenizer, sampling, max_len), sampling)

    def sample(self, prompts: list, n: int = 1, key: str = "data") -> list[list[str]]:
        """n completions of each prompt (a string, or messages through the chat template), decoded
        without special tokens: [len(prompts)][n]."""
        from align.data.prompts import encode_bounded_prompt
        from align.rollout import SamplingParams

        s = self.sampling
        ids = [encode_bounded_prompt(self.tokenizer, p, i, key, s.max_prompt_length or None) for i, p in enumerate(prompts)]
        out: list[list[str]] = []
        for start in range(0, len(ids), s.batch_size):
            params = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                                    top_k=s.top_k, min_p=s.min_p, repetition_penalty=s.repetition_penalty,
                                    stop=list(s.stop), seed=s.seed + start)  # each chunk its own stream
            rollout = self.engine.generate(ids[start:start + s.batch_size], params, n)
            texts = self.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
            out += [texts[i:i + n] for i in range(0, len(texts), n)]
        return out


def load_prompt_rows(source, key: str = "data") -> list[dict]:
    """The rows of a task's data: each needs a `prompt` (string or messages)."""
    from align.data import load_rows

    rows = [dict(r) for r in load_rows(source, key=key)]
    if "prompt" not in rows[0]:
        raise AlignError(f"{key}: {source.path!r} needs a `prompt` column (a string or a list of messages); its "
                         f"columns are {sorted(rows[0])}; rename one with {key}.columns: {{my_column: prompt}}")
    return rows
