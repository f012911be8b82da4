"""Every shipped offline recipe validates and runs a couple of steps from the command line."""

from pathlib import Path

import pytest

from align.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = sorted(p.name for p in (ROOT / "recipes").glob("*_tiny*.yaml"))


def test_there_are_tiny_recipes_for_each_trainer():
    assert {name.split("_")[0] for name in TINY} >= {"sft", "rm", "dpo"}


@pytest.mark.parametrize("name", TINY)
def test_tiny_recipe_runs(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    recipe = f"recipes/{name}"
    assert main(["validate", recipe, "--set", f"output_dir={tmp_path}/out"]) == 0  # not runs/: it may hold a run
    code = main(["train", recipe, "--set", f"output_dir={tmp_path}/out", "--set", "train.max_steps=2",
                 "--set", "train.progress=false", "--set", "train.eval_every=null", "--set", "train.save_every=null"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "metrics.jsonl").exists() and (tmp_path / "out" / "recipe.yaml").exists()
    # the run's own recipe.yaml (what the stop message tells a preempted run to train on) reads again
    assert main(["validate", str(tmp_path / "out" / "recipe.yaml"), "--set", f"output_dir={tmp_path}/again"]) == 0, \
        capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes").rglob("*.yaml")
                                        if "algorithm:" in p.read_text()))
def test_every_recipe_saved_as_a_run_saves_it_reads_again(path, monkeypatch):
    """(a distillation run's recipe.yaml, which holds every key, was refused: an explicit default beta)"""
    from align.config import load_recipe, recipe_from_dict

    monkeypatch.chdir(ROOT)
    recipe = load_recipe(path)
    assert recipe_from_dict(recipe.model_dump(mode="json")) == recipe


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "recipes" / "real").glob("*.yaml")))
def test_real_model_recipes_validate_offline(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main(["validate", f"recipes/real/{name}", "--set", f"output_dir={tmp_path}/out"]) == 0, \
        capsys.readouterr().err


def test_validate_resolves_reward_functions(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main(["validate", "recipes/grpo_tiny_custom_reward.yaml", "--set", f"output_dir={tmp_path}/out"]) == 0
    assert "grpo.rewards[1]: recipes/rewards/brevity.py:brief_and_right ok" in capsys.readouterr().out
    assert main(["validate", "recipes/grpo_tiny.yaml", "--set", "grpo.rewards=[{fn: exact_anwser}]"]) == 2
    assert "grpo.rewards[0].fn: unknown reward 'exact_anwser'. Did you mean 'exact_answer'?" in capsys.readouterr().err
