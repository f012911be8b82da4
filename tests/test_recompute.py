"""model.checkpoint_mode: what a checkpointed layer keeps for the backward (align/models/recompute.py)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from align.errors import AlignError
from align.models.recompute import forward_ops_counter
from align.trainers.sft import SFTTrainer

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def step(trainer) -> tuple[dict, dict]:
    """One optimizer step's gradients, and the forward ops it ran."""
    with forward_ops_counter() as counter:
        trainer.accumulate_gradients(trainer.micro_batches(0))
    grads = {n: p.grad.clone() for n, p in trainer.policy.module.named_parameters() if p.grad is not None}
    return grads, counter.counts


@pytest.mark.parametrize("adapter", [None, {"kind": "lora", "r": 4, "dropout": 0.1},
                                     {"kind": "qlora", "r": 4, "dropout": 0.0}])
def test_selective_checkpointing_recomputes_no_matmul_and_gives_the_same_gradients(make_recipe, adapter):
    """selective: the elementwise ops run again in the backward (as under full checkpointing), the
    matmuls do not (as without checkpointing; full runs each layer's again), and the gradients are
    the plain ones: full fine-tuning, LoRA with dropout (recomputed with the forward's random
    draws), QLoRA (its preparation switches checkpointing on again, with the same mode)."""
    sections = {"adapter": adapter} if adapter else {}
    runs = {}
    for mode in ("none", "full", "selective"):
        model = {} if mode == "none" else {"gradient_checkpointing": True, "checkpoint_mode": mode}
        runs[mode] = step(SFTTrainer.from_recipe(make_recipe(**sections, model=model)))
    (plain, plain_ops), (_, full_ops), (selective, selective_ops) = runs["none"], runs["full"], runs["selective"]
    matmuls = {mode: sum(ops[name] for name in MATMULS) for mode, (_, ops) in runs.items()}
    assert matmuls["selective"] == matmuls["none"] < matmuls["full"], matmuls
    assert selective_ops["aten::silu"] == full_ops["aten::silu"] == 2 * plain_ops["aten::silu"] > 0
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
    assert growth["full"] < growth["selective"] < 0.8 * growth["none"], growth
