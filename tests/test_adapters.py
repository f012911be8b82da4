"""LoRA and QLoRA train only the adapter; saved adapters and exports reload with the same outputs."""

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from align.config import AdapterConfig, ModelConfig
from align.export import export_merged
from align.models.tiny import resolve
from align.trainers import SFTTrainer

INPUT = torch.tensor([[5, 17, 42, 99, 7, 3, 120, 11]])


def base_weights(model):
    """name -> raw bytes of every non-adapter weight (4-bit packs may hold NaN bit patterns)."""
    return {n: p.detach().view(torch.uint8).clone() for n, p in model.named_parameters() if "lora_" not in n}


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_adapter_training_changes_only_the_adapter_and_reloads(make_recipe, tmp_path, kind):
    trainer = SFTTrainer.from_recipe(make_recipe(adapter={"kind": kind, "r": 4, "dropout": 0.0},
                                                 train={"max_steps": 3, "lr": 1e-2}))
    model = trainer.policy.model
    frozen_before = base_weights(model)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    trainer.fit()
    for name, value in base_weights(model).items():
        assert torch.equal(value, frozen_before[name]), f"base weight {name} changed"
    changed = [n for n, p in model.named_parameters() if "lora_B" in n and not torch.equal(p, lora_before[n])]
    assert changed, "the adapter did not train"

    out = tmp_path / "run"
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=INPUT).logits
        # the saved adapter on a freshly loaded base gives the same outputs
        quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
        fresh_base = AutoModelForCausalLM.from_pretrained(
            resolve("builtin:tiny-llama"), quantization_config=quantized if kind == "qlora" else None)
        reloaded = PeftModel.from_pretrained(fresh_base, str(out)).eval()
        torch.testing.assert_close(reloaded(input_ids=INPUT).logits, trained, atol=1e-5, rtol=0)


def test_export_merges_a_lora_adapter_into_a_plain_model(make_recipe, tmp_path):
    trainer = SFTTrainer.from_recipe(make_recipe(adapter={"kind": "lora", "r": 4}, train={"max_steps": 2, "lr": 1e-2}))
    trainer.fit()
    export_merged(str(tmp_path / "run"), str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    trainer.policy.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=INPUT).logits, trainer.policy.model(input_ids=INPUT).logits,
                                   atol=1e-4, rtol=0)
    assert not (tmp_path / "merged" / "adapter_config.json").exists()


def test_reference_strategies(make_recipe):
    from align.models import Policy

    config = ModelConfig(name_or_path="builtin:tiny-llama", dtype="float32")
    lora = Policy.from_config(config, AdapterConfig(kind="lora", r=4), reference="auto")
    full = Policy.from_config(config, AdapterConfig(kind="none"), reference="auto")
    assert (lora.reference, full.reference) == ("adapter_disabled", "frozen_copy")
    batch = {"input_ids": INPUT, "labels": torch.roll(INPUT, -1)}
    for policy in (lora, full):
        with torch.no_grad():
            for p in policy.trainable_parameters():
                p.add_(0.05 * torch.randn_like(p))
        assert not torch.allclose(policy.logprobs(batch), policy.reference_logprobs(batch))
    plain = AutoModelForCausalLM.from_pretrained(resolve("builtin:tiny-llama"))
    want = torch.log_softmax(plain(input_ids=INPUT).logits, -1).gather(-1, batch["labels"][..., None])[..., 0]
    torch.testing.assert_close(lora.reference_logprobs(batch), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(full.reference_logprobs(batch), want, atol=1e-5, rtol=0)


def test_lm_head_as_lora_target_is_refused_and_modules_to_save_trains_the_head():
    """Log-probs come from the head's weight in chunks: a LoRA on the head would be bypassed, so it
    is refused; a fully trained head (modules_to_save) is what the chunked log-probs see."""
    from align.errors import AlignError
    from align.models import Policy

    config = ModelConfig(name_or_path="builtin:tiny-llama", dtype="float32")
    with pytest.raises(AlignError, match="lm-head.*modules_to_save"):
        Policy.from_config(config, AdapterConfig(kind="lora", r=4, target_modules=["q_proj", "lm_head"]))
    policy = Policy.from_config(config, AdapterConfig(kind="lora", r=4, dropout=0.0, modules_to_save=["lm_head"]))
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = {"input_ids": INPUT, "labels": torch.roll(INPUT, -1)}
    with torch.no_grad():
        want = torch.log_softmax(policy.model(input_ids=INPUT).logits, -1).gather(-1, batch["labels"][..., None])[..., 0]
    torch.testing.assert_close(policy.logprobs(batch), want, atol=1e-5, rtol=0)
