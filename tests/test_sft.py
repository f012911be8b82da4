import json

import datasets
import pytest
import torch

from align.data import pack, pad
from align.errors import AlignError
from align.losses.sft import masked_nll
from align.ops.logprobs import IGNORE_INDEX
from align.toy import chat_rows, prompt_completion_rows
from align.trainers import Callback, SFTTrainer, Trainer


def read_metrics(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_sft_loss_falls_on_toy_chats(make_recipe, tmp_path):
    recipe = make_recipe(eval_rows=chat_rows(16, seed=9),
                         train={"max_steps": 40, "batch_size": 8, "eval_every": 40, "lr": 3e-3})
    trainer = SFTTrainer.from_recipe(recipe)
    before = trainer.evaluate()["eval/loss"]
    trainer.fit()
    after = read_metrics(tmp_path / "run")[-1]["eval/loss"]
    assert after < 0.6 * before, (before, after)
    assert (tmp_path / "run" / "model.safetensors").exists()
    assert (tmp_path / "run" / "recipe.yaml").exists()


def test_a_new_run_in_the_same_output_dir_starts_a_fresh_metrics_file(make_recipe, tmp_path):
    recipe = make_recipe(eval_rows=chat_rows(4, seed=9), train={"max_steps": 2, "eval_at_start": True})
    for _ in range(2):
        SFTTrainer.from_recipe(recipe).fit(overwrite=True)  # the second moves the first aside
    for run in [tmp_path / "run", *tmp_path.glob("run.old-*")]:
        steps = [r["step"] for r in read_metrics(run)]
        assert steps.count(0) == 1 and steps == sorted(steps), steps


def test_packed_and_padded_batches_give_the_same_loss(make_recipe):
    trainer = SFTTrainer.from_recipe(make_recipe())
    examples = [trainer.train_data[i] for i in range(6)]
    packed_loss = trainer.compute_loss({**pack(examples), "num_items": None})[0]
    padded_loss = trainer.compute_loss({**pad(examples, trainer.policy.tokenizer.pad_token_id), "num_items": None})[0]
    assert abs(packed_loss.item() - padded_loss.item()) < 1e-5
    # and the packed rows really are separate: shuffling example order changes nothing
    shuffled = trainer.compute_loss({**pack(examples[::-1]), "num_items": None})[0]
    assert abs(packed_loss.item() - shuffled.item()) < 1e-5


def test_fused_loss_equals_masked_nll_of_the_token_logprobs(make_recipe):
    """SFT's loss makes the lm-head gradient in the forward; value and gradients are masked_nll's."""
    trainer = SFTTrainer.from_recipe(make_recipe())
    batch = {**pack([trainer.train_data[i] for i in range(6)]), "num_items": 50.0}
    params = [p for p in trainer.policy.module.parameters() if p.requires_grad]
    fused = trainer.compute_loss(batch)[0]
    plain = masked_nll(trainer.policy.logprobs(batch), batch["labels"] != IGNORE_INDEX, 50.0)
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=0)
    for a, b in zip(torch.autograd.grad(fused, params), torch.autograd.grad(plain, params)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def gradients(trainer):
    trainer.accumulate_gradients(trainer.micro_batches(0))
    return {n: p.grad.clone() for n, p in trainer.policy.module.named_parameters() if p.grad is not None}


def test_gradient_accumulation_4x2_equals_one_batch_of_8(make_recipe):
    big = gradients(SFTTrainer.from_recipe(make_recipe(train={"batch_size": 8, "grad_accum": 1})))
    small = gradients(SFTTrainer.from_recipe(make_recipe(train={"batch_size": 2, "grad_accum": 4})))
    assert big.keys() == small.keys() and len(big) > 0
    for name in big:
        torch.testing.assert_close(small[name], big[name], atol=1e-5, rtol=1e-4, msg=name)


class Kill(Callback):
    """Simulates a crash right after step `at` was logged."""

    def __init__(self, at):
        self.at = at

    def on_log(self, trainer, record):
        if trainer.step == self.at:
            raise KeyboardInterrupt


@pytest.mark.parametrize("adapter", ["none", "lora"])
def test_resume_after_a_kill_continues_the_same_run(make_recipe, tmp_path, adapter):
    settings = dict(adapter={"kind": adapter, "r": 4, "dropout": 0.1},
                    train={"max_steps": 6, "save_every": 3, "log_every": 1, "schedule": "cosine", "warmup": 2})
    straight = make_recipe(output_dir=str(tmp_path / "straight"), **settings)
    SFTTrainer.from_recipe(straight).fit()
    killed = make_recipe(output_dir=str(tmp_path / "killed"), **settings)
    with pytest.raises(KeyboardInterrupt):
        SFTTrainer.from_recipe(killed, callbacks=[Kill(at=5)]).fit()
    assert (tmp_path / "killed" / "checkpoints" / "step-000003").is_dir()
    resumed = make_recipe(output_dir=str(tmp_path / "killed"), **settings)
    resumed.train.resume_from = "auto"
    SFTTrainer.from_recipe(resumed).fit()
    want, got = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "killed")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]  # records past the checkpoint were replaced
    for a, b in zip(want, got):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
        assert a["lr"] == pytest.approx(b["lr"])


def test_sft_loss_equals_trl_on_the_same_batch(make_recipe):
    from trl import SFTConfig
    from trl import SFTTrainer as TRLSFTTrainer

    rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in prompt_completion_rows(8, seed=4)]
    trainer = SFTTrainer.from_recipe(make_recipe(rows=rows, train={"batch_size": 8}))
    trl = TRLSFTTrainer(model=trainer.policy.model, processing_class=trainer.policy.tokenizer,
                        train_dataset=datasets.Dataset.from_list(rows),
                        args=SFTConfig(output_dir=str(make_recipe().output_dir), report_to="none", use_cpu=True,
                                       per_device_train_batch_size=8, max_length=128))
    batch = next(iter(trl.get_train_dataloader()))
    trl_loss = trl.compute_loss(trl.model, batch).item()
    # TRL labels are unshifted (labels[t] = input_ids[t] when trained); ours name the next token.
    shifted = torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], IGNORE_INDEX)], 1)
    ours = {"input_ids": batch["input_ids"], "labels": shifted, "attention_mask": batch["attention_mask"],
            "position_ids": (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)}
    our_loss = masked_nll(trainer.policy.logprobs(ours), shifted != IGNORE_INDEX).item()
    assert our_loss == pytest.approx(trl_loss, abs=1e-5)
    # our own tokenization of the same rows gives TRL's tokens and trained positions
    mine = sorted((tuple(e["input_ids"]), tuple(e["labels"])) for e in trainer.train_data)
    theirs = sorted((tuple(i[m.bool()].tolist()), tuple(s[m.bool()].tolist()))
                    for i, s, m in zip(batch["input_ids"], shifted, batch["attention_mask"]))
    assert mine == theirs


def activation_calls(trainer) -> list:
    """Calls of the first decoder layer's MLP activation, appended to as they happen."""
    calls = []
    act = next(m for name, m in trainer.policy.model.named_modules() if name.endswith("layers.0.mlp.act_fn"))
    act.register_forward_hook(lambda *args: calls.append(1))
    return calls


@pytest.mark.parametrize("adapter", [None, {"kind": "lora", "r": 4, "dropout": 0.0}])
def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(make_recipe, adapter):
    """Checkpointed layers run again in the backward (it is on, in a step of a freshly built trainer,
    not only inside fit: from_pretrained's eval mode would switch it off) with the same gradients."""
    adapter = {"adapter": adapter} if adapter else {}
    plain_trainer = SFTTrainer.from_recipe(make_recipe(**adapter))
    plain_calls = activation_calls(plain_trainer)
    plain = gradients(plain_trainer)
    trainer = SFTTrainer.from_recipe(make_recipe(**adapter, model={"gradient_checkpointing": True}))
    calls = activation_calls(trainer)
    checkpointed = gradients(trainer)
    assert len(calls) == 2 * len(plain_calls) > 0  # each micro-batch's forward, then its recomputation
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_a_fraction_of_the_layers_is_checkpointed(make_recipe):
    """checkpointed_layers 0.5 on the 2-layer model: layer 1 recomputes (once per micro-batch), layer
    0 does not, and the gradients are the plain ones; QLoRA's preparation does not switch the rest
    back on; without gradient_checkpointing the key is an error."""
    plain = gradients(SFTTrainer.from_recipe(make_recipe()))
    for adapter in ({}, {"adapter": {"kind": "qlora", "r": 4, "dropout": 0.0}}):
        trainer = SFTTrainer.from_recipe(make_recipe(**adapter, model={"gradient_checkpointing": True,
                                                                       "checkpointed_layers": 0.5}))
        layers = [m for name, m in trainer.policy.model.named_modules() if name.endswith(("layers.0", "layers.1"))]
        assert [layer.gradient_checkpointing for layer in layers] == [False, True], adapter
        calls = {i: [] for i in range(2)}
        for i, layer in enumerate(layers):
            layer.mlp.act_fn.register_forward_hook(lambda *args, i=i: calls[i].append(1))
        gradients(trainer)
        assert len(calls[1]) == 2 * len(calls[0]) > 0, adapter
    full = gradients(SFTTrainer.from_recipe(make_recipe(model={"gradient_checkpointing": True,
                                                               "checkpointed_layers": 0.5})))
    for name in plain:
        torch.testing.assert_close(full[name], plain[name], atol=1e-6, rtol=1e-5)
    with pytest.raises(AlignError, match="checkpointed_layers < 1 needs gradient_checkpointing: true"):
        make_recipe(model={"checkpointed_layers": 0.5})
    with pytest.raises(AlignError, match="checkpoints none of this model's 2 layers"):
        SFTTrainer.from_recipe(make_recipe(model={"gradient_checkpointing": True, "checkpointed_layers": 0.4}))


@pytest.mark.parametrize("layers, fraction, chosen", [(10, 0.3, [3, 6, 9]), (4, 0.5, [1, 3]), (100, 0.29, 29),
                                                      (3, 1.0, [0, 1, 2])])
def test_checkpointed_layers_are_spread_evenly(layers, fraction, chosen):
    from transformers import LlamaConfig, LlamaForCausalLM

    from align.models.recompute import checkpoint_some_layers, enable_activation_checkpointing

    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=layers,
                                         num_attention_heads=2, num_key_value_heads=2))
    enable_activation_checkpointing(model)
    checkpoint_some_layers(model, fraction)
    on = [i for i, layer in enumerate(model.model.layers) if layer.gradient_checkpointing]
    assert on == chosen if isinstance(chosen, list) else len(on) == chosen


def test_checkpointed_layers_recompute_with_the_forwards_attention_kernels(make_recipe, monkeypatch):
    """Where Align picks SDPA's kernels (CUDA: no cuDNN, `attention_kernels`), activation
    checkpointing's recomputation in the backward must pick the same ones, or its saved tensors
    differ from the forward's and torch.utils.checkpoint raises (it did on an H200). The kernel
    choice is made to apply on the CPU here, and every attention call, forward and recomputed, is seen."""
    import align.models.packed as packed

    monkeypatch.setattr(packed, "KERNEL_CHOICE_DEVICES", {"cuda", "cpu"})
    trainer = SFTTrainer.from_recipe(make_recipe(model={"gradient_checkpointing": True, "attn_implementation": "sdpa"}))
    cudnn_allowed = []
    for name, module in trainer.policy.model.named_modules():
        if name.endswith("self_attn"):
            module.register_forward_hook(lambda *args: cudnn_allowed.append(torch.backends.cuda.cudnn_sdp_enabled()))
    layers = trainer.policy.model.config.num_hidden_layers
    trainer.train_step(trainer.micro_batches(0))
    assert len(cudnn_allowed) == 2 * layers * len(trainer.micro_batches(0))  # the forward, then its recomputation
    assert not any(cudnn_allowed)


def test_bf16_mixed_precision_trains(make_recipe, tmp_path):
    trainer = SFTTrainer.from_recipe(make_recipe(train={"mixed_precision": "bf16", "max_steps": 12, "log_every": 1}))
    trainer.fit()
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert losses[-1] < losses[0] - 0.5


def test_packed_rows_give_the_loss_and_gradients_of_padding(make_recipe):
    """Several packed rows [R, L <= budget], rows holding several chats and right padding:
    the same loss and gradients as the padded batch and as one packed row (attention stays inside
    each chat in every row: transformers derives the mask from the restarting position ids)."""
    trainer = SFTTrainer.from_recipe(make_recipe())
    examples = [trainer.train_data[i] for i in range(12)]
    lengths = [len(e["input_ids"]) for e in examples]
    params = [p for p in trainer.policy.module.parameters() if p.requires_grad]
    assert pack(examples)["input_ids"].shape[1] == max(lengths)
    packed = pack(examples, max_length=100)  # these chats are 40-75 tokens: a budget that pairs them
    rows, width = packed["input_ids"].shape
    assert width <= 100 and 1 < rows < len(examples)
    assert ((packed["position_ids"] == 0).sum(-1) > 1).any()  # some row holds several chats
    num_items = float(sum((torch.as_tensor(e["labels"]) != IGNORE_INDEX).sum() for e in examples))
    results = []
    for batch in (packed, pad(examples, trainer.policy.tokenizer.pad_token_id), pack(examples, sum(lengths))):
        loss = trainer.compute_loss({**batch, "num_items": num_items})[0]
        results.append((loss.detach(), torch.autograd.grad(loss, params)))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], atol=1e-6, rtol=1e-5)
        for a, b in zip(grads, results[0][1]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_the_default_item_count_is_the_examples_whatever_the_layout(make_recipe):
    """`Trainer.count_items` (what a plug-in that keeps it averages over) counts examples, not rows:
    rows depend on data.pack_length and on the device (`one_row`), the examples do not."""
    trainer = SFTTrainer.from_recipe(make_recipe())
    examples = [trainer.train_data[i] for i in range(6)]
    total = sum(len(e["input_ids"]) for e in examples)
    layouts = [pack(examples, total), pack(examples), pad(examples, trainer.policy.tokenizer.pad_token_id)]
    assert [b["input_ids"].shape[0] for b in layouts[::2]] == [1, 6]
    assert [Trainer.count_items(trainer, b) for b in layouts] == [6.0] * 3


def test_pack_length_packs_longer_rows(make_recipe):
    """data.pack_length: rows of up to that many tokens (default: the batch's longest example)."""
    examples = [SFTTrainer.from_recipe(make_recipe()).train_data[i] for i in range(6)]
    total = sum(len(e["input_ids"]) for e in examples)
    default = SFTTrainer.from_recipe(make_recipe()).collate(examples)
    longer = SFTTrainer.from_recipe(make_recipe(data={"pack_length": total})).collate(examples)
    assert default["input_ids"].shape[0] > 1 and longer["input_ids"].shape == (1, total)


def test_tokens_per_s_leaves_out_evaluations_and_checkpoint_saves(make_recipe, monkeypatch):
    """An evaluation (here 2 s) is no training: tokens_per_s counts the steps' own time only."""
    import time

    from align.plot import read_metrics

    trainer = SFTTrainer.from_recipe(make_recipe(train={"max_steps": 2, "eval_every": 1, "save_every": 1}))
    monkeypatch.setattr(trainer, "evaluate", lambda: time.sleep(2.0) or {"eval/loss": 1.0})
    trainer.eval_data = trainer.eval_data if trainer.eval_data is not None else trainer.train_data
    trainer.fit()
    for record in read_metrics(trainer.output_dir):
        if "tokens_per_s" in record:
            assert record["tokens_per_s"] > record["num_tokens"] / 2.0, record


def test_the_python_api_takes_a_recipe_dict_and_refuses_trl_style_construction(make_recipe):
    """(a dict was read as a file name; a transformers model or raw rows failed deep inside with an
    AttributeError or KeyError)"""
    from transformers import AutoModelForCausalLM

    from align.models.tiny import resolve

    raw = make_recipe(raw=True, train={"max_steps": 1})
    trainer = SFTTrainer.from_recipe(raw, ["train.lr=1e-4"])
    assert trainer.cfg.lr == 1e-4 and raw["train"]["lr"] == 3e-3  # the caller's dict is left as it was
    recipe, rows = trainer.recipe, datasets.Dataset.from_list(chat_rows(4))
    with pytest.raises(AlignError, match="policy must be an align Policy"):
        SFTTrainer(recipe, AutoModelForCausalLM.from_pretrained(resolve("builtin:tiny-llama")), trainer.train_data)
    with pytest.raises(AlignError, match=r"train_data holds rows of columns \['messages'\], not tokenized examples"):
        SFTTrainer(recipe, trainer.policy, rows)
    with pytest.raises(AlignError, match="recipe must be an align Recipe"):
        SFTTrainer(raw, trainer.policy, trainer.train_data)
