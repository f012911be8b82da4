"""The registries: names in recipes, plug-ins from outside, one section per algorithm, old run dirs."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import setuptools
import torch
import yaml

from align.cli import main
from align.config import load_recipe, recipe_from_dict
from align.errors import AlignError
from align.registry import ADVANTAGE_ESTIMATORS, LOSS_NORMS, PREFERENCE_LOSSES, ROLLOUT_ENGINES, TRAINERS
from align.toy import preference_rows

ROOT = Path(__file__).resolve().parents[1]


def test_built_ins_are_registered():
    assert {"sft", "reward", "dpo", "grpo", "ppo"} <= set(TRAINERS.names())
    assert {"sigmoid", "robust", "ipo", "hinge"} <= set(PREFERENCE_LOSSES.names())
    assert {"grpo", "bnpo", "dr_grpo", "dapo"} <= set(LOSS_NORMS.names())
    assert "grpo" in ADVANTAGE_ESTIMATORS.names()
    assert {"prefix_shared", "hf", "vllm"} <= set(ROLLOUT_ENGINES.names())


def test_lower_floors_import_no_trainer():
    """models/, losses/, data/, rollout/ never import a trainer (the loader once trained a model)."""
    code = ("import sys, align.models, align.losses, align.data, align.rollout, align.models.tiny; "
            "print(sorted(m for m in sys.modules if m.startswith('align.trainers') or m == 'align.builtins'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_trainers_and_the_cli_import_no_adapter_or_quantization_package():
    """peft and bitsandbytes (with the inductor modules they pull in, ~1 s) load when a recipe asks
    for an adapter, not at every start of a trainer or `align` command."""
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    code = ("import sys, align.trainers, align.cli; "
            "print(sorted(m for m in ('peft', 'bitsandbytes') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unbuilt_trained_builtin_is_not_trained_by_the_loader(tmp_path, monkeypatch):
    from align.models import tiny

    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path))
    with pytest.raises(AlignError, match="align build builtin:tiny-llama-arith"):
        tiny.resolve("builtin:tiny-llama-arith")
    assert not tiny.is_built("tiny-llama-arith")
    assert tiny.resolve("builtin:tiny-llama-arith", for_config=True) == str(tiny.builtin_dir("tiny-llama"))


def test_rewards_folder_is_installed_as_align_rewards():
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(setuptools.find_packages(str(ROOT), include=["align*"])) <= set(settings["packages"])
    assert settings["package-dir"] == {"align_rewards": "rewards"} and "rewards" not in settings["packages"]
    import align_rewards.math

    assert Path(align_rewards.math.__file__).resolve() == ROOT / "rewards" / "math.py"


def base(tmp_path, algorithm="dpo", **sections) -> dict:
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(f"{__import__('json').dumps(r)}\n" for r in preference_rows(8, seed=1)))
    return {"algorithm": algorithm, "output_dir": str(tmp_path / "run"),
            "model": {"name_or_path": "builtin:tiny-llama"}, "data": {"train": {"path": str(data)}}, **sections}


def test_unknown_names_list_the_registered_ones(tmp_path):
    with pytest.raises(AlignError, match=r"algorithm: unknown algorithm 'dpoo'; did you mean 'dpo'\? Registered: .*grpo"):
        recipe_from_dict(base(tmp_path, "dpoo"))
    with pytest.raises(AlignError, match=r"dpo.loss_type: unknown preference loss 'sigmoi'; did you mean 'sigmoid'"):
        recipe_from_dict(base(tmp_path, dpo={"loss_type": "sigmoi"}))
    with pytest.raises(AlignError, match=r"grpo.loss_norm: unknown loss normalization 'token_mean'.*dapo"):
        recipe_from_dict(base(tmp_path, "grpo", grpo={"loss_norm": "token_mean"}))
    with pytest.raises(AlignError, match=r"grpo.advantage: unknown advantage estimator 'gae'.*grpo"):
        recipe_from_dict(base(tmp_path, "grpo", grpo={"advantage": "gae"}))
    with pytest.raises(AlignError, match=r"grpo.sampling.engine: unknown rollout engine 'fast'"):
        recipe_from_dict(base(tmp_path, "grpo", grpo={"sampling": {"engine": "fast"}}))


def test_a_recipe_holds_its_own_section_only(tmp_path):
    recipe = recipe_from_dict(base(tmp_path, dpo={"beta": 0.2}))
    assert recipe.section is recipe.dpo and recipe.dpo.beta == 0.2
    assert not hasattr(recipe, "grpo") and "grpo" not in recipe.model_dump()
    with pytest.raises(AlignError, match=r"grpo: this section belongs to algorithm 'grpo', but the recipe's algorithm is "
                                         r"'dpo'.*Did you mean grpo.beta -> dpo.beta\?"):
        recipe_from_dict(base(tmp_path, grpo={"beta": 0.04}))


def test_old_recipe_with_every_section_at_its_defaults_still_loads(tmp_path):
    """Recipes saved before this change held all five sections; the others at their defaults are dropped."""
    old = base(tmp_path, dpo={"beta": 0.3})
    for name in ("sft", "reward", "grpo", "ppo"):
        old[name] = TRAINERS.get(name).config_class().model_dump(mode="json")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(old))
    recipe = load_recipe(path)
    assert recipe.dpo.beta == 0.3 and set(recipe.model_dump()) >= {"dpo"} and "ppo" not in recipe.model_dump()


PLUGIN = '''
import torch.nn.functional as F
from align.losses.preference import register_preference_loss
from align.losses.advantages import register_advantage_estimator


@register_preference_loss("plugin_margin", needs_reference=False)
def plugin_margin(pairs, beta, label_smoothing=0.0, margin=1.0):
    losses = F.relu(margin - beta * (pairs.chosen - pairs.rejected))
    return losses, beta * pairs.chosen.detach(), beta * pairs.rejected.detach()


def centered(scores, config):
    return scores.rewards - scores.rewards.mean()
'''


def test_plugins_register_losses_and_estimators_known_to_validate(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_losses.py").write_text(PLUGIN)
    raw = base(tmp_path, dpo={"loss_type": "plugin_margin", "loss_kwargs": {"margin": 2.0}})
    (tmp_path / "no_plugin.yaml").write_text(yaml.safe_dump(raw))
    assert main(["validate", "no_plugin.yaml"]) == 2
    assert "unknown preference loss 'plugin_margin'" in capsys.readouterr().err
    (tmp_path / "plugin.yaml").write_text(yaml.safe_dump({**raw, "plugins": ["my_losses.py"]}))
    assert main(["validate", "plugin.yaml"]) == 0, capsys.readouterr().err
    entry = PREFERENCE_LOSSES.get("plugin_margin")
    assert not entry.needs_reference
    pairs = __import__("align.losses.preference", fromlist=["PairLogps"]).PairLogps(
        torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([1.0]), torch.tensor([1.0]))
    assert entry.fn(pairs, 0.5, margin=2.0)[0].item() == pytest.approx(1.5)
    # module:Name names a plain function without registering it; missing ones are clear errors
    estimator = ADVANTAGE_ESTIMATORS.get("my_losses.py:centered")
    assert estimator.fn(type("S", (), {"rewards": torch.tensor([1.0, 3.0])})(), None).tolist() == [-1.0, 1.0]
    with pytest.raises(AlignError, match="has no 'centred'; did you mean 'centered'"):
        ADVANTAGE_ESTIMATORS.get("my_losses.py:centred")
    (tmp_path / "missing.yaml").write_text(yaml.safe_dump({**raw, "plugins": ["nowhere.py"]}))
    assert main(["validate", "missing.yaml"]) == 2
    assert "plugins[0]: file not found: 'nowhere.py'" in capsys.readouterr().err


TRAINER_PLUGIN = '''
from align.config import Section
from align.trainers.sft import SFTTrainer
from align.trainers.base import register_trainer


class ScaledConfig(Section):
    scale: float = 1.0


@register_trainer("scaled_sft", ScaledConfig)
class ScaledSFT(SFTTrainer):
    def compute_loss(self, batch):
        loss, metrics = super().compute_loss(batch)
        return loss * self.recipe.scaled_sft.scale, metrics
'''


def test_a_trainer_from_a_plugin_file_trains(tmp_path, make_recipe, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scaled.py").write_text(TRAINER_PLUGIN)
    raw = make_recipe(raw=True, algorithm="scaled_sft", plugins=["scaled.py"], scaled_sft={"scale": 0.5},
                      train={"max_steps": 2})
    recipe = recipe_from_dict(raw)
    trainer = TRAINERS.get(recipe.algorithm).from_recipe(recipe)
    assert type(trainer).__name__ == "ScaledSFT" and recipe.section.scale == 0.5
    record = trainer.fit()
    assert record["loss"] > 0 and yaml.safe_load((Path(recipe.output_dir) / "recipe.yaml").read_text())["scaled_sft"] == {"scale": 0.5}
    with pytest.raises(AlignError, match="scaled_sft.scael: unknown key; did you mean 'scaled_sft.scale'"):
        recipe_from_dict({**raw, "scaled_sft": {"scael": 2}})


def test_a_run_dir_saved_with_every_section_resumes(make_recipe):
    """A checkpoint written before this change carries a recipe with all five sections and no
    `plugins` key: resuming from it is not a change of recipe."""
    from align.trainers import SFTTrainer
    from align.trainers.checkpoint import STATE_FILE

    raw = make_recipe(raw=True, train={"max_steps": 2, "save_every": 2})
    SFTTrainer.from_recipe(recipe_from_dict(raw)).fit()
    state_file = next(Path(raw["output_dir"]).glob(f"checkpoints/*/{STATE_FILE}"))
    state = __import__("json").loads(state_file.read_text())
    saved = state["recipe"]
    del saved["plugins"]
    for name in ("reward", "dpo", "grpo", "ppo"):
        saved[name] = TRAINERS.get(name).config_class().model_dump(mode="json")
    state_file.write_text(__import__("json").dumps(state))
    resumed = SFTTrainer.from_recipe(recipe_from_dict({**raw, "train": {**raw["train"], "max_steps": 3,
                                                                         "resume_from": "auto"}}))
    resumed.fit()
    assert resumed.step == 3


def test_loss_kwargs_are_checked_against_the_loss(tmp_path):
    with pytest.raises(AlignError, match="simpo has no parameter 'gama'; did you mean 'gamma'"):
        recipe_from_dict(base(tmp_path, dpo={"loss_type": "simpo", "loss_kwargs": {"gama": 1.0}}))
    assert recipe_from_dict(base(tmp_path, dpo={"loss_type": "simpo", "loss_kwargs": {"gamma": 1.0}})).dpo.loss_kwargs


def test_a_section_with_required_keys_in_another_algorithms_recipe_is_a_clear_error(tmp_path):
    with pytest.raises(AlignError, match="distill: this section belongs to algorithm 'distill'"):
        recipe_from_dict(base(tmp_path, distill={"teacher_model": "builtin:tiny-llama"}))
    with pytest.raises(AlignError, match="distill: this section belongs to algorithm 'distill'"):
        recipe_from_dict(base(tmp_path, distill={}))
