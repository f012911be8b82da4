"""Dataset formats and their tokenization into (input_ids, labels) examples.

An example is `{"input_ids": [T], "labels": [T]}` where labels are already shifted:
`labels[t]` is the token that follows position t when that token is trained, else -100. Shifting
per example means packed examples never predict across their boundary.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence

import datasets
import pyarrow as pa

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
                _check_messages(value, row, key, name)
                continue
            got = "nothing (the key is missing or null)" if value is None else f"{type(value).__name__} {value!r:.60}"
            raise AlignError(f"{key} row {row}: column {shown} must be {' or '.join(COLUMN_TYPES[name])}, "
                             f"got {got}; fix or remove that row")


def shift_labels(input_ids: list[int], trained: list[bool]) -> list[int]:
    """labels[t] = input_ids[t + 1] if that token is trained, else -100; the last is always -100."""
    return [tok if keep else IGNORE_INDEX for tok, keep in zip(input_ids[1:], trained[1:])] + [IGNORE_INDEX]


def has_generation_markers(template: str) -> bool:
    return "generation %}" in template


def render_chat(tokenizer, messages: list[dict], row: int, key: str,
                turns: str = "all") -> tuple[list[int], list[bool]]:
    """Token ids of a conversation and, per token, whether it belongs to a trained assistant turn:
    every one, or with `turns="last"` the last one only (`sft.assistant_turns`).

    Templates with `{% generation %}` markers give the mask directly. For others each assistant
    reply is located by rendering the conversation up to it (`assistant_span`). A reply the
    template leaves out of the text (e.g. string content given to a template that reads content
    blocks) is refused, never trained as nothing.
    """
    if not tokenizer.chat_template:
        raise AlignError(f"{key}: the data is conversational (`messages`) but the tokenizer has no chat "
                         f"template; set model.chat_template to a Jinja template or a file holding one")
    _check_messages(messages, row, key)
    trained = assistant_turns(messages)[-1:] if turns == "last" else assistant_turns(messages)
    if has_generation_markers(tokenizer.chat_template) and turns == "all":
        for i in trained:
            reply_end(tokenizer, messages, i, row, key)  # the reply is in the text
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = [assistant_span(tokenizer, messages, i, text, row, key) for i in trained]
    mask = [any(a <= start < b for a, b in spans) for start, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def assistant_turns(messages: list[dict]) -> list[int]:
    return [i for i, message in enumerate(messages) if message["role"] == "assistant"]


REPLY_END = "\u2063align-reply-end\u2063"  # appended to a reply to see where the template puts its end


def reply_end(tokenizer, messages: list[dict], i: int, row: int, key: str) -> int | None:
    """Where assistant turn `i`'s reply ends in the template's rendering of `messages[:i + 1]`,
    found by rendering it with `REPLY_END` appended (templates trim and reformat replies, so the
    reply's own text may not appear verbatim); None for content blocks. AlignError if the reply
    leaves no trace in the text."""
    content = messages[i]["content"]
    if not isinstance(content, str):
        return None
    marked = tokenizer.apply_chat_template(messages[:i] + [{**messages[i], "content": content.rstrip() + REPLY_END}],
                                           tokenize=False)
    if REPLY_END not in marked:
        raise AlignError(f"{key} row {row}: the chat template leaves assistant turn {i}'s content out of the text "
                         f"({content[:40]!r}); check the content's form (a string, or the content blocks the "
                         "template reads) or set model.chat_template")
    return marked.index(REPLY_END)


UNLOCATABLE = ("use a template with {% generation %} markers around each reply and its end-of-turn "
               "token (model.chat_template: the template or a file holding it; TRL, for one, ships "
               "such `*_training.jinja` variants of common models' templates)")


def assistant_span(tokenizer, messages: list[dict], i: int, text: str, row: int, key: str) -> tuple[int, int]:
    """(start, end) characters of assistant turn `i`'s reply and end-of-turn token in `text`, the
    whole conversation rendered, for a template without `{% generation %}` markers.

    The reply starts where the template's generation prompt after `messages[:i]` ends, and ends
    where the template's rendering of `messages[:i + 1]` does (less trailing whitespace). That
    rendering may close the conversation with tokens the whole text holds only at its end (Phi-3's
    EOS, GPT-OSS's `<|return|>` where history turns end with `<|end|>`): the turn then ends at the
    token where it parts from `text`, which must come after the reply. Anything else is refused: a
    generation prompt the turn does not start with (a `<think>` prefill), or a turn rendered
    otherwise once later turns follow (reasoning dropped from history), would make the mask wrong."""
    before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
    through = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
    reply = reply_end(tokenizer, messages, i, row, key)
    where = f"{key} row {row}: assistant turn {i}"
    if not through.startswith(before):
        shown = tokenizer.apply_chat_template(messages[:i], tokenize=False)
        prompt, turn = before[len(os.path.commonprefix([before, shown])):], through[len(shown):]
        raise AlignError(f"{where}: the chat template's generation prompt {prompt[:40]!r} is not how it begins the "
                         f"turn ({turn[:40]!r}; a prefilled prompt, e.g. `<think>`), so the reply cannot be "
                         f"located; {UNLOCATABLE}")
    end = len(through)
    if not text.startswith(through):
        parted = len(os.path.commonprefix([through, text]))
        offsets = tokenizer(through, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        end = max((a for a, _ in offsets if a <= parted), default=parted)  # the token where they part
        if end < max(len(before), reply or 0) or not text.endswith(through[end:]):
            shown = max(0, min(parted, len(before)) - 20)
            raise AlignError(f"{where}: the chat template renders this turn differently once later turns follow "
                             f"(alone: {through[shown:shown + 70]!r}; in the conversation: {text[shown:shown + 70]!r}; "
                             "e.g. reasoning dropped from earlier turns), so the reply cannot be located; train the "
                             f"last turn only (sft.assistant_turns: last), or {UNLOCATABLE}")
    turn = through[:end].rstrip()  # without the template's newline
    if end == len(through) and reply is not None and len(turn) <= reply:
        warn_no_end_of_turn(tokenizer.chat_template, key)
    return len(before), len(turn)


@functools.cache
def warn_no_end_of_turn(template: str, key: str) -> None:
    """Once per template: its assistant turns end with the reply itself (GLM-4's end where the next
    role token begins), so no trained token tells the model where a reply ends."""
    log.warning("%s: the chat template closes assistant replies with no end-of-turn token, so SFT never trains "
                "the model to stop; %s", key, UNLOCATABLE)


def _check_messages(messages, row: int, key: str, column: str = "messages") -> None:
    if not isinstance(messages, list) or not messages:
        raise AlignError(f"{key} row {row}: `{column}` must be a non-empty list of {{role, content}}")
    for turn in messages:
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or "content" not in turn:
            raise AlignError(f"{key} row {row}: each message in `{column}` needs a `role` string and "
                             f"`content`, got {turn!r:.80}")


def encode_text(tokenizer, text: str) -> list[int]:
    """Plain text with the tokenizer's special tokens (e.g. BOS); no EOS."""
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def sft_tokens(tokenizer, row: dict, fmt: str, index: int, key: str,
               turns: str = "all") -> tuple[list[int], list[bool]]:
    """(input_ids, trained mask) of one SFT row before truncation."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if fmt == "messages":
        return render_chat(tokenizer, row["messages"], index, key, turns)
    if fmt == "text":
        ids = encode_text(tokenizer, row["text"]) + eos
        return ids, [True] * len(ids)
    if fmt == "prompt_completion":
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, list):  # conversational prompt + completion messages
            ids, _ = render_chat(tokenizer, prompt + completion, index, key)
            prompt_ids = list(tokenizer.apply_chat_template(prompt, tokenize=True, return_dict=True,
                                                            add_generation_prompt=True)["input_ids"])
            if ids[:len(prompt_ids)] != prompt_ids:
                raise AlignError(f"{key} row {index}: the chat template's tokens for the prompt differ inside the "
                                 "conversation; cannot separate prompt and completion tokens")
            return ids, [False] * len(prompt_ids) + [True] * (len(ids) - len(prompt_ids))
        prompt_ids = encode_text(tokenizer, prompt)
        completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"]) + eos
        return prompt_ids + completion_ids, [False] * len(prompt_ids) + [True] * len(completion_ids)
    raise AlignError(f"{key}: SFT cannot train on {fmt!r} data; use text, messages or prompt+completion rows")


def tokenize(data: datasets.Dataset, encode: Callable[[dict, int], dict], key: str) -> datasets.Dataset:
    """Map `encode(row, index) -> example | {"dropped": reason}` over the rows; drop and count the rest."""
    mapped = data.map(lambda row, i: {"dropped": "", **encode(row, i)}, with_indices=True,
                      remove_columns=data.column_names, desc=f"tokenizing {key}")
    dropped = [i for i, reason in enumerate(mapped["dropped"]) if reason]
    if len(dropped) == len(mapped):
        raise AlignError(f"{key}: every row was dropped; first reason: row {dropped[0]}: "
                         f"{mapped[dropped[0]]['dropped']}")
    if dropped:
        log.warning("%s: dropped %d of %d rows (first: row %d: %s)", key, len(dropped), len(mapped),
                    dropped[0], mapped[dropped[0]]["dropped"])
    return mapped.filter(lambda r: not r["dropped"]).remove_columns("dropped")


def sft_encoder(tokenizer, fmt: str, max_length: int, key: str, turns: str = "all") -> Callable[[dict, int], dict]:
    """Row -> {"input_ids", "labels"} truncated to max_length, or a drop reason if nothing is trained."""

    def encode(row: dict, index: int) -> dict:
        ids, trained = sft_tokens(tokenizer, row, fmt, index, key, turns)
        if not any(trained[1:max_length]):
            first = trained.index(True) if True in trained else len(ids)
            return {"dropped": f"no trained token within max_length={max_length} (the prompt has {first} "
                               f"tokens); raise data.max_length or shorten the prompt",
                    "input_ids": [], "labels": []}
        ids, trained = ids[:max_length], trained[:max_length]
        return {"input_ids": ids, "labels": shift_labels(ids, trained)}

    return encode
