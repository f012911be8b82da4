"""GRPO: learns on the toy arithmetic task, trainer-level invariants, and bad input."""

import json
import shutil

import pytest
import torch

from align.data.groups import sequence_tokens
from align.errors import AlignError
from align.toy import prompt_rows
from align.trainers import GRPOTrainer

pytestmark = pytest.mark.usefixtures("arith_builtin")  # builtin:tiny-llama-arith, trained once

BUILTIN_ARITH = "builtin:tiny-llama-arith"


@pytest.fixture
def grpo_recipe(make_recipe):
    def make(rows=None, **sections):
        base = dict(algorithm="grpo", rows=rows or prompt_rows(64, seed=21), eval_rows=prompt_rows(48, seed=22),
                    model={"name_or_path": BUILTIN_ARITH, "dtype": "float32"},
                    adapter={"kind": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
                    data={"max_length": 64},
                    train={"batch_size": 16, "lr": 2e-3, "max_steps": 2},
                    grpo={"group_size": 8, "sampling": {"max_new_tokens": 32}, "rewards": [{"fn": "exact_answer"}]})
        for key, value in sections.items():
            base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
        return make_recipe(**base)
    return make


def test_grpo_raises_exact_answer_accuracy(grpo_recipe):
    trainer = GRPOTrainer.from_recipe(grpo_recipe(rows=prompt_rows(512, seed=23),
                                                  train={"batch_size": 64, "lr": 1e-3, "max_steps": 20}))
    before = trainer.evaluate()["eval/rewards/exact_answer/mean"]
    trainer.fit()
    after = trainer.evaluate()["eval/rewards/exact_answer/mean"]
    print(f"GRPO exact-answer accuracy (greedy, 48 held-out prompts): {before:.3f} -> {after:.3f}")
    assert after >= before + 0.1, (before, after)


def test_shared_prompt_and_separate_rows_give_the_same_loss_and_gradients(grpo_recipe):
    results = []
    for shared in (True, False):
        torch.manual_seed(0)
        trainer = GRPOTrainer.from_recipe(grpo_recipe(grpo={"shared_prompt": shared, "beta": 0.05,
                                                            "num_iterations": 2}))
        with torch.no_grad():  # policy != reference so the KL term has a gradient
            for p in trainer.policy.trainable_parameters():
                p.add_(0.01 * torch.randn_like(p, generator=torch.Generator().manual_seed(p.numel())))
        record = trainer.read_record(trainer.accumulate_gradients(trainer.micro_batches(0)))
        results.append((record["loss"], record["kl"], [p.grad.clone() for p in trainer.policy.trainable_parameters()]))
    (loss_a, kl_a, grads_a), (loss_b, kl_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, abs=1e-5) and kl_a == pytest.approx(kl_b, abs=1e-6)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("norm, beta", [("dapo", 0.0), ("grpo", 0.0), ("dr_grpo", 0.0), ("bnpo", 0.0),
                                        ("dapo", 0.05), ("grpo", 0.05)])
def test_on_policy_fast_path_equals_the_general_loss(grpo_recipe, norm, beta):
    """One iteration, with or without the KL term: the loss with its lm-head gradient made in the
    forward equals the surrogate of the plain token log-probs, in value, gradients and metrics."""
    trainer = GRPOTrainer.from_recipe(grpo_recipe(grpo={"loss_norm": norm, "beta": beta}))
    assert trainer.linear_in_logprobs
    batch = trainer.micro_batches(0)[0]  # the reference log-probs are taken before the policy moves
    with torch.no_grad():  # policy != reference, so the KL term has a gradient
        for p in trainer.policy.trainable_parameters():
            p.add_(0.02 * torch.randn_like(p, generator=torch.Generator().manual_seed(p.numel())))
    batch = trainer._to_device({**batch, "num_items": 123.0})
    params = list(trainer.policy.trainable_parameters())
    fast, fast_metrics = trainer.compute_loss(batch)
    packed = trainer.policy.logprobs(batch, trainer.logprob_temperature)
    plain, plain_metrics = trainer.surrogate(sequence_tokens(packed, batch["sequence_ids"], *batch["mask"].shape),
                                             batch)
    assert fast.item() == pytest.approx(plain.item(), abs=1e-6) and fast.requires_grad
    assert {k: v.item() for k, v in fast_metrics.items() if k != "entropy"} == pytest.approx(
        {k: v.item() for k, v in plain_metrics.items()}, rel=1e-5, abs=1e-7)  # kl ~1e-3: fp32 noise ~1e-8
    for a, b in zip(torch.autograd.grad(fast, params), torch.autograd.grad(plain, params)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


class SquaredLogprobGRPO(GRPOTrainer):
    """A subclass whose loss is not linear in the log-probs (it adds 0.1 * mean(logp^2))."""

    def surrogate(self, logps, batch):
        loss, metrics = super().surrogate(logps, batch)
        return loss + 0.1 * (logps ** 2 * batch["mask"]).sum() / batch["mask"].sum(), metrics


def test_a_subclass_overriding_the_surrogate_gets_its_true_gradient(grpo_recipe):
    """The fused path reads token weights off the built-in loss; a subclass's own surrogate trains by
    the plain path (before, its gradient came out ~26% off with the right value)."""
    trainer = SquaredLogprobGRPO.from_recipe(grpo_recipe())
    assert not trainer.linear_in_logprobs
    batch = trainer._to_device({**trainer.micro_batches(0)[0], "num_items": 123.0})
    params = list(trainer.policy.trainable_parameters())
    loss, _ = trainer.compute_loss(batch)
    packed = trainer.policy.logprobs(batch, trainer.logprob_temperature)
    plain, _ = trainer.surrogate(sequence_tokens(packed, batch["sequence_ids"], *batch["mask"].shape), batch)
    for a, b in zip(torch.autograd.grad(loss, params), torch.autograd.grad(plain, params)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_gradient_accumulation_equals_one_big_batch(grpo_recipe):
    grads = []
    for batch_size, accum in ((16, 1), (8, 2)):
        torch.manual_seed(0)
        trainer = GRPOTrainer.from_recipe(grpo_recipe(train={"batch_size": batch_size, "grad_accum": accum},
                                                      grpo={"loss_norm": "dapo"}))
        trainer.accumulate_gradients(trainer.micro_batches(0))
        grads.append(torch.cat([p.grad.flatten() for p in trainer.policy.trainable_parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_one_iteration_needs_no_old_logprob_forward(grpo_recipe):
    trainer = GRPOTrainer.from_recipe(grpo_recipe())
    groups = trainer.micro_batches(0)
    assert "old_logps" not in groups[0] and "ref_logps" not in groups[0]  # beta=0: no reference either
    assert trainer.policy.reference == "none"
    trainer = GRPOTrainer.from_recipe(grpo_recipe(grpo={"num_iterations": 2, "beta": 0.1}))
    assert {"old_logps", "ref_logps"} <= set(trainer.micro_batches(0)[0])


def _losses(run_dir) -> list[float]:
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return [r["loss"] for r in records if "loss" in r]


def test_resume_mid_round_continues_the_same_run(grpo_recipe, tmp_path):
    sections = dict(train={"max_steps": 4, "save_every": 1, "lr": 1e-3}, grpo={"num_iterations": 2})
    full = GRPOTrainer.from_recipe(grpo_recipe(**sections))
    full.fit()
    losses = _losses(full.output_dir)
    shutil.rmtree(full.output_dir / "checkpoints" / "step-000004")  # as if killed after the step-3 save
    resumed = GRPOTrainer.from_recipe(grpo_recipe(train={**sections["train"], "resume_from": "auto"},
                                                  grpo=sections["grpo"]))
    assert resumed.step == 0
    resumed.fit()
    again = _losses(resumed.output_dir)
    assert len(again) == 4 and again[3] == pytest.approx(losses[3], abs=1e-5)


def test_batch_size_must_hold_whole_groups(grpo_recipe):
    with pytest.raises(AlignError, match=r"train.batch_size=12 is not a multiple of grpo.group_size=8.*8 or 16"):
        GRPOTrainer.from_recipe(grpo_recipe(train={"batch_size": 12}))


def test_prompt_longer_than_allowed_names_the_row(grpo_recipe):
    rows = prompt_rows(8, seed=1)
    rows[5]["prompt"] = "What is 1 + 1? " * 40
    with pytest.raises(AlignError, match=r"data.train row 5: the prompt has \d+ tokens, more than "
                                         r"grpo.sampling.max_prompt_length=32"):
        GRPOTrainer.from_recipe(grpo_recipe(rows=rows, grpo={"sampling": {"max_prompt_length": 32}}))


def test_bad_reward_function_fails_before_training(grpo_recipe, tmp_path):
    bad = tmp_path / "bad_rewards.py"
    bad.write_text("def wrong_length(completions, **_):\n    return [1.0]\n")
    with pytest.raises(AlignError, match="wrong_length"):
        GRPOTrainer.from_recipe(grpo_recipe(grpo={"rewards": [{"fn": f"{bad}:wrong_length"}]}))


def test_completions_without_any_reward_are_left_out_of_the_group_statistics(grpo_recipe, monkeypatch):
    # as TRL: NaN reward, advantage 0, not counted in the group's mean/std nor in the reward metrics;
    # the completion stays in the loss (trained) with advantage 0, so it moves nothing but the KL term
    from align.rollout import Rollout

    trainer = GRPOTrainer.from_recipe(grpo_recipe())
    nan = float("nan")
    values = torch.tensor([1.0, 0.0, 1.0, 0.0, nan, nan, nan, nan] + [1.0, 1.0] + [nan] * 6)[:, None]

    def sample_and_score(rows, round_):
        completions = [[5, 6, 7]] * (len(rows) * 8)
        return Rollout([r["prompt_ids"] for r in rows], completions, [True] * len(completions), 8), values

    monkeypatch.setattr(trainer, "sample_and_score", sample_and_score)
    experience = trainer.make_experience(0)
    first, second = (g["advantages"] for g in experience["groups"])
    a = 0.5 / (torch.tensor([1.0, 0.0, 1.0, 0.0]).std().item() + 1e-4)
    torch.testing.assert_close(first, torch.tensor([a, -a, a, -a, 0.0, 0.0, 0.0, 0.0]))
    assert second.tolist() == [0.0] * 8 and all(all(g["trained"]) for g in experience["groups"])
    metrics, scored = experience["metrics"], torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    assert metrics["reward"] == pytest.approx(scored.mean().item())
    assert metrics["reward_std"] == pytest.approx(scored.std().item())
    assert metrics["frac_reward_zero_std"] == 0.5  # the second group's scored rewards are all 1
    assert metrics["rewards/total/none"] == 10 / 16


def _gspo_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "importance: sequence" in r.getMessage()]


def test_gspo_with_dapo_warns_once(grpo_recipe, caplog):
    from align.trainers import grpo

    grpo._warn_once.cache_clear()
    with caplog.at_level("WARNING", logger="align.trainers.grpo"):
        GRPOTrainer.from_recipe(grpo_recipe(grpo={"importance": "sequence", "loss_norm": "dapo"}))
    (message,) = _gspo_warnings(caplog)  # the recipe is checked twice while the trainer is built
    assert "grpo.loss_norm: dapo" in message and "grpo.loss_norm: grpo" in message


@pytest.mark.parametrize("importance, norm, warns", [("sequence", "bnpo", True), ("sequence", "dr_grpo", True),
                                                     ("sequence", "grpo", False), ("token", "dapo", False)])
def test_gspo_norm_warning_only_for_token_summing_norms(grpo_recipe, caplog, importance, norm, warns):
    from align.trainers import grpo

    grpo._warn_once.cache_clear()
    with caplog.at_level("WARNING", logger="align.trainers.grpo"):
        GRPOTrainer.check_recipe(grpo_recipe(grpo={"importance": importance, "loss_norm": norm}))
    assert len(_gspo_warnings(caplog)) == warns


@pytest.mark.parametrize("loss_norm", ["dapo", "grpo"])
def test_a_step_whose_every_completion_is_truncated_and_masked_trains_nothing(grpo_recipe, loss_norm):
    # mask_truncated with every completion cut at max_new_tokens (early in training, a short budget):
    # no token is trained, the loss and gradients are 0 (TRL clamps the count), not a ZeroDivisionError
    trainer = GRPOTrainer.from_recipe(grpo_recipe(train={"batch_size": 8, "max_steps": 1},
                                                  grpo={"mask_truncated": True, "loss_norm": loss_norm,
                                                        "sampling": {"max_new_tokens": 2}}))
    record = trainer.read_record(trainer.accumulate_gradients(trainer.micro_batches(0)))
    assert record["loss"] == 0.0
    if loss_norm == "dapo":  # (its items are trained tokens: none; the true count is logged, not the clamp)
        assert record["num_items"] == 0.0
    assert all(p.grad is None or not p.grad.any() for p in trainer.policy.trainable_parameters())
