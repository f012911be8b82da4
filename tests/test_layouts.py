"""Batch layouts a family cannot run exactly are found at load and left out (a row per sequence
instead of packed rows, a prompt copy per sequence instead of shared prompts), never trained on
with wrong numbers (`align.models.layouts`).

Stand-ins for the families a scan of transformers 5.24 found: the BART decoder counts positions
along the row (packed rows and shared prompts both wrong), MPT's ALiBi measures distances along
the row (shared prompts wrong), Qwen3-Next's linear-attention layers take no mask (refused)."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers as T

from align.config import AdapterConfig, ModelConfig, recipe_from_dict
from align.data.groups import pack_groups
from align.errors import AlignError
from align.models import Policy
from align.models.head import compute_dtype
from align.models.layouts import PACKED_ROWS, SHARED_PROMPTS, inexact_layouts
from align.models.reward import RewardModel, RewardScorer
from align.rollout import HFGenerateEngine, PrefixSharedEngine
from align.toy import chat_rows, preference_rows
from align.trainers import TRAINERS
from tests.conftest import write_jsonl
from align.models.tiny import resolve
from tests.test_families import MATRIX, TEMPERATURE, build, forward_logprobs, saved_models, trainer_recipes

VOCAB = 512
SMALL = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=None, eos_token_id=1, initializer_range=0.2)


def bart_decoder():
    config = T.BartConfig(d_model=32, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64,
                          encoder_layers=1, max_position_embeddings=256, **SMALL)
    return T.BartForCausalLM._from_config(config, attn_implementation="sdpa")


def mpt():
    config = T.MptConfig(d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=256, **SMALL)
    return T.MptForCausalLM._from_config(config, attn_implementation="eager")


def qwen3_next():
    config = T.Qwen3NextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=8, linear_num_value_heads=2, linear_num_key_heads=2,
                               linear_key_head_dim=8, linear_value_head_dim=8, num_experts=2, num_experts_per_tok=1,
                               moe_intermediate_size=32, shared_expert_intermediate_size=32,
                               layer_types=["linear_attention", "full_attention"], **SMALL)
    return T.Qwen3NextForCausalLM._from_config(config, attn_implementation="sdpa")


def llama4():
    """Chunked attention (every 8 positions here): no mask of Align's expresses it."""
    config = T.Llama4TextConfig(hidden_size=32, intermediate_size=64, intermediate_size_mlp=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                                attention_chunk_size=8, **SMALL)
    return T.Llama4ForCausalLM._from_config(config, attn_implementation="sdpa")


def seeded(make):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return make().eval()


@pytest.mark.parametrize("name, attn", MATRIX)
def test_every_tested_family_runs_both_layouts_exactly(name, attn):
    """No false refusal: the families of the matrix, in fp32 and in bf16 (the looser tolerance)."""
    model = build(name, attn)
    assert inexact_layouts(model) == {}
    assert inexact_layouts(model.to(torch.bfloat16)) == {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_probe_finds_what_each_family_gets_wrong(dtype):
    bart = inexact_layouts(seeded(bart_decoder).to(dtype))
    assert set(bart) == {PACKED_ROWS, SHARED_PROMPTS}
    assert "model type 'bart': packed rows give decoder states" in bart[PACKED_ROWS]
    assert set(inexact_layouts(seeded(mpt).to(dtype))) == {SHARED_PROMPTS}
    hybrid = inexact_layouts(seeded(qwen3_next).to(dtype))
    assert set(hybrid) == {PACKED_ROWS, SHARED_PROMPTS}
    assert "'qwen3_next' has 'linear_attention' layers, which no attention mask keeps" in hybrid[PACKED_ROWS]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """name -> a saved model directory with the built-in tiny tokenizer."""
    makers = {"bart": bart_decoder, "mpt": mpt, "qwen3_next": qwen3_next, "llama": lambda: build("llama")}
    return saved_models(tmp_path_factory, lambda name: seeded(makers[name]))


def recipe(algorithm: str, path: str, attn: str, tmp_path, **data) -> dict:
    rows = chat_rows(8, seed=1) if algorithm == "sft" else preference_rows(8, seed=2)
    return recipe_from_dict({
        "algorithm": algorithm, "output_dir": str(tmp_path / algorithm),
        "model": {"name_or_path": path, "dtype": "float32", "attn_implementation": attn},
        "data": {"train": {"path": write_jsonl(tmp_path / f"{algorithm}.jsonl", rows)}, "max_length": 64, **data},
        "train": {"lr": 1e-3, "batch_size": 4, "max_steps": 2, "progress": False, "plots": False}})


def check_sequences_against_forward(trainer, batch, sequences):
    """The policy's log-probs on `batch` equal forward() of each (prompt, completion) of `sequences`."""
    model = trainer.policy.model.eval()
    with torch.no_grad():
        ours = trainer.policy.logprobs(batch, temperature=TEMPERATURE)
    for number, (prompt, completion) in enumerate(sequences):
        want = forward_logprobs(model, prompt + completion, len(prompt))
        torch.testing.assert_close(ours[batch["sequence_ids"] == number], want, atol=1e-5, rtol=0)
    trainer.policy.model.train()


def pairs_of(trainer, count: int):
    pairs = [trainer.train_data[i] for i in range(count)]
    return pairs, [(p["prompt_ids"], c) for p in pairs for c in (p["chosen_ids"], p["rejected_ids"])]


@pytest.mark.parametrize("name", ["bart", "qwen3_next"])
def test_a_model_that_cannot_run_packed_rows_gets_a_row_per_sequence(name, model_dir, tmp_path, caplog):
    """SFT pads (as with data.packing: false), DPO's pairs get a row per sequence with a padding
    mask; both give forward()'s log-probs, and say what they do instead."""
    path = model_dir(name)
    with caplog.at_level(logging.WARNING, logger="align.trainers.batches"):
        sft = TRAINERS["sft"].from_recipe(recipe("sft", path, "sdpa", tmp_path))
        dpo = TRAINERS["dpo"].from_recipe(recipe("dpo", path, "sdpa", tmp_path))
    assert f"model type '{name}'" in caplog.text and "each sequence gets a row of its own instead" in caplog.text
    batch = sft.collate([sft.train_data[i] for i in range(3)])
    assert batch["attention_mask"].shape == batch["input_ids"].shape  # padded, one chat per row
    assert not dpo.packs_rows and not dpo.shared_prompt
    pairs, sequences = pairs_of(dpo, 2)
    batch = dpo.collate(pairs)
    assert batch["input_ids"].shape[0] == len(sequences)
    check_sequences_against_forward(dpo, batch, sequences)
    assert torch.isfinite(torch.tensor(sft.fit()["loss"])) and torch.isfinite(torch.tensor(dpo.fit()["loss"]))


def test_sft_without_packing_trains_such_a_model_on_its_own_log_probs(model_dir, tmp_path):
    trainer = TRAINERS["sft"].from_recipe(recipe("sft", model_dir("bart"), "sdpa", tmp_path, packing=False))
    batch = trainer.collate([trainer.train_data[i] for i in range(3)])
    model = trainer.policy.model.eval()
    with torch.no_grad():
        ours = trainer.policy.logprobs(batch, temperature=TEMPERATURE)
    for row in range(3):
        length = int(batch["attention_mask"][row].sum())
        labelled = batch["labels"][row, :length - 1] != -100
        want = forward_logprobs(model, batch["input_ids"][row, :length].tolist(), 1)
        torch.testing.assert_close(ours[row, :length - 1][labelled], want[labelled], atol=1e-5, rtol=0)


def test_dpo_leaves_out_shared_prompts_a_model_cannot_run_and_says_so(model_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="align.trainers.batches"):
        trainer = TRAINERS["dpo"].from_recipe(recipe("dpo", model_dir("mpt"), "eager", tmp_path))
    assert "model type 'mpt': shared-prompt groups give decoder states" in caplog.text
    assert "each sequence gets its own copy of its prompt" in caplog.text
    assert trainer.packs_rows and not trainer.shared_prompt
    pairs, sequences = pairs_of(trainer, 3)
    check_sequences_against_forward(trainer, trainer.collate(pairs), sequences)


def test_a_family_that_runs_both_layouts_keeps_them(model_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="align.trainers.batches"):
        trainer = TRAINERS["dpo"].from_recipe(recipe("dpo", model_dir("llama"), "sdpa", tmp_path))
    assert trainer.policy.inexact_layouts == {} and trainer.packs_rows and trainer.shared_prompt
    assert "instead" not in caplog.text


def test_every_trainer_trains_a_model_that_cannot_pack(model_dir, tmp_path, caplog):
    """Two steps of each trainer on the hybrid, with a LoRA (its 1-output expert gate narrower than
    the rank does not stop it): a row per sequence (the distillation teacher is probed too), an
    evaluation with greedy samples where a trainer shows them. GRPO, PPO and distillation sample
    with transformers' generate under the default engine (auto), saying why; asked for by name,
    the prefix_shared engine is refused, naming the setting (before a step)."""
    path = model_dir("qwen3_next")
    raws = trainer_recipes(path, "sdpa", tmp_path)
    raws["kto"] = {**raws["dpo"], "algorithm": "kto", "output_dir": str(tmp_path / "kto")}
    raws["distill"] = {**raws["grpo"], "algorithm": "distill", "output_dir": str(tmp_path / "distill"),
                       "distill": {"teacher_model": path, "sampling": {"max_new_tokens": 8}}}
    del raws["distill"]["grpo"]
    for algorithm, raw in raws.items():
        if algorithm in ("sft", "dpo", "kto"):  # their evaluations show greedy samples: by generate here
            raw["data"]["eval"], raw["train"]["eval_every"] = raw["data"]["train"], 2
    named = {**raws["grpo"], "grpo": {**raws["grpo"]["grpo"], "sampling": {"max_new_tokens": 8,
                                                                           "engine": "prefix_shared"}}}
    with pytest.raises(AlignError, match="'qwen3_next': the prefix_shared engine fails on a probe .*set sampling.engine: hf"):
        TRAINERS["grpo"].from_recipe(recipe_from_dict(named)).fit()
    for algorithm, raw in raws.items():
        trainer = TRAINERS[algorithm].from_recipe(recipe_from_dict(raw))
        assert not trainer.packs_rows, algorithm
        with caplog.at_level(logging.WARNING, logger="align.rollout"):
            record = trainer.fit()
        assert torch.isfinite(torch.tensor(record["loss"])), (algorithm, record)
        if algorithm in ("grpo", "ppo", "distill"):
            assert isinstance(trainer.engine, HFGenerateEngine), algorithm
    assert "sampling with transformers' generate (engine auto), as prefix_shared cannot: model type 'qwen3_next'" \
        in caplog.text


def test_llama4_text_gets_a_row_per_sequence_and_its_own_log_probs():
    """Llama 4's text model, whose `get_decoder()` returns the model itself (transformers looks for
    its prefix, `language_model`, not its `model`): the policy finds the decoder, the probes refuse
    both layouts for its chunked attention, and a row per sequence gives forward()'s log-probs."""
    model = seeded(llama4)
    policy = Policy(model, tokenizer=None)
    assert set(policy.inexact_layouts) == {PACKED_ROWS, SHARED_PROMPTS}
    assert "'chunked_attention' layers" in policy.inexact_layouts[SHARED_PROMPTS]
    prompt, first, second = [list(range(3 + k, 3 + k + n)) for k, n in ((0, 11), (40, 12), (90, 5))]
    batch = pack_groups([(prompt, [first, second])], shared_prompt=False, packed=False)
    with torch.no_grad():
        ours = policy.logprobs(batch, temperature=TEMPERATURE)
    for number, completion in enumerate((first, second)):
        want = forward_logprobs(model, prompt + completion, len(prompt))
        torch.testing.assert_close(ours[batch["sequence_ids"] == number], want, atol=1e-5, rtol=0)


def test_a_reward_model_that_cannot_pack_scores_each_completion_alone():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = T.Qwen3NextForSequenceClassification._from_config(qwen3_next().config.__class__(
            **{**qwen3_next().config.to_dict(), "num_labels": 1})).eval()
    tokenizer = T.AutoTokenizer.from_pretrained(resolve("builtin:tiny-llama"))
    scorer = RewardScorer(RewardModel(model, tokenizer))
    assert scorer.batch_size == 1
    prompts, completions = ["1 + 1 =", "2 + 3 ="], [" 2", " 5, since 2 + 3 is 5"]
    scores = scorer(prompts, completions)
    for prompt, completion, score in zip(prompts, completions, scores):
        p, c = scorer.input_ids(prompt, completion, None, 0)
        with torch.no_grad():
            want = model(input_ids=torch.tensor([p + c])).logits[0, 0].item()
        assert abs(score - want) < 1e-5


def test_a_separate_reference_is_probed_too(model_dir):
    config = ModelConfig(name_or_path=model_dir("llama"), dtype="float32", attn_implementation="eager")
    policy = Policy.from_config(config, AdapterConfig(kind="none"), reference_model=model_dir("mpt"))
    assert set(policy.inexact_layouts) == {SHARED_PROMPTS}


class CacheSkewedLlama(T.LlamaForCausalLM):
    """A stand-in for a family whose cached decoding gives other logits than its forward()."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        if kwargs.get("past_key_values") is not None:
            out.logits = out.logits * 1.7
        return out


def test_the_prefix_shared_engine_samples_only_what_forward_gives():
    """Its probe refuses a model it would sample from other numbers than forward()'s, and one it
    fails on (BART's decoder counts positions along the row), naming the engine to use instead; MPT,
    whose shared-prompt training batches are inexact, samples exactly."""
    config = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, **SMALL)
    with pytest.raises(AlignError, match=r"'llama': the prefix_shared engine's next-token distributions are 0.35.* "
                                         r"\(total variation\) from the model's own forward\(\)'s .* set sampling.engine: hf"):
        PrefixSharedEngine(seeded(lambda: CacheSkewedLlama(config)), tokenizer=None)
    with pytest.raises(AlignError, match="'bart': the prefix_shared engine fails on a probe"):
        PrefixSharedEngine(seeded(bart_decoder), tokenizer=None)
    PrefixSharedEngine(seeded(mpt), tokenizer=None)
    PrefixSharedEngine(seeded(lambda: T.LlamaForCausalLM(config)), tokenizer=None)


def test_the_auto_engine_falls_back_for_what_prefix_shared_cannot_run_and_raises_what_looks_like_a_bug(
        monkeypatch, caplog):
    """auto samples with generate where the probe refuses (a tolerance refusal, or a failure on a
    model whose batch layouts are inexact too); a failure on a model whose layouts are exact is raised."""
    from align.rollout import auto

    config = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, **SMALL)
    with caplog.at_level(logging.WARNING, logger="align.rollout"):
        assert isinstance(auto(seeded(lambda: CacheSkewedLlama(config)), None), HFGenerateEngine)
        assert isinstance(auto(seeded(qwen3_next), None), HFGenerateEngine)
        assert isinstance(auto(seeded(lambda: T.LlamaForCausalLM(config)), None), PrefixSharedEngine)
    assert "model type 'qwen3_next': the prefix_shared engine fails on a probe" in caplog.text
    assert "set sampling.engine" not in caplog.text

    def broken(*args):
        raise IndexError("a bug in the decoding loop")

    monkeypatch.setattr(PrefixSharedEngine, "prefill", broken)
    with pytest.raises(AlignError, match="'llama': the prefix_shared engine fails on a probe .*a bug in the decoding"):
        auto(seeded(lambda: T.LlamaForCausalLM(config)), None)


def test_the_probes_take_the_precision_the_model_computes_in():
    """A float32 model under bf16 autocast rounds like a bf16 one (its shared-prompt probe is off by
    ~2e-3 here, above float32's tolerance), and so does a QLoRA model: no false refusal."""
    config = ModelConfig(name_or_path="builtin:tiny-llama", dtype="float32")
    policy = Policy.from_config(config, AdapterConfig(kind="none"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(policy.model) == torch.bfloat16
        assert inexact_layouts(policy.model) == {}
        PrefixSharedEngine(policy.model, policy.tokenizer)
    assert compute_dtype(policy.model) == torch.float32
    qlora = Policy.from_config(config, AdapterConfig(kind="qlora", r=4))
    assert compute_dtype(qlora.model) == torch.bfloat16 and qlora.inexact_layouts == {}
