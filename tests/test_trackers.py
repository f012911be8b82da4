"""Trackers (train.report_to) and the richer evaluations: SFT perplexity, GRPO/PPO sampled reward and
samples.jsonl."""

import importlib.util
import json
import math
import subprocess
import sys

import pytest
import yaml

from align.cli import main
from align.errors import AlignError
from align.toy import chat_rows, prompt_rows
from align.trainers import GRPOTrainer, PPOTrainer, SFTTrainer
from align.trainers.callbacks import Trackers


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def tiny_sft(make_recipe, **train):
    return make_recipe(eval_rows=chat_rows(4, seed=9), train={"max_steps": 2, "batch_size": 2, **train})


# ---- configuration --------------------------------------------------------------------------------
def test_report_to_defaults_to_nothing_and_names_known_trackers(make_recipe):
    assert make_recipe().train.report_to == []
    with pytest.raises(AlignError, match="report_to"):
        make_recipe(train={"report_to": ["tensorbord"]})
    with pytest.raises(AlignError, match="eval_samples"):
        make_recipe(train={"eval_samples": -1})


def test_no_tracker_package_is_imported_without_report_to():
    code = ("import sys, align.trainers, align.cli; "
            "print(sorted(m for m in ('tensorboard', 'wandb', 'mlflow', 'trackio', 'tensorboardX') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_a_missing_tracker_package_fails_at_construction_with_exit_2(make_recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(Trackers.PACKAGES, "tensorboard", ("align_no_such_tracker_package",))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_sft(make_recipe, report_to=["tensorboard"]).model_dump(mode="json")))
    assert main(["train", str(recipe)]) == 2
    assert "pip install align_no_such_tracker_package" in capsys.readouterr().err
    assert not (tmp_path / "run" / "model.safetensors").exists()


# ---- trackers -------------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_gets_the_records_of_metrics_jsonl(make_recipe, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = SFTTrainer.from_recipe(tiny_sft(make_recipe, report_to=["tensorboard"]))
    trainer.fit()
    records = {r["step"]: r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r}
    events = EventAccumulator(str(tmp_path / "run" / "trackers" / trainer.run_id))
    events.Reload()
    losses = {e.step: e.value for e in events.Scalars("loss")}
    assert sorted(losses) == [1, 2]
    for step in (1, 2):
        assert losses[step] == pytest.approx(records[step]["loss"], rel=1e-6)
    assert "eval/perplexity" in events.Tags()["scalars"]


def _offline_run(make_recipe, name):
    trainer = SFTTrainer.from_recipe(tiny_sft(make_recipe, report_to=[name]))
    trainer.fit()
    return trainer


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline(make_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _offline_run(make_recipe, "wandb")
    assert list((tmp_path / "run" / "trackers").rglob("*.wandb"))


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed")
def test_mlflow_offline(make_recipe, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # then Align logs to OUTPUT_DIR/trackers/mlruns
    _offline_run(make_recipe, "mlflow")
    assert list((tmp_path / "run" / "trackers" / "mlruns").rglob("loss"))


@pytest.mark.skipif(importlib.util.find_spec("trackio") is None, reason="trackio is not installed")
def test_trackio_offline(make_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    _offline_run(make_recipe, "trackio")


# ---- evaluation -----------------------------------------------------------------------------------
def test_sft_eval_reports_perplexity_as_exp_of_the_token_mean_loss(make_recipe):
    trainer = SFTTrainer.from_recipe(tiny_sft(make_recipe))
    metrics = trainer.evaluate()
    assert metrics["eval/perplexity"] == pytest.approx(math.exp(metrics["eval/loss"]), rel=1e-12)
    assert 1.0 < metrics["eval/perplexity"] < trainer.policy.tokenizer.vocab_size * 10


def online_recipe(make_recipe, algorithm, **train):
    """An untrained tiny model (the arithmetic one is trained once per session: minutes on a busy
    machine); the length penalty makes rewards vary between completions."""
    section = {"sampling": {"max_new_tokens": 12},
               "rewards": [{"fn": "exact_answer"}, {"fn": "length_penalty", "kwargs": {"target": 4}}]}
    if algorithm == "grpo":
        section["group_size"] = 4
    return make_recipe(algorithm=algorithm, rows=prompt_rows(16, seed=21), eval_rows=prompt_rows(6, seed=22),
                       model={"name_or_path": "builtin:tiny-llama", "dtype": "float32"},
                       adapter={"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.0}, data={"max_length": 64},
                       train={"batch_size": 8, "max_steps": 1, **train}, **{algorithm: section})


def test_grpo_eval_reports_the_sampled_reward_and_writes_samples(make_recipe, tmp_path):
    trainer = GRPOTrainer.from_recipe(online_recipe(make_recipe, "grpo", eval_samples=2, eval_at_start=True))
    trainer.fit()
    evals = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "eval/reward" in r]
    assert [r["step"] for r in evals] == [0, 1]
    for record in evals:
        assert {"eval/reward_sampled", "eval/rewards/exact_answer/mean_sampled",
                "eval/rewards/length_penalty/mean_sampled"} <= set(record)
        assert record["eval/rewards/length_penalty/mean_sampled"] <= 0.0
    samples = read_jsonl(tmp_path / "run" / "samples.jsonl")
    assert [s["step"] for s in samples] == [0] * 4 + [1] * 4
    assert all(set(s) >= {"step", "prompt", "completion", "rewards"}
               and set(s["rewards"]) == {"exact_answer", "length_penalty"} for s in samples)
    assert samples[0]["prompt"] == json.loads((tmp_path / "eval.jsonl").read_text().splitlines()[0])["prompt"]


def test_eval_sampling_is_seeded_and_eval_samples_0_skips_it(make_recipe, tmp_path):
    trainer = GRPOTrainer.from_recipe(online_recipe(make_recipe, "grpo", eval_samples=2))
    first, second = trainer.evaluate(), trainer.evaluate()
    assert first == second  # the same weights, the same eval draws
    assert not (tmp_path / "run").exists()  # outside fit nothing is written
    trainer.cfg.eval_samples = 0
    greedy = trainer.evaluate()
    assert "eval/reward_sampled" not in greedy and not any(k.endswith("_sampled") for k in greedy)
    assert greedy["eval/reward"] == first["eval/reward"]


def test_ppo_eval_reports_the_sampled_reward(make_recipe):
    trainer = PPOTrainer.from_recipe(online_recipe(make_recipe, "ppo", eval_samples=2))
    metrics = trainer.evaluate()
    assert {"eval/reward", "eval/reward_sampled", "eval/rewards/exact_answer/mean_sampled"} <= set(metrics)
