import logging

import pytest
import torch

from align.data.preference import pair_sums
from align.errors import AlignError
from align.toy import preference_rows
from align.trainers import DPOTrainer


@pytest.fixture
def dpo_recipe(make_recipe):
    def make(rows=None, **sections):
        base = dict(algorithm="dpo", rows=rows or preference_rows(64, seed=11), eval_rows=preference_rows(32, seed=12),
                    adapter={"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.0})
        for key, value in sections.items():
            base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
        return make_recipe(**base)
    return make


def test_dpo_raises_held_out_preference_accuracy_and_moves_greedy_answers(dpo_recipe):
    trainer = DPOTrainer.from_recipe(dpo_recipe(train={"max_steps": 24, "batch_size": 16, "lr": 5e-3}))
    before = trainer.evaluate()
    record = trainer.fit()
    after = trainer.evaluate()
    assert after["eval/rewards/accuracy"] >= 0.9, after
    assert after["eval/rewards/margin"] > before["eval/rewards/margin"] + 0.5
    assert after["eval/loss"] < before["eval/loss"] - 0.3
    # the policy now prefers the chosen style: chosen log-prob margin over rejected rises
    assert after["eval/logps/chosen"] - after["eval/logps/rejected"] > before["eval/logps/chosen"] - before["eval/logps/rejected"]
    assert record["rewards/accuracy"] >= 0.9


@pytest.mark.parametrize("loss_type,extra", [("ipo", {}), ("hinge", {}), ("robust", {"label_smoothing": 0.1}),
                                             ("sigmoid", {"label_smoothing": 0.1, "rpo_alpha": 0.5})])
def test_every_loss_type_trains(dpo_recipe, loss_type, extra):
    trainer = DPOTrainer.from_recipe(dpo_recipe(dpo={"loss_type": loss_type, **extra},
                                                train={"max_steps": 8, "batch_size": 16, "lr": 5e-3}))
    before = trainer.evaluate()["eval/rewards/margin"]
    trainer.fit()
    assert trainer.evaluate()["eval/rewards/margin"] > before


@pytest.mark.parametrize("adapter", ["lora", "none"])
def test_cached_reference_logps_equal_fresh_ones_and_are_reused(dpo_recipe, caplog, adapter, tmp_path, monkeypatch):
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "fresh-cache"))
    recipe = dpo_recipe(adapter={"kind": adapter})
    cached = DPOTrainer.from_recipe(recipe)
    assert "computed and cached" in caplog.text and cached.policy.reference == "none"
    fresh = DPOTrainer.from_recipe(dpo_recipe(adapter={"kind": adapter}, dpo={"precompute_reference": False}))
    examples = [fresh.train_data[i] for i in range(len(fresh.train_data))]
    batch = fresh.collate(examples)
    want = torch.stack(pair_sums(fresh.policy.reference_logprobs(batch), batch["sequence_ids"], len(examples)), -1)
    got = torch.tensor(cached.train_data["ref_logps"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)  # sums of ~100 float32 terms
    caplog.clear()
    DPOTrainer.from_recipe(recipe)
    assert "reusing" in caplog.text and "computed and cached" not in caplog.text


def test_shared_prompt_and_two_row_dpo_give_the_same_loss_and_gradients(dpo_recipe):
    results = []
    for shared in (True, False):
        torch.manual_seed(0)  # the same LoRA init in both runs
        trainer = DPOTrainer.from_recipe(dpo_recipe(dpo={"shared_prompt": shared, "precompute_reference": False}))
        with torch.no_grad():  # make policy != reference so the loss has a gradient everywhere
            for p in trainer.policy.trainable_parameters():
                p.add_(0.01 * torch.randn_like(p, generator=torch.Generator().manual_seed(p.numel())))
        record = trainer.read_record(trainer.accumulate_gradients(trainer.micro_batches(0)))
        results.append((record["loss"], [p.grad.clone() for p in trainer.policy.trainable_parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_identical_pairs_are_warned_and_counted(dpo_recipe, caplog):
    rows = preference_rows(8, seed=3)
    rows[2]["rejected"] = rows[2]["chosen"]
    DPOTrainer.from_recipe(dpo_recipe(rows=rows))
    assert "1 pairs have chosen identical to rejected (first: row 2)" in caplog.text
    with pytest.raises(AlignError, match="in every pair chosen is identical to rejected"):  # (only warned)
        DPOTrainer.from_recipe(dpo_recipe(rows=[dict(row, rejected=row["chosen"]) for row in rows]))


def test_missing_columns_and_foreign_reference_tokenizer(dpo_recipe, tmp_path):
    with pytest.raises(AlignError, match="dpo trains on preference data.*looks like 'prompt_completion'"):
        DPOTrainer.from_recipe(dpo_recipe(rows=[{"prompt": "a", "completion": "b"}]))
    from align.models.tiny import build_model, build_tokenizer

    other = build_tokenizer(["completely different text for another vocabulary"], 300)
    build_model("tiny-llama", other).save_pretrained(tmp_path / "other")
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(AlignError, match="dpo.reference_model: .* has a different tokenizer"):
        DPOTrainer.from_recipe(dpo_recipe(dpo={"reference_model": str(tmp_path / "other")}))
    build_model("tiny-llama", other).save_pretrained(tmp_path / "weights-only")  # (no tokenizer: it was named model.tokenizer)
    with pytest.raises(AlignError, match=r"dpo.reference_model: '.*weights-only' holds no tokenizer that loads, "
                                         r"so Align cannot check that it scores the policy's tokens; save"):
        DPOTrainer.from_recipe(dpo_recipe(dpo={"reference_model": str(tmp_path / "weights-only")}))


# ---- a pair's own label smoothing (ties `align label` keeps) ---------------------------------------
def smoothed_rows():
    rows = preference_rows(8, seed=3)
    for i, row in enumerate(rows):
        if i % 2:
            row["label_smoothing"] = 0.5  # a tie
    return rows


def test_a_pairs_own_label_smoothing_is_its_cdpo_flip_rate(make_recipe):
    lora = {"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.0}
    trainer = DPOTrainer.from_recipe(make_recipe(algorithm="dpo", rows=smoothed_rows(), adapter=lora,
                                                 dpo={"beta": 0.5, "label_smoothing": 0.1}, train={"batch_size": 8}))
    torch.manual_seed(0)
    for name, param in trainer.policy.model.named_parameters():
        if "lora_B" in name:  # the policy moves away from the reference
            param.data.normal_(0.0, 0.05)
    batch = trainer._to_device(trainer.collate([trainer.train_data[i] for i in range(8)]))
    loss, _ = trainer.compute_loss({**batch, "num_items": 8.0})
    pairs = trainer.pair_logps(batch)
    h = ((pairs.chosen - pairs.ref_chosen) - (pairs.rejected - pairs.ref_rejected)).detach().double()
    eps = torch.tensor([0.1, 0.5] * 4, dtype=torch.float64)
    expected = (-(1 - eps) * torch.nn.functional.logsigmoid(0.5 * h)
                - eps * torch.nn.functional.logsigmoid(-0.5 * h)).sum() / 8
    assert h.abs().min() > 1e-3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    uniform = (-(0.9) * torch.nn.functional.logsigmoid(0.5 * h) - 0.1 * torch.nn.functional.logsigmoid(-0.5 * h)).sum() / 8
    assert abs(loss.item() - uniform.item()) > 1e-4  # the ties' 0.5 counted


@pytest.mark.parametrize("algorithm, section", [("reward", {}), ("dpo", {"dpo": {"loss_type": "ipo"}})])
def test_losses_without_per_pair_smoothing_refuse_such_rows(make_recipe, algorithm, section):
    from align.trainers import TRAINERS

    recipe = make_recipe(algorithm=algorithm, rows=smoothed_rows(), **section)
    with pytest.raises(AlignError, match="data.train row 1 has its own label_smoothing"):
        TRAINERS[algorithm].from_recipe(recipe)


def test_a_label_smoothing_out_of_range_names_the_row(make_recipe):
    rows = preference_rows(4, seed=3)
    rows[2]["label_smoothing"] = 0.7
    with pytest.raises(AlignError, match="data.train row 2: label_smoothing must be a number in"):
        DPOTrainer.from_recipe(make_recipe(algorithm="dpo", rows=rows,
                                           adapter={"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.0}))
