"""Rollout engines: our prefix-shared sampler against transformers' generate."""

import pytest
import torch

from align.config import AdapterConfig, ModelConfig
from align.errors import AlignError
from align.models import Policy
from align.rollout import HFGenerateEngine, PrefixSharedEngine, SamplingParams, make_engine


def _policy(kind="none"):
    config = ModelConfig(name_or_path="builtin:tiny-llama-arith", dtype="float32")
    return Policy.from_config(config, AdapterConfig(kind=kind, r=8, dropout=0.0))


@pytest.fixture(scope="module")
def policy():
    return _policy()


def _prompts(tokenizer):
    texts = ["Question: What is 3 + 4?\nAnswer:", "Question: What is 13 - 20? Think carefully.\nAnswer:",
             "Question: What is 1 + 19?\nAnswer:"]
    return [tokenizer(t)["input_ids"] for t in texts]


@pytest.mark.parametrize("max_new_tokens", [4, 24])
def test_greedy_equals_transformers_generate(policy, max_new_tokens):
    prompts, params = _prompts(policy.tokenizer), SamplingParams(temperature=0, max_new_tokens=max_new_tokens)
    ours = PrefixSharedEngine(policy.model, policy.tokenizer).generate(prompts, params, group_size=3)
    reference = HFGenerateEngine(policy.model, policy.tokenizer).generate(prompts, params, group_size=3)
    assert ours.completion_ids == reference.completion_ids and ours.finished == reference.finished
    for i, prompt in enumerate(prompts):  # and each prompt alone, unpadded
        alone = policy.model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=policy.tokenizer.pad_token_id)[0, len(prompt):].tolist()
        assert ours.completion_ids[3 * i] == alone[:len(ours.completion_ids[3 * i])]
    assert all(len(c) <= max_new_tokens for c in ours.completion_ids)
    assert ours.finished == [c[-1] == policy.tokenizer.eos_token_id for c in ours.completion_ids]


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_greedy_equality_holds_for_adapter_policies(kind):
    torch.manual_seed(0)
    policy = _policy(kind)
    with torch.no_grad():  # a non-zero adapter, so its effect is part of the comparison
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    prompts, params = _prompts(policy.tokenizer), SamplingParams(temperature=0, max_new_tokens=16)
    ours = PrefixSharedEngine(policy.model, policy.tokenizer).generate(prompts, params, group_size=2)
    reference = HFGenerateEngine(policy.model, policy.tokenizer).generate(prompts, params, group_size=2)
    assert ours.completion_ids == reference.completion_ids


def _first_token_frequencies(engine, prompt, params, n, vocab):
    rollout = engine.generate([prompt], params, group_size=n)
    return torch.bincount(torch.tensor([c[0] for c in rollout.completion_ids]), minlength=vocab).float() / n


def test_sampling_follows_the_processed_distribution(policy):
    tokenizer = policy.tokenizer
    prompt = tokenizer("Question: What is 13 - 20?\nAnswer:")["input_ids"]
    params = SamplingParams(temperature=1.5, top_k=6, max_new_tokens=1, seed=3)
    with torch.no_grad():
        logits = policy.model(input_ids=torch.tensor([prompt])).logits[0, -1]
    top = torch.topk(logits / 1.5, 6)
    exact = torch.zeros_like(logits).index_put((top.indices,), top.values.softmax(-1))
    n = 4000
    ours = _first_token_frequencies(PrefixSharedEngine(policy.model, tokenizer), prompt, params, n, len(logits))
    theirs = _first_token_frequencies(HFGenerateEngine(policy.model, tokenizer), prompt, params, n, len(logits))
    # total variation of an n-sample empirical distribution over 6 outcomes is ~0.02; 0.05 is far in the tail
    assert 0.5 * (ours - exact).abs().sum() < 0.05
    assert 0.5 * (theirs - exact).abs().sum() < 0.05
    assert ours[exact == 0].sum() == 0  # top-k really cut the rest


def test_seeds_make_sampling_reproducible(policy):
    engine, prompts = PrefixSharedEngine(policy.model, policy.tokenizer), _prompts(policy.tokenizer)
    sample = lambda seed: engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=12, seed=seed), 4)
    assert sample(1).completion_ids == sample(1).completion_ids
    assert sample(1).completion_ids != sample(2).completion_ids


def test_prompt_is_prefilled_once_and_finished_rows_leave_the_batch(policy):
    shapes = []
    hook = policy.model.register_forward_pre_hook(lambda m, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                                  with_kwargs=True)
    try:
        prompts = _prompts(policy.tokenizer)
        rollout = PrefixSharedEngine(policy.model, policy.tokenizer).generate(
            prompts, SamplingParams(temperature=1.0, max_new_tokens=40, seed=0), group_size=8)
    finally:
        hook.remove()
    assert shapes[0] == (3, max(len(p) for p in prompts))  # one prefill of the 3 prompts, not 24 rows
    decode_rows = [rows for rows, width in shapes[1:]]
    assert all(width == 1 for _, width in shapes[1:])
    assert decode_rows[0] <= 24 and decode_rows == sorted(decode_rows, reverse=True)
    assert decode_rows[-1] < decode_rows[0]  # rows that finished stopped costing compute
    lengths = sorted(len(c) for c in rollout.completion_ids)
    assert len(decode_rows) == lengths[-1] - 1  # the batch ran only as long as its longest row


def test_stop_strings_stop_ids_and_the_token_budget(policy):
    tokenizer, prompts = policy.tokenizer, _prompts(policy.tokenizer)
    engine = PrefixSharedEngine(policy.model, tokenizer)
    free = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=24))
    word = tokenizer.decode(free.completion_ids[0]).split()[1]  # a word that greedy decoding writes
    stopped = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=24, stop=[word]))
    text = tokenizer.decode(stopped.completion_ids[0])
    assert stopped.finished[0] and text.rstrip().endswith(word) and word not in tokenizer.decode(stopped.completion_ids[0][:-1])
    reference = HFGenerateEngine(policy.model, tokenizer).generate(prompts, SamplingParams(temperature=0, max_new_tokens=24, stop=[word]))
    assert stopped.completion_ids == reference.completion_ids
    second = free.completion_ids[0][1]
    by_id = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=24, stop_token_ids=[second]))
    assert by_id.completion_ids[0] == free.completion_ids[0][:2] and by_id.finished[0]
    short = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=3))
    assert all(len(c) <= 3 for c in short.completion_ids)
    assert short.finished == [c[-1] == tokenizer.eos_token_id for c in short.completion_ids]


def test_top_k_one_and_extreme_min_p_are_greedy(policy):
    engine, prompts = PrefixSharedEngine(policy.model, policy.tokenizer), _prompts(policy.tokenizer)
    greedy = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=16), 2).completion_ids
    assert engine.generate(prompts, SamplingParams(top_k=1, max_new_tokens=16, seed=0), 2).completion_ids == greedy
    assert engine.generate(prompts, SamplingParams(min_p=0.999, max_new_tokens=16, seed=0), 2).completion_ids == greedy


def test_repetition_penalty_matches_transformers(policy):
    prompts, params = _prompts(policy.tokenizer), SamplingParams(temperature=0, max_new_tokens=16, repetition_penalty=1.8)
    ours = PrefixSharedEngine(policy.model, policy.tokenizer).generate(prompts, params)
    reference = HFGenerateEngine(policy.model, policy.tokenizer).generate(prompts, params)
    plain = PrefixSharedEngine(policy.model, policy.tokenizer).generate(prompts, SamplingParams(temperature=0, max_new_tokens=16))
    assert ours.completion_ids == reference.completion_ids != plain.completion_ids


def test_unknown_and_unavailable_engines_are_clear_errors(policy):
    with pytest.raises(AlignError, match="unknown engine 'fast'"):
        make_engine("fast", policy.model, policy.tokenizer)
    with pytest.raises(AlignError, match="vllm"):
        make_engine("vllm", policy.model, policy.tokenizer)
