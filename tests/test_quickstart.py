"""The quickstart pipeline runs end to end (few steps here) and reports every stage."""

import shutil
from pathlib import Path

import yaml

import pytest

from align.quickstart import STAGES, load_stage, main

ROOT = Path(__file__).resolve().parents[1]


def short_recipes(tmp_path):
    """The shipped quickstart recipes, shortened, under tmp_path/recipes."""
    shutil.copytree(ROOT / "recipes" / "data", tmp_path / "recipes" / "data")
    (tmp_path / "recipes" / "quickstart").mkdir()
    for name in STAGES:  # the shipped recipes, shortened
        recipe = yaml.safe_load(open(ROOT / "recipes" / "quickstart" / f"{name}.yaml"))
        recipe["train"].update(max_steps=3, eval_every=None, plots=False)
        recipe["data"]["train"]["max_rows"] = 64
        if "eval" in recipe["data"]:
            recipe["data"]["eval"]["max_rows"] = 16
        yaml.safe_dump(recipe, open(tmp_path / "recipes" / "quickstart" / f"{name}.yaml", "w"))


def test_quickstart_runs_every_stage_and_reports(tmp_path, monkeypatch, capsys):
    short_recipes(tmp_path)
    monkeypatch.chdir(tmp_path)
    report = main(progress=False)
    out = capsys.readouterr().out
    assert set(report["exact_answer"]) == {"sft", "dpo", "grpo", "ppo"}
    for line in ("Pre-training eval loss", "SFT   eval loss", "RM    held-out pair accuracy", "DPO   preference accuracy", "exact-answer accuracy",
                 "Greedy samples", "Plots: runs/quickstart/pretrain/plots, runs/quickstart/sft/plots"):
        assert line in out
    main(progress=False)  # a second run reuses the pre-trained and SFT models
    out = capsys.readouterr().out
    assert "pretrain: reusing runs/quickstart/pretrain" in out and "sft: reusing runs/quickstart/sft" in out


def test_seeds_run_apart_and_report_the_spread(tmp_path, monkeypatch, capsys):
    short_recipes(tmp_path)
    monkeypatch.chdir(tmp_path)
    stage = load_stage(Path("recipes/quickstart/ppo.yaml"), [], seed=2)
    assert stage.train.seed == 2 and stage.output_dir == "runs/quickstart/seed2/ppo"
    assert stage.model.name_or_path == "runs/quickstart/seed2/sft" and stage.ppo.value_model == "runs/quickstart/seed2/rm"
    assert stage.ppo.rewards[0].fn == "runs/quickstart/seed2/rm"
    assert load_stage(Path("recipes/quickstart/ppo.yaml"), [], seed=0).output_dir == "runs/quickstart/ppo"

    report = main(progress=False, seeds=2)
    out = capsys.readouterr().out
    assert [Path(f"runs/quickstart{d}/{name}/model.safetensors").exists() or
            Path(f"runs/quickstart{d}/{name}/adapter_config.json").exists()
            for d in ("", "/seed1") for name in STAGES] == [True] * 2 * len(STAGES)
    assert [run["sft_eval_loss"][1] for run in report["runs"]][0] != report["runs"][1]["sft_eval_loss"][1]
    values = [run["exact_answer"]["grpo"] for run in report["runs"]]
    mean, std, low, high = report["spread"]["exact_answer/grpo"]
    assert mean == pytest.approx(sum(values) / 2) and (low, high) == (min(values), max(values))
    assert std == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    assert "over 2 seeds" in out and "exact_answer/ppo" in out
