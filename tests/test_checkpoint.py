import pytest
import torch

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
    from align.errors import AlignError

    recipe = make_recipe(train={"resume_from": str(tmp_path)})
    with pytest.raises(AlignError, match="not a complete checkpoint"):
        SFTTrainer.from_recipe(recipe).fit()
