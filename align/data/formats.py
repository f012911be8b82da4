"""Dataset formats and their tokenization into (input_ids, labels) examples.

An example is `{"input_ids": [T], "labels": [T]}` where labels are already shifted:
`labels[t]` is the token that follows position t when that token is trained, else -100. Shifting
per example means packed examples never predict across their boundary.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import datasets
import pyarrow as pa

from align.data import chat
from align.data.chat import check_messages, render_chat
from align.errors import AlignError
from align.ops.logprobs import IGNORE_INDEX

log = logging.getLogger(__name__)

FORMAT_COLUMNS = {  # checked in order: the first whose columns are all present wins
    "preference": ("chosen", "rejected"),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "prompt": ("prompt",),
}


def detect_format(columns: Sequence[str], declared: str, key: str) -> str:
    """The data format of a dataset with these columns; `declared` (not `auto`) is checked instead."""
    if declared != "auto":
        needed = FORMAT_COLUMNS[declared]
        if not all(c in columns for c in needed):
            raise AlignError(f"{key}: format {declared!r} needs columns {list(needed)}, found {list(columns)}; "
                             f"rename yours with {key}.columns, e.g. {{my_column: {needed[0]}}}")
        return declared
    for name, needed in FORMAT_COLUMNS.items():
        if all(c in columns for c in needed):
            return name
    raise AlignError(f"{key}: cannot tell the data format from columns {list(columns)}; expected one of "
                     + ", ".join(f"{list(v)} ({k})" for k, v in FORMAT_COLUMNS.items())
                     + f"; map your columns with {key}.columns")


TEXT, TURNS = "a string", "a non-empty list of {role, content} messages"
COLUMN_TYPES = {"text": (TEXT,), "messages": (TURNS,), "prompt": (TEXT, TURNS), "completion": (TEXT, TURNS),
                "chosen": (TEXT, TURNS), "rejected": (TEXT, TURNS)}
"""What each row of a format column must hold; other columns are the user's (rewards read them)."""


def check_columns(data: datasets.Dataset, key: str, renamed: dict[str, str] | None = None) -> None:
    """AlignError naming the first row whose format column holds the wrong type (an int among strings,
    a null where a key is missing, a message without `role`), before anything is tokenized."""
    for name in data.column_names:
        if name not in COLUMN_TYPES:
            continue
        shown = f"{name!r}" + (f" (renamed from {renamed[name]!r})" if renamed and name in renamed else "")
        column = data.data.table.column(name)
        if column.type in (pa.string(), pa.large_string()) and column.null_count == 0:
            continue  # all strings: nothing to look at row by row
        for row, value in enumerate(data[name]):
            if isinstance(value, str) and TEXT in COLUMN_TYPES[name]:
                continue
            if isinstance(value, list) and TURNS in COLUMN_TYPES[name]:
                check_messages(value, row, key, name)
                continue
            got = "nothing (the key is missing or null)" if value is None else f"{type(value).__name__} {value!r:.60}"
            raise AlignError(f"{key} row {row}: column {shown} must be {' or '.join(COLUMN_TYPES[name])}, "
                             f"got {got}; fix or remove that row")


def shift_labels(input_ids: list[int], trained: list[bool]) -> list[int]:
    """labels[t] = input_ids[t + 1] if that token is trained, else -100; the last is always -100."""
    return [tok if keep else IGNORE_INDEX for tok, keep in zip(input_ids[1:], trained[1:])] + [IGNORE_INDEX]


def encode_text(tokenizer, text: str) -> list[int]:
    """Plain text with the tokenizer's special tokens (e.g. BOS); no EOS."""
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def prompt_completion_ids(tokenizer, prompt, completion, row: int, key: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) for string or conversational data (`chat.prompt_completion_ids`);
    string completions end with EOS."""
    if isinstance(prompt, list):
        return chat.prompt_completion_ids(tokenizer, prompt, completion, row, key)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return encode_text(tokenizer, prompt), list(tokenizer(completion, add_special_tokens=False)["input_ids"]) + eos


def sft_tokens(tokenizer, row: dict, fmt: str, index: int, key: str,
               turns: str = "all") -> tuple[list[int], list[bool]]:
    """(input_ids, trained mask) of one SFT row before truncation."""
    if fmt == "messages":
        return render_chat(tokenizer, row["messages"], index, key, turns)
    if fmt == "text":
        ids = encode_text(tokenizer, row["text"]) + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        return ids, [True] * len(ids)
    if fmt == "prompt_completion":
        prompt_ids, completion_ids = prompt_completion_ids(tokenizer, row["prompt"], row["completion"], index, key)
        return prompt_ids + completion_ids, [False] * len(prompt_ids) + [True] * len(completion_ids)
    raise AlignError(f"{key}: SFT cannot train on {fmt!r} data; use text, messages or prompt+completion rows")


def tokenize(data: datasets.Dataset, encode: Callable[[dict, int], dict], key: str,
             num_proc: int | None = None) -> datasets.Dataset:
    """Map `encode(row, index) -> example | {"dropped": reason}` over the rows (in `num_proc`
    processes, `data.num_proc`); drop and count the rest."""
    mapped = data.map(lambda row, i: {"dropped": "", **encode(row, i)}, with_indices=True, num_proc=num_proc,
                      remove_columns=data.column_names, desc=f"tokenizing {key}")
    reasons = mapped["dropped"]
    dropped = [i for i, reason in enumerate(reasons) if reason]
    if len(dropped) == len(mapped):
        raise AlignError(f"{key}: every row was dropped; first reason: row {dropped[0]}: {reasons[dropped[0]]}")
    if dropped:
        log.warning("%s: dropped %d of %d rows (first: row %d: %s)", key, len(dropped), len(mapped),
                    dropped[0], reasons[dropped[0]])
        mapped = mapped.select([i for i, reason in enumerate(reasons) if not reason])
    return mapped.remove_columns("dropped")


def sft_encoder(tokenizer, fmt: str, max_length: int, key: str, turns: str = "all") -> Callable[[dict, int], dict]:
    """Row -> {"input_ids", "labels"} truncated to max_length, or a drop reason if nothing is trained."""

    def encode(row: dict, index: int) -> dict:
        ids, trained = sft_tokens(tokenizer, row, fmt, index, key, turns)
        if not any(trained[1:]):
            what = "no assistant message" if fmt == "messages" else "an empty completion" \
                if fmt == "prompt_completion" else "no text"
            return {"dropped": f"nothing to train: {what}", "input_ids": [], "labels": []}
        if not any(trained[1:max_length]):
            return {"dropped": f"no trained token within max_length={max_length} (the prompt has "
                               f"{trained.index(True)} tokens); raise data.max_length or shorten the prompt",
                    "input_ids": [], "labels": []}
        ids, trained = ids[:max_length], trained[:max_length]
        return {"input_ids": ids, "labels": shift_labels(ids, trained)}

    return encode
