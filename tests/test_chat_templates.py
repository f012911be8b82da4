"""SFT's assistant mask on real models' chat templates, as their tokenizers ship them (TRL, a dev
dependency, stores them in trl/chat_templates with `*_training.jinja` variants whose `{% generation %}`
markers give the mask TRL trains). A character-level tokenizer with each template's special tokens
stands in for the model's own: masks are located by characters, so any tokenizer shows them."""

import logging
import re
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from align.data import render_chat
from align.data.prompts import encode_prompt
from align.errors import AlignError

trl = pytest.importorskip("trl")
TEMPLATES = Path(trl.__file__).parent / "chat_templates"

SINGLE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
          {"role": "assistant", "content": "It is 4."}]
MULTI = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6."}]


def tokenizer(template: str) -> PreTrainedTokenizerFast:
    """One token per printable character, plus the template's `<|...|>`-style special tokens."""
    vocab = {chr(c): c for c in range(32, 127)} | {"\n": 127}
    chars = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    chars.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=chars, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    specials = sorted(set(re.findall(r"<\|[a-z_]+\|>|<[a-z_]+\|>|<\|[a-z_]+>|<[a-z_]+>", template)))
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = template
    return tok


def trained_text(tok, messages, turns: str = "all") -> tuple[str, list[bool]]:
    """(the conversation's text, per character whether a trained token covers it)."""
    ids, mask = render_chat(tok, messages, 0, "data.train", turns)
    text = tok.apply_chat_template(messages, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert list(enc["input_ids"]) == ids
    flags = [False] * len(text)
    for (start, stop), keep in zip(enc["offset_mapping"], mask):
        flags[start:stop] = [keep] * (stop - start)
    return text, flags


def pieces(text: str, flags: list[bool]) -> list[str]:
    """The runs of trained characters."""
    runs, current = [], ""
    for char, keep in zip(text, flags):
        if keep:
            current += char
        elif current:
            runs, current = runs + [current], ""
    return runs + [current] if current else runs


@pytest.mark.parametrize("name", ["llama3", "qwen2_5", "gemma3", "phi3", "phi3_5", "gptoss", "cohere2", "lfm2",
                                  "qwen3_instruct_2507", "muse_glimmer"])
@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "multi"])
def test_align_trains_the_replies_and_no_more_than_trl_s_training_template(name, messages):
    """Where Align locates the replies itself (no markers in the shipped template), it trains each
    reply and what closes it, and only characters TRL's marked variant trains on the same text."""
    ours, theirs = tokenizer((TEMPLATES / f"{name}.jinja").read_text()), \
        tokenizer((TEMPLATES / f"{name}_training.jinja").read_text())
    text, flags = trained_text(ours, messages)
    their_text = theirs.apply_chat_template(messages, tokenize=False)
    out = theirs.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    their_enc = theirs(their_text, add_special_tokens=False, return_offsets_mapping=True)
    assert their_text == text and list(their_enc["input_ids"]) == out["input_ids"]
    their_flags = [False] * len(text)
    for (start, stop), keep in zip(their_enc["offset_mapping"], out["assistant_masks"]):
        their_flags[start:stop] = [bool(keep)] * (stop - start)
    assert all(theirs_ for ours_, theirs_ in zip(flags, their_flags) if ours_), (pieces(text, flags), pieces(text, their_flags))
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    trained = pieces(text, flags)
    assert len(trained) == len(replies) and all(reply in piece for reply, piece in zip(replies, trained)), trained
    assert not trained[-1].endswith(replies[-1])  # the last reply's end-of-turn token too


def test_a_template_closing_the_conversation_with_eos_trains_every_turn():
    """Phi-3 ends a rendered conversation with EOS: a reply rendered alone ends `<|end|>\\n<eos>`, inside a
    longer conversation `<|end|>\\n<|user|>`. Each history reply trains through `<|end|>`; the last adds EOS."""
    tok = tokenizer((TEMPLATES / "phi3.jinja").read_text())
    assert pieces(*trained_text(tok, MULTI)) == ["Hello!<|end|>", "6.<|end|>\n<eos>"]
    gptoss = tokenizer((TEMPLATES / "gptoss.jinja").read_text())  # the last reply ends <|return|>, others <|end|>
    assert pieces(*trained_text(gptoss, MULTI)) == ["<|channel|>final<|message|>Hello!",
                                                    "<|channel|>final<|message|>6.<|return|>"]


def test_templates_whose_replies_cannot_be_located_are_refused_with_the_reason():
    qwen3 = tokenizer((TEMPLATES / "qwen3.jinja").read_text())
    assert pieces(*trained_text(qwen3, SINGLE)) == ["<think>\n\n</think>\n\nIt is 4.<|im_end|>"]
    reasoned = SINGLE[:2] + [{"role": "assistant", "content": "<think>2 and 2</think>It is 4."}]  # reformatted
    assert pieces(*trained_text(qwen3, reasoned)) == ["<think>\n2 and 2\n</think>\n\nIt is 4.<|im_end|>"]
    with pytest.raises(AlignError, match=r"row 0: assistant turn 1: .*renders this turn differently once later "
                                         r"turns follow .*generation %\} markers.*_training\.jinja"):
        render_chat(qwen3, MULTI, 0, "data.train")  # history replies lose their <think> block
    deepseek = tokenizer((TEMPLATES / "deepseekv3.jinja").read_text())
    with pytest.raises(AlignError, match=r"assistant turn 2: the chat template's generation prompt .*<think>.*"
                                         r"is not how it begins the turn \('<｜Assistant｜>It is 4\."):
        render_chat(deepseek, SINGLE, 0, "data.train")
    idefics = tokenizer((TEMPLATES / "idefics3.jinja").read_text())  # reads content blocks, not strings
    with pytest.raises(AlignError, match=r"leaves assistant turn 2's content out of the text"):
        render_chat(idefics, SINGLE, 0, "data.train")


def test_a_template_with_no_end_of_turn_token_warns_once(caplog):
    """GLM-4 ends a reply where the next role token begins: nothing trained says where it stops."""
    tok = tokenizer((TEMPLATES / "glm4moe.jinja").read_text())
    with caplog.at_level(logging.WARNING):
        assert pieces(*trained_text(tok, MULTI)) == ["\n<think></think>\nHello!", "\n<think></think>\n6."]
        render_chat(tok, SINGLE, 1, "data.train")
    assert caplog.text.count("closes assistant replies with no end-of-turn token, so SFT never trains") == 1


def test_the_last_turn_alone_is_trained_where_history_is_rendered_otherwise():
    """`sft.assistant_turns: last`: Qwen3's multi-turn data, refused under `all`, trains its last reply
    as the template renders it at inference (history replies lose their reasoning, and are context)."""
    qwen3 = tokenizer((TEMPLATES / "qwen3.jinja").read_text())
    reasoned = MULTI[:3] + [{"role": "assistant", "content": "<think>3 and 3</think>6."}]
    text, flags = trained_text(qwen3, reasoned, turns="last")
    assert pieces(text, flags) == ["<think>\n3 and 3\n</think>\n\n6.<|im_end|>"] and "Hello!" in text
    marked = tokenizer((TEMPLATES / "qwen2_5_training.jinja").read_text())  # markers: the last of their turns
    assert pieces(*trained_text(marked, MULTI, turns="last")) == ["6.<|im_end|>"]


TOOL_CALL = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}


def test_tool_calls_content_blocks_and_template_errors():
    """A reply of tool calls alone (empty content) trains the calls; a reply the template drops (content
    blocks Qwen3 does not read) is refused; a template's own error (Gemma's alternating roles) names the row."""
    calls = [{"role": "user", "content": "Add 2 and 2"}, {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
             {"role": "tool", "content": "4"}, {"role": "assistant", "content": "It is 4."}]
    llama = tokenizer((TEMPLATES / "llama3_1.jinja").read_text())
    assert pieces(*trained_text(llama, calls)) == ['{"name": "add", "parameters": {"a": 2, "b": 2}}<|eot_id|>',
                                                   "It is 4.<|eot_id|>"]
    gptoss = tokenizer((TEMPLATES / "gptoss_training.jinja").read_text())  # thinking beside the tool call
    thinking = [calls[0], {**calls[1], "thinking": "Use the tool."}, *calls[2:]]
    assert render_chat(gptoss, thinking, 0, "data.train")[1].count(True) > 0
    blocks = SINGLE[:2] + [{"role": "assistant", "content": [{"type": "text", "text": "It is 4."}]}]
    with pytest.raises(AlignError, match=r"row 3: the chat template leaves assistant turn 2's content out"):
        render_chat(tokenizer((TEMPLATES / "qwen3.jinja").read_text()), blocks, 3, "data.train")
    with pytest.raises(AlignError, match=r"data.train row 5: the chat template failed on this conversation: "
                                         r"Conversation roles must alternate"):
        render_chat(tokenizer((TEMPLATES / "gemma3.jinja").read_text()), MULTI[:2] + MULTI[1:], 5, "data.train")
    with pytest.raises(AlignError, match=r"data.train row 2: the chat template failed .*roles must alternate"):
        encode_prompt(tokenizer((TEMPLATES / "gemma3.jinja").read_text()), MULTI[:1] * 2, 2, "data.train")  # GRPO


@pytest.mark.parametrize("name,closing", [("llama3_1", ["<|eot_id|>"]), ("qwen2_5", ["<|im_end|>"]),
                                          ("gemma3", ["<end_of_turn>"]), ("phi3", ["<|end|>", "<eos>"]),
                                          ("gptoss", ["<|return|>"]), ("glm4moe", [])])
def test_the_tokens_that_close_a_reply_and_the_eos_ids_sampling_stops_at(name, closing):
    """A base model given a chat template (or SFT trained on one) writes the template's end of turn when
    its reply ends; where no EOS id of the tokenizer or the generation config closes a reply, sampling
    stops there too. GLM-4.5 closes replies with nothing; Phi-3 writes EOS after <|end|>."""
    from transformers import GenerationConfig

    from align.data.chat import reply_closing_ids
    from align.rollout.sampling import eos_token_ids

    tok = tokenizer((TEMPLATES / f"{name}.jinja").read_text())
    assert tok.convert_ids_to_tokens(reply_closing_ids(tok)) == closing
    eos = tok.eos_token_id
    added = [] if not closing or closing[-1] == "<eos>" else [tok.convert_tokens_to_ids(closing[0])]
    assert eos_token_ids(tok, GenerationConfig(eos_token_id=eos)) == [eos, *added]
    if closing:  # an instruct model's generation config already lists its end of turn: nothing added
        end = tok.convert_tokens_to_ids(closing[-1])
        assert eos_token_ids(tok, GenerationConfig(eos_token_id=[end, eos])) == list(dict.fromkeys([eos, end]))
    tok.chat_template = None
    assert reply_closing_ids(tok) == [] and eos_token_ids(tok, GenerationConfig(eos_token_id=eos)) == [eos]


def test_named_chat_templates_and_a_tensor_of_eos_ids():
    """transformers loads a tokenizer with several named templates (default, tool_use) with a dict as
    its chat_template; a generation config may hold its EOS ids as a tensor."""
    import torch
    from transformers import GenerationConfig

    from align.rollout.sampling import eos_token_ids

    tok = tokenizer((TEMPLATES / "qwen2_5.jinja").read_text())
    tok.chat_template = {"default": tok.chat_template, "tool_use": tok.chat_template}
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert eos_token_ids(tok, GenerationConfig(eos_token_id=tok.eos_token_id)) == [tok.eos_token_id, end]
    config = GenerationConfig()
    config.eos_token_id = torch.tensor([end, 7])
    assert eos_token_ids(tok, config) == [tok.eos_token_id, end, 7]
