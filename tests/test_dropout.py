"""Dropout: off by default while training DPO, GRPO and PPO, so the reference and old-log-prob
passes see the model the training forward runs (DPO's implicit rewards start at 0, PPO's first
ratio is 1); `train.dropout_during_training: true` keeps it on, in those passes too."""

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from align.models.dropout import has_dropout
from align.models.tiny import resolve
from align.toy import preference_rows, prompt_rows
from align.trainers import DPOTrainer, PPOTrainer, SFTTrainer


@pytest.fixture(scope="module")
def dropout_model(tmp_path_factory) -> str:
    """The tiny Llama with attention dropout 0.3 (as some released configs have)."""
    path = tmp_path_factory.mktemp("dropout-llama")
    source = resolve("builtin:tiny-llama")
    config = AutoConfig.from_pretrained(source)
    config.attention_dropout = 0.3
    AutoModelForCausalLM.from_pretrained(source, config=config).save_pretrained(path)
    AutoTokenizer.from_pretrained(source).save_pretrained(path)
    return str(path)


def first_batch_metrics(trainer) -> dict:
    """compute_loss on the first training micro-batch, in training mode, before any update."""
    trainer.policy.module.train()
    batch = trainer._to_device({**trainer.micro_batches(0)[0], "num_items": 1.0})
    with torch.no_grad():
        loss, metrics = trainer.compute_loss(batch)
    return {"loss": loss.item() / trainer.count_items(batch), **metrics}


def dpo(make_recipe, model, **train):
    return DPOTrainer.from_recipe(make_recipe(algorithm="dpo", rows=preference_rows(16, seed=1),
                                              model={"name_or_path": model, "dtype": "float32"},
                                              adapter={"kind": "lora", "r": 8, "dropout": 0.5},
                                              train={"batch_size": 8, **train}))


def test_dpo_starts_at_ln2_with_zero_implicit_rewards_despite_model_dropout(make_recipe, dropout_model):
    trainer = dpo(make_recipe, dropout_model)
    assert not has_dropout(trainer.policy.module)
    metrics = first_batch_metrics(trainer)
    assert metrics["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["rewards/rejected"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_dropout_during_training_true_keeps_it_on_in_both_passes(make_recipe, dropout_model):
    trainer = dpo(make_recipe, dropout_model, dropout_during_training=True)
    assert has_dropout(trainer.policy.module)
    with trainer.scoring_mode():  # the reference/old-log-prob passes run with dropout too
        assert trainer.policy.module.training


def test_sft_keeps_dropout_by_default(make_recipe, dropout_model):
    trainer = SFTTrainer.from_recipe(make_recipe(model={"name_or_path": dropout_model, "dtype": "float32"},
                                                 adapter={"kind": "lora", "r": 8, "dropout": 0.5}))
    assert has_dropout(trainer.policy.module) and trainer.policy.module.model.base_model.model.model.layers[0] \
        .self_attn.attention_dropout == 0.3


def test_ppo_first_update_has_ratio_one_despite_model_dropout(make_recipe, dropout_model):
    trainer = PPOTrainer.from_recipe(make_recipe(
        algorithm="ppo", rows=prompt_rows(16, seed=2), model={"name_or_path": dropout_model, "dtype": "float32"},
        adapter={"kind": "lora", "r": 8, "dropout": 0.5}, train={"batch_size": 4, "max_steps": 1},
        ppo={"sampling": {"max_new_tokens": 8}, "rewards": [{"fn": "exact_answer"}], "critic": "shared"}))
    metrics = first_batch_metrics(trainer)
    assert metrics["approx_kl"] == pytest.approx(0.0, abs=1e-10)
    assert metrics["clip_ratio/region"] == 0.0


@pytest.mark.parametrize("name, config", [
    ("opt", dict(word_embed_proj_dim=16, ffn_dim=32, dropout=0.3, attention_dropout=0.3, activation_dropout=0.3,
                 layerdrop=0.3)),
    ("xglm", dict(d_model=16, ffn_dim=32, num_layers=2, attention_heads=2, dropout=0.3, attention_dropout=0.3,
                  activation_dropout=0.3, layerdrop=0.3)),
    ("biogpt", dict(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3, activation_dropout=0.3, layerdrop=0.3)),
    ("falcon", dict(hidden_dropout=0.3, attention_dropout=0.3)),
    ("gpt2", dict(n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3)),
    ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=1, router_jitter_noise=0.3)),
])
def test_rates_layers_and_configs_keep_as_numbers_are_turned_off_too(name, config):
    """(OPT, XGLM and BioGPT call `dropout(p=self.dropout)` and skip layers by `self.layerdrop`;
    Falcon reads `config.hidden_dropout`: with only nn.Dropout set to 0, two training-mode forwards
    of DPO's policy and reference differed by up to 1.7 nats)"""
    from transformers import AutoConfig, AutoModelForCausalLM

    from align.models.dropout import disable_dropout

    config = AutoConfig.for_model(name, vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, **config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert has_dropout(model) and not torch.equal(model(ids).logits, model(ids).logits)
        disable_dropout(model)
        assert not has_dropout(model)
        torch.testing.assert_close(model(ids).logits, model.eval()(ids).logits, rtol=0, atol=1e-6)
