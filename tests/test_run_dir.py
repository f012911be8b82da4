"""The output-dir contract (align.trainers.run_dir): one run owns its output dir; nothing already
written is lost or spoiled by another run."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from align.cli import main
from align.errors import AlignError
from align.plot import read_metrics
from align.trainers import SFTTrainer, checkpoint

REPO = Path(__file__).resolve().parents[1]
HOLD = """
import sys, time
from align.trainers import run_dir
with run_dir.hold(sys.argv[1], resume_from=None, overwrite=False):
    print("held", flush=True)
    time.sleep(120)
"""


def steps_in(run: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run)]


def test_a_used_output_dir_is_refused_and_overwrite_moves_the_old_run_aside(make_recipe, tmp_path):
    run = tmp_path / "run"
    SFTTrainer.from_recipe(make_recipe(train={"max_steps": 4, "save_every": 2, "log_every": 1})).fit()
    metrics, weights = (run / "metrics.jsonl").read_text(), (run / "model.safetensors").read_bytes()
    second = make_recipe(train={"max_steps": 2, "save_every": 1, "log_every": 1, "lr": 1e-4})
    with pytest.raises(AlignError, match="already holds a run.*--overwrite"):
        SFTTrainer.from_recipe(second).fit()
    assert (run / "metrics.jsonl").read_text() == metrics and (run / "model.safetensors").read_bytes() == weights

    SFTTrainer.from_recipe(second).fit(overwrite=True)
    [old] = tmp_path.glob("run.old-*")
    assert (old / "metrics.jsonl").read_text() == metrics and (old / "model.safetensors").read_bytes() == weights
    assert [p.name for p in checkpoint.list_checkpoints(old / "checkpoints")] == ["step-000002", "step-000004"]
    assert [p.name for p in checkpoint.list_checkpoints(run / "checkpoints")] == ["step-000001", "step-000002"]
    assert steps_in(run) == [1, 2]
    run_id = yaml.safe_load((run / "run.json").read_text())["run_id"]
    assert {r["run_id"] for r in read_metrics(run)} == {run_id}


def test_resuming_a_checkpoint_past_max_steps_is_refused(make_recipe, tmp_path):
    SFTTrainer.from_recipe(make_recipe(train={"max_steps": 4, "save_every": 2})).fit()
    shorter = make_recipe(train={"max_steps": 2, "resume_from": "auto"})
    with pytest.raises(AlignError, match="step 4, past this run's 2 steps"):
        SFTTrainer.from_recipe(shorter).fit()


def test_rotation_removes_only_this_runs_checkpoints(tmp_path):
    for step in (32, 48):
        checkpoint.save_checkpoint(tmp_path, step, {}, {}, keep=2, run_id="first")
    for step in (10, 20, 30):
        checkpoint.save_checkpoint(tmp_path, step, {}, {}, keep=2, run_id="second")
    assert [p.name.split("-")[1] for p in checkpoint.list_checkpoints(tmp_path)] == ["000020", "000030",
                                                                                     "000032", "000048"]
    newest = checkpoint.load_newest(tmp_path, "second")
    assert newest[0].name == "step-000030"


def test_a_second_run_on_a_held_output_dir_exits_2_naming_the_holder(make_recipe, tmp_path, capsys):
    run = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(raw=True, train={"max_steps": 1})))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for extra in ([], ["--set", "train.resume_from=auto"], ["--overwrite"]):
            assert main(["train", str(recipe), *extra]) == 2
            assert f"is in use by another run (pid {holder.pid})" in capsys.readouterr().err
    finally:
        holder.kill()  # kill -9: the kernel releases the lock
        holder.wait()
    assert main(["train", str(recipe), "--set", "train.resume_from=auto"]) == 0
    assert steps_in(run) == [1]


def test_an_empty_output_dir_or_one_holding_other_files_is_refused(make_recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("mine")
    recipe = tmp_path / "recipe.yaml"
    for output_dir in ("", "."):
        recipe.write_text(yaml.safe_dump(make_recipe(raw=True, output_dir=output_dir, train={"max_steps": 1})))
        assert main(["train", str(recipe), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert "output_dir: empty" in err or "is not empty and holds no Align run (README.md, recipe.yaml" in err
    assert (tmp_path / "README.md").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "recipe.yaml", "train.jsonl"]


def test_an_output_dir_that_is_a_file_exits_2_before_the_model_loads(make_recipe, tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(raw=True, output_dir=str(tmp_path / "taken" / "run"))))
    assert main(["train", str(recipe)]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


def test_a_read_only_output_dir_exits_2_before_the_model_loads(make_recipe, tmp_path):
    """Root writes into a chmod-ed directory regardless, so as root the directory is a read-only
    tmpfs mounted in a private mount namespace (unshare -m)."""
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(raw=True, output_dir=str(read_only / "run"))))
    train = [sys.executable, "-m", "align.cli", "train", str(recipe)]
    if os.geteuid() != 0:
        read_only.chmod(0o500)
        command = train
    elif shutil.which("unshare") and subprocess.run(["unshare", "-m", "true"]).returncode == 0:
        command = ["unshare", "-m", "sh", "-c", f'mount -t tmpfs -o ro tmpfs "{read_only}" && exec "$@"', "sh", *train]
    else:
        pytest.skip("running as root without `unshare -m`: no way to make a directory read-only for root")
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "is not writable" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_auto_resume_of_a_finished_run_without_checkpoints_is_refused(make_recipe, tmp_path, capsys):
    """(it started over, wrote over the finished model and emptied metrics.jsonl, exit 0)"""
    run = tmp_path / "run"
    SFTTrainer.from_recipe(make_recipe(train={"max_steps": 2})).fit()
    weights, metrics = (run / "model.safetensors").read_bytes(), (run / "metrics.jsonl").read_text()
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(make_recipe(raw=True, train={"max_steps": 2, "seed": 5, "resume_from": "auto"})))
    for command in ("validate", "train"):
        assert main([command, str(again)]) == 2
        assert "holds a finished run (run " in capsys.readouterr().err
    with pytest.raises(AlignError, match="no checkpoint to resume .*model.name_or_path"):
        SFTTrainer.from_recipe(make_recipe(train={"max_steps": 2, "resume_from": "auto"})).fit()
    assert (run / "model.safetensors").read_bytes() == weights and (run / "metrics.jsonl").read_text() == metrics


def test_a_checkpoint_of_another_run_starts_a_new_run_only_in_a_new_output_dir(make_recipe, tmp_path):
    """(resumed into a finished run's output_dir, it wrote over its model and checkpoints, exit 0)"""
    run = tmp_path / "run"
    SFTTrainer.from_recipe(make_recipe(train={"max_steps": 2, "save_every": 1})).fit()
    weights, run_id = (run / "model.safetensors").read_bytes(), yaml.safe_load((run / "run.json").read_text())["run_id"]
    other = tmp_path / "other"
    SFTTrainer.from_recipe(make_recipe(output_dir=str(other), train={"max_steps": 2, "save_every": 1})).fit()
    theirs = str(other / "checkpoints" / "step-000001")
    with pytest.raises(AlignError, match=f"holds a run \\(run {run_id}.* is a checkpoint of run .* new output_dir"):
        SFTTrainer.from_recipe(make_recipe(train={"max_steps": 2, "resume_from": theirs})).fit()
    assert (run / "model.safetensors").read_bytes() == weights
    assert {checkpoint.checkpoint_run_id(p) for p in checkpoint.list_checkpoints(run / "checkpoints")} == {run_id}
    fork = make_recipe(output_dir=str(tmp_path / "fork"), train={"max_steps": 2, "resume_from": theirs})
    SFTTrainer.from_recipe(fork).fit()  # a new run from that checkpoint
    forked = yaml.safe_load((tmp_path / "fork" / "run.json").read_text())["run_id"]
    assert forked != checkpoint.checkpoint_run_id(Path(theirs)) and steps_in(tmp_path / "fork") == [2]


def test_a_refused_resume_writes_nothing_and_validate_refuses_it_first(make_recipe, tmp_path, capsys):
    """(the refusal came after recipe.yaml was rewritten with the refused settings, after the model
    loaded; into a new output_dir it left a run.json that then blocked the corrected command)"""
    run = tmp_path / "run"
    SFTTrainer.from_recipe(make_recipe(train={"max_steps": 2, "save_every": 1})).fit()
    saved = (run / "recipe.yaml").read_text()
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(make_recipe(raw=True, data={"max_length": 64},
                                                  train={"max_steps": 2, "seed": 5, "resume_from": "auto"})))
    for command in ("validate", "train"):
        assert main([command, str(changed)]) == 2
        err = capsys.readouterr().err
        assert "was trained with another recipe" in err and "train.seed: 0 -> 5" in err
    assert (run / "recipe.yaml").read_text() == saved
    fork = make_recipe(output_dir=str(tmp_path / "fork"), train={"max_steps": 2, "seed": 5,
                                                                  "resume_from": str(run / "checkpoints/step-000001")})
    with pytest.raises(AlignError, match="train.seed: 0 -> 5"):
        SFTTrainer.from_recipe(fork).fit()
    assert not (tmp_path / "fork").exists()


def test_resuming_an_earlier_checkpoint_sets_the_later_ones_aside(make_recipe, tmp_path):
    """(after such a resume was killed, auto went back to the abandoned timeline's newest step)"""
    run = tmp_path / "run"
    SFTTrainer.from_recipe(make_recipe(train={"max_steps": 4, "save_every": 1, "keep_checkpoints": 4})).fit()
    earlier = make_recipe(train={"max_steps": 4, "save_every": 1, "keep_checkpoints": 4, "lr": 1e-4,
                                 "resume_from": str(run / "checkpoints/step-000001")})
    trainer = SFTTrainer.from_recipe(earlier)
    trainer.train_loop = lambda: {}  # killed right after the resume
    trainer.fit()
    assert [p.name for p in checkpoint.list_checkpoints(run / "checkpoints")] == ["step-000001"]
    assert sorted(p.name for p in (run / "checkpoints").glob("abandoned-*")) == [
        "abandoned-step-000002", "abandoned-step-000003", "abandoned-step-000004"]
    auto = SFTTrainer.from_recipe(make_recipe(train={"max_steps": 4, "save_every": 1, "keep_checkpoints": 4,
                                                     "lr": 1e-4, "resume_from": "auto"}))
    auto.train_loop = lambda: {}
    auto.fit()
    assert auto.step == 1


def test_overwrite_with_a_checkpoint_inside_output_dir_is_refused_moving_nothing(make_recipe, tmp_path):
    run = tmp_path / "run"
    SFTTrainer.from_recipe(make_recipe(train={"max_steps": 1, "save_every": 1})).fit()
    names = sorted(p.name for p in run.iterdir())
    with pytest.raises(AlignError, match="which --overwrite would move aside; drop --overwrite"):
        SFTTrainer.from_recipe(make_recipe(train={"resume_from": str(run / "checkpoints/step-000001")})).fit(
            overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == names and not list(tmp_path.glob("run.old-*"))


def test_a_step_whose_new_copy_was_not_yet_in_place_keeps_its_old_one(tmp_path):
    """A kill between `_put_in_place`'s two renames leaves the old copy as .retired-step-N."""
    checkpoint.save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {}, keep=2, run_id="r")
    os.replace(tmp_path / "step-000001", tmp_path / ".retired-step-000001")
    (tmp_path / ".staging-step-000001").mkdir()
    checkpoint.clean_staging(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001"]
    assert checkpoint.load_newest(tmp_path, "r")[0].name == "step-000001"


def test_an_output_dir_that_is_or_holds_an_input_is_refused_before_the_model_loads(make_recipe, tmp_path, capsys,
                                                                                   monkeypatch):
    """(a DPO run with output_dir its own model's directory and --overwrite moved the model aside and
    saved an adapter naming itself as its base: a RecursionError for every later load)"""
    from align.models import loading

    sft = tmp_path / "run"
    SFTTrainer.from_recipe(make_recipe(train={"max_steps": 1})).fit()
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    recipe = tmp_path / "on-itself.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(raw=True, model={"name_or_path": str(sft)}, train={"max_steps": 1})))
    for command in ("validate", "train"):
        assert main([command, str(recipe), "--overwrite"]) == 2
        assert f"model.name_or_path: {str(sft)!r} is output_dir" in capsys.readouterr().err
    assert (sft / "model.safetensors").exists() and not list(tmp_path.glob("run.old-*"))
    monkeypatch.undo()
    within = tmp_path / "runs"
    (within / "data").mkdir(parents=True)
    data = make_recipe(raw=True)["data"]["train"]["path"]
    shutil.copy(data, within / "data" / "train.jsonl")
    recipe = make_recipe(output_dir=str(within), data={"train": {"path": str(within / "data" / "train.jsonl")}})
    with pytest.raises(AlignError, match=r"data.train.path: .* lies in output_dir"):
        SFTTrainer.from_recipe(recipe).fit(overwrite=True)  # (--overwrite would have moved the data aside)
    assert (within / "data" / "train.jsonl").exists()


def test_a_resume_past_its_steps_or_from_no_checkpoint_is_refused_before_anything_moves(make_recipe, tmp_path,
                                                                                        capsys):
    """(past max_steps was refused after --overwrite had moved a finished run aside, and validate said
    valid; a run directory given as the checkpoint was called another run's checkpoint)"""
    run = tmp_path / "run"
    SFTTrainer.from_recipe(make_recipe(train={"max_steps": 2, "save_every": 2})).fit()
    other = tmp_path / "other"
    SFTTrainer.from_recipe(make_recipe(output_dir=str(other), train={"max_steps": 1})).fit()
    recipe = tmp_path / "past.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(raw=True, output_dir=str(other), train={
        "max_steps": 1, "resume_from": str(run / "checkpoints" / "step-000002")})))
    for command in ("validate", "train"):
        assert main([command, str(recipe), "--overwrite"]) == 2
        assert "is at step 2, past this run's 1 steps" in capsys.readouterr().err
    assert (other / "model.safetensors").exists() and not list(tmp_path.glob("other.old-*"))
    recipe.write_text(yaml.safe_dump(make_recipe(raw=True, train={"max_steps": 2, "resume_from": str(run)})))
    assert main(["validate", str(recipe)]) == 2
    assert "is not a complete checkpoint directory" in capsys.readouterr().err
