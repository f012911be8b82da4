"""Batch layouts a family cannot run exactly are found at load and refused (packed rows) or left
out (shared prompts), never trained on with wrong numbers (`align.models.layouts`).

Stand-ins for the families a scan of transformers 5.24 found: the BART decoder counts positions
along the row (packed rows and shared prompts both wrong), MPT's ALiBi measures distances along
the row (shared prompts wrong), Qwen3-Next's linear-attention layers take no mask (refused)."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers as T

from align.config import AdapterConfig, ModelConfig, recipe_from_dict
from align.data.preference import pack_pairs
from align.errors import AlignError
from align.models import Policy
from align.models.layouts import PACKED_ROWS, SHARED_PROMPTS, inexact_layouts
from align.models.reward import RewardModel, RewardScorer
from align.toy import chat_rows, preference_rows
from align.trainers import TRAINERS
from tests.conftest import write_jsonl
from tests.test_families import MATRIX, TEMPERATURE, build, forward_logprobs, saved_models

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
    makers = {"bart": bart_decoder, "mpt": mpt, "llama": lambda: build("llama")}
    return saved_models(tmp_path_factory, lambda name: seeded(makers[name]))


def recipe(algorithm: str, path: str, attn: str, tmp_path, **data) -> dict:
    rows = chat_rows(8, seed=1) if algorithm == "sft" else preference_rows(8, seed=2)
    return recipe_from_dict({
        "algorithm": algorithm, "output_dir": str(tmp_path / algorithm),
        "model": {"name_or_path": path, "dtype": "float32", "attn_implementation": attn},
        "data": {"train": {"path": write_jsonl(tmp_path / f"{algorithm}.jsonl", rows)}, "max_length": 64, **data},
        "train": {"lr": 1e-3, "batch_size": 4, "max_steps": 2, "progress": False, "plots": False}})


def test_packed_rows_a_model_cannot_run_are_refused_naming_the_fix(model_dir, tmp_path):
    path = model_dir("bart")
    with pytest.raises(AlignError, match=r"model type 'bart': packed rows .*; set data\.packing: false"):
        TRAINERS["sft"].from_recipe(recipe("sft", path, "sdpa", tmp_path))
    for algorithm in ("dpo", "reward"):
        with pytest.raises(AlignError, match=f"model type 'bart': packed rows .*; {algorithm} packs its sequences"):
            TRAINERS[algorithm].from_recipe(recipe(algorithm, path, "sdpa", tmp_path))
    with pytest.raises(AlignError, match="model type 'bart': packed rows .*cannot score with this reward model"):
        RewardScorer(RewardModel(seeded(bart_decoder), tokenizer=None))


def test_sft_without_packing_trains_such_a_model_on_its_own_log_probs(model_dir, tmp_path):
    trainer = TRAINERS["sft"].from_recipe(recipe("sft", model_dir("bart"), "sdpa", tmp_path, packing=False))
    batch = trainer.collate([trainer.train_data[i] for i in range(3)])
    model = trainer.policy.model.eval()
    with torch.no_grad():
        ours = trainer.policy.logprobs(batch, temperature=TEMPERATURE)
    for row in range(3):
        length = int(batch["attention_mask"][row].sum())
        sequence = batch["input_ids"][row, :length].tolist()
        labelled = batch["labels"][row, :length - 1] != -100
        want = forward_logprobs(model, sequence, 1)
        torch.testing.assert_close(ours[row, :length - 1][labelled], want[labelled], atol=1e-5, rtol=0)
    trainer.policy.model.train()
    assert torch.isfinite(torch.tensor(trainer.fit()["loss"]))


def test_dpo_leaves_out_shared_prompts_a_model_cannot_run_and_says_so(model_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="align.trainers.base"):
        trainer = TRAINERS["dpo"].from_recipe(recipe("dpo", model_dir("mpt"), "eager", tmp_path))
    assert "model type 'mpt': shared-prompt groups give decoder states" in caplog.text
    assert "each sequence gets its own copy of its prompt" in caplog.text
    assert not trainer.shared_prompt
    pairs = [trainer.train_data[i] for i in range(2)]
    batch = pack_pairs(pairs, shared_prompt=trainer.shared_prompt)
    model = trainer.policy.model.eval()
    with torch.no_grad():
        ours = trainer.policy.logprobs(batch, temperature=TEMPERATURE)
    sequences = [(p["prompt_ids"], c) for p in pairs for c in (p["chosen_ids"], p["rejected_ids"])]
    for number, (prompt, completion) in enumerate(sequences):
        want = forward_logprobs(model, prompt + completion, len(prompt))
        torch.testing.assert_close(ours[batch["sequence_ids"] == number], want, atol=1e-5, rtol=0)


def test_a_family_that_runs_both_layouts_keeps_them(model_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="align.trainers.base"):
        trainer = TRAINERS["dpo"].from_recipe(recipe("dpo", model_dir("llama"), "sdpa", tmp_path))
    assert trainer.policy.inexact_layouts == {} and trainer.shared_prompt
    assert "own copy of its prompt" not in caplog.text


def test_a_separate_reference_is_probed_too(model_dir):
    config = ModelConfig(name_or_path=model_dir("llama"), dtype="float32", attn_implementation="eager")
    policy = Policy.from_config(config, AdapterConfig(kind="none"), reference_model=model_dir("mpt"))
    assert set(policy.inexact_layouts) == {SHARED_PROMPTS}
