"""On-policy distillation: the divergences equal TRL's, the chunked full-vocabulary loss equals the
plain one (value and gradient), the trainer's loss equals the divergence of the two models' own
logits, the student learns from the teacher, and a teacher with another tokenizer is refused."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from align.errors import AlignError
from align.losses.distill import (distill_loss, divergence_grad, forward_kl, generalized_jsd, reverse_kl,
                                  token_divergence, trl_beta)
from align.models.policy import causal_lm
from align.ops.distill import chunked_divergence
from align.ops.logprobs import LogitTransform
from align.rollout import SamplingParams, make_engine
from align.toy import prompt_rows
from align.trainers.distill import DistillTrainer

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

CASES = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("generalized_jsd", 0.5), ("generalized_jsd", 0.1),
         ("generalized_jsd", 0.9)]


def random_logits(n=6, vocab=40, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(n, vocab, generator=g, dtype=dtype), 3 * torch.randn(n, vocab, generator=g, dtype=dtype))


# ---- (1) the divergences are TRL's -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generalized_jsd_equals_trl(beta, temperature, dtype):
    """Per token and reduced over a mask by num_items, against TRL's GKD `generalized_jsd_loss`; beta
    0 and 1 are the forward and reverse KL there (its endpoints), and here."""
    gkd = pytest.importorskip("trl.experimental.gkd")
    student, teacher = random_logits(dtype=dtype)
    ours = generalized_jsd(student, teacher, beta, temperature)
    trl = gkd.GKDTrainer.generalized_jsd_loss(student[None], teacher[None], beta=beta, temperature=temperature,
                                              reduction="none")[0].sum(-1)
    torch.testing.assert_close(ours, trl, atol=1e-6, rtol=0)
    if beta in (0.0, 1.0):
        endpoint = reverse_kl if beta == 1.0 else forward_kl
        torch.testing.assert_close(endpoint(student, teacher, temperature), trl, atol=1e-6, rtol=0)
        name = "reverse_kl" if beta == 1.0 else "forward_kl"
        torch.testing.assert_close(token_divergence(student, teacher, name, temperature=temperature), trl,
                                   atol=1e-6, rtol=0)
    labels = torch.tensor([[1, -100, 3, 4, -100, 5]])
    mask = labels[0] != -100
    for num_items in (None, 7.0):
        want = gkd.GKDTrainer.generalized_jsd_loss(student[None], teacher[None], labels=labels, beta=beta,
                                                   temperature=temperature, num_items_in_batch=num_items)
        assert distill_loss(ours, mask, num_items).item() == pytest.approx(want.item(), abs=1e-6)


@pytest.mark.parametrize("divergence, beta", CASES)
def test_closed_form_gradient_equals_autograd(divergence, beta):
    student, teacher = random_logits()
    student.requires_grad_(True)
    token_divergence(student, teacher, divergence, beta, temperature=0.7).sum().backward()
    torch.testing.assert_close(divergence_grad(student.detach(), teacher, divergence, beta, temperature=0.7),
                               student.grad, atol=1e-10, rtol=0)


def test_the_divergences_vanish_when_the_models_agree():
    student, _ = random_logits()
    for divergence, beta in CASES:
        assert token_divergence(student, student.clone(), divergence, beta).abs().max() < 1e-12


# ---- (2) chunked over tokens = plain, value and gradient ----------------------------------------------

def heads(dtype, hidden=8, teacher_hidden=12, vocab=50, extra_teacher_rows=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.nn.Linear(hidden, vocab, dtype=dtype)
    teacher = torch.nn.Linear(teacher_hidden, vocab + extra_teacher_rows, dtype=dtype).requires_grad_(False)
    with torch.no_grad():
        for p in (*student.parameters(), *teacher.parameters()):
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
    h = torch.randn(3, 7, hidden, generator=g, dtype=dtype, requires_grad=True)
    th = torch.randn(3, 7, teacher_hidden, generator=g, dtype=dtype)
    labels = torch.randint(0, vocab, (3, 7), generator=g)
    labels[0, :4] = labels[2, 5:] = -100
    weights = torch.rand(3, 7, generator=g, dtype=dtype)
    return student, teacher, h, th, labels, weights


def plain_logits(hidden, head, transform, labels, vocab):
    z = head(hidden[labels != -100])[:, :vocab] * transform.scale
    return transform.softcap * torch.tanh(z / transform.softcap) if transform.softcap else z


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
@pytest.mark.parametrize("divergence, beta", CASES)
@pytest.mark.parametrize("transform", [LogitTransform(), LogitTransform(scale=0.5, softcap=3.0)])
def test_chunked_equals_unchunked(dtype, tolerance, divergence, beta, transform):
    """Chunks of 4 positions vs the whole [N, V] logits through autograd: per-token divergences,
    the weighted total, and the gradients of hidden states, lm-head weight and bias (the teacher's
    hidden size differs from the student's, and both logits are post-processed and tempered)."""
    student, teacher, h, th, labels, weights = heads(dtype)
    out = chunked_divergence(h, student, th, teacher, labels, weights, beta=trl_beta(divergence, beta),
                             temperature=0.7, transform=transform, teacher_transform=transform, chunk_size=4)
    out.total.backward()
    chunked_grads = [h.grad.clone(), student.weight.grad.clone(), student.bias.grad.clone()]
    h.grad = student.weight.grad = student.bias.grad = None

    mask = labels != -100
    per_token = token_divergence(plain_logits(h, student, transform, labels, 50),
                                 plain_logits(th, teacher, transform, labels, 50), divergence, beta, temperature=0.7)
    total = (per_token * weights[mask]).sum()
    total.backward()
    assert out.total.item() == pytest.approx(total.item(), abs=tolerance)
    torch.testing.assert_close(out.divergence[mask], per_token.detach().to(out.divergence.dtype), atol=tolerance, rtol=0)
    assert (out.divergence[~mask] == 0).all()
    for ours, want in zip(chunked_grads, [h.grad, student.weight.grad, student.bias.grad]):
        torch.testing.assert_close(ours, want, atol=tolerance, rtol=tolerance)


def test_chunked_equals_trl_distillation_kernel():
    """Against TRL's DistillationTrainer kernel (`ChunkedDivergenceFunction`, its torch path on a
    CPU) with scale, soft-cap, biases and temperature: per-token divergence, entropy and gradients."""
    kernel = pytest.importorskip("trl.kernels.chunked_divergence")
    for beta in (1.0, 0.0, 0.5):
        student, teacher, h, th, labels, _ = heads(torch.float32, seed=1)
        mask = labels != -100
        transform, teacher_transform = LogitTransform(scale=0.5, softcap=3.0), LogitTransform(scale=1.5)
        out = chunked_divergence(h, student, th, teacher, labels, beta=beta, temperature=0.8, transform=transform,
                                 teacher_transform=teacher_transform, chunk_size=5)
        out.total.backward()
        ours = [h.grad.clone(), student.weight.grad.clone(), student.bias.grad.clone()]
        h.grad = student.weight.grad = student.bias.grad = None
        divergence, entropy = kernel.ChunkedDivergenceFunction.apply(
            h[mask], student.weight, student.bias, th[mask], teacher.weight, teacher.bias, beta, 0.8, 0.5, 3.0, 1.5,
            None)
        divergence.sum().backward()
        torch.testing.assert_close(out.divergence[mask], divergence.detach(), atol=1e-5, rtol=0)
        torch.testing.assert_close(out.entropy[mask], entropy, atol=1e-5, rtol=0)
        for a, b in zip(ours, [h.grad, student.weight.grad, student.bias.grad]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_padded_vocabularies_are_cut_to_the_shared_rows():
    """A teacher lm-head with extra (padding) rows: the divergence runs over the shared rows."""
    student, teacher, h, th, labels, weights = heads(torch.float64, extra_teacher_rows=14)
    out = chunked_divergence(h, student, th, teacher, labels, weights, beta=1.0)
    trimmed = torch.nn.Linear(12, 50, dtype=torch.float64)
    with torch.no_grad():
        trimmed.weight.copy_(teacher.weight[:50])
        trimmed.bias.copy_(teacher.bias[:50])
    want = chunked_divergence(h, student, th, trimmed, labels, weights, beta=1.0)
    torch.testing.assert_close(out.divergence, want.divergence)


def test_no_gradient_is_made_under_no_grad():
    student, teacher, h, th, labels, weights = heads(torch.float32)
    with torch.no_grad():
        out = chunked_divergence(h, student, th, teacher, labels, weights)
    assert out.total.grad_fn is None and h.grad is None


# ---- the trainer --------------------------------------------------------------------------------

@pytest.fixture
def distill_recipe(make_recipe):
    def make(**sections):
        base = dict(algorithm="distill", rows=prompt_rows(64, seed=21), eval_rows=prompt_rows(16, seed=22),
                    data={"max_length": 64},
                    train={"batch_size": 8, "lr": 3e-3, "max_steps": 2},
                    distill={"teacher_model": "builtin:small-llama", "sampling": {"max_new_tokens": 12}})
        for key, value in sections.items():
            base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
        return make_recipe(**base)
    return make


@pytest.mark.parametrize("divergence, beta", [("reverse_kl", 0.5), ("generalized_jsd", 0.3)])
def test_trainer_loss_is_the_divergence_of_the_models_own_logits(distill_recipe, divergence, beta):
    """A packed, shared-prompt micro-batch: the loss and the student's gradients equal those of the
    token divergences of both models' own forward() logits on each prompt + completion, averaged
    over the completion tokens (teacher builtin:small-llama: same tokenizer, wider hidden states)."""
    distill = {"divergence": divergence, **({"beta": beta} if divergence == "generalized_jsd" else {}),
               "temperature": 0.8}
    trainer = DistillTrainer.from_recipe(distill_recipe(distill=distill))
    groups = trainer.make_experience(0)["groups"]
    host = trainer.collate(groups)
    num_items = trainer.count_items(host)
    loss, metrics = trainer.compute_loss(trainer._to_device({**host, "num_items": num_items}))
    loss.backward()
    params = trainer.policy.trainable_parameters()
    ours = [p.grad.clone() for p in params]
    trainer.policy.module.zero_grad()

    student, teacher = causal_lm(trainer.policy.model), trainer.policy.teacher
    total = 0.0
    for group in groups:
        prompt, completion = group["prompt_ids"], group["completions"][0]
        ids = torch.tensor([prompt + completion])
        span = slice(len(prompt) - 1, len(prompt) - 1 + len(completion))
        logits = student(input_ids=ids).logits[0, span]
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids).logits[0, span]
        total = total + token_divergence(logits, teacher_logits, divergence, beta, temperature=0.8).sum()
    (total / num_items).backward()
    assert loss.item() == pytest.approx(total.item() / num_items, abs=1e-5)
    for a, p in zip(ours, params):
        torch.testing.assert_close(a, p.grad, atol=1e-5, rtol=1e-4)
    assert set(metrics) == {"entropy", "teacher_nll"}


def test_gradient_accumulation_equals_one_big_batch(distill_recipe):
    """The loss divides by the step's completion tokens: 2 micro-batches of 4 = 1 of 8."""
    results = []
    for batch_size, grad_accum in ((8, 1), (4, 2)):
        torch.manual_seed(0)
        trainer = DistillTrainer.from_recipe(distill_recipe(train={"batch_size": batch_size, "grad_accum": grad_accum}))
        record = trainer.read_record(trainer.accumulate_gradients(trainer.micro_batches(0)))
        results.append((record, [p.grad.clone() for p in trainer.policy.trainable_parameters()]))
    (one, grads_one), (two, grads_two) = results
    assert one["num_items"] == two["num_items"] and one["loss"] == pytest.approx(two["loss"], abs=1e-6)
    assert one["entropy"] == pytest.approx(two["entropy"], abs=1e-5)
    for a, b in zip(grads_one, grads_two):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_distillation_runs_without_deepspeed_installed(distill_recipe, monkeypatch):
    """deepspeed is an optional dependency: the teacher's lm-head is gathered only where ZeRO-3
    partitioned it, and nothing imports deepspeed otherwise (it did, and every run failed)."""
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` now raises, as when not installed
    DistillTrainer.from_recipe(distill_recipe(train={"max_steps": 1})).fit()


def test_a_teacher_with_another_tokenizer_is_refused(distill_recipe, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.models.tiny import resolve

    source = resolve("builtin:tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.add_tokens(["<|not-in-the-student|>"])
    other = tmp_path / "other-teacher"
    AutoModelForCausalLM.from_pretrained(source).save_pretrained(other)
    tokenizer.save_pretrained(other)
    with pytest.raises(AlignError, match=r"distill\.teacher_model: .*different tokenizer"):
        DistillTrainer.from_recipe(distill_recipe(distill={"teacher_model": str(other)}))


def test_recipe_checks(distill_recipe):
    with pytest.raises(AlignError, match=r"distill\.teacher_model: required key is missing"):
        _recipe_without_teacher(distill_recipe)
    with pytest.raises(AlignError, match="beta applies to divergence: generalized_jsd only"):
        distill_recipe(distill={"beta": 0.9})
    recipe = distill_recipe(distill={"divergence": "generalized_jsd", "beta": 0.25})
    assert recipe.distill.beta == 0.25


def _recipe_without_teacher(distill_recipe):
    from align.config import recipe_from_dict

    raw = distill_recipe(raw=True)
    del raw["distill"]["teacher_model"]
    return recipe_from_dict(raw)


# ---- (3) learning -------------------------------------------------------------------------------

def teacher_style_nll(trainer, groups) -> tuple[float, float]:
    """(student, teacher) mean NLL per token of the fixed completions `groups`."""
    with torch.no_grad(), trainer.policy.eval_mode():
        batch = trainer._to_device(trainer.collate(groups))
        out = trainer.policy.distill(batch, None, 1.0, 1.0)
        mask = batch["labels"] != -100
        return -out.student_logps[mask].mean().item(), -out.teacher_logps[mask].mean().item()


@pytest.mark.usefixtures("arith_builtin")
def test_student_closes_half_the_gap_to_the_teacher(distill_recipe, tmp_path):
    """Teacher builtin:tiny-llama-arith (SFT-trained on the arithmetic task), student the randomly
    initialised builtin:tiny-llama (same tokenizer). 100 steps of on-policy reverse KL close at least
    half of the gap on two held-out measures: the reverse KL on the student's own samples (the
    teacher's is 0) and the NLL of completions the teacher sampled for held-out prompts (minus the
    teacher's own NLL). The same run at lr 1e-12 (the control) closes neither."""
    def run(lr: float, name: str) -> dict[str, float]:
        recipe = distill_recipe(rows=prompt_rows(512, seed=31), eval_rows=prompt_rows(32, seed=32),
                                output_dir=str(tmp_path / name),
                                train={"batch_size": 32, "lr": lr, "max_steps": 100},
                                distill={"teacher_model": "builtin:tiny-llama-arith",
                                         "sampling": {"max_new_tokens": 16}})
        trainer = DistillTrainer.from_recipe(recipe)
        rows = [trainer.eval_data[i] for i in range(len(trainer.eval_data))]
        engine = make_engine("prefix_shared", trainer.policy.teacher, trainer.policy.tokenizer)
        rollout = engine.generate([r["prompt_ids"] for r in rows], SamplingParams(max_new_tokens=16, seed=123), 1)
        groups = trainer.build_groups(rows, rollout)
        before = {"kl": trainer.evaluate()["eval/loss"], "nll": teacher_style_nll(trainer, groups)}
        trainer.fit()
        after = {"kl": trainer.evaluate()["eval/loss"], "nll": teacher_style_nll(trainer, groups)}
        teacher_nll = before["nll"][1]
        closed = {"kl": 1 - after["kl"] / before["kl"],
                  "nll": 1 - (after["nll"][0] - teacher_nll) / (before["nll"][0] - teacher_nll)}
        print(f"{name}: held-out reverse KL {before['kl']:.3f} -> {after['kl']:.3f} (teacher 0); NLL of teacher "
              f"samples {before['nll'][0]:.3f} -> {after['nll'][0]:.3f} (teacher {teacher_nll:.3f}); gap closed "
              f"{closed['kl']:.0%} / {closed['nll']:.0%}")
        return closed

    distilled = run(3e-3, "distilled")
    assert distilled["kl"] >= 0.5 and distilled["nll"] >= 0.5, distilled
    control = run(1e-12, "control")
    assert abs(control["kl"]) < 0.1 and abs(control["nll"]) < 0.1, control


@pytest.mark.parametrize("beta, blocks", [(1.0, 5.3), (0.0, 6.3), (0.5, 8.3)])
def test_a_chunk_holds_the_blocks_its_gpu_size_allows_for(beta, blocks):
    """The [chunk, V] float32 blocks a distillation chunk holds at once (student and teacher logits,
    log-softmaxes, the divergence's terms, the gradient): at most `CHUNK_BLOCKS` (the generalized
    JSD's), which sizes its chunks on a GPU. A soft-capped teacher adds none (it makes no gradient:
    its soft-cap's derivative is not computed); a soft-capped student's derivative adds one, except
    where no gradient is made (evaluation)."""
    from align.ops.distill import CHUNK_BLOCKS
    from tests.test_logprobs import _LiveBytes

    torch.manual_seed(0)
    tokens, vocab, chunk = 1024, 50_000, 256
    block = chunk * vocab * 4
    head, teacher_head = torch.nn.Linear(16, vocab, bias=False), torch.nn.Linear(16, vocab, bias=False)
    hidden, teacher_hidden = torch.randn(1, tokens, 16, requires_grad=True), torch.randn(1, tokens, 16)
    labels = torch.randint(0, vocab, (1, tokens))
    capped = LogitTransform(softcap=30.0)
    peaks = {}
    for name, transforms in {"plain": (None, None), "capped teacher": (None, capped), "capped student": (capped, None)}.items():
        with _LiveBytes() as live:
            chunked_divergence(hidden, head, teacher_hidden, teacher_head, labels, beta=beta, chunk_size=chunk,
                               transform=transforms[0], teacher_transform=transforms[1])
        peaks[name] = live.peak / block
    with _LiveBytes() as live, torch.no_grad():
        chunked_divergence(hidden, head, teacher_hidden, teacher_head, labels, beta=beta, chunk_size=chunk,
                           transform=capped)
    peaks["capped student, no gradient"] = live.peak / block
    assert peaks["plain"] < blocks <= CHUNK_BLOCKS + 0.3 and peaks["capped teacher"] < blocks, peaks
    assert blocks < peaks["capped student"] < blocks + 1 and peaks["capped student, no gradient"] < blocks, peaks


def test_a_student_with_more_lm_head_rows_than_the_teacher_is_refused(distill_recipe, tmp_path):
    """It sampled ids from its padded rows that the teacher cannot score: an IndexError traceback."""
    from transformers import AutoModelForCausalLM

    from align.models.loading import load_tokenizer
    from align.models.tiny import resolve
    from align.config import ModelConfig

    student = AutoModelForCausalLM.from_pretrained(resolve("builtin:tiny-llama"))
    student.resize_token_embeddings(640)
    student.save_pretrained(tmp_path / "student")
    load_tokenizer(ModelConfig(name_or_path="builtin:tiny-llama")).save_pretrained(tmp_path / "student")
    recipe = distill_recipe(model={"name_or_path": str(tmp_path / "student")},
                            distill={"teacher_model": "builtin:tiny-llama"})
    with pytest.raises(AlignError, match="the student's lm-head has 640 rows, more than the teacher's"):
        DistillTrainer.build_policy(recipe)
