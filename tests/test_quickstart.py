"""The quickstart pipeline runs end to end (few steps here) and reports every stage."""

import shutil
from pathlib import Path

import yaml

from align.quickstart import STAGES, main

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_every_stage_and_reports(tmp_path, monkeypatch, capsys):
    shutil.copytree(ROOT / "recipes" / "data", tmp_path / "recipes" / "data")
    (tmp_path / "recipes" / "quickstart").mkdir()
    for name in STAGES:  # the shipped recipes, shortened
        recipe = yaml.safe_load(open(ROOT / "recipes" / "quickstart" / f"{name}.yaml"))
        recipe["train"].update(max_steps=3, eval_every=None, plots=False)
        recipe["data"]["train"]["max_rows"] = 64
        if "eval" in recipe["data"]:
            recipe["data"]["eval"]["max_rows"] = 16
        yaml.safe_dump(recipe, open(tmp_path / "recipes" / "quickstart" / f"{name}.yaml", "w"))
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
