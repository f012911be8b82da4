"""Trackers (train.report_to) and the richer evaluations: SFT perplexity, GRPO/PPO sampled reward and
samples.jsonl (every generative trainer)."""

import importlib.util
import json
import math
import subprocess
import sys

import pytest
import yaml

from align.cli import main
from align.errors import AlignError
from align.toy import chat_rows, preference_rows, prompt_completion_rows, prompt_rows, text_rows
from align.trainers import DPOTrainer, GRPOTrainer, PPOTrainer, RewardTrainer, SFTTrainer
from align.trainers.callbacks import Trackers
from align.trainers.samples import untrained_prefix


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
    texts = {event.step: event.tensor_proto.string_val[0].decode() for event in events.Tensors("eval/samples/text_summary")}
    samples = read_jsonl(tmp_path / "run" / "samples.jsonl")
    assert sorted(texts) == [2]  # the final evaluation's table
    assert texts[2].splitlines()[0] == "| prompt | completion |"
    assert len(texts[2].splitlines()) == 2 + len(samples)


def test_a_signal_stop_still_finishes_the_trackers(make_recipe, tmp_path):
    trainer = SFTTrainer.from_recipe(tiny_sft(make_recipe, report_to=["tensorboard"], max_steps=4))
    (tracker,) = [cb for cb in trainer.callbacks if isinstance(cb, Trackers)]
    finished = []
    trainer.callbacks.append(type("Watch", (), {"on_train_begin": lambda self, t: None, "on_log": lambda *a: None,
                                                "on_samples": lambda *a: None,
                                                "on_train_end": lambda self, t: finished.append(t.step)})())
    trainer._stop_signal = 15  # as SIGTERM's handler leaves it
    trainer.fit()
    assert trainer.stopped_by == "SIGTERM" and finished == [1] and tracker.trackers == []
    assert not (tmp_path / "run" / "model.safetensors").exists()  # stopped: a checkpoint, not the final model


def _offline_run(make_recipe, name):
    trainer = SFTTrainer.from_recipe(tiny_sft(make_recipe, report_to=[name]))
    trainer.fit()
    return trainer


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline(make_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _offline_run(make_recipe, "wandb")
    (events,) = (tmp_path / "run" / "trackers").rglob("*.wandb")
    assert b"eval/samples" in events.read_bytes()  # the samples table


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed")
def test_mlflow_offline(make_recipe, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # then Align logs under OUTPUT_DIR/trackers
    if importlib.util.find_spec("sqlalchemy") is None:
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow-skinny: the file store
    monkeypatch.chdir(tmp_path)
    trainer = _offline_run(make_recipe, "mlflow")
    client = mlflow.MlflowClient(Trackers.local_mlflow_uri(tmp_path / "run" / "trackers"))
    (run,) = client.search_runs([client.get_experiment_by_name("run").experiment_id])
    assert run.info.run_name == trainer.run_id
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    assert [f.path for f in client.list_artifacts(run.info.run_id, "samples")] == ["samples/step_000002.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.jsonl", "run", "train.jsonl"]  # nothing in the cwd


@pytest.mark.skipif(importlib.util.find_spec("trackio") is None, reason="trackio is not installed")
def test_trackio_offline(make_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    _offline_run(make_recipe, "trackio")


# ---- evaluation -----------------------------------------------------------------------------------
def test_untrained_prefix_is_the_prompt_before_the_first_trained_token():
    # labels are shifted: labels[t] is the target of position t
    assert untrained_prefix([1, 5, 6, 7, 8], [-100, -100, 7, 8, -100]) == [1, 5, 6]
    assert untrained_prefix([1, 5, 6], [5, 6, -100]) == []  # plain text: trained from the first token
    assert untrained_prefix([1, 5], [-100, -100]) == []


def _sample_lines(tmp_path):
    path = tmp_path / "run" / "samples.jsonl"
    return read_jsonl(path) if path.exists() else []


@pytest.mark.parametrize("rows", ["prompt_completion", "chat", "text"])
def test_sft_evaluations_write_greedy_samples_of_the_eval_prompts(make_recipe, tmp_path, rows):
    make_rows = {"prompt_completion": prompt_completion_rows, "chat": chat_rows, "text": text_rows}[rows]
    trainer = SFTTrainer.from_recipe(make_recipe(rows=make_rows(16, seed=1), eval_rows=make_rows(6, seed=2),
                                                 train={"max_steps": 2, "batch_size": 4, "eval_every": 1}))
    trainer.fit()
    samples = _sample_lines(tmp_path)
    if rows == "text":  # no prompt to complete
        assert samples == []
        return
    assert [s["step"] for s in samples] == [1] * 4 + [2] * 4
    assert all(s["run_id"] == trainer.run_id and isinstance(s["completion"], str) for s in samples)
    if rows == "prompt_completion":
        eval_prompts = [json.loads(line)["prompt"] for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
        assert [s["prompt"] for s in samples[:4]] == eval_prompts[:4]


def test_preference_evaluations_write_samples_but_the_reward_model_does_not(make_recipe, tmp_path):
    recipe = dict(rows=preference_rows(16, seed=1), eval_rows=preference_rows(6, seed=2),
                  train={"max_steps": 1, "batch_size": 4})
    DPOTrainer.from_recipe(make_recipe(algorithm="dpo", adapter={"kind": "lora", "r": 4, "alpha": 8}, **recipe)).fit()
    samples = _sample_lines(tmp_path)
    assert [s["step"] for s in samples] == [1] * 4
    assert samples[0]["prompt"] == json.loads((tmp_path / "eval.jsonl").read_text().splitlines()[0])["prompt"]
    RewardTrainer.from_recipe(make_recipe(algorithm="reward", **recipe)).fit(overwrite=True)
    assert _sample_lines(tmp_path) == []


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
