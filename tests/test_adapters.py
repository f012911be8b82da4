"""LoRA and QLoRA train only the adapter; saved adapters and exports reload with the same outputs."""

import json
import logging
import os

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from align.config import AdapterConfig, ModelConfig
from align.errors import AlignError
from align.export import export, export_merged
from align.models.loading import keep_4bit_forward_exact, load_model
from align.models.merged import merged_weights
from align.models.tiny import cache_dir, resolve
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
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == "builtin:tiny-llama"  # not this cache's path: the run dir loads under any ALIGN_CACHE
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=INPUT).logits
        # the saved adapter on a freshly loaded base gives the same outputs
        quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
        fresh_base = AutoModelForCausalLM.from_pretrained(
            resolve("builtin:tiny-llama"), quantization_config=quantized if kind == "qlora" else None)
        keep_4bit_forward_exact(fresh_base)  # as Align loads it: no bf16 CPU kernel
        reloaded = PeftModel.from_pretrained(fresh_base, str(out)).eval()
        torch.testing.assert_close(reloaded(input_ids=INPUT).logits, trained, atol=1e-5, rtol=0)


def test_export_merges_a_lora_adapter_into_a_plain_model(make_recipe, tmp_path, monkeypatch):
    import errno

    from transformers import PreTrainedTokenizerBase

    trainer = SFTTrainer.from_recipe(make_recipe(adapter={"kind": "lora", "r": 4}, train={"max_steps": 2, "lr": 1e-2}))
    trainer.fit()
    with monkeypatch.context() as patch:  # a full disk once the weights are written: nothing half-written is left
        patch.setattr(PreTrainedTokenizerBase, "save_pretrained",
                      lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
        with pytest.raises(AlignError, match="could not write the model .No space left on device"):
            export_merged(str(tmp_path / "run"), str(tmp_path / "merged"))
    assert not [p.name for p in tmp_path.iterdir() if "merged" in p.name]
    export_merged(str(tmp_path / "run"), str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    trainer.policy.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=INPUT).logits, trainer.policy.model(input_ids=INPUT).logits,
                                   atol=1e-4, rtol=0)
    assert not (tmp_path / "merged" / "adapter_config.json").exists()


@pytest.mark.parametrize("kind", ["lora", "none"])
def test_export_of_a_checkpoint_gives_that_steps_model(make_recipe, tmp_path, capsys, kind):
    """(a checkpoint held only Align's state: no model could be had from a run's earlier step)"""
    import shutil

    from align.cli import main

    base = tmp_path / "base"
    shutil.copytree(resolve("builtin:tiny-llama"), base)
    trainer = SFTTrainer.from_recipe(make_recipe(model={"name_or_path": str(base)}, adapter={"kind": kind, "r": 4},
                                                 train={"max_steps": 4, "save_every": 2, "lr": 1e-2}))
    trainer.fit()
    run = tmp_path / "run"
    if kind == "lora":
        export_merged(str(run), str(tmp_path / "final"))
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final" if kind == "lora" else run).eval()
    (tmp_path / "step4").mkdir()  # an empty directory (a mount point, say) is written into, not replaced
    for step in (2, 4):
        assert main(["export", str(run / f"checkpoints/step-{step:06d}"), str(tmp_path / f"step{step}")]) == 0
    assert f"model written to {tmp_path / 'step2'}" in capsys.readouterr().out
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "step2").stat().st_mode & 0o777 == 0o777 & ~umask  # (a staging folder's 0700 was kept)
    with torch.no_grad():
        want = final(input_ids=INPUT).logits
        for step in (2, 4):
            exported = AutoModelForCausalLM.from_pretrained(tmp_path / f"step{step}").eval()
            assert not (tmp_path / f"step{step}" / "adapter_config.json").exists()
            same = torch.allclose(exported(input_ids=INPUT).logits, want, atol=1e-5, rtol=0)
            assert same == (step == 4)  # the last checkpoint is the final model; the earlier one its own step's
    assert not [p for d in ("step2", "step4") for p in (tmp_path / d).iterdir() if p.name.startswith(".")]
    AutoModelForCausalLM.from_pretrained(base).save_pretrained(base)  # the base written again (same weights)
    with open(base / "config.json", "a") as f:
        f.write("\n")
    with pytest.raises(AlignError, match=r"model.name_or_path .* changed since this checkpoint was written"):
        export(str(run / "checkpoints/step-000002"), str(tmp_path / "again"))
    assert not (tmp_path / "again").exists()


def test_export_of_a_dpo_checkpoint_loads_no_reference_model(make_recipe, tmp_path):
    """(it built the trainer's whole policy: a reference model, a teacher or a critic loaded for nothing,
    and refused once their folder was gone)"""
    import shutil

    from align.toy import preference_rows
    from align.trainers import DPOTrainer

    reference = tmp_path / "reference"
    shutil.copytree(resolve("builtin:tiny-llama"), reference)
    DPOTrainer.from_recipe(make_recipe(algorithm="dpo", rows=preference_rows(8), dpo={"reference_model": str(reference)},
                                       train={"max_steps": 2, "save_every": 2, "lr": 1e-2})).fit()
    shutil.rmtree(reference)
    export(str(tmp_path / "run" / "checkpoints" / "step-000002"), str(tmp_path / "exported"))
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()(input_ids=INPUT).logits
        final = AutoModelForCausalLM.from_pretrained(tmp_path / "run").eval()(input_ids=INPUT).logits
    torch.testing.assert_close(exported, final, atol=1e-6, rtol=0)


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


@pytest.mark.parametrize("kind", ["none", "lora", "qlora"])
def test_merged_weights_are_the_model_the_policy_computes(make_recipe, kind):
    """What an outside engine (vLLM) loads: a plain model built from merged_weights gives the
    trained policy's logits, LoRA deltas added and 4-bit weights dequantized, the head kept fully
    trained through modules_to_save, and the policy itself left untouched."""
    adapter = {"kind": kind, "r": 4, "dropout": 0.0}
    if kind != "none":
        adapter["modules_to_save"] = ["lm_head"]
    trainer = SFTTrainer.from_recipe(make_recipe(adapter=adapter, train={"max_steps": 3, "lr": 1e-2}))
    trainer.fit()
    model = trainer.policy.model.eval()
    before = base_weights(model)
    weights = dict(merged_weights(model))
    assert not any("lora_" in n or "base_layer" in n or "modules_to_save" in n for n in weights)
    plain = AutoModelForCausalLM.from_pretrained(resolve("builtin:tiny-llama"), dtype=torch.float32).eval()
    assert sorted(weights) == sorted(n for n, _ in plain.named_parameters())
    plain.load_state_dict(weights, strict=False)
    with torch.no_grad():
        expected = model(input_ids=INPUT).logits
        torch.testing.assert_close(plain(input_ids=INPUT).logits, expected, atol=1e-4, rtol=0)
        if kind != "none":  # the adapter did train: without its delta the logits differ
            assert (causal_lm_without_adapter(model)(input_ids=INPUT).logits - expected).abs().max() > 1e-3
    assert all(torch.equal(v, before[n]) for n, v in base_weights(model).items())


def causal_lm_without_adapter(model):
    class Disabled(torch.nn.Module):
        def forward(self, **inputs):
            with model.disable_adapter():
                return model(**inputs)

    return Disabled()


def test_qlora_gradients_are_the_same_after_an_eval_forward():
    """bitsandbytes' CPU inference kernel must not take over the 4-bit layers after generation or
    evaluation ran in eval mode: the training forward and its gradients stay exactly as before."""

    def forward_and_grads(eval_first: bool):
        torch.manual_seed(0)
        model = load_model(ModelConfig(name_or_path="builtin:tiny-llama", dtype="float32"),
                           AdapterConfig(kind="qlora", r=4, dropout=0.0))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1)
        if eval_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=INPUT)
            model.train()
        logits = model(input_ids=INPUT).logits
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    logits, grads = forward_and_grads(eval_first=False)
    logits_after_eval, grads_after_eval = forward_and_grads(eval_first=True)
    assert torch.equal(logits_after_eval, logits)
    assert grads.keys() == grads_after_eval.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert torch.equal(grads_after_eval[name], grad), name


def save_random_adapter(directory, seed: int) -> None:
    """A LoRA adapter on builtin:tiny-llama with random (not zero) weights, saved into `directory`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(resolve("builtin:tiny-llama"), dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(directory)


def test_qlora_from_an_adapter_dir_merges_its_current_adapter_outside_the_dir(tmp_path, caplog):
    """Re-running a stage into the same directory must not leave a later QLoRA stage on the old
    weights, and the merged base is cached outside the user's directory, saying where."""
    caplog.set_level(logging.INFO, logger="align.models.loading")
    directory = tmp_path / "stage"
    config = ModelConfig(name_or_path=str(directory), dtype="float32")
    name = "model.layers.0.self_attn.q_proj.weight"
    plain = AutoModelForCausalLM.from_pretrained(resolve("builtin:tiny-llama"), dtype=torch.float32)
    candidates = {"base": plain.state_dict()[name]}
    for adapter, seed in (("A", 1), ("B", 2)):  # adapter B is written over adapter A, in the same directory
        save_random_adapter(directory, seed)
        candidates[adapter] = dict(merged_weights(load_model(config, AdapterConfig(kind="none"))))[name]
        got = dict(merged_weights(load_model(config, AdapterConfig(kind="qlora", r=4))))[name]  # dequantized
        distances = {k: (got - weight).abs().mean().item() for k, weight in candidates.items()}
        assert min(distances, key=distances.get) == adapter, distances
        assert f"{directory} merged into its base" in caplog.text and str(cache_dir() / "merged") in caplog.text
        caplog.clear()
    assert sorted(p.name for p in directory.iterdir()) == ["README.md", "adapter_config.json",
                                                           "adapter_model.safetensors"]  # no `merged` inside


def test_a_lora_run_started_from_another_lora_run_reloads_with_both_stages(tmp_path):
    """A later stage's adapter names the earlier stage's directory as its base, so that reloading it (the
    next stage, `align export`, a reward model) merges both; it named the first stage's own base,
    silently dropping that stage."""
    from align.models.policy import Policy

    first, second = tmp_path / "sft", tmp_path / "dpo"
    save_random_adapter(first, seed=1)
    config = ModelConfig(name_or_path=str(first), tokenizer="builtin:tiny-llama", dtype="float32")
    policy = Policy.from_config(config, AdapterConfig(kind="lora", r=4, dropout=0.0))
    with torch.no_grad():  # the second stage's adapter changes the outputs too
        for name, weight in policy.model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.1)
    policy.save(second)
    assert json.loads((second / "adapter_config.json").read_text())["base_model_name_or_path"] == str(first)
    reloaded = load_model(ModelConfig(name_or_path=str(second), dtype="float32"), AdapterConfig())
    first_only = load_model(config, AdapterConfig())
    policy.model.eval()
    with torch.no_grad():
        logits = reloaded(input_ids=INPUT).logits
        torch.testing.assert_close(logits, policy.model(input_ids=INPUT).logits, atol=1e-4, rtol=0)
        assert (logits - first_only(input_ids=INPUT).logits).abs().max() > 1e-2
    merged = dict(merged_weights(load_model(ModelConfig(name_or_path=str(second), dtype="float32"),
                                            AdapterConfig(kind="qlora", r=4))))  # its 4-bit base: both stages too
    name = "model.layers.0.self_attn.q_proj.weight"
    exact = dict(reloaded.named_parameters())[name]
    assert (merged[name] - exact).abs().mean() < (dict(first_only.named_parameters())[name] - exact).abs().mean()


def test_export_of_a_lora_reward_model_keeps_its_score_head(tmp_path):
    """(It loaded the adapter's base as a causal LM: the trained score head was dropped.)"""
    from align.models.reward import RewardModel, load_reward_model

    lora = AdapterConfig(kind="lora", r=4, dropout=0.0)
    RewardModel.from_config(ModelConfig(name_or_path="builtin:tiny-llama", dtype="float32"), lora).save(tmp_path / "rm")
    export_merged(str(tmp_path / "rm"), str(tmp_path / "merged"))
    prompts, completions = ["1 + 1 =", "2 + 5 ="], [" 2", " 7"]
    assert load_reward_model(str(tmp_path / "merged"), device="cpu")(prompts, completions) == pytest.approx(
        load_reward_model(str(tmp_path / "rm"), device="cpu")(prompts, completions), abs=1e-5)
