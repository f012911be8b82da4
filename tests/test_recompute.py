"""model.checkpoint_mode: what a checkpointed layer keeps for the backward (align/models/recompute.py)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from align.config import recipe_from_dict
from align.errors import AlignError
from align.models.recompute import OpCounts, checkpoint_kwargs, enable_activation_checkpointing, keeps
from align.trainers.sft import SFTTrainer


def step(trainer) -> tuple[dict, OpCounts]:
    """One optimizer step's gradients, and the ops it ran."""
    with OpCounts() as ops:
        trainer.accumulate_gradients(trainer.micro_batches(0))
    grads = {n: p.grad.clone() for n, p in trainer.policy.module.named_parameters() if p.grad is not None}
    return grads, ops


@pytest.mark.parametrize("adapter", [None, {"kind": "lora", "r": 4, "dropout": 0.1},
                                     {"kind": "qlora", "r": 4, "dropout": 0.0}])
def test_selective_checkpointing_recomputes_no_matmul_and_gives_the_same_gradients(make_recipe, adapter):
    """selective: the elementwise ops run again in the backward (as under full checkpointing), the
    matmuls and attention kernels do not (as without checkpointing; full runs each layer's again),
    and the gradients are the plain ones: full fine-tuning, LoRA with dropout (recomputed with the
    forward's random draws), QLoRA (its preparation switches checkpointing on again, with the same mode)."""
    sections = {"adapter": adapter} if adapter else {}
    runs = {}
    for mode in ("none", "full", "selective"):
        model = {} if mode == "none" else {"gradient_checkpointing": True, "checkpoint_mode": mode}
        runs[mode] = step(SFTTrainer.from_recipe(make_recipe(**sections, model=model)))
    (plain, plain_ops), (_, full_ops), (selective, selective_ops) = runs["none"], runs["full"], runs["selective"]
    assert selective_ops.matmuls() == plain_ops.matmuls() < full_ops.matmuls()
    assert selective_ops.attention() == plain_ops.attention() < full_ops.attention()
    assert selective_ops.with_grad["aten::silu"] == full_ops.with_grad["aten::silu"] == \
        2 * plain_ops.with_grad["aten::silu"] > 0
    assert plain.keys() == selective.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(selective[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_selective_checkpointing_with_a_fraction_of_the_layers(make_recipe):
    """checkpointed_layers 0.5 with selective: layer 1 recomputes its elementwise ops, layer 0 nothing."""
    trainer = SFTTrainer.from_recipe(make_recipe(model={"gradient_checkpointing": True, "checkpoint_mode": "selective",
                                                        "checkpointed_layers": 0.5}))
    calls = {0: [], 1: []}
    for name, module in trainer.policy.model.named_modules():
        for i in calls:
            if name.endswith(f"layers.{i}.mlp.act_fn"):
                module.register_forward_hook(lambda *args, i=i: calls[i].append(1))
    step(trainer)
    assert len(calls[1]) == 2 * len(calls[0]) > 0


def test_checkpoint_mode_needs_gradient_checkpointing(make_recipe):
    with pytest.raises(AlignError, match="checkpoint_mode: selective needs gradient_checkpointing: true"):
        make_recipe(model={"checkpoint_mode": "selective"})
    with pytest.raises(AlignError, match="checkpoint_mode"):
        make_recipe(model={"gradient_checkpointing": True, "checkpoint_mode": "some"})


def losses(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def checkpointed(fn, *inputs):
    return checkpoint(fn, *inputs, **checkpoint_kwargs("selective"))


def test_writing_into_a_kept_output_is_an_error_not_wrong_gradients():
    """An in-place op on a matmul's output through the `_unsafe_view` that `matmul` returns (what
    DeepSpeed ZeRO-3's linear does to add a bias) escapes torch's own check of kept tensors, and the
    recomputation would read the changed values: the guard raises in the forward. In-place ops on
    what is recomputed are fine."""
    x = torch.randn(2, 3, 4, requires_grad=True)
    weight, bias = torch.randn(5, 4, requires_grad=True), torch.randn(5, requires_grad=True)

    def bias_in_place(x, weight, bias):
        out = x.matmul(weight.t())
        out += bias
        return out.sin()

    with pytest.raises(AlignError, match="writes in place into the output of a matmul"):
        checkpointed(bias_in_place, x, weight, bias)

    def in_place_on_recomputed(x, weight, bias):
        out = (x.matmul(weight.t()) + bias) * 1.5
        out.add_(1)
        return out.sin()

    plain = torch.autograd.grad(in_place_on_recomputed(x, weight, bias).sum(), (x, weight, bias))
    selective = torch.autograd.grad(checkpointed(in_place_on_recomputed, x, weight, bias).sum(), (x, weight, bias))
    for a, b in zip(selective, plain):
        torch.testing.assert_close(a, b)


def test_deepspeed_zero3_linear_with_a_bias_is_refused_under_selective_checkpointing():
    zero_linear = pytest.importorskip("deepspeed.runtime.zero.linear")
    x = torch.randn(2, 3, 4, requires_grad=True)
    weight, bias = torch.randn(5, 4, requires_grad=True), torch.randn(5, requires_grad=True)
    with pytest.raises(AlignError, match="ZeRO-3's linear adds a model's linear biases so"):
        checkpointed(lambda *a: zero_linear.zero3_linear_wrap(*a).sin(), x, weight, bias)


def test_attention_with_dropout_is_recomputed_not_kept():
    """On CUDA an attention kernel with dropout advances the random generator: kept, it would shift
    the recomputation's later random draws. Without dropout it is kept."""
    q = k = v = torch.randn(1, 2, 4, 8)
    efficient = torch.ops.aten._scaled_dot_product_efficient_attention.default
    assert keeps(efficient, (q, k, v, None, True), {})
    assert keeps(efficient, (q, k, v, None, True, 0.0), {})
    assert not keeps(efficient, (q, k, v, None, True, 0.1), {})
    assert not keeps(efficient, (q, k, v, None, True), {"dropout_p": 0.1})
    assert keeps(torch.ops.aten.mm.default, (q, k), {}) and not keeps(torch.ops.aten.silu.default, (q,), {})


def test_a_model_that_drops_checkpoint_arguments_is_refused_under_selective():
    """An old-format model (its own `_set_gradient_checkpointing(module, value)`) ignores the
    arguments: selective would quietly be full checkpointing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    class OldFormat(LlamaForCausalLM):
        def _set_gradient_checkpointing(self, module, value=False):
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = value

    model = OldFormat(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(AlignError, match="old checkpointing format"):
        enable_activation_checkpointing(model, "selective")


def test_a_run_resumed_with_checkpointing_switched_on_continues_as_the_uninterrupted_run(make_recipe, tmp_path):
    """Activation checkpointing changes a step's memory, not its numbers: a run may resume with it
    (e.g. after running out of memory)."""
    raw = make_recipe(raw=True, train={"max_steps": 4, "save_every": 2, "log_every": 1})
    SFTTrainer.from_recipe(recipe_from_dict(raw)).fit()
    uninterrupted = losses(tmp_path / "run")
    raw["train"]["resume_from"] = str(tmp_path / "run" / "checkpoints" / "step-000002")
    raw["model"].update(gradient_checkpointing=True, checkpoint_mode="selective", checkpointed_layers=0.5)
    SFTTrainer.from_recipe(recipe_from_dict(raw)).fit()
    resumed = losses(tmp_path / "run")[-2:]
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(uninterrupted[2:], resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


MEMORY_SCRIPT = r"""
import json, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from align.config import AdapterConfig, ModelConfig
from align.models.loading import load_model

path = sys.argv[1]
torch.manual_seed(0)
LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=704, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=1, pad_token_id=0)).save_pretrained(path)
ids = torch.randint(0, 64, (2, 2048))


def status(key):
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith(key))) * 1024


try:
    open("/proc/self/clear_refs", "w").write("5")
except OSError:
    print(json.dumps({"skip": "/proc/self/clear_refs cannot be written here"}))
    sys.exit(0)
growth = {}
for mode in ("none", "full", "selective"):
    checkpointing = {} if mode == "none" else {"gradient_checkpointing": True, "checkpoint_mode": mode}
    model = load_model(ModelConfig(name_or_path=path, dtype="float32", **checkpointing), AdapterConfig())
    model.train()
    for _ in range(2):  # the first step allocates the gradients
        start = status("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as trainers run on a GPU (train.mixed_precision)
            hidden = model.model(input_ids=ids).last_hidden_state
        hidden.float().pow(2).mean().backward()
        growth[mode] = status("VmHWM") - start
    del model
print(json.dumps(growth))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak resident memory from /proc")
def test_selective_checkpointing_holds_fewer_activations(tmp_path):
    """The peak memory of a forward and backward under bf16 autocast (the decoder's activations:
    2 x 2048 tokens) is lower with selective than without checkpointing (0.63x here), and higher
    than with full; measured as the process's peak resident memory, with glibc returning every
    large block to the system at once."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "model")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    growth = json.loads(result.stdout.strip().splitlines()[-1])
    if "skip" in growth:
        pytest.skip(growth["skip"])
    assert growth["full"] < growth["selective"] < 0.8 * growth["none"], growth
