import pytest

from align.data import pack, pad, render_chat, sft_encoder, tokenize
from align.errors import AlignError
from align.models import load_tokenizer
from align.config import ModelConfig
from align.toy import chat_rows

import datasets


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(name_or_path="builtin:tiny-llama"))


MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
    {"role": "user", "content": "And 3 - 1?"},
    {"role": "assistant", "content": "3 - 1 = 2. The answer is 2."},
]


def expected_tokens(tokenizer, messages):
    """ChatML rendered piece by piece: (ids, trained) with every assistant turn + its <|im_end|> trained."""
    ids, trained = [], []
    for m in messages:
        pieces = [(f"<|im_start|>{m['role']}\n", False)]
        pieces += [(m["content"] + "<|im_end|>", m["role"] == "assistant"), ("\n", False)]
        for text, keep in pieces:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            trained += [keep] * len(piece)
    return ids, trained


def test_assistant_mask_is_right_token_by_token_on_every_turn(tokenizer):
    ids, mask = render_chat(tokenizer, MULTI_TURN, 0, "data.train")
    want_ids, want_mask = expected_tokens(tokenizer, MULTI_TURN)
    assert ids == want_ids
    assert mask == want_mask
    trained_text = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert trained_text == "2 + 2 = 4.<|im_end|>3 - 1 = 2. The answer is 2.<|im_end|>"


def test_template_without_generation_markers_gives_the_same_mask(tokenizer):
    plain = tokenizer.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    other = load_tokenizer(ModelConfig(name_or_path="builtin:tiny-llama", chat_template=plain))
    assert render_chat(other, MULTI_TURN, 0, "k") == render_chat(tokenizer, MULTI_TURN, 0, "k")


def test_sft_labels_are_shifted_and_cover_completion_only(tokenizer):
    encode = sft_encoder(tokenizer, "prompt_completion", 64, "data.train")
    example = encode({"prompt": "Question: 1 + 1?", "completion": " 2"}, 0)
    ids, labels = example["input_ids"], example["labels"]
    n_prompt = len(tokenizer("Question: 1 + 1?")["input_ids"])
    completion = tokenizer(" 2", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids[n_prompt:] == completion
    assert labels == [-100] * (n_prompt - 1) + completion + [-100]


def test_rows_with_no_trained_token_after_truncation_are_dropped_and_counted(tokenizer, caplog):
    rows = datasets.Dataset.from_list([{"prompt": "word " * 50, "completion": " yes"},
                                       {"prompt": "short", "completion": " yes"}])
    out = tokenize(rows, sft_encoder(tokenizer, "prompt_completion", 20, "data.train"), "data.train")
    assert len(out) == 1
    assert "dropped 1 of 2 rows (first: row 0" in caplog.text
    with pytest.raises(AlignError, match="every row was dropped.*max_length=20"):
        tokenize(rows.select([0]), sft_encoder(tokenizer, "prompt_completion", 20, "data.train"), "data.train")


def test_pack_restarts_positions_and_pad_masks(tokenizer):
    encode = sft_encoder(tokenizer, "messages", 128, "data.train")
    examples = [encode(row, i) for i, row in enumerate(chat_rows(3))]
    lengths = [len(e["input_ids"]) for e in examples]
    packed = pack(examples)
    assert packed["input_ids"].shape == (1, sum(lengths))
    starts = [0, lengths[0], lengths[0] + lengths[1]]
    assert all(packed["position_ids"][0, s] == 0 for s in starts)
    padded = pad(examples, tokenizer.pad_token_id)
    assert padded["input_ids"].shape == (3, max(lengths))
    assert padded["attention_mask"].sum().item() == sum(lengths) == packed["num_tokens"].item()
