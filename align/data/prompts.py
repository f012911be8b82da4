"""Prompt-only data for online RL: each row's prompt tokenized once, every other column kept for
the reward functions."""

from __future__ import annotations

import datasets

from align.data.chat import check_messages, render
from align.errors import AlignError


def encode_prompt(tokenizer, prompt, row: int, key: str) -> list[int]:
    """A string prompt (with the tokenizer's BOS) or a message list rendered by the chat template
    up to the assistant's turn."""
    if isinstance(prompt, list):
        check_messages(prompt, row, key)
        if not tokenizer.chat_template:
            raise AlignError(f"{key}: conversational prompts need a chat template; set model.chat_template")
        return list(render(tokenizer, prompt, row, key, tokenize=True, return_dict=True,
                           add_generation_prompt=True)["input_ids"])
    if not isinstance(prompt, str) or not prompt:
        raise AlignError(f"{key} row {row}: `prompt` must be a non-empty string or a list of messages, "
                         f"got {prompt!r}")
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def tokenize_prompts(rows: datasets.Dataset, tokenizer, max_prompt_length: int, key: str,
                     setting: str = "sampling.max_prompt_length", num_proc: int | None = None) -> datasets.Dataset:
    """Add `prompt_ids` to every row (in `num_proc` processes); a prompt longer than
    `max_prompt_length` is an error naming the row (dropping it silently would change the task)."""

    def encode(row: dict, index: int) -> dict:
        return {"prompt_ids": encode_bounded_prompt(tokenizer, row["prompt"], index, key, max_prompt_length, setting)}

    return rows.map(encode, with_indices=True, num_proc=num_proc, desc=f"tokenizing {key}")


def encode_bounded_prompt(tokenizer, prompt, index: int, key: str, max_prompt_length: int | None,
                          setting: str = "sampling.max_prompt_length") -> list[int]:
    """`encode_prompt`, and an error naming the row if the prompt has more than `max_prompt_length`
    tokens (None: no bound)."""
    ids = encode_prompt(tokenizer, prompt, index, key)
    if max_prompt_length is not None and len(ids) > max_prompt_length:
        raise AlignError(f"{key} row {index}: the prompt has {len(ids)} tokens, more than "
                         f"{setting}={max_prompt_length}; raise {setting} or filter out long prompts")
    return ids
