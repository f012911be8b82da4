"""KTO (`algorithm: kto`): parity with TRL 1.16's KTOTrainer loss, a closed form, learning on the toy
task from unpaired rows, gradient accumulation, and bad input."""

import collections
import math
import types

import pytest
import torch

from align.errors import AlignError
from align.losses.kto import kl_reference_point, kl_sums, kto_loss
from align.toy import HEDGE, preference_rows, prompt_completion_rows
from align.trainers.kto import KTOTrainer


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# --- parity with TRL 1.16 ------------------------------------------------------------------------

def trl_kto(policy, ref, labels, policy_kl, ref_kl, beta, desirable_weight, undesirable_weight, loss_type):
    """TRL 1.16's `KTOTrainer._compute_loss` itself (trl/trainer/kto_trainer.py:1370-1563), run on a
    minimal stand-in for the trainer: one process, precomputed reference log-probs, and a "model"
    whose per-token log-probs put each row's sequence log-prob on its one completion token."""
    from trl import KTOTrainer as TRLKTOTrainer

    rows = len(labels)
    outputs = types.SimpleNamespace(log_probs=policy[:, None], entropy=torch.zeros(rows, 1),
                                    mean_logits=torch.zeros(rows, 1))
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
    fake = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=accelerator, precompute_ref_logps=True,
        calculate_KL=loss_type == "kto", loss_type=loss_type, beta=beta, desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight, aux_loss_enabled=False, _total_train_tokens=0, _tp_size=1,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        _compute_kl_logps=lambda model, batch: policy_kl if loss_type == "kto" else None)
    ones = torch.ones(rows, 2, dtype=torch.long)
    inputs = {"input_ids": ones, "attention_mask": ones,
              "completion_mask": torch.tensor([[0, 1]] * rows), "label": labels, "ref_logps": ref,
              "ref_KL_logps": ref_kl}
    loss = TRLKTOTrainer._compute_loss(fake, lambda **kwargs: outputs, inputs, False)
    return loss, {k: v[-1] for k, v in fake._metrics["train"].items()}


CASES = {  # labels, KL log-ratio shift (its sign decides whether z0 is clamped), weights, loss type
    "mixed": ([1, 0, 1, 1, 0, 0, 1, 0], 0.7, (1.0, 1.0), "kto"),
    "negative_kl_clamped": ([1, 0, 0, 1, 0, 1], -2.0, (1.0, 1.0), "kto"),
    "weighted_unbalanced": ([1, 0, 0, 0, 0, 1, 0], 0.3, (1.33, 0.6), "kto"),
    "all_desirable": ([1, 1, 1, 1], 1.1, (0.8, 1.0), "kto"),
    "apo_zero_unpaired": ([0, 1, 1, 0, 1], 0.0, (1.0, 1.2), "apo_zero_unpaired"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_metrics_match_trl_kto_trainer(case):
    pytest.importorskip("trl")
    labels, shift, (w_d, w_u), loss_type = CASES[case]
    g = torch.Generator().manual_seed(len(labels))
    rows, beta = len(labels), 0.3
    ref = -20 * torch.rand(rows, generator=g) - 5
    policy = (ref + 4 * torch.randn(rows, generator=g)).requires_grad_()
    ref_kl = -20 * torch.rand(rows, generator=g) - 5
    policy_kl = ref_kl + shift + torch.randn(rows, generator=g)
    label_tensor = torch.tensor(labels, dtype=torch.bool)

    z0 = kl_reference_point(kl_sums(policy_kl, ref_kl))
    ours, metrics = kto_loss(policy, ref, label_tensor, z0, beta, w_d, w_u, loss_type=loss_type)
    theirs, trl_metrics = trl_kto(policy, ref, label_tensor, policy_kl, ref_kl, beta, w_d, w_u, loss_type)

    assert abs(ours.item() - theirs.item()) < 1e-6
    for a, b in zip(torch.autograd.grad(ours, policy), torch.autograd.grad(theirs, policy)):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)
    if shift < 0:
        assert z0.item() == 0.0 and (policy_kl - ref_kl).mean() < 0  # clamped
    assert metrics["kl"].item() == pytest.approx(trl_metrics["kl"], abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        if key in trl_metrics:  # TRL logs none for a kind the batch lacks
            assert metrics[key].item() == pytest.approx(trl_metrics[key], abs=1e-5), key
    if "rewards/margins" in trl_metrics:
        assert metrics["rewards/margin"].item() == pytest.approx(trl_metrics["rewards/margins"], abs=1e-5)


# --- closed form ---------------------------------------------------------------------------------

def test_closed_form_normalization_clamp_and_gradient():
    beta, w_d, w_u = 0.5, 2.0, 1.0
    policy = torch.tensor([-1.0, -4.0], dtype=torch.float64, requires_grad=True)  # log-ratios +2 and -1
    ref = torch.tensor([-3.0, -3.0], dtype=torch.float64)
    labels = torch.tensor([True, False])
    z0 = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    loss, metrics = kto_loss(policy, ref, labels, z0, beta, w_d, w_u)
    desirable, undesirable = 1 - sigmoid(0.5 * (2 - 0.4)), 1 - sigmoid(0.5 * (0.4 + 1))
    assert loss.item() == pytest.approx((w_d * desirable + w_u * undesirable) / 2, abs=1e-12)
    # a share of a 4-row step: half of it
    assert kto_loss(policy, ref, labels, z0, beta, w_d, w_u, num_items=4)[0].item() == pytest.approx(loss.item() / 2)
    assert metrics["rewards/chosen"].item() == 1.0 and metrics["rewards/rejected"].item() == -0.5
    assert metrics["rewards/margin"].item() == 1.5 and metrics["kl"].item() == pytest.approx(0.4)
    loss.backward()  # d/dr (1 - sigmoid(b(r - z))) = -b s(1 - s); z0 gets no gradient
    s_d, s_u = sigmoid(0.8), sigmoid(0.7)
    torch.testing.assert_close(policy.grad, torch.tensor([-w_d * beta * s_d * (1 - s_d) / 2,
                                                          w_u * beta * s_u * (1 - s_u) / 2], dtype=torch.float64))
    assert z0.grad is None
    # a negative KL estimate is clamped to 0; the estimate is the mean log-ratio over all pairs
    negative = kto_loss(policy, ref, labels, -3.0, beta, w_d, w_u)[0]
    assert negative.item() == pytest.approx((w_d * (1 - sigmoid(1.0)) + w_u * (1 - sigmoid(0.5))) / 2)
    sums = kl_sums(torch.tensor([-2.0, -5.0]), torch.tensor([-3.0, -3.0])) + kl_sums(torch.tensor([-1.0]),
                                                                                       torch.tensor([-4.0]))
    assert kl_reference_point(sums).item() == pytest.approx((1 - 2 + 3) / 3)


# --- the trainer ---------------------------------------------------------------------------------

def labelled_rows(n: int, seed: int) -> list[dict]:
    """Unpaired toy rows: worked answers desirable, the hedge undesirable."""
    rows = prompt_completion_rows(n, seed=seed, hedged=0.5)
    return [{"prompt": r["prompt"], "completion": r["completion"], "label": r["completion"] != " " + HEDGE}
            for r in rows]


@pytest.fixture
def kto_recipe(make_recipe):
    def make(rows=None, eval_rows=None, **sections):
        base = dict(algorithm="kto", rows=rows or labelled_rows(48, seed=21),
                    eval_rows=labelled_rows(24, seed=22) if eval_rows is None else eval_rows or None,
                    adapter={"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.0})
        for key, value in sections.items():
            base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
        return make_recipe(**base)
    return make


def test_kto_raises_held_out_reward_margin_on_unpaired_rows(kto_recipe):
    # 21 desirable and 27 undesirable rows: desirable_weight within the range eq. 8 of the paper asks for
    trainer = KTOTrainer.from_recipe(kto_recipe(train={"max_steps": 8, "batch_size": 12, "lr": 5e-3},
                                                kto={"desirable_weight": 1.3}))
    before = trainer.evaluate()
    trainer.fit()
    after = trainer.evaluate()
    assert after["eval/loss"] < before["eval/loss"] - 0.05, (before, after)
    assert after["eval/rewards/margin"] > before["eval/rewards/margin"] + 0.5
    # the policy itself now favours the worked answers over the hedge, relative to where it started
    assert (after["eval/logps/chosen"] - after["eval/logps/rejected"]
            > before["eval/logps/chosen"] - before["eval/logps/rejected"] + 1.0)


def test_gradient_accumulation_2x2_equals_1x4_and_kl_pairs_stay_in_their_step(kto_recipe):
    results = []
    for batch_size, grad_accum in ((4, 1), (2, 2)):
        torch.manual_seed(0)  # the same LoRA init in both runs
        trainer = KTOTrainer.from_recipe(kto_recipe(rows=labelled_rows(12, seed=3), eval_rows=[],
                                                    train={"batch_size": batch_size, "grad_accum": grad_accum}))
        # the mismatched pair of each row is another row of its own step
        completions = trainer.train_data["completion_ids"]
        for rows in trainer._step_rows:
            assert {tuple(trainer.train_data[i]["kl_ids"]) for i in rows} == {tuple(completions[i]) for i in rows}
        # lower the reference's log-probs of the mismatched pairs so that z0 > 0 and shifts every row's loss
        trainer.train_data = trainer.train_data.map(lambda e: {"ref_logps": [e["ref_logps"][0], e["ref_logps"][1] - 3]})
        with torch.no_grad():  # policy != reference
            for p in trainer.policy.trainable_parameters():
                p.add_(0.01 * torch.randn_like(p, generator=torch.Generator().manual_seed(p.numel())))
        micro_batches = trainer.micro_batches(1)
        assert len(micro_batches) == grad_accum
        record = trainer.read_record(trainer.accumulate_gradients(micro_batches))
        grads = [p.grad.clone() for p in trainer.policy.trainable_parameters()]
        trainer.optimizer.step()
        results.append((record, grads, [p.detach().clone() for p in trainer.policy.trainable_parameters()]))
    (one, grads_one, weights_one), (two, grads_two, weights_two) = results
    assert one["kl"] > 2.0
    for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margin", "logps/chosen"):
        assert one[key] == pytest.approx(two[key], abs=1e-5), key
    for a, b in zip(grads_one, grads_two):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    for a, b in zip(weights_one, weights_two):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_paired_rows_are_split_and_precomputed_reference_equals_fresh(kto_recipe):
    recipe = kto_recipe(rows=preference_rows(6, seed=4), eval_rows=preference_rows(4, seed=5))
    cached = KTOTrainer.from_recipe(recipe)
    assert len(cached.train_data) == 12 and sum(cached.train_data["label"]) == 6
    assert cached.policy.reference == "none"  # freed once its log-probs are cached
    fresh = KTOTrainer.from_recipe(kto_recipe(rows=preference_rows(6, seed=4), eval_rows=preference_rows(4, seed=5),
                                              kto={"precompute_reference": False}))
    examples = [fresh.train_data[i] for i in range(len(fresh.train_data))]
    batch = fresh.collate(examples)
    from align.data.unpaired import kl_batch

    want = torch.stack([fresh.reference_sums(batch, 12), fresh.reference_sums(kl_batch(batch), 12)], -1)
    torch.testing.assert_close(torch.tensor(cached.train_data["ref_logps"]), want, atol=1e-5, rtol=1e-6)
    # the same loss either way (LoRA B starts at 0: policy == reference, so z0 = 0 and rewards are 0)
    own = cached.collate([cached.train_data[i] for i in range(len(cached.train_data))])
    assert cached.compute_loss(own)[0].item() == pytest.approx(
        fresh.compute_loss(batch)[0].item(), abs=1e-6)


def test_prompt_completion_rows_without_label_are_refused_naming_the_file(kto_recipe, tmp_path):
    rows = [{"prompt": "Q: 1 + 1?", "completion": " 2"}] * 4
    with pytest.raises(AlignError, match=r"data\.train: '.*train\.jsonl' has prompt/completion rows but no 'label' "
                                         r"column.*add \"label\": true"):
        KTOTrainer.from_recipe(kto_recipe(rows=rows))
    bad = [{"prompt": "Q: 1 + 1?", "completion": " 2", "label": "yes"}] * 4
    with pytest.raises(AlignError, match=r"train\.jsonl' row 0: 'label' must be true or false, got 'yes'"):
        KTOTrainer.from_recipe(kto_recipe(rows=bad))
    with pytest.raises(AlignError, match="kto trains on prompt_completion / preference data"):
        KTOTrainer.from_recipe(kto_recipe(rows=[{"text": "hello"}] * 4))


@pytest.mark.parametrize("kto", [{}, {"precompute_reference": False}, {"loss_type": "apo_zero_unpaired"}])
def test_a_step_reads_the_host_only_when_it_logs(kto_recipe, kto):
    """As tests/test_host_syncs.py checks the other trainers: the KL pre-pass, its all-reduce and the
    metric rescaling wait for nothing; a log step reads once (the stacked record)."""
    from tests.host_reads import HostReads

    trainer = KTOTrainer.from_recipe(kto_recipe(rows=labelled_rows(16, seed=5), eval_rows=[], kto=kto,
                                                train={"batch_size": 2, "grad_accum": 2, "log_every": 1000}))
    trainer.output_dir.mkdir(parents=True, exist_ok=True)
    for cb in trainer.callbacks:
        cb.on_train_begin(trainer)
    found = []
    for logged in (False, True):
        batches = trainer.micro_batches(trainer.step)
        host = [v for b in batches for v in b.values() if isinstance(v, torch.Tensor)]
        with HostReads(host) as reads:
            record = trainer.train_step(batches)
            trainer.step += 1
            if logged:
                trainer.log(record)
        found.append(reads.count)
    assert found == [0, 1], found


def test_metrics_of_a_kind_no_row_measured_are_left_out_of_the_record(kto_recipe):
    """A step (or an eval split) of desirable rows only has no rejected rewards: TRL leaves them out; a
    0 (and a margin equal to rewards/chosen) would be drawn as measured."""
    from align.plot import read_metrics

    rows = labelled_rows(48, seed=21)
    desirable = [r for r in rows if r["label"]]
    trainer = KTOTrainer.from_recipe(kto_recipe(rows=desirable[:8], eval_rows=desirable[:6],
                                                train={"batch_size": 4, "max_steps": 2, "eval_every": 2}))
    trainer.fit()
    records = read_metrics(trainer.output_dir)
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 2 and all("rewards/chosen" in r and "logps/chosen" in r for r in steps), steps
    assert not any({"rewards/rejected", "logps/rejected", "rewards/margin"} & set(r) for r in steps), steps
    evaluation = records[-1]
    assert "eval/rewards/chosen" in evaluation and "eval/logps/chosen" in evaluation
    assert not {"eval/rewards/rejected", "eval/logps/rejected", "eval/rewards/margin"} & set(evaluation), evaluation
