"""Conversations through a chat template: token ids and which of them are trained.

A template with `{% generation %}` markers says where each assistant reply is (transformers'
assistant mask). Most models ship templates without them; for those each reply is located by
rendering the conversation up to it (`assistant_span`). Where that cannot be done exactly (a
prefilled generation prompt, history rendered otherwise than a last turn, a reply the template
leaves out) the row is refused with the reason, never trained on the wrong tokens.
"""

from __future__ import annotations

import logging
import os

import jinja2

from align.errors import AlignError

log = logging.getLogger(__name__)

UNLOCATABLE = ("use a template with {% generation %} markers around each reply and its end-of-turn "
               "token (model.chat_template: the template or a file holding it; TRL, for one, ships "
               "such `*_training.jinja` variants of common models' templates)")
REPLY_END = "\u2063align-reply-end\u2063"  # appended to a reply to see where the template puts its end


MISNAMED_ROLES = {"gpt": "assistant", "bot": "assistant", "chatbot": "assistant", "model": "assistant",
                  "human": "user"}
"""Roles other datasets (ShareGPT, Cohere, Gemma's rendered turns) give replies and prompts: read
as context by Align, so no reply in them would be trained; refused with the name to use."""


def check_messages(messages, row: int, key: str, column: str = "messages") -> None:
    if not isinstance(messages, list) or not messages:
        raise AlignError(f"{key} row {row}: `{column}` must be a non-empty list of {{role, content}}")
    for turn in messages:
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or "content" not in turn:
            raise AlignError(f"{key} row {row}: each message in `{column}` needs a `role` string and "
                             f"`content`, got {turn!r:.80}")
        role = turn["role"]
        meant = MISNAMED_ROLES.get(role.strip().lower(), role.strip().lower())
        if role != meant and meant in ("assistant", "user", "system"):
            raise AlignError(f"{key} row {row}: `{column}` has a message of role {role!r}; Align trains the replies "
                             f"of role 'assistant' and reads every other role as context: name it {meant!r} "
                             "(e.g. map ShareGPT's human/gpt to user/assistant when writing the file)")


def render(tokenizer, messages: list[dict], row: int, key: str, **kwargs):
    """`tokenizer.apply_chat_template(messages, **kwargs)` (text unless kwargs say otherwise); a
    template's own error (`raise_exception`, e.g. roles that do not alternate) names the row."""
    kwargs.setdefault("tokenize", False)
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except (jinja2.TemplateError, TypeError, ValueError) as error:  # (ValueError: an empty conversation)
        odd = next((turn for turn in messages if not isinstance(turn.get("content"), (str, list))), None)
        if odd is not None:  # (what the template tripped on, most likely: null for a tool call's content is allowed)
            raise AlignError(f"{key} row {row}: the chat template failed on a message whose `content` is not a "
                             f"string ({odd!r:.80}): {error}") from None
        raise AlignError(f"{key} row {row}: the chat template failed on this conversation: {error}") from None


def reply_closing_ids(tokenizer) -> list[int]:
    """The special tokens the chat template writes right after an assistant reply, in order, up to
    the first other text: Llama 3's [<|eot_id|>], Qwen's [<|im_end|>], Phi-3's [<|end|>, EOS]; [] for
    a tokenizer without a template, a template that closes replies with text or nothing (GLM-4.5),
    or one that fails on a conversation of one user turn and one reply."""
    if not tokenizer.chat_template:
        return []
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": REPLY_END}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError):
        return []
    if REPLY_END not in text:
        return []
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    closing = []
    for token in tokenizer(text[text.rindex(REPLY_END) + len(REPLY_END):], add_special_tokens=False)["input_ids"]:
        if token in special:
            closing.append(token)
        elif tokenizer.decode([token]).strip():
            break
    return closing


def has_generation_markers(template: str) -> bool:
    return "generation %}" in template


def assistant_turns(messages: list[dict]) -> list[int]:
    return [i for i, message in enumerate(messages) if message["role"] == "assistant"]


def render_chat(tokenizer, messages: list[dict], row: int, key: str,
                turns: str = "all") -> tuple[list[int], list[bool]]:
    """Token ids of a conversation and, per token, whether it belongs to a trained assistant turn:
    every one, or with `turns="last"` the last one only (`sft.assistant_turns`)."""
    if not tokenizer.chat_template:
        raise AlignError(f"{key}: the data is conversational (`messages`) but the tokenizer has no chat "
                         f"template; set model.chat_template to a Jinja template or a file holding one")
    check_messages(messages, row, key)
    trained = assistant_turns(messages)[-1:] if turns == "last" else assistant_turns(messages)
    if has_generation_markers(tokenizer.chat_template) and turns == "all":
        for i in trained:
            reply_end(tokenizer, messages, i, row, key)  # refuses a reply the template leaves out
        out = render(tokenizer, messages, row, key, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
    text = render(tokenizer, messages, row, key)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = [assistant_span(tokenizer, messages, i, text, row, key) for i in trained]
    mask = [any(a <= start < b for a, b in spans) for start, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def with_reply_end(content):
    """`content` with `REPLY_END` after its text (the last text block of a list), or None where it
    holds no text (an empty reply, e.g. beside tool calls: nothing to lose)."""
    if isinstance(content, str):
        return content.rstrip() + REPLY_END if content.strip() else None
    if isinstance(content, list):
        texts = [j for j, block in enumerate(content) if isinstance(block, dict) and block.get("type") == "text"
                 and isinstance(block.get("text"), str) and block["text"].strip()]
        if texts:
            last = content[texts[-1]]
            return content[:texts[-1]] + [{**last, "text": last["text"].rstrip() + REPLY_END}] + content[texts[-1] + 1:]
    return None


def reply_end(tokenizer, messages: list[dict], i: int, row: int, key: str) -> int | None:
    """Where assistant turn `i`'s reply ends in the template's rendering of `messages[:i + 1]`,
    found by rendering it with `REPLY_END` appended (templates trim and reformat replies, so the
    reply's own text may not appear verbatim); None where the reply holds no text, or where the
    marked reply makes the template fail. AlignError if the template leaves the reply out."""
    marked = with_reply_end(messages[i]["content"])
    if marked is None:
        return None
    try:
        text = tokenizer.apply_chat_template(messages[:i] + [{**messages[i], "content": marked}], tokenize=False)
    except (jinja2.TemplateError, TypeError):  # e.g. GPT-OSS: content and thinking together
        return None
    if REPLY_END not in text:
        raise AlignError(f"{key} row {row}: the chat template leaves assistant turn {i}'s content out of the text "
                         f"({str(messages[i]['content'])[:40]!r}); check the content's form (a string, or the "
                         "content blocks the template reads) or set model.chat_template")
    return text.index(REPLY_END)


def assistant_span(tokenizer, messages: list[dict], i: int, text: str, row: int, key: str) -> tuple[int, int]:
    """(start, end) characters of assistant turn `i`'s reply and end-of-turn token in `text`, the
    whole conversation rendered.

    The reply starts where the template's generation prompt after `messages[:i]` ends, and ends
    where the template's rendering of `messages[:i + 1]` does (less trailing whitespace). That
    rendering may close the conversation with tokens the whole text holds only at its end (Phi-3's
    EOS, GPT-OSS's `<|return|>` where history turns end with `<|end|>`): the turn then ends at the
    token where it parts from `text`, which must come after the reply. Anything else is refused: a
    generation prompt the turn does not start with (a `<think>` prefill), or a turn rendered
    otherwise once later turns follow (reasoning dropped from history), would make the mask wrong."""
    before = render(tokenizer, messages[:i], row, key, add_generation_prompt=True)
    through = render(tokenizer, messages[:i + 1], row, key)
    reply = reply_end(tokenizer, messages, i, row, key)
    where = f"{key} row {row}: assistant turn {i}"
    if not through.startswith(before):
        history = render(tokenizer, messages[:i], row, key)
        prompt, turn = before[len(os.path.commonprefix([before, history])):], through[len(history):]
        raise AlignError(f"{where}: the chat template's generation prompt {prompt[:40]!r} is not how it begins the "
                         f"turn ({turn[:40]!r}; a prefilled prompt, e.g. `<think>`), so the reply cannot be "
                         f"located; {UNLOCATABLE}")
    end = len(through)
    if not text.startswith(through):
        parted = len(os.path.commonprefix([through, text]))
        offsets = tokenizer(through, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        end = max((a for a, _ in offsets if a <= parted), default=parted)  # the token where they part
        if end < max(len(before), reply or 0) or not text.endswith(through[end:]):
            context = max(0, min(parted, len(before)) - 20)
            raise AlignError(f"{where}: the chat template renders this turn differently once later turns follow "
                             f"(alone: {through[context:context + 70]!r}; in the conversation: "
                             f"{text[context:context + 70]!r}; e.g. reasoning dropped from earlier turns), so the "
                             "reply cannot be located; train the last turn only (sft.assistant_turns: last), or "
                             f"{UNLOCATABLE}")
    turn = through[:end].rstrip()  # without the template's newline
    # `reply` counts characters of the marked rendering, the same as `through` up to the reply's end
    if end == len(through) and reply is not None and len(turn) <= reply:
        warn_no_end_of_turn(tokenizer.chat_template, key)
    return len(before), len(turn)


_WARNED: set[str] = set()


def warn_no_end_of_turn(template: str, key: str) -> None:
    """Once per template: its assistant turns end with the reply itself (GLM-4's end where the next
    role token begins), so no trained token tells the model where a reply ends."""
    if template not in _WARNED:
        _WARNED.add(template)
        log.warning("%s: the chat template closes assistant replies with no end-of-turn token, so SFT never "
                    "trains the model to stop; %s", key, UNLOCATABLE)


def prompt_completion_ids(tokenizer, prompt: list[dict], completion: list[dict], row: int,
                          key: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of a conversational prompt and its completion messages, as the
    model meets them: the prompt with the generation prompt, tokenized alone (what a sampler feeds
    it), then the rest of the conversation's text (a token merging across the boundary, e.g.
    "\\n\\n", is split there, as generating after that prompt would)."""
    if not isinstance(completion, list):
        raise AlignError(f"{key} row {row}: a conversational prompt (a list of messages) needs its completion as "
                         f"messages too, e.g. [{{role: assistant, content: ...}}], got {type(completion).__name__}")
    check_messages(prompt + completion, row, key)
    if not tokenizer.chat_template:
        raise AlignError(f"{key}: conversational data needs a chat template; set model.chat_template")
    for i in assistant_turns(prompt + completion):
        reply_end(tokenizer, prompt + completion, i, row, key)  # refuses a reply the template leaves out
    prompt_text = render(tokenizer, prompt, row, key, add_generation_prompt=True)
    text = render(tokenizer, prompt + completion, row, key)
    if not text.startswith(prompt_text):
        context = max(0, len(os.path.commonprefix([prompt_text, text])) - 20)
        raise AlignError(f"{key} row {row}: the chat template renders the prompt differently inside the conversation "
                         f"(alone: {prompt_text[context:context + 60]!r}; in it: {text[context:context + 60]!r}; "
                         f"e.g. a prefilled `<think>`), so prompt and completion cannot be separated; {UNLOCATABLE}")
    return (list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"]),
            list(tokenizer(text[len(prompt_text):], add_special_tokens=False)["input_ids"]))
