"""Rollout engines: our prefix-shared sampler against transformers' generate and exact distributions.

The built-in tiny model is untrained: its attention is near-uniform (so position ids barely matter)
and its next-token distributions are near-flat. The tests sharpen both by scaling its weights, so
that a wrong position, mask or cache row changes the tokens, and distributions have a few likely
tokens to check.
"""

import importlib.util
import math

import pytest
import torch

from align.config import AdapterConfig, ModelConfig
from align.errors import AlignError
from align.models import Policy
from align.rollout import HFGenerateEngine, PrefixSharedEngine, Rollout, SamplingParams, make_engine

TEXTS = ["Question: What is 3 + 4?\nAnswer:", "Hi", "Question: What is 13 - 20? Think carefully.\nAnswer:"]


def _policy(kind: str = "none") -> Policy:
    return Policy.from_config(ModelConfig(name_or_path="builtin:tiny-llama", dtype="float32"),
                              AdapterConfig(kind=kind, r=8, dropout=0.0))


def _sharpen(model: torch.nn.Module) -> None:
    """Attention logits x64 and output logits x10."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight *= 8
            layer.self_attn.k_proj.weight *= 8
        model.lm_head.weight *= 10


def _random_adapter(model: torch.nn.Module) -> None:
    """A non-zero adapter, so its effect is part of a comparison."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)


@pytest.fixture(scope="module")
def policy():
    policy = _policy()
    _sharpen(policy.model)
    return policy


@pytest.fixture(scope="module")
def prompts(policy):
    return [policy.tokenizer(t)["input_ids"] for t in TEXTS]  # 11, 2 and 20 tokens


def _engines(policy):
    return PrefixSharedEngine(policy.model, policy.tokenizer), HFGenerateEngine(policy.model, policy.tokenizer)


def _alone(model, prompt, max_new_tokens, **kwargs) -> list[int]:
    """transformers' greedy generate on one unpadded prompt."""
    out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=0, **kwargs)
    return out[0, len(prompt):].tolist()


def _expected(free: list[int], tokenizer, max_new: int, stop_ids=(), stop=()) -> tuple[list[int], bool]:
    """What a completion must be, given the unstopped greedy one: cut at its first stop."""
    for end in range(1, min(len(free), max_new) + 1):
        text = tokenizer.decode(free[:end])
        if free[end - 1] in {tokenizer.eos_token_id, *stop_ids} or any(s in text for s in stop):
            return free[:end], True
    return free[:max_new], False


# ---- greedy: exactly transformers' tokens ------------------------------------------------------

def test_greedy_equals_transformers_generate(policy, prompts):
    model, tokenizer = policy.model, policy.tokenizer
    ours, hf = _engines(policy)
    free = ours.generate(prompts, SamplingParams(temperature=0, max_new_tokens=10)).completion_ids
    stop_id = free[0][3]  # prompt 0's group stops early, the others (most likely) run to the budget
    params = SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=[stop_id])
    rollout = ours.generate(prompts, params, group_size=3)
    reference = hf.generate(prompts, params, group_size=3)
    assert rollout.completion_ids == reference.completion_ids and rollout.finished == reference.finished
    assert len(rollout) == 9 and rollout.prompt_ids == prompts and [rollout.prompt_index(r) for r in (0, 3, 8)] == [0, 1, 2]
    for row, completion in enumerate(rollout.completion_ids):  # and each prompt alone, unpadded
        prompt = prompts[row // 3]
        alone = _alone(model, prompt, 10, eos_token_id=[tokenizer.eos_token_id, stop_id])
        assert completion == alone
        assert (completion, rollout.finished[row]) == _expected(free[row // 3], tokenizer, 10, [stop_id])
    assert rollout.finished[0] and len(rollout.completion_ids[0]) <= 4


def test_stop_strings_stop_ids_and_the_token_budget(policy, prompts):
    tokenizer = policy.tokenizer
    ours, hf = _engines(policy)
    free = ours.generate(prompts, SamplingParams(temperature=0, max_new_tokens=16)).completion_ids
    # a stop string: the text of a clean token that greedy decoding writes in row 0
    word = next(w for w in (tokenizer.decode([t]) for t in free[0][2:])
                if len(w.strip()) >= 2 and w.isprintable() and "\ufffd" not in w)
    cases = [dict(stop=[word]), dict(stop_token_ids=[free[0][2]]), dict(max_new_tokens=3)]
    for case in cases:
        params = SamplingParams(**{"temperature": 0, "max_new_tokens": 16, **case})
        rollout = ours.generate(prompts, params, group_size=2)
        expected = [_expected(free[r // 2], tokenizer, params.max_new_tokens, params.stop_token_ids, params.stop)
                    for r in range(len(rollout))]
        assert list(zip(rollout.completion_ids, rollout.finished)) == expected, case
        assert rollout.completion_ids == hf.generate(prompts, params, group_size=2).completion_ids, case
    stopped = ours.generate(prompts[:1], SamplingParams(temperature=0, max_new_tokens=16, stop=[word]))
    text = tokenizer.decode(stopped.completion_ids[0])
    assert stopped.finished[0] and word in text and word not in tokenizer.decode(stopped.completion_ids[0][:-1])


def test_completions_end_at_the_generation_config_s_eos_ids_as_in_generate(policy, prompts):
    """An instruct model ends its turn with an id its generation config lists beside the tokenizer's
    EOS (Llama 3's <|eot_id|>, Gemma's <end_of_turn>, Qwen's <|im_end|> beside <|endoftext|>).
    transformers' generate stops there; so must every engine, or the completion runs on past its end."""
    from transformers import GenerationConfig

    from align.rollout.sampling import eos_token_ids

    model, tokenizer = policy.model, policy.tokenizer
    ours, hf = _engines(policy)
    params = SamplingParams(temperature=0, max_new_tokens=10)
    free = ours.generate(prompts, params).completion_ids
    end_of_turn = free[0][3]
    assert end_of_turn != tokenizer.eos_token_id
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [end_of_turn, tokenizer.eos_token_id]
    try:
        assert eos_token_ids(tokenizer, model) == [tokenizer.eos_token_id, end_of_turn]
        rollout = ours.generate(prompts, params, group_size=2)
        assert rollout.completion_ids == hf.generate(prompts, params, group_size=2).completion_ids
        for row, completion in enumerate(rollout.completion_ids):
            assert completion == _alone(model, prompts[row // 2], 10)  # generate's own default stop ids
            assert (completion, rollout.finished[row]) == _expected(free[row // 2], tokenizer, 10, [end_of_turn])
        assert rollout.finished[0] and rollout.completion_ids[0][-1] == end_of_turn
    finally:
        model.generation_config.eos_token_id = saved
    assert eos_token_ids(tokenizer, GenerationConfig(eos_token_id=7)) == [tokenizer.eos_token_id, 7]
    assert eos_token_ids(tokenizer, GenerationConfig()) == [tokenizer.eos_token_id]


def test_a_saved_policy_lists_its_chat_template_s_end_of_turn_among_its_eos_ids(tmp_path, caplog):
    """A base model given a chat template whose replies end with a token that is no EOS id (Qwen's
    <|im_end|> beside <|endoftext|>): sampling stops there too, and the saved model's generation config
    lists it, so that `generate` and vLLM stop there as well."""
    import json

    from align.rollout.sampling import eos_token_ids

    policy = _policy()
    tokenizer, eos, end = policy.tokenizer, policy.tokenizer.eos_token_id, policy.tokenizer.pad_token_id
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% if m['role'] == "
                               "'assistant' %}<|pad|>{% endif %}\n{% endfor %}")
    assert policy.model.generation_config.eos_token_id == eos
    with caplog.at_level("INFO", logger="align.rollout.sampling"):
        assert eos_token_ids(tokenizer, policy.model) == [eos, end]
    assert "completions also end at '<|pad|>'" in caplog.text
    policy.save(tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == [eos, end]


def test_repetition_penalty_matches_unpadded_transformers(policy, prompts):
    ours, _ = _engines(policy)
    params = SamplingParams(temperature=0, max_new_tokens=12, repetition_penalty=1.5)
    rollout = ours.generate(prompts, params, group_size=2)
    plain = ours.generate(prompts, SamplingParams(temperature=0, max_new_tokens=12), group_size=2)
    for row, completion in enumerate(rollout.completion_ids):
        assert completion == _alone(policy.model, prompts[row // 2], 12, repetition_penalty=1.5)
    assert rollout.completion_ids != plain.completion_ids  # the penalty did something


def test_top_k_one_tiny_top_p_and_full_min_p_are_greedy(policy, prompts):
    ours, _ = _engines(policy)
    greedy = ours.generate(prompts, SamplingParams(temperature=0, max_new_tokens=8), 2).completion_ids
    for knob in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)):
        params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=0, **knob)
        assert ours.generate(prompts, params, 2).completion_ids == greedy, knob


# ---- sampling: the right distribution, reproducibly --------------------------------------------

def _exact(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampling distribution [V] written out by hand: temperature, top-k, top-p, min-p."""
    probs = torch.softmax(logits.double() / params.temperature, -1)
    if params.top_k:
        probs[probs < probs.topk(params.top_k).values[-1]] = 0
        probs /= probs.sum()
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        mass_before = sorted_probs.cumsum(0) - sorted_probs
        probs[order[mass_before >= params.top_p]] = 0
        probs /= probs.sum()
    if params.min_p:
        probs[probs < params.min_p * probs.max()] = 0
        probs /= probs.sum()
    return probs


def _check_distribution(samples: torch.Tensor, exact: torch.Tensor) -> None:
    """Total variation of the empirical distribution below a bound that n samples over k outcomes
    exceed with probability below 1e-6 (Bretagnolle-Huber-Carol)."""
    n, k = len(samples), int((exact > 0).sum())
    empirical = torch.bincount(samples, minlength=len(exact)).double() / n
    assert empirical[exact == 0].sum() == 0, "sampled a token the warpers cut"
    assert 1 < k < 10  # the check is about a real choice among a few tokens
    bound = math.sqrt((k * math.log(2) + math.log(1e6)) / (2 * n))
    assert 0.5 * (empirical - exact).abs().sum() < bound


@pytest.mark.parametrize("engine,knobs", [
    ("prefix_shared", dict(top_k=4)), ("prefix_shared", dict(temperature=0.5, top_p=0.5)),
    ("prefix_shared", dict(min_p=0.3)), ("hf", dict(temperature=0.7, top_k=6, top_p=0.9, min_p=0.1))])
def test_sampling_follows_the_processed_distribution(policy, prompts, engine, knobs):
    """First tokens against the exact distribution, and second tokens (after the shared prefill and
    one decode step on the expanded cache) against the exact conditional distribution."""
    prompt, n = prompts[0], 2000
    params = SamplingParams(**{"max_new_tokens": 2, "seed": 7, **knobs})
    rollout = make_engine(engine, policy.model, policy.tokenizer).generate([prompt], params, group_size=n)
    first = torch.tensor([c[0] for c in rollout.completion_ids])
    with torch.no_grad():
        logits = policy.model(input_ids=torch.tensor([prompt])).logits[0, -1]
    _check_distribution(first, _exact(logits, params))
    top = int(first.mode().values)
    second = torch.tensor([c[1] for c in rollout.completion_ids if c[0] == top])
    with torch.no_grad():
        logits = policy.model(input_ids=torch.tensor([prompt + [top]])).logits[0, -1]
    _check_distribution(second, _exact(logits, params))


def test_categorical_sampler_draws_the_given_distribution():
    """The inverse-CDF sampler the engines use: a long tail, zeros never drawn."""
    from align.rollout.sampling import sample_categorical

    probs = torch.softmax(torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3, -1)
    probs[probs.argmax()] = 0.0  # the likeliest token cut, as top-k / top-p cut tokens
    probs /= probs.sum()
    n, generator = 200_000, torch.Generator().manual_seed(1)
    draws = torch.cat([sample_categorical(probs.expand(10_000, -1), generator) for _ in range(n // 10_000)])
    assert draws[probs[draws] == 0].numel() == 0
    top = probs.topk(8).indices  # the head token by token; the tail (most of the mass here) as one bin
    exact = torch.cat([probs[top], 1 - probs[top].sum()[None]])
    counts = torch.stack([(draws == t).sum() for t in top] + [(~torch.isin(draws, top)).sum()]).double()
    bound = math.sqrt((9 * math.log(2) + math.log(1e6)) / (2 * n))
    assert 0.5 * (counts / n - exact.double()).abs().sum() < bound
    generator = lambda: torch.Generator().manual_seed(3)
    assert torch.equal(sample_categorical(probs[None], generator()), sample_categorical(probs[None], generator()))


def test_seeds_make_sampling_reproducible_without_touching_the_global_rng(policy, prompts):
    for engine in _engines(policy):
        sample = lambda seed: engine.generate(prompts, SamplingParams(max_new_tokens=6, seed=seed), 3).completion_ids
        state = torch.get_rng_state()
        assert sample(1) == sample(1) != sample(2)
        assert torch.equal(torch.get_rng_state(), state)
        assert sample(None) != sample(None)  # unseeded: the global RNG moves on


# ---- prefix sharing is real --------------------------------------------------------------------

def _forward_shapes(model) -> tuple[list[tuple[int, int]], object]:
    shapes = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                           with_kwargs=True)
    return shapes, hook


def test_prompts_are_prefilled_once_and_finished_rows_leave_the_batch(policy, prompts):
    params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=0, stop_token_ids=list(range(3, 100)))
    engine = PrefixSharedEngine(policy.model, policy.tokenizer)  # (its probe's forwards before the hook)
    shapes, hook = _forward_shapes(policy.model)
    try:
        rollout = engine.generate(prompts, params, group_size=8)
    finally:
        hook.remove()
    assert shapes[0] == (3, 20)  # one prefill of the 3 prompts (padded to 20 tokens), not of 24 rows
    assert all(width == 1 for _, width in shapes[1:])  # then only one new token per row and step
    lengths = [len(c) for c in rollout.completion_ids]
    decode_rows = [rows for rows, _ in shapes[1:]]
    # decode step s feeds token s of every row that has a token s + 1: exactly the unfinished rows
    assert decode_rows == [sum(n > s + 1 for n in lengths) for s in range(max(lengths) - 1)]
    assert decode_rows[0] <= 24 and decode_rows[-1] < decode_rows[0]  # rows left as they finished
    assert rollout.finished == [n < 12 or c[-1] in range(3, 100) for n, c in zip(lengths, rollout.completion_ids)]

    shapes, hook = _forward_shapes(policy.model)  # transformers' generate prefills every row
    try:
        HFGenerateEngine(policy.model, policy.tokenizer).generate(prompts, params, group_size=8)
    finally:
        hook.remove()
    assert shapes[0] == (24, 20)


# ---- adapters ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_greedy_equality_holds_for_adapter_policies(kind, prompts):
    policy = _policy(kind)
    _random_adapter(policy.model)
    policy.model.train()
    ours, hf = _engines(policy)
    params = SamplingParams(temperature=0, max_new_tokens=8)
    rollout = ours.generate(prompts, params, group_size=2)
    assert rollout.completion_ids == hf.generate(prompts, params, group_size=2).completion_ids
    assert policy.model.training  # the engines restore the training mode
    with policy.model.disable_adapter():
        assert ours.generate(prompts, params, group_size=2).completion_ids != rollout.completion_ids


# ---- static decoding (CUDA graphs on a GPU; eager here) -------------------------------------------

STATIC_CASES = [dict(temperature=0, max_new_tokens=12), dict(max_new_tokens=12, seed=3, repetition_penalty=1.3),
                dict(max_new_tokens=16, seed=5, top_k=20, stop_token_ids=list(range(3, 60)))]


@pytest.mark.parametrize("kind", ["none", "lora", "qlora"])
def test_static_decoding_samples_what_the_eager_loop_samples(kind, policy, prompts):
    """Rows that finish early ride along in the static decoder (the eager loop drops them): the
    completions, greedy or seeded samples, are the same token for token."""
    if kind != "none":
        policy = _policy(kind)
        _random_adapter(policy.model)
    eager = PrefixSharedEngine(policy.model, policy.tokenizer, static=False)
    static = PrefixSharedEngine(policy.model, policy.tokenizer, static=True)
    for case in STATIC_CASES:
        params = SamplingParams(**case)
        want, got = eager.generate(prompts, params, 3), static.generate(prompts, params, 3)
        assert (got.completion_ids, got.finished) == (want.completion_ids, want.finished), case
    lengths = {len(c) for c in got.completion_ids}
    assert len(lengths) > 2  # rows did finish at different steps
    assert static.static is True
    from align.config import SamplingConfig  # the recipe's switch: CUDA graphs where CUDA is (None), or never
    assert make_engine("prefix_shared", policy.model, policy.tokenizer, SamplingConfig()).static is None
    assert make_engine("prefix_shared", policy.model, policy.tokenizer, SamplingConfig(cuda_graphs=False)).static is False


class _MisusesForeignCaches(torch.nn.Module):
    """A causal LM that misuses any cache but transformers' own, without an error: "cache" hands its
    model no cache (and no mask: one token alone), "mask" the cache but a mask that lets every column
    through. The first static step must catch both (an update count; log-probs against the usual step)."""

    def __init__(self, model, misuse: str):
        super().__init__()
        self.inner, self.config, self.misuse = model, model.config, misuse

    def forward(self, cache=None, **kwargs):
        from transformers import DynamicCache

        if not isinstance(cache, DynamicCache) and self.misuse == "cache":
            cache, kwargs["attention_mask"] = None, None
        elif not isinstance(cache, DynamicCache):
            kwargs["attention_mask"] = torch.ones_like(kwargs["attention_mask"])
        return self.inner(cache=cache, **kwargs)


@pytest.mark.parametrize("misuse, message", [("cache", "StaticDecodingError: 0 cache updates for 2 layers"),
                                             ("mask", "StaticDecodingError: its first step's log-probs differ")])
def test_a_model_that_misuses_the_static_cache_decodes_the_usual_way(policy, prompts, caplog, misuse, message):
    engine = PrefixSharedEngine(_MisusesForeignCaches(policy.model, misuse), policy.tokenizer, static=True)
    params = SamplingParams(max_new_tokens=8, seed=1)
    rollout = engine.generate(prompts, params, 2)
    assert f"decoding without a static cache: {message}" in caplog.text
    assert engine.static is False
    assert rollout.completion_ids == PrefixSharedEngine(policy.model, policy.tokenizer, static=False).generate(
        prompts, params, 2).completion_ids


def test_the_first_step_check_allows_float_noise_only():
    """1e-3 on log-probs when the model computes in float32 (its keys' dtype), 5e-2 in 16 bits,
    whatever dtype the logits come in; NaN never passes."""
    from align.rollout.static_decoder import StaticDecodingError, check_first_step

    generator = torch.Generator().manual_seed(0)
    expected = torch.randn(3, 50, generator=generator)
    noise = torch.rand(3, 50, generator=generator)  # in [0, 1): log-prob differences below twice the scale
    check_first_step(expected + 4e-4 * noise, expected, torch.float32)
    check_first_step((expected + 1e-2 * noise).bfloat16(), expected.bfloat16(), torch.bfloat16)
    check_first_step(expected + 1e-2 * noise, expected, torch.bfloat16)  # (a 16-bit model with float32 logits)
    one_off = expected.clone()
    one_off[:, 7] += 2e-2
    for logits, dtype in ((one_off, torch.float32), (expected + 0.2 * noise, torch.bfloat16),
                          (expected * float("nan"), torch.bfloat16)):
        with pytest.raises(StaticDecodingError, match="log-probs differ"):
            check_first_step(logits, expected, dtype)


def test_models_whose_weights_move_in_hooks_are_refused():
    """FSDP2, DeepSpeed ZeRO-3 and accelerate's offload gather or move weights in hooks, which a CUDA
    graph would not replay: such models decode the usual way."""
    from transformers import DynamicCache

    from align.rollout.static_decoder import static_decoding_refusal

    model = _policy().model
    assert static_decoding_refusal(model, DynamicCache()) is None
    next(model.parameters()).ds_id = 0  # what DeepSpeed marks its partitioned parameters with
    assert "gathers or moves its weights in hooks" in static_decoding_refusal(model, DynamicCache())


# ---- edges and errors --------------------------------------------------------------------------

def test_edges_and_clear_errors(policy, prompts):
    ours, hf = _engines(policy)
    for engine in (ours, hf):
        assert engine.generate([], SamplingParams(), 4) == Rollout([], [], [], 4)
        with pytest.raises(ValueError, match="prompt 1 is empty"):
            engine.generate([prompts[0], []], SamplingParams())
        engine.sync_weights()
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(AlignError, match="unknown rollout engine 'fast'"):
        make_engine("fast", policy.model, policy.tokenizer)
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(AlignError, match="vllm is not installed"):
            make_engine("vllm", policy.model, policy.tokenizer)
