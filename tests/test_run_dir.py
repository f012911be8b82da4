"""The output-dir contract (align.trainers.run_dir): one run owns its output dir; nothing already
written is lost or spoiled by another run."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from align.cli import main
from align.errors import AlignError
from align.plot import read_metrics
from align.trainers import SFTTrainer, checkpoint

REPO = Path(__file__).resolve().parents[1]
HOLD = """
import sys, time
from align.trainers import run_dir
with run_dir.hold(sys.argv[1], resume=False, overwrite=False):
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
