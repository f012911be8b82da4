import json
import os

import pytest
import torch

from align.errors import AlignError
from align.plot import read_metrics
from align.trainers import SFTTrainer
from align.trainers import checkpoint


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_intact(tmp_path):
    root = tmp_path / "checkpoints"
    checkpoint.save_checkpoint(root, 1, {"model": {"w": torch.ones(2)}}, {"note": "first"}, keep=2)

    def crash(directory):
        raise KeyboardInterrupt  # killed half-way through writing step 2

    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(root, 2, {"model": {"w": torch.zeros(2)}}, {}, keep=2, write_extra=crash)
    assert [p.name for p in checkpoint.list_checkpoints(root)] == ["step-000001"]
    state, tensors = checkpoint.load_checkpoint(root / "step-000001")
    assert state["note"] == "first" and torch.equal(tensors["model"]["w"], torch.ones(2))
    checkpoint.clean_staging(root)
    assert sorted(p.name for p in root.iterdir()) == ["step-000001"]


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    for step in range(1, 5):
        checkpoint.save_checkpoint(tmp_path, step, {"x": torch.tensor(step)}, {}, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]


def test_resume_from_an_explicit_path_that_is_not_a_checkpoint(make_recipe, tmp_path):
    recipe = make_recipe(train={"resume_from": str(tmp_path)})
    with pytest.raises(AlignError, match="not a complete checkpoint"):
        SFTTrainer.from_recipe(recipe).fit()


class RunsCode:
    """A pickle that runs code when loaded: it makes the directory `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_loading_a_checkpoint_never_unpickles(tmp_path):
    handed = tmp_path / "step-000001"
    handed.mkdir()
    (handed / checkpoint.STATE_FILE).write_text(json.dumps({"step": 1}))
    torch.save({"w": RunsCode(tmp_path / "pwned")}, handed / "model.pt")
    with pytest.raises(AlignError, match="never loaded: they can run code"):
        checkpoint.load_checkpoint(handed)
    assert not (tmp_path / "pwned").exists()


def test_a_damaged_checkpoint_is_detected_and_the_one_before_it_is_loaded(tmp_path, caplog):
    for step in (1, 2):
        checkpoint.save_checkpoint(tmp_path, step, {"model": {"w": torch.full((64,), float(step))}}, {}, keep=3,
                                   run_id="r")
    tensors = tmp_path / "step-000002" / checkpoint.TENSORS_FILE
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 1  # one flipped bit, same size: only the checksum sees it
    tensors.write_bytes(bytes(data))
    with pytest.raises(AlignError, match="damaged"):
        checkpoint.load_checkpoint(tmp_path / "step-000002")
    path, state, objects = checkpoint.load_newest(tmp_path, "r")
    assert path.name == "step-000001" and torch.equal(objects["model"]["w"], torch.ones(64))
    assert "step-000002" in caplog.text and "trying the one before it" in caplog.text


def test_resume_after_a_kill_mid_write_falls_back_to_the_previous_checkpoint(make_recipe, tmp_path, caplog):
    """The newest checkpoint truncated and the last metrics line cut short (a kill during both
    writes): `auto` resumes from the checkpoint before it, and the run ends as one straight run."""
    settings = dict(train={"max_steps": 4, "save_every": 2, "log_every": 1})
    straight = make_recipe(output_dir=str(tmp_path / "straight"), **settings)
    SFTTrainer.from_recipe(straight).fit()
    SFTTrainer.from_recipe(make_recipe(**settings)).fit()
    run = tmp_path / "run"
    newest = max((run / "checkpoints" / "step-000004").iterdir(), key=lambda p: p.stat().st_size)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    resumed = make_recipe(**settings)
    resumed.train.resume_from = "auto"
    trainer = SFTTrainer.from_recipe(resumed)
    trainer.fit()
    assert "step-000004" in caplog.text and "trying the one before it" in caplog.text
    want, got = read_metrics(tmp_path / "straight"), read_metrics(run)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(want, got):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
