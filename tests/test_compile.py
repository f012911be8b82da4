"""model.compile: decoder layers compiled with torch.compile train as the eager ones do, and
sampling runs them eagerly."""

import json

import pytest
import torch
from torch._dynamo.utils import counters

from align.errors import AlignError
from align.models import zero
from align.models.compiled import compile_layers, decoder_layers
from align.rollout import PrefixSharedEngine
from align.rollout.sampling import SamplingParams
from align.toy import chat_rows, preference_rows
from align.trainers import DPOTrainer, SFTTrainer


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def fit_both(trainer_class, make_recipe, tmp_path, model: dict | None = None, **sections) -> tuple[tuple, tuple]:
    """Eager and compiled runs of the same recipe -> ({step: logged row}, final trainable weights, graphs
    dynamo compiled during the run) each."""
    runs = {}
    for compiled in (False, True):
        recipe = make_recipe(output_dir=str(tmp_path / f"compiled-{compiled}"),
                             model={**(model or {}), "compile": compiled}, **sections)
        trainer = trainer_class.from_recipe(recipe)
        graphs, frames, compiled_frames = (counters["stats"]["unique_graphs"], counters["frames"]["total"],
                                           counters["frames"]["ok"])
        trainer.fit()
        layers = decoder_layers(trainer.policy.module)
        assert len(layers) == trainer.policy.model.config.num_hidden_layers
        assert all((layer._compiled_call_impl is not None) == compiled for layer in layers)
        weights = {n: p.detach().clone() for n, p in trainer.policy.module.named_parameters() if p.requires_grad}
        # every frame dynamo met was compiled (one past the recompile limit would run eagerly)
        assert counters["frames"]["total"] - frames == counters["frames"]["ok"] - compiled_frames
        runs[compiled] = ({row["step"]: row for row in metrics(tmp_path / f"compiled-{compiled}")}, weights,
                          counters["stats"]["unique_graphs"] - graphs)
    return runs[False], runs[True]


def assert_same_run(eager, compiled, keys):
    (eager_rows, eager_weights, _), (compiled_rows, compiled_weights, graphs) = eager, compiled
    assert eager_rows.keys() == compiled_rows.keys()
    for step, row in eager_rows.items():
        for key in keys:
            if key in row:
                assert compiled_rows[step][key] == pytest.approx(row[key], rel=1e-4, abs=1e-6), (step, key)
    for name, weight in eager_weights.items():
        torch.testing.assert_close(compiled_weights[name], weight, atol=1e-5, rtol=1e-4, msg=name)
    assert graphs > 0


def test_compiled_sft_trains_as_the_eager_model(make_recipe, tmp_path):
    """Full fine-tuning with gradient checkpointing and a held-out split: the same losses, gradient
    norms, evaluation and weights (to rounding), sequence lengths varying from step to step."""
    eager, compiled = fit_both(SFTTrainer, make_recipe, tmp_path, eval_rows=chat_rows(8, seed=7),
                               model={"gradient_checkpointing": True},
                               train={"max_steps": 4, "log_every": 1, "eval_every": 2})
    assert_same_run(eager, compiled, ["loss", "grad_norm", "eval/loss"])
    assert "eval/loss" in eager[0][4]


def test_compiled_dpo_with_the_adapter_disabled_reference(make_recipe, tmp_path):
    """LoRA, whose reference is the same compiled layers with the adapter switched off, half the layers
    checkpointed, evaluation one pair at a time: more variants of the layers' call than dynamo's
    default recompile limit (8) allows, past which it would run them eagerly."""
    eager, compiled = fit_both(DPOTrainer, make_recipe, tmp_path, algorithm="dpo", rows=preference_rows(16, seed=1),
                               eval_rows=preference_rows(4, seed=2),
                               adapter={"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                               model={"gradient_checkpointing": True, "checkpointed_layers": 0.5},
                               dpo={"reference": "adapter_disabled", "precompute_reference": False},
                               train={"max_steps": 3, "log_every": 1, "eval_every": 2, "eval_batch_size": 1})
    assert_same_run(eager, compiled, ["loss", "grad_norm", "rewards/margins"])


@pytest.mark.parametrize("checkpointing", [{}, {"gradient_checkpointing": True, "checkpoint_mode": "selective"}],
                         ids=["plain", "selective"])
def test_compiled_qlora_step_gives_the_eager_gradients(make_recipe, checkpointing):
    """QLoRA: the 4-bit base layers (bitsandbytes) inside the compiled graphs, also selectively
    checkpointed."""
    grads = []
    for compiled in (False, True):
        trainer = SFTTrainer.from_recipe(make_recipe(adapter={"kind": "qlora", "r": 4, "dropout": 0.0},
                                                     model={"compile": compiled, **checkpointing}))
        trainer.accumulate_gradients(trainer.micro_batches(0))
        grads.append({n: p.grad for n, p in trainer.policy.module.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-4, msg=name)


def test_sampling_runs_compiled_layers_eagerly(make_recipe):
    """Decoding would compile a graph per length: the rollout engines run the layers' eager forward
    (the same tokens as an uncompiled model, nothing compiled)."""
    recipe = make_recipe()
    plain = SFTTrainer.from_recipe(recipe).policy
    compiled = SFTTrainer.from_recipe(recipe).policy
    compile_layers(compiled.model)
    prompts = [compiled.tokenizer("2 + 3 =")["input_ids"], compiled.tokenizer("7 + 1 =")["input_ids"]]
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=3)
    frames = counters["frames"]["total"]
    sampled = [PrefixSharedEngine(policy.model, policy.tokenizer).generate(prompts, params, group_size=2).completion_ids
               for policy in (plain, compiled)]
    greedy = [policy.generate(torch.tensor([prompts[0]]), max_new_tokens=4, do_sample=False)
              for policy in (plain, compiled)]
    assert counters["frames"]["total"] == frames  # dynamo saw no frame
    assert sampled[0] == sampled[1] and torch.equal(*greedy)


def test_compiled_selective_checkpointing_trains_as_the_eager_one(make_recipe, tmp_path):
    """checkpoint_mode: selective inside compiled layers: the same losses, gradient norms and weights
    as the eager selective run (which keeps its KeptOutputsGuard)."""
    eager, compiled = fit_both(SFTTrainer, make_recipe, tmp_path,
                               model={"gradient_checkpointing": True, "checkpoint_mode": "selective"},
                               train={"max_steps": 3, "log_every": 1})
    assert_same_run(eager, compiled, ["loss", "grad_norm"])


def _saved_activation_bytes(model, input_ids) -> int:
    """Bytes of the tensors a training forward saves for the backward, the parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []  # (held, so no freed storage's address is reused by a later saved tensor)

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=input_ids)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    return sum(size for pointer, size in storages.items() if pointer not in params)


def test_compiled_layers_apply_the_selective_policy():
    """In compiled layers, selective checkpointing keeps less than no checkpointing (the matmuls'
    outputs, not the elementwise ops' between them) and more than full checkpointing (the input
    alone): the policy reaches the compiled graph, where the guard of eager selective checkpointing
    cannot go. A write into a kept output there is functionalized: the gradients equal the
    uncompiled function's (eager selective checkpointing refuses such a write)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from align.models.recompute import enable_activation_checkpointing

    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    input_ids = torch.randint(0, 64, (1, 256), generator=torch.Generator().manual_seed(0))
    saved = {}
    for mode in (None, "selective", "full"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).train()
        if mode:
            enable_activation_checkpointing(model, mode)
        compile_layers(model)
        saved[mode] = _saved_activation_bytes(model, input_ids)
    assert saved["full"] < saved["selective"] < 0.8 * saved[None], saved

    from align.models.recompute import selective_contexts
    from torch.utils.checkpoint import checkpoint

    weight, bias = torch.randn(32, 16, requires_grad=True), torch.randn(32, requires_grad=True)

    def block(x):
        h = x @ weight.T
        h.add_(bias)  # in place into a kept matmul output, as DeepSpeed ZeRO-3's linear does
        return torch.nn.functional.silu(h).sum(-1)

    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    expected = torch.autograd.grad(block(x).sum(), (weight, bias))
    selective = torch.compile(lambda x: checkpoint(block, x, use_reentrant=False, context_fn=selective_contexts))
    for got, want in zip(torch.autograd.grad(selective(x).sum(), (weight, bias)), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_compiled_selective_layers_reach_the_compile_cache(tmp_path, monkeypatch):
    """A compiled layer with selective checkpointing is cached by AOTAutograd (its graphs are reused
    by the next process, or after dynamo forgets them, instead of compiled anew): `selective_contexts`
    carries the `cache_hash` that cache requires of a checkpoint's context_fn."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from align.models.recompute import enable_activation_checkpointing

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # (a cold cache of its own)
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", True)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    input_ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    before = dict(counters["aot_autograd"])
    for _ in range(2):
        torch._dynamo.reset()
        model = LlamaForCausalLM(config).train()
        enable_activation_checkpointing(model, "selective")
        compile_layers(model)
        model(input_ids=input_ids).logits.sum().backward()
    torch._dynamo.reset()
    new = {key: counters["aot_autograd"][key] - before.get(key, 0) for key in ("autograd_cache_bypass",
                                                                             "autograd_cache_hit")}
    assert new == {"autograd_cache_bypass": 0, "autograd_cache_hit": 1}, new


def test_compile_refusals(make_recipe):
    with pytest.raises(AlignError, match="model.compile"):
        make_recipe(model={"compile": True}, train={"sharding": "fsdp"})
    with pytest.raises(AlignError, match="model.compile"):
        zero.check("sft", make_recipe(model={"compile": True}))
    with pytest.raises(AlignError, match="no decoder layers"):
        compile_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
