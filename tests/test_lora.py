"""Which layers a LoRA takes (`align.models.lora`): MoE experts adapted as parameters (no dropout
there), layers a LoRA cannot sit on left out of all-linear and refused by name, the rank checked
against the widest targeted layer; and what such adapters merge into."""

from __future__ import annotations

import logging
import re

import pytest
import torch
import transformers as T
import yaml
from torch import nn

from align.cli import main as cli_main
from align.config import AdapterConfig, ModelConfig
from align.errors import AlignError
from align.models.loading import load_model
from align.models.lora import DEFAULT_DROPOUT, apply_adapter, unadaptable, weights_read_directly
from align.models.merged import merged_weights
from align.trainers import SFTTrainer
from tests.test_families import VOCAB, build, saved_models

SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0, bos_token_id=None, eos_token_id=1, initializer_range=0.2)
INPUT = torch.tensor([[5, 17, 42, 99, 7, 3, 120, 11]])


def seeded(model_class, config):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return model_class(config).eval()


def phimoe():
    """Its router subclasses nn.Linear and returns a tuple."""
    return seeded(T.PhimoeForCausalLM, T.PhimoeConfig(num_local_experts=4, num_experts_per_tok=2, **SMALL))


def nemotron_h():
    """Mamba-2 mixers, whose fused CUDA kernel reads out_proj.weight directly."""
    return seeded(T.NemotronHForCausalLM, T.NemotronHConfig(**{**SMALL, "intermediate_size": 64}))


def trainable(model) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_moe_experts_are_adapted_as_parameters_without_dropout(name):
    model = apply_adapter(build(name), AdapterConfig(kind="lora", r=4))
    config = model.peft_config["default"]
    assert config.target_parameters and config.lora_dropout == 0.0
    assert any(".experts." in n and "lora_A" in n for n in trainable(model))
    fused = [m for m in model.modules() if getattr(m, "parameter_name", None) == "gate_up_proj"]
    assert fused and all(m.r["default"] == 8 for m in fused)  # peft's doubled rank for the fused pair: 2 x r
    with pytest.raises(AlignError, match=f"adapter.dropout: 0.05 cannot apply to model type '{name}': peft adapts "
                                         "its MoE layers as parameters .*set adapter.dropout: 0"):
        apply_adapter(build(name), AdapterConfig(kind="lora", r=4, dropout=0.05))
    dense = apply_adapter(build("llama"), AdapterConfig(kind="lora", r=4))
    assert dense.peft_config["default"].lora_dropout == DEFAULT_DROPOUT
    assert apply_adapter(build("llama"), AdapterConfig(kind="lora", r=4, dropout=0.2)).peft_config[
        "default"].lora_dropout == 0.2


def test_validate_refuses_a_dropout_a_moe_adapter_cannot_take(tmp_path_factory, tmp_path, make_recipe, capsys):
    model_dir = saved_models(tmp_path_factory, build)("mixtral")
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(raw=True, model={"name_or_path": model_dir},
                                                 adapter={"kind": "lora", "r": 4, "dropout": 0.1})))
    assert cli_main(["validate", str(recipe)]) == 2
    assert "adapter.dropout: 0.1 cannot apply to model type 'mixtral'" in capsys.readouterr().err


@pytest.mark.parametrize("make, left_out, why", [
    (phimoe, "model.layers.0.mlp.router", "PhimoeTopKRouter.forward returns no [..., out_features] tensor"),
    (nemotron_h, "model.layers.0.mixer.out_proj", "reads out_proj.weight directly, which would skip a LoRA"),
])
def test_all_linear_leaves_out_layers_a_lora_cannot_sit_on_and_naming_one_is_refused(make, left_out, why):
    assert why in unadaptable(make())[left_out]
    model = apply_adapter(make(), AdapterConfig(kind="lora", r=4))
    names = trainable(model)
    assert not any(n.startswith(f"base_model.model.{left_out}.") for n in names)
    assert len(names) > 4
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=INPUT).logits).all()  # peft's wrapper on the router would fail here
    leaf = left_out.rsplit(".", 1)[1]
    with pytest.raises(AlignError, match=f"adapter.target_modules: a LoRA cannot sit on {left_out} .*{re.escape(why)}"):
        apply_adapter(make(), AdapterConfig(kind="lora", r=4, target_modules=[leaf]))


class ReadsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.other = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.proj.weight) + self.other(x).to(self.other.weight.dtype)


def test_qlora_keeps_unquantized_moe_experts_in_the_models_dtype_and_says_so(tmp_path_factory, caplog):
    """bitsandbytes quantizes linear layers only: a QLoRA Mixtral keeps its 3-D experts (most of its
    weights) unquantized, in bfloat16 rather than peft's float32, its base frozen in that dtype (the
    experts and their inputs agree: a forward without autocast works, and only LoRA weights get
    gradients); a warning says how much of the model that is; a dense model gets none, and its
    unquantized weights peft's float32."""
    make = saved_models(tmp_path_factory, build)
    with caplog.at_level(logging.WARNING, logger="align.models.lora"):
        model = load_model(ModelConfig(name_or_path=make("mixtral"), dtype="bfloat16"), AdapterConfig(kind="qlora", r=4))
    experts = {n: p for n, p in model.named_parameters() if p.dim() == 3 and ".experts.base_layer" in n}
    assert experts and all(p.dtype == torch.bfloat16 for p in experts.values())
    model(input_ids=INPUT).logits.float().logsumexp(-1).sum().backward()
    trained = [n for n, p in model.named_parameters() if p.grad is not None]
    assert trained and all("lora_" in n for n in trained) and set(trained) == set(trainable(model))
    share = sum(p.numel() for p in experts.values()) / sum(
        p.numel() for p in T.MixtralForCausalLM.from_pretrained(make("mixtral")).parameters())
    assert f"model type 'mixtral' keeps its MoE experts in 3-D parameters ({100 * share:.0f}% of the weights" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="align.models.lora"):
        dense = load_model(ModelConfig(name_or_path=make("llama"), dtype="bfloat16"), AdapterConfig(kind="qlora", r=4))
    assert "qlora quantizes linear layers only" not in caplog.text
    assert dense.get_input_embeddings().weight.dtype == torch.float32


def test_a_weight_read_for_its_values_counts_its_dtype_does_not():
    assert weights_read_directly(ReadsWeight) == {"proj"}


def test_a_layer_narrower_than_the_rank_does_not_stop_the_adapter(caplog):
    """Qwen2-MoE's shared-expert gate has one output: a rank-16 LoRA still goes on (that gate's
    update has rank 1); a rank wider than every targeted layer is refused. peft adapts none of its
    3-D experts, and a warning says so."""
    config = T.Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                              shared_expert_intermediate_size=32, **SMALL)
    with caplog.at_level(logging.WARNING, logger="align.models.lora"):
        model = apply_adapter(seeded(T.Qwen2MoeForCausalLM, config), AdapterConfig(kind="lora", r=16))
    assert any("shared_expert_gate.lora_A" in n for n in trainable(model))
    assert not any(".experts." in n for n in trainable(model))
    assert "model type 'qwen2_moe' keeps its MoE experts in 3-D parameters" in caplog.text
    with pytest.raises(AlignError, match="adapter.r: 64 is larger than every targeted layer's narrower side"):
        apply_adapter(seeded(T.Qwen2MoeForCausalLM, config), AdapterConfig(kind="lora", r=64))


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_a_moe_adapter_merges_into_the_model_it_computes(name, tmp_path_factory, make_recipe):
    """merged_weights (what vLLM loads) and an adapter directory loaded as its merged base (the next
    stage, `align export`) give the trained policy's logits, experts' deltas included."""
    model_dir = saved_models(tmp_path_factory, build)(name)
    recipe = make_recipe(model={"name_or_path": model_dir, "dtype": "float32"},
                         adapter={"kind": "lora", "r": 4}, train={"max_steps": 3, "lr": 3e-2})
    trainer = SFTTrainer.from_recipe(recipe)
    trainer.fit()
    policy = trainer.policy.model.eval()
    with torch.no_grad():
        expected = policy(input_ids=INPUT).logits
        plain = T.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        assert (plain(input_ids=INPUT).logits - expected).abs().max() > 1e-3  # the adapter did train
        plain.load_state_dict(dict(merged_weights(policy)), strict=True)
        torch.testing.assert_close(plain(input_ids=INPUT).logits, expected, atol=1e-4, rtol=0)
        merged = load_model(ModelConfig(name_or_path=recipe.output_dir, dtype="float32"), AdapterConfig()).eval()
        torch.testing.assert_close(merged(input_ids=INPUT).logits, expected, atol=1e-4, rtol=0)
