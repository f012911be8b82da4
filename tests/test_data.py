import pytest

from align.data import pack, pad, render_chat, sft_encoder, tokenize
from align.errors import AlignError
from align.models import load_tokenizer
from align.config import ModelConfig
from align.toy import chat_rows, preference_rows, prompt_rows

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
    unanswered = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "Hi?"}]}])
    with pytest.raises(AlignError, match="row 0: nothing to train: no assistant message"):  # (not: raise max_length)
        tokenize(unanswered, sft_encoder(tokenizer, "messages", 128, "data.train"), "data.train")


def test_pack_restarts_positions_and_pad_masks(tokenizer):
    encode = sft_encoder(tokenizer, "messages", 128, "data.train")
    examples = [encode(row, i) for i, row in enumerate(chat_rows(3))]
    lengths = [len(e["input_ids"]) for e in examples]
    packed = pack(examples, max_length=sum(lengths))  # a budget that holds them all: one row
    assert packed["input_ids"].shape == (1, sum(lengths))
    assert (packed["position_ids"][0] == 0).sum() == 3
    padded = pad(examples, tokenizer.pad_token_id)
    assert padded["input_ids"].shape == (3, max(lengths))
    assert padded["attention_mask"].sum().item() == sum(lengths) == packed["num_tokens"].item()


def _segments(position_ids, labels):
    """A row's (start, length) runs of positions 0, 1, 2, ..."""
    out, start = [], 0
    for t in range(1, len(position_ids) + 1):
        if t == len(position_ids) or position_ids[t] != position_ids[t - 1] + 1:
            out.append((start, t - start))
            start = t
    return out


def test_pack_bounds_rows_by_the_longest_example_best_fit_decreasing():
    from align.data.collate import pack_rows
    from align.ops.logprobs import IGNORE_INDEX

    lengths = [17, 12, 22, 9, 13, 20, 5, 11, 17, 3]
    examples = [{"input_ids": [100 + i] * n, "labels": [i] * (n - 1) + [IGNORE_INDEX]} for i, n in enumerate(lengths)]
    packed = pack(examples, pad_token_id=7)
    rows, width = packed["input_ids"].shape
    assert width == max(lengths) and rows < len(lengths)  # never longer than padding, fewer rows
    assert rows == 7  # [22] [20] [17] [17] [13 9] [12 5 3] [11]: best fit decreasing (6 is optimal)
    assert packed["num_tokens"].item() == sum(lengths)
    seen = []
    for r in range(rows):
        ids, pos, lab = (packed[k][r].tolist() for k in ("input_ids", "position_ids", "labels"))
        for start, n in _segments(pos, lab):
            if ids[start] == 7:  # the row's padding: its own positions 0.., nothing trained
                assert start + n == width and set(lab[start:]) == {IGNORE_INDEX}
                continue
            i = ids[start] - 100
            assert n == lengths[i] and ids[start:start + n] == examples[i]["input_ids"]
            assert lab[start:start + n] == examples[i]["labels"]
            seen.append(i)
    assert sorted(seen) == list(range(len(lengths)))
    # deterministic; a larger budget gives fewer, longer rows; best fit decreasing order
    assert pack_rows(lengths) == pack_rows(list(lengths))
    assert pack_rows([5, 3, 2, 4, 1, 5]) == [[0], [5], [3, 4], [1, 2]]
    # a larger budget: best fit needs 3 rows (64 + 61 + 4 tokens); balanced, the widest holds 44
    assert pack_rows(lengths, 64) == [[2, 1, 3], [5, 4, 7], [0, 8, 6, 9]]
    assert pack(examples, max_length=64)["input_ids"].shape == (3, 44)
    assert pack(examples[:1])["input_ids"].shape == (1, lengths[0])


def test_a_token_merging_across_the_prompt_s_end_is_split_there_as_generation_would():
    """Conversational prompt + completion: the prompt (with its generation prompt) is tokenized alone,
    as a sampler feeds it, and the completion's text after it: the whole completion is trained even
    where the conversation's own tokens merge across the boundary (here ` I`)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(c): c for c in range(32, 127)} | {"\n": 127, " I": 128}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[(" ", "I")])),
                                  eos_token="~")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '~' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    encode = sft_encoder(tok, "prompt_completion", 64, "data.train")
    example = encode({"prompt": [{"role": "user", "content": "Hi"}],
                      "completion": [{"role": "assistant", "content": "It is."}]}, 0)
    tokens = tok.convert_ids_to_tokens(example["input_ids"])
    assert "".join(tokens) == "user: Hi~assistant: It is.~" and " I" not in tokens
    trained = tok.convert_ids_to_tokens([t for t in example["labels"] if t != -100])
    assert "".join(trained) == "It is.~"


def test_sft_assistant_turns_last_trains_the_last_reply_only(make_recipe, tokenizer):
    from align.trainers import SFTTrainer

    recipe = make_recipe(rows=[{"messages": MULTI_TURN}], sft={"assistant_turns": "last"})
    rows, fmt = SFTTrainer.load_splits(recipe)["data.train"]
    (example,) = SFTTrainer.build_dataset(recipe, tokenizer, rows, fmt, "data.train")
    trained = [token for token in example["labels"] if token != -100]
    assert tokenizer.decode(trained) == "3 - 1 = 2. The answer is 2.<|im_end|>"
    recipe = make_recipe(rows=[{"prompt": "1 + 1?", "completion": " 2"}], sft={"assistant_turns": "last"})
    rows, fmt = SFTTrainer.load_splits(recipe)["data.train"]
    with pytest.raises(AlignError, match="sft.assistant_turns: last picks turns of `messages` data; data.train "
                                         "is prompt_completion data"):
        SFTTrainer.build_dataset(recipe, tokenizer, rows, fmt, "data.train")


@pytest.mark.parametrize("algorithm, rows, sections", [
    ("sft", chat_rows(40, seed=3, max_turns=3), {}),
    ("dpo", preference_rows(40, seed=3), {}),
    ("kto", preference_rows(40, seed=3), {}),
    ("grpo", prompt_rows(40, seed=3), {"grpo": {"rewards": [{"fn": "exact_answer"}]}, "train": {"batch_size": 8}}),
])
def test_num_proc_tokenizes_the_same_examples(make_recipe, tokenizer, algorithm, rows, sections, monkeypatch):
    from align.registry import TRAINERS

    trainer, mapped, map_rows = TRAINERS.get(algorithm), [], datasets.Dataset.map

    def spied(self, *args, **kwargs):
        mapped.append(kwargs.get("num_proc"))
        return map_rows(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "map", spied)
    datasets.disable_caching()  # each map computes: the second must not read the first's cache
    try:
        built = []
        for num_proc in (None, 2):
            recipe = make_recipe(rows=rows, algorithm=algorithm, data={"num_proc": num_proc, "max_length": 96},
                                 **sections)
            data, fmt = trainer.load_splits(recipe)["data.train"]
            built.append(trainer.build_dataset(recipe, tokenizer, data, fmt, "data.train"))
    finally:
        datasets.enable_caching()
    one, two = built
    assert len(one) == len(two) > 0 and one[:] == two[:]
    assert 2 in mapped  # the tokenizing map ran in two processes


@pytest.mark.parametrize("algorithm, row, sections", [
    ("sft", {"messages": [{"role": "user", "content": None}]}, {}),
    ("grpo", {"prompt": ""}, {"grpo": {"rewards": [{"fn": "exact_answer"}]}, "train": {"batch_size": 8}}),
])
def test_an_error_in_a_tokenizing_process_names_the_row(make_recipe, tokenizer, algorithm, row, sections):
    from align.registry import TRAINERS

    trainer = TRAINERS.get(algorithm)
    rows = chat_rows(40, seed=3) if algorithm == "sft" else prompt_rows(40, seed=3)
    rows[33] = {**rows[33], **row}  # in the second process's half
    recipe = make_recipe(rows=rows, algorithm=algorithm, data={"num_proc": 2}, **sections)
    data, fmt = trainer.load_splits(recipe)["data.train"]
    with pytest.raises(AlignError, match="data.train row 33"):
        trainer.build_dataset(recipe, tokenizer, data, fmt, "data.train")


def test_dropped_rows_leave_the_rest_in_order(tokenizer):
    rows = [{"messages": [{"role": "user", "content": "1 + 1 " * (i % 3 * 30)},
                          {"role": "assistant", "content": f"answer {i}"}]} for i in range(9)]
    examples = tokenize(datasets.Dataset.from_list(rows), sft_encoder(tokenizer, "messages", 40, "data.train"),
                        "data.train")
    kept = [tokenizer.decode([t for t in e["labels"] if t != -100]) for e in examples]
    assert kept == [f"answer {i}<|im_end|>" for i in range(0, 9, 3)]
