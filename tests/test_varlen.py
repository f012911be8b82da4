"""Packed rows through the varlen kernel (`align.models.varlen`): boundaries found on the host, the
switched model equal to transformers' SDPA everywhere, packed examples kept apart by the kernel's
layout (checked on the CPU with a per-example stand-in for the CUDA kernel) and by the fallback
mask, and the models the kernel cannot run refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers as T

from align.data import pack
from align.models import varlen
from align.models.policy import TokenLogprobModel
from align.ops.logprobs import IGNORE_INDEX
from align.toy import preference_rows
from align.trainers import TRAINERS, SFTTrainer
from tests.test_families import TEMPERATURE, build, forward_logprobs, random_ids

PLAIN = {  # families whose attention the kernel runs (sliding windows turned off where the test turns them on)
    "llama": {}, "llama-tied": {}, "qwen2": {"use_sliding_window": False}, "qwen3": {"use_sliding_window": False},
    "mistral": {"sliding_window": None}, "phi3": {"sliding_window": None}, "cohere": {}, "granite": {},
    "olmo2": {}, "phi-lm-head-bias": {},
}


def packed_batch(*lengths: int, seed: int = 2) -> tuple[dict, list[list[int]]]:
    """Examples of these lengths packed into one row (then a row of the last), with their boundaries."""
    sequences = random_ids(*lengths, seed=seed)
    examples = [{"input_ids": s, "labels": s[1:] + [IGNORE_INDEX]} for s in sequences]
    batch = pack(examples, max_length=sum(lengths[:-1]))
    cu_seq_lens, longest = varlen.segments(batch["position_ids"])
    return {**batch, "cu_seq_lens": cu_seq_lens, "max_seq_len": longest}, sequences


def check_examples(model, batch, sequences) -> None:
    """Each example's log-probs in the packed rows equal the model's own forward on it alone."""
    inputs = {k: batch[k] for k in ("input_ids", "labels", "position_ids", "cu_seq_lens", "max_seq_len")}
    with torch.no_grad():
        ours = TokenLogprobModel(model)(**inputs, temperature=TEMPERATURE).flatten()
        flat_ids = batch["input_ids"].flatten()
    starts = batch["cu_seq_lens"].tolist()
    for sequence in sequences:
        start = next(s for s in starts if flat_ids[s:s + len(sequence)].tolist() == sequence)
        torch.testing.assert_close(ours[start:start + len(sequence) - 1], forward_logprobs(model, sequence, 1),
                                   atol=1e-5, rtol=0)


def test_segments_mark_every_packed_example_and_each_rows_padding():
    batch, _ = packed_batch(7, 5, 3, 9, 2)  # rows of <= 24 tokens: balanced [9 3 2 | 7 5 + 2 padding]
    cu_seq_lens, longest = varlen.segments(batch["position_ids"])
    assert cu_seq_lens.dtype == torch.int32 and cu_seq_lens[0] == 0 and cu_seq_lens[-1] == batch["input_ids"].numel()
    assert batch["input_ids"].shape == (2, 14) and cu_seq_lens.tolist() == [0, 9, 12, 14, 21, 26, 28] and longest == 9
    assert varlen.segments(torch.tensor([[1, 2, 3]])) is None  # not packed examples: no boundaries


@pytest.mark.parametrize("name", PLAIN)
def test_a_switched_model_is_transformers_sdpa_and_keeps_packed_examples_apart(name):
    plain, switched = build(name, **PLAIN[name]), build(name, **PLAIN[name])
    assert varlen.varlen_refusal(switched.config) is None and varlen.use_varlen(switched)
    assert switched.config._attn_implementation == varlen.NAME
    ids = torch.tensor(random_ids(12, 12, seed=3))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded row, as the samplers make
    with torch.no_grad():
        torch.testing.assert_close(switched(input_ids=ids, attention_mask=mask).logits,
                                   plain(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)
        prompt = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, use_cache=True)
        assert torch.equal(switched.generate(**prompt), plain.generate(**prompt))  # decoding with a KV cache
    batch, sequences = packed_batch(11, 6, 4, 8)
    check_examples(switched, batch, sequences)  # on a CPU: SDPA with the boundaries' mask


def reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size, enable_gqa=False,
                     scale=None):
    """What the CUDA kernel computes, one example at a time (query [T, Hq, D], key/value [T, Hkv, D])."""
    assert window_size == (-1, 0) and torch.equal(cu_seq_q, cu_seq_k) and max_q == max_k
    assert max_q == int(cu_seq_q.diff().max())
    out = torch.empty_like(query)
    for start, end in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa).transpose(0, 1)
    return out


@pytest.mark.parametrize("name", ["llama", "qwen3", "cohere"])
def test_the_kernels_layout_keeps_packed_examples_apart(name, monkeypatch):
    """The path that runs on CUDA (rows flattened to [R * L, H, D], GQA, scale, causal window),
    with a per-example stand-in for the kernel: equal to each example's own forward."""
    calls = []

    def stand_in(*args, **kwargs):
        calls.append(args[0].shape)
        return reference_varlen(*args, **kwargs)

    monkeypatch.setattr(torch.nn.attention.varlen, "varlen_attn", stand_in)
    monkeypatch.setattr(varlen, "_kernel_runs", lambda *args: True)
    model = build(name, **PLAIN[name])
    assert varlen.use_varlen(model)
    calls.clear()  # (the switch's probe ran the kernel too)
    batch, sequences = packed_batch(11, 6, 4, 8)
    check_examples(model, batch, sequences)
    assert len(calls) == model.config.num_hidden_layers and calls[0][0] == batch["input_ids"].numel()


def test_under_autocast_the_kernel_gets_autocasts_dtype(monkeypatch):
    """Under autocast with fp32 weights, rotary embeddings leave query and key in fp32; the kernel
    (fp16/bf16 only) gets them in autocast's dtype, as SDPA would, and the examples stay apart."""
    dtypes = []

    def stand_in(*args, **kwargs):
        dtypes.append({t.dtype for t in args[:3]})
        return reference_varlen(*args, **kwargs)

    monkeypatch.setattr(torch.nn.attention.varlen, "varlen_attn", stand_in)
    monkeypatch.setattr(varlen, "_kernel_runs", lambda query, *args: query.dtype == torch.bfloat16)
    model = build("llama")
    assert varlen.use_varlen(model)
    batch, _ = packed_batch(11, 6, 4, 8)
    inputs = {k: batch[k] for k in ("input_ids", "labels", "position_ids")}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        masked = TokenLogprobModel(model)(**inputs)
        ours = TokenLogprobModel(model)(**inputs, cu_seq_lens=batch["cu_seq_lens"], max_seq_len=batch["max_seq_len"])
    assert dtypes and all(d == {torch.bfloat16} for d in dtypes)
    torch.testing.assert_close(ours, masked, atol=0.05, rtol=0)


@pytest.mark.parametrize("name, overrides, reason", [
    ("mistral", {}, "sliding"),
    ("qwen2", {}, "sliding"),
    ("gemma3", {}, "sliding"),
    ("llama", {"attention_dropout": 0.1}, "dropout"),
])
def test_models_the_kernel_cannot_run_keep_sdpa(name, overrides, reason):
    model = build(name, **overrides)
    assert reason in varlen.varlen_refusal(model.config)
    assert not varlen.use_varlen(model) and model.config._attn_implementation == "sdpa"


def test_other_refusals():
    config = T.Gemma2Config(num_hidden_layers=1, layer_types=["full_attention"])
    config._attn_implementation = "sdpa"
    assert "softcapping" in varlen.varlen_refusal(config)
    config = T.FalconConfig(num_hidden_layers=1)
    config._attn_implementation = "sdpa"
    assert "name 'sdpa'" in varlen.varlen_refusal(config)
    config = T.LlamaConfig(num_hidden_layers=1)
    config._attn_implementation = "eager"
    assert "eager" in varlen.varlen_refusal(config)


def test_every_family_that_branches_on_the_name_sdpa_is_known():
    """A model whose code compares its attention implementation with "sdpa" would behave
    differently under another name: such families must never be switched."""
    models = Path(T.__file__).parent / "models"
    pattern = re.compile(r"""_attn_implementation\s*(==|!=)\s*["']sdpa["']|["']sdpa["']\s*(==|!=|in)""")
    found = {path.parent.name for path in models.glob("*/modeling_*.py") if pattern.search(path.read_text())}
    assert found and found <= varlen.NAMED_SDPA_FAMILIES, sorted(found - varlen.NAMED_SDPA_FAMILIES)


def loss_and_grads(trainer, batch):
    """A training forward's loss on a moved batch, and its gradients in the trainable parameters."""
    trainer.policy.module.train()
    loss = trainer.compute_loss(batch)[0]
    return loss, torch.autograd.grad(loss, trainer.policy.trainable_parameters())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_trainer_hands_packed_rows_boundaries_to_the_model(make_recipe, monkeypatch, checkpointing):
    """Where the kernel runs (here: a CPU made to count as such), `_to_device` adds the boundaries
    on the host, the forward takes them (its fallback mask, on a CPU; activation checkpointing's
    recomputation too), and the loss and gradients are unchanged."""
    recipe = make_recipe(model={"gradient_checkpointing": checkpointing})

    plain = SFTTrainer.from_recipe(recipe)
    batch = {**pack([plain.train_data[i] for i in range(6)]), "num_items": None}
    assert "cu_seq_lens" not in plain._to_device(batch)  # a CPU: the mask, built once per forward
    want, want_grads = loss_and_grads(plain, plain._to_device(batch))
    masks = []
    segment_mask = varlen._segment_mask
    monkeypatch.setattr(varlen, "KERNEL_DEVICES", {"cpu"})
    monkeypatch.setattr(varlen, "_segment_mask", lambda *args: masks.append(args) or segment_mask(*args))
    trainer = SFTTrainer.from_recipe(recipe)
    assert trainer.policy.model.config._attn_implementation == varlen.NAME
    masks.clear()  # (the switch's probe took its own)
    moved = trainer._to_device(batch)
    assert torch.equal(moved["cu_seq_lens"], varlen.segments(batch["position_ids"])[0])
    got, got_grads = loss_and_grads(trainer, moved)
    layers = trainer.policy.model.config.num_hidden_layers
    assert len(masks) == layers * (2 if checkpointing else 1)  # the backward's recomputation took them too
    assert abs(got.item() - want.item()) < 1e-5
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_unshared_pairs_get_their_boundaries_too(make_recipe, monkeypatch):
    """DPO pairs in the plain layout (dpo.shared_prompt: false; KTO's rows always) are packed rows
    too: where the kernel runs they take their boundaries (a group batch carries attention_mask
    None), with the loss unchanged."""
    recipe = make_recipe(rows=preference_rows(8, seed=2), algorithm="dpo", dpo={"shared_prompt": False})
    plain = TRAINERS["dpo"].from_recipe(recipe)
    batch = {**plain.collate([plain.train_data[i] for i in range(4)]), "num_items": 4.0}
    plain.policy.module.train()
    want = plain.compute_loss(plain._to_device(batch))[0]
    monkeypatch.setattr(varlen, "KERNEL_DEVICES", {"cpu"})
    trainer = TRAINERS["dpo"].from_recipe(recipe)
    moved = trainer._to_device(batch)
    assert torch.equal(moved["cu_seq_lens"], varlen.segments(batch["position_ids"])[0])
    trainer.policy.module.train()
    assert abs(trainer.compute_loss(moved)[0].item() - want.item()) < 1e-5


def test_where_every_attention_call_takes_the_kernel_a_batch_is_one_unpadded_row(make_recipe, monkeypatch):
    """`Trainer.one_row`: where the policy's attention all goes through the varlen kernel (here a
    CPU made to count as such), a packed micro-batch is one row without padding, with the loss and
    gradients of the same examples in rows of the longest one. Not on a CPU as it is, nor in
    float32 (the kernel runs in 16 bits)."""
    recipe = make_recipe()
    plain = SFTTrainer.from_recipe(recipe)
    examples = [plain.train_data[i] for i in range(6)]
    rows = plain.collate(examples)
    assert not plain.one_row and rows["input_ids"].shape[0] > 1 and (rows["labels"] == IGNORE_INDEX).any()

    want, want_grads = loss_and_grads(plain, plain._to_device({**rows, "num_items": None}))
    monkeypatch.setattr(varlen, "KERNEL_DEVICES", {"cpu"})
    assert not SFTTrainer.from_recipe(recipe).one_row  # float32
    assert SFTTrainer.from_recipe(make_recipe(train={"mixed_precision": "bf16"})).one_row  # bf16 autocast
    monkeypatch.setattr(varlen, "_KERNEL_DTYPES", (torch.float32,))  # (exact comparisons, in float32)
    trainer = SFTTrainer.from_recipe(recipe)
    assert trainer.one_row
    batch = trainer.collate(examples)
    total = sum(len(e["input_ids"]) for e in examples)
    assert batch["input_ids"].shape == (1, total) and int(batch["num_tokens"]) == total
    got, got_grads = loss_and_grads(trainer, trainer._to_device({**batch, "num_items": None}))
    assert abs(got.item() - want.item()) < 1e-5
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_one_row_needs_the_kernel_device_16_bit_queries_and_heads_the_kernel_takes(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(varlen, "KERNEL_DEVICES", {"cpu"})
    model = build("llama")
    assert not varlen.one_row(model, cpu, torch.bfloat16)  # not switched to the kernel
    assert varlen.use_varlen(model)
    assert varlen.one_row(model, cpu, torch.bfloat16)  # under bf16 autocast
    assert not varlen.one_row(model, torch.device("meta"), torch.bfloat16)  # not a kernel device
    assert not varlen.one_row(model, cpu, None)  # float32 weights, no autocast
    model.to(torch.bfloat16)
    assert varlen.one_row(model, cpu, None)  # bfloat16 weights
    model.model.norm.float()
    assert not varlen.one_row(model, cpu, None)  # weights in two dtypes (say, float32 adapters or norms)
    attention = next(m for m in model.modules() if hasattr(m, "scaling") and hasattr(m, "head_dim"))
    monkeypatch.setattr(attention, "head_dim", 512)
    assert not varlen.one_row(model, cpu, torch.bfloat16)  # heads wider than the kernel takes


def test_one_row_takes_lora_adapters_and_refuses_attention_dropout_and_gpus_before_ampere(monkeypatch):
    """LoRA's float32 adapters leave queries in their base layer's 16 bits (peft casts the output
    back): one row. An attention module's own dropout (GPT-2's attn_pdrop) sends every training call
    to SDPA's mask, quadratic in the one row: not one row until dropout is off. A GPU older than
    Ampere has no FlashAttention kernel: the model is not switched."""
    from peft import LoraConfig, get_peft_model

    from align.models.dropout import disable_dropout

    cpu = torch.device("cpu")
    monkeypatch.setattr(varlen, "KERNEL_DEVICES", {"cpu"})
    model = build("llama").to(torch.bfloat16)
    assert varlen.use_varlen(model)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1))
    assert {p.dtype for n, p in lora.named_parameters() if "lora_" in n} == {torch.float32}
    assert varlen.one_row(lora, cpu, None)

    config = T.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, attn_pdrop=0.1)
    gpt2 = T.GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
    assert varlen.use_varlen(gpt2)
    assert not varlen.one_row(gpt2, cpu, torch.bfloat16)  # dropout on
    disable_dropout(gpt2)
    assert varlen.one_row(gpt2, cpu, torch.bfloat16)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert not varlen.use_varlen(build("llama"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert varlen.use_varlen(build("llama"))


@pytest.mark.parametrize("model_type", ["stablelm", "nemotron"])
def test_a_family_whose_layers_drop_the_boundaries_keeps_sdpa(model_type):
    """StableLM's and Nemotron's decoder layers do not pass their keyword arguments on to attention,
    so packed rows' boundaries never reach it: `use_varlen`'s probe leaves such a model on SDPA, and a
    forward that loses them raises instead of attending to all of its row (before: across examples
    and to later tokens, with no error, on CUDA)."""
    from align.errors import AlignError

    config = T.AutoConfig.for_model(model_type, vocab_size=512, hidden_size=64, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = T.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    assert varlen.varlen_refusal(model.config) is None
    assert not varlen.use_varlen(model) and model.config._attn_implementation == "sdpa"
    model.set_attn_implementation(varlen.NAME)  # switched all the same
    batch, _ = packed_batch(5, 3, 4)
    inputs = {k: batch[k] for k in ("input_ids", "labels", "position_ids", "cu_seq_lens", "max_seq_len")}
    with pytest.raises(AlignError, match="without their boundaries"):
        TokenLogprobModel(model)(**inputs)
