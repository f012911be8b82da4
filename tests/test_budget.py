"""train.micro_batch_tokens: a step's items regrouped into micro-batches under a token budget,
with the update of the plain grouping."""

import json
import random
from types import SimpleNamespace

import pytest
import torch

import align.distributed
from align.config import recipe_from_dict
from align.data.budget import budget_groups
from align.toy import preference_rows, prompt_rows
from align.trainers import DPOTrainer, GRPOTrainer, SFTTrainer
from align.errors import AlignError
from align.trainers.kto import KTOTrainer
from align.trainers.reward import RewardTrainer
from tests.test_kto import labelled_rows


@pytest.mark.parametrize("seed", range(6))
def test_budget_groups_cover_every_item_once_within_both_caps(seed):
    rng = random.Random(seed)
    sizes = [rng.randint(1, 400) for _ in range(rng.randint(1, 40))]
    per_batch, max_tokens = rng.randint(1, 8), rng.randint(200, 1200)
    groups = budget_groups(sizes, per_batch, max_tokens)
    assert sorted(i for group in groups for i in group) == list(range(len(sizes)))
    for group in groups:
        assert len(group) <= per_batch and group == sorted(group)
        assert sum(sizes[i] for i in group) <= max_tokens or len(group) == 1
    assert [group[0] for group in groups] == sorted(group[0] for group in groups)
    assert groups == budget_groups(list(sizes), per_batch, max_tokens)  # a pure function of its inputs


def test_budget_groups_spread_a_step_evenly_and_give_an_overlong_item_its_own_group():
    # in order, 4 at a time: 40 + 40 + 40 + 40 = 160 tokens, then 5 + 5 + 5 + 5 = 20; balanced: 90 and 90
    sizes = [40, 40, 40, 40, 5, 5, 5, 5]
    assert budget_groups(sizes, 4, 1000) == [[0, 2, 4, 6], [1, 3, 5, 7]]  # 90 and 90
    assert budget_groups(sizes, 8, 100) == [[0, 2, 4, 6], [1, 3, 5, 7]]  # the budget, not the count, binds
    assert budget_groups(sizes, 8, 60) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert budget_groups([10, 500, 10], 4, 100) == [[0, 2], [1]]
    assert budget_groups([], 4, 100) == []
    with pytest.raises(ValueError):
        budget_groups([1], 0, 100)


# ---- every trainer counts what its collator packs --------------------------------------------------
def trainers(make_recipe):
    lora = {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
    yield SFTTrainer.from_recipe(make_recipe(train={"batch_size": 4, "grad_accum": 2}))
    for shared in (True, False):
        yield DPOTrainer.from_recipe(make_recipe(algorithm="dpo", rows=preference_rows(16, seed=1), adapter=lora,
                                                 dpo={"shared_prompt": shared}))
    yield RewardTrainer.from_recipe(make_recipe(algorithm="reward", rows=preference_rows(16, seed=1),
                                                reward={"shared_prompt": False}))
    yield KTOTrainer.from_recipe(make_recipe(algorithm="kto", rows=labelled_rows(16, seed=2), adapter=lora))
    for shared in (True, False):
        yield GRPOTrainer.from_recipe(make_recipe(
            algorithm="grpo", rows=prompt_rows(8, seed=3), adapter=lora, data={"max_length": 64},
            train={"batch_size": 8}, grpo={"group_size": 4, "shared_prompt": shared, "sampling": {"max_new_tokens": 8},
                                           "rewards": [{"fn": "exact_answer"}]}))


def test_item_tokens_count_the_tokens_the_collator_packs(make_recipe):
    seen = set()
    for trainer in trainers(make_recipe):
        seen.add(type(trainer).__name__)
        if isinstance(trainer, GRPOTrainer):
            trainer.micro_batches(0)  # samples the round
            items = trainer.experience["groups"]
        else:
            items = [trainer.train_data[i] for i in range(4)]
        for item in items:
            batch = trainer.collate([item])
            packed = int(batch["num_tokens"]) + (batch["kl_input_ids"].numel() if "kl_input_ids" in batch else 0)
            assert trainer.item_tokens(item) == packed, type(trainer).__name__
    assert seen == {"SFTTrainer", "DPOTrainer", "RewardTrainer", "KTOTrainer", "GRPOTrainer"}


# ---- the same update, smaller micro-batches ---------------------------------------------------------
def step_gradients(trainer):
    batches = trainer.micro_batches(0)
    trainer.accumulate_gradients(batches)
    return batches, {n: p.grad.clone() for n, p in trainer.policy.module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("algorithm", ["sft", "dpo"])
def test_a_token_budget_gives_the_same_gradients_from_smaller_micro_batches(make_recipe, algorithm):
    extra = dict(algorithm="dpo", rows=preference_rows(32, seed=4), dpo={"precompute_reference": False},
                 adapter={"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0}) if algorithm == "dpo" else {}
    trainer_class = DPOTrainer if algorithm == "dpo" else SFTTrainer
    plain, grads = step_gradients(trainer_class.from_recipe(make_recipe(train={"batch_size": 8, "grad_accum": 2},
                                                                        **extra)))
    largest = max(int(b["num_tokens"]) for b in plain)
    budget = largest // 2
    budgeted, budget_grads = step_gradients(trainer_class.from_recipe(make_recipe(
        train={"batch_size": 8, "grad_accum": 2, "micro_batch_tokens": budget}, **extra)))
    assert len(budgeted) > len(plain)
    assert max(int(b["num_tokens"]) for b in budgeted) <= budget
    assert sum(int(b["num_tokens"]) for b in budgeted) == sum(int(b["num_tokens"]) for b in plain)
    assert grads.keys() == budget_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(budget_grads[name], grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_under_lockstep_every_process_runs_as_many_micro_batches(make_recipe, monkeypatch):
    """fsdp and ZeRO need the same number of forwards on every process: each process groups every
    process's share under the budget and pads to the busiest."""
    trainer = SFTTrainer.from_recipe(make_recipe(train={"batch_size": 4, "micro_batch_tokens": 100}))
    trainer.lockstep = True
    by_length = sorted((trainer.train_data[i] for i in range(24)), key=lambda item: -len(item["input_ids"]))
    longest, rest = by_length[:8], by_length[8:]
    items = [x for k in range(8) for x in (longest[k], rest[2 * k], rest[2 * k + 1])]  # process 0: the longest
    counts, trained = [], []
    for rank in range(3):
        monkeypatch.setattr(align.distributed, "PartialState", lambda rank=rank: SimpleNamespace(
            process_index=rank, num_processes=3))
        batches = trainer.share_micro_batches(items, 4)
        counts.append(len(batches))
        trained.append(sum(int(b["num_tokens"]) for b in batches if not b.get("padding")))
        assert max(int(b["num_tokens"]) for b in batches) <= 100
    assert len(set(counts)) == 1 and counts[0] > 24 // 3 // 4
    assert sum(trained) == sum(len(item["input_ids"]) for item in items)


def test_a_per_micro_batch_loss_norm_is_refused_under_a_budget(make_recipe):
    """bnpo averages over each micro-batch's own tokens: regrouping would change the update."""
    from align.trainers.grpo import GRPOTrainer as Trainer

    recipe = make_recipe(algorithm="grpo", rows=prompt_rows(8, seed=3), train={"batch_size": 8, "micro_batch_tokens": 64},
                         grpo={"group_size": 4, "loss_norm": "bnpo", "rewards": [{"fn": "exact_answer"}]})
    with pytest.raises(AlignError, match="grpo.loss_norm: bnpo averages over each micro-batch"):
        Trainer.check_recipe(recipe)
    Trainer.check_recipe(recipe.model_copy(update={"grpo": recipe.grpo.model_copy(update={"loss_norm": "dapo"})}))


@pytest.mark.parametrize("loss_norm", ["dapo", "grpo", "dr_grpo"])
def test_grpo_under_a_token_budget_gives_the_same_gradients(make_recipe, arith_builtin, loss_norm):
    def step(**train):
        torch.manual_seed(0)
        trainer = GRPOTrainer.from_recipe(make_recipe(
            algorithm="grpo", rows=prompt_rows(8, seed=3), model={"name_or_path": arith_builtin, "dtype": "float32"},
            adapter={"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            data={"max_length": 64}, train={"batch_size": 8, "grad_accum": 2, **train},
            grpo={"group_size": 4, "loss_norm": loss_norm, "sampling": {"max_new_tokens": 32},
                  "rewards": [{"fn": "exact_answer"}]}))
        return step_gradients(trainer)

    plain, grads = step()
    budgeted, budget_grads = step(micro_batch_tokens=max(int(b["num_tokens"]) for b in plain) // 2)
    assert len(budgeted) > len(plain) and any(g.abs().sum() > 0 for g in grads.values())  # rewards that differ
    for name in grads:
        torch.testing.assert_close(budget_grads[name], grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_a_run_resumed_under_a_token_budget_continues_as_the_uninterrupted_run(make_recipe, tmp_path):
    """The budget changes a step's memory, not its numbers: a run may resume with it (e.g. after
    running out of memory)."""
    raw = make_recipe(raw=True, train={"max_steps": 4, "save_every": 2, "log_every": 1, "grad_accum": 2})
    SFTTrainer.from_recipe(recipe_from_dict(raw)).fit()
    uninterrupted = losses(tmp_path / "run")
    raw["train"]["resume_from"] = str(tmp_path / "run" / "checkpoints" / "step-000002")
    raw["train"]["micro_batch_tokens"] = 100
    resumed_trainer = SFTTrainer.from_recipe(recipe_from_dict(raw))
    assert len(resumed_trainer.micro_batches(2)) > 2  # the budget regroups the step's 2 micro-batches
    resumed_trainer.fit()
    resumed = losses(tmp_path / "run")[-2:]
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(uninterrupted[2:], resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def losses(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if "loss" in r]
