import pytest
import torch

from align.config import AdapterConfig, ModelConfig
from align.data.preference import pack_pairs, preference_encoder, pair_sums, split_implicit_prompt
from align.errors import AlignError
from align.models import Policy
from align.toy import preference_rows


@pytest.fixture(scope="module")
def policy():
    return Policy.from_config(ModelConfig(name_or_path="builtin:tiny-llama", dtype="float32"), AdapterConfig())


def random_pairs(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(5, 400, (n,), generator=g).tolist()  # noqa: E731
    return [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r), "margin": 0.0} for p, c, r in shapes]


def test_shared_prompt_row_equals_two_rows_in_value_and_gradient(policy):
    pairs = random_pairs([(9, 4, 6), (1, 3, 2), (30, 7, 1)])
    results = []
    for shared in (True, False):
        policy.module.zero_grad()
        batch = pack_pairs(pairs, shared_prompt=shared)
        chosen, rejected = pair_sums(policy.logprobs(batch), batch["sequence_ids"], len(pairs))
        (chosen.sum() - 2 * rejected.sum()).backward()
        grads = [p.grad.clone() for p in policy.trainable_parameters()]
        results.append((torch.stack([chosen, rejected]).detach(), grads, batch["num_tokens"].item()))
    (shared_vals, shared_grads, shared_tokens), (two_vals, two_grads, two_tokens) = results
    torch.testing.assert_close(shared_vals, two_vals, atol=1e-5, rtol=0)
    for a, b in zip(shared_grads, two_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert shared_tokens == two_tokens - sum(p - 1 for p, _, _ in [(9, 4, 6), (1, 3, 2), (30, 7, 1)])


def test_pair_sums_cover_exactly_the_completion_tokens():
    pairs = random_pairs([(5, 3, 4), (2, 6, 1)])
    batch = pack_pairs(pairs)
    chosen, rejected = pair_sums(torch.ones_like(batch["input_ids"], dtype=torch.float), batch["sequence_ids"], 2)
    assert chosen.tolist() == [3, 6] and rejected.tolist() == [4, 1]


def test_implicit_prompt_is_the_shared_prefix(policy):
    """The spaces before the cut go with the completions, so implicit string pairs encode as the same
    pairs given explicitly do (a lone " " token closed the prompt, and "16" was read without its space)."""
    assert split_implicit_prompt("Q: 2+2? A: 4", "Q: 2+2? A: 5") == ("Q: 2+2? A:", " 4", " 5")
    assert split_implicit_prompt("Q: 2+2?\n4", "Q: 2+2?\n5") == ("Q: 2+2?\n", "4", "5")
    for row in preference_rows(4, seed=7):
        encode = preference_encoder(policy.tokenizer, 128, "data.train")
        implicit = {"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]}
        assert encode(implicit, 0) == encode(row, 0)
    chat = [{"role": "user", "content": "hi"}]
    assert split_implicit_prompt(chat + [{"role": "assistant", "content": "a"}],
                                 chat + [{"role": "assistant", "content": "b"}])[0] == chat


def test_long_prompts_are_dropped_and_completions_truncated_alike(policy):
    encode = preference_encoder(policy.tokenizer, 12, "data.train")
    assert "max_length=12" in encode({"prompt": "word " * 20, "chosen": " a", "rejected": " b"}, 0)["dropped"]
    out = encode({"prompt": "Q:", "chosen": " one two three four five six seven eight nine ten eleven",
                  "rejected": " yes"}, 1)
    assert len(out["prompt_ids"]) + len(out["chosen_ids"]) == 12
    with pytest.raises(AlignError, match="row 3: empty rejected"):
        encode({"prompt": "Q:", "chosen": " a", "rejected": ""}, 3)


def test_conversational_pairs_split_at_the_generation_prompt(policy):
    tok = policy.tokenizer
    prompt = [{"role": "user", "content": "What is 2 + 2?"}]
    row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "4."}],
           "rejected": [{"role": "assistant", "content": "5?"}]}
    out = preference_encoder(tok, 128, "data.train")(row, 0)
    assert tok.decode(out["prompt_ids"]).endswith("<|im_start|>assistant\n")
    assert tok.decode(out["chosen_ids"]) == "4.<|im_end|>\n"
    assert tok.decode(out["rejected_ids"]) == "5?<|im_end|>\n"
    implicit = preference_encoder(tok, 128, "data.train")({"chosen": prompt + row["chosen"],
                                                         "rejected": prompt + row["rejected"]}, 0)
    assert implicit == out
