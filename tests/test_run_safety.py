"""A run is never silently spoiled: non-finite steps are skipped and stop the run, resuming applies
or refuses a changed recipe, SIGTERM saves a checkpoint, a full disk leaves earlier files intact."""

import errno
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from align.config import recipe_from_dict
from align.errors import AlignError
from align.trainers import SFTTrainer, checkpoint
from align.trainers.callbacks import Callback


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def weights(trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in trainer.policy.trainable_parameters()])


# ---- numerical guards ----------------------------------------------------------------------------
class NaNAt(SFTTrainer):
    """SFT whose loss is NaN at the given steps (0-based)."""

    bad_steps: tuple[int, ...] = ()

    def compute_loss(self, batch):
        loss, metrics = super().compute_loss(batch)
        return (loss * float("nan") if self.step in self.bad_steps else loss), metrics


def test_a_nonfinite_step_is_skipped_on_the_device_and_counted(make_recipe, tmp_path):
    trainer = type("NaNAtTwo", (NaNAt,), {"bad_steps": (2,)}).from_recipe(make_recipe())
    seen = []
    trainer.callbacks.append(type("Watch", (Callback,), {"on_log": lambda s, t, r: seen.append(weights(t))})())
    trainer.fit()
    records = metrics(tmp_path / "run")
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1]
    assert math.isnan(records[2]["loss"]) and all(math.isfinite(r["loss"]) for r in records if r["step"] != 3)
    assert torch.equal(seen[1], seen[2])  # step 3 (index 2) changed nothing: weights (and moments) kept
    assert not torch.equal(seen[2], seen[3])
    steps = {float(state["step"]) for state in trainer.torch_optimizer.state.values()}
    assert steps == {3.0}  # four steps, one skipped: Adam's bias correction did not advance on it


def test_too_many_nonfinite_steps_in_a_row_stop_the_run_without_saving_nan(make_recipe, tmp_path):
    recipe = make_recipe(train={"max_steps": 8, "save_every": 2, "max_nonfinite_steps": 3})
    trainer = type("NaNFromThree", (NaNAt,), {"bad_steps": tuple(range(3, 8))}).from_recipe(recipe)
    with pytest.raises(AlignError, match=r"stopped at step 6: the loss or gradient norm was NaN/inf in the last 3"):
        trainer.fit()
    run = tmp_path / "run"
    assert not (run / "model.safetensors").exists()
    newest = checkpoint.load_newest(run / "checkpoints", trainer.run_id)
    assert all(torch.isfinite(t).all() for t in newest[2]["model"].values())


def test_an_absurd_learning_rate_is_stopped_and_no_nonfinite_weights_are_saved(make_recipe, tmp_path):
    trainer = SFTTrainer.from_recipe(make_recipe(train={"lr": 1e30, "max_steps": 12, "save_every": 1,
                                                        "schedule": "constant"}))
    with pytest.raises(AlignError, match="NaN/inf"):
        trainer.fit()
    run = tmp_path / "run"
    assert not (run / "model.safetensors").exists()
    for path in checkpoint.list_checkpoints(run / "checkpoints"):
        assert all(torch.isfinite(t).all() for t in checkpoint.load_checkpoint(path)[1]["model"].values())


def test_the_8bit_optimizers_are_refused_on_a_cpu_naming_the_alternative(make_recipe):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the 8-bit optimizers are allowed")
    with pytest.raises(AlignError, match="paged_adamw_8bit.*needs a CUDA GPU.*train.optimizer: adamw"):
        SFTTrainer.from_recipe(make_recipe(train={"optimizer": "paged_adamw_8bit"}))


# ---- resume with a changed recipe ---------------------------------------------------------------
def test_resume_applies_a_new_lr_and_longer_schedule_from_the_resumed_step(make_recipe, tmp_path):
    raw = make_recipe(raw=True, train={"max_steps": 4, "save_every": 2, "schedule": "linear", "lr": 1e-3})
    SFTTrainer.from_recipe(recipe_from_dict(raw)).fit()
    raw["train"].update(max_steps=8, lr=2e-3, resume_from="auto")
    trainer = SFTTrainer.from_recipe(recipe_from_dict(raw))
    trainer.fit()
    lrs = {r["step"]: r["lr"] for r in metrics(tmp_path / "run")}
    assert lrs[5] == pytest.approx(2e-3 * (8 - 4) / 8)  # linear decay over 8 steps, evaluated at step 4
    assert lrs[8] == pytest.approx(2e-3 * 1 / 8)
    assert trainer.step == 8


def test_resume_with_the_same_recipe_equals_the_uninterrupted_run(make_recipe, tmp_path):
    raw = make_recipe(raw=True, train={"max_steps": 6, "save_every": 3, "schedule": "cosine", "warmup": 2})
    SFTTrainer.from_recipe(recipe_from_dict(raw)).fit()
    full = metrics(tmp_path / "run")
    raw["train"]["resume_from"] = str(tmp_path / "run" / "checkpoints" / "step-000003")
    SFTTrainer.from_recipe(recipe_from_dict(raw)).fit()
    resumed = metrics(tmp_path / "run")[-3:]
    for a, b in zip(full[3:], resumed):
        assert (a["step"], a["lr"]) == (b["step"], b["lr"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


def test_resume_refuses_changes_to_model_data_or_seed_listing_them(make_recipe, tmp_path):
    raw = make_recipe(raw=True, train={"max_steps": 2, "save_every": 2})
    SFTTrainer.from_recipe(recipe_from_dict(raw)).fit()
    raw["train"].update(seed=1, batch_size=2, max_steps=4, resume_from="auto")
    raw["data"]["max_length"] = 64
    with pytest.raises(AlignError) as error:
        SFTTrainer.from_recipe(recipe_from_dict(raw)).fit()
    message = str(error.value)
    assert "train.seed: 0 -> 1" in message and "data.max_length: 128 -> 64" in message
    assert "train.batch_size" in message and "global batch" in message
    assert "train.max_steps" not in message  # applied, not refused


def test_a_checkpoint_saved_under_retired_defaults_resumes(make_recipe):
    """Checkpoints saved before adapter.dropout's default became unset (0.05 where peft allows it) and
    sampling.engine's became auto hold the old defaults: resuming with the same recipe is no change;
    another value still is."""
    from pathlib import Path

    from align.config import same_by_default
    from align.trainers.checkpoint import STATE_FILE

    raw = make_recipe(raw=True, adapter={"kind": "lora", "r": 4}, train={"max_steps": 2, "save_every": 2})
    SFTTrainer.from_recipe(recipe_from_dict(raw)).fit()
    state_file = next(Path(raw["output_dir"]).glob(f"checkpoints/*/{STATE_FILE}"))
    state = json.loads(state_file.read_text())
    assert state["recipe"]["adapter"]["dropout"] is None
    state["recipe"]["adapter"]["dropout"] = 0.05
    state_file.write_text(json.dumps(state))
    resumed = recipe_from_dict({**raw, "train": {**raw["train"], "max_steps": 3, "resume_from": "auto"}})
    trainer = SFTTrainer.from_recipe(resumed)
    trainer.fit()
    assert trainer.step == 3
    assert same_by_default("grpo.sampling.engine", "prefix_shared", "auto")
    assert not same_by_default("grpo.sampling.engine", "hf", "auto")
    assert not same_by_default("adapter.dropout", 0.1, None)


# ---- preemption ---------------------------------------------------------------------------------
class SignalAt(Callback):
    def __init__(self, step: int, signum=signal.SIGTERM):
        self.step, self.signum = step, signum

    def on_log(self, trainer, record):
        if trainer.step == self.step:
            os.kill(os.getpid(), self.signum)


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_ends_as_an_uninterrupted_one(make_recipe, tmp_path):
    raw = make_recipe(raw=True, train={"max_steps": 5})
    SFTTrainer.from_recipe(recipe_from_dict({**raw, "output_dir": str(tmp_path / "whole")})).fit()
    trainer = SFTTrainer.from_recipe(recipe_from_dict(raw), callbacks=[SignalAt(2)])
    trainer.fit()
    run = tmp_path / "run"
    assert trainer.stopped_by == "SIGTERM" and trainer.step == 2
    assert [p.name for p in checkpoint.list_checkpoints(run / "checkpoints")] == ["step-000002"]
    assert not (run / "model.safetensors").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back
    raw["train"]["resume_from"] = "auto"
    SFTTrainer.from_recipe(recipe_from_dict(raw)).fit()
    whole, resumed = metrics(tmp_path / "whole"), metrics(run)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    assert resumed[-1]["loss"] == pytest.approx(whole[-1]["loss"], rel=1e-6)


def test_align_train_exits_143_on_sigterm_with_a_checkpoint_to_resume(make_recipe, tmp_path):
    import time

    import yaml

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(raw=True, train={"max_steps": 500})))
    proc = subprocess.Popen([sys.executable, "-m", "align.cli", "train", str(recipe)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics_file = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics_file.exists() and metrics_file.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    (saved,) = checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert f"stopped by SIGTERM at step {int(saved.name.split('-')[1])}" in err
    assert "--set train.resume_from=auto" in err


# ---- full disks ---------------------------------------------------------------------------------
def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_during_a_checkpoint_keeps_the_earlier_one_and_says_so(make_recipe, tmp_path, monkeypatch):
    trainer = SFTTrainer.from_recipe(make_recipe(train={"max_steps": 4, "save_every": 2}))
    real_save = checkpoint.save_file
    monkeypatch.setattr(checkpoint, "save_file", lambda tensors, path: (no_space() if "000004" in path
                                                                        else real_save(tensors, path)))
    with pytest.raises(AlignError, match="could not write checkpoint step 4 .*No space left on device.*intact"):
        trainer.fit()
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]
    checkpoint.load_checkpoint(root / "step-000002")


def test_a_full_disk_during_the_final_save_writes_no_config_without_weights(make_recipe, tmp_path, monkeypatch):
    trainer = SFTTrainer.from_recipe(make_recipe(train={"max_steps": 2}))

    def save_then_fail(directory):
        (directory / "config.json").write_text("{}")
        no_space()

    monkeypatch.setattr(trainer.policy, "save", save_then_fail)
    with pytest.raises(AlignError, match="could not write the final model .*No space left on device"):
        trainer.fit()
    run = tmp_path / "run"
    assert not (run / "config.json").exists() and not list(run.glob(".staging*"))


def test_a_full_disk_for_metrics_samples_and_plots_costs_no_model(make_recipe, tmp_path, monkeypatch, caplog):
    """(a failed metrics.jsonl or samples.jsonl write ended the run with a traceback before its final
    save; a failed plot made a finished run exit 1)"""
    import builtins

    from align.toy import chat_rows
    from align.trainers import callbacks, samples

    def open_but_logs(path, mode="r", *args, **kwargs):
        if str(path).endswith((".jsonl",)) and "a" in mode:
            no_space()
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(callbacks, "open", open_but_logs, raising=False)
    monkeypatch.setattr(samples, "open", open_but_logs, raising=False)
    monkeypatch.setattr("align.plot.plot_metrics", no_space)
    trainer = SFTTrainer.from_recipe(make_recipe(eval_rows=chat_rows(4, seed=9),
                                                 train={"max_steps": 2, "eval_every": 1, "plots": True}))
    trainer.fit()
    assert (tmp_path / "run" / "model.safetensors").exists()
    logged = caplog.text
    assert "could not write step 1's record" in logged and "could not write step 1's samples" in logged
    assert "could not draw the plots" in logged and "No space left on device" in logged


def test_a_real_full_tmpfs(make_recipe, tmp_path):
    """The same on a real 2 MiB tmpfs (needs mount rights, as root in CI; skipped elsewhere)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")
    try:
        recipe = make_recipe(output_dir=str(mount / "run"), train={"max_steps": 2, "save_every": 1},
                             model={"name_or_path": "builtin:small-llama"})
        with pytest.raises(AlignError, match="No space left on device"):
            SFTTrainer.from_recipe(recipe).fit()
        assert not list((mount / "run").rglob(".staging*"))
    finally:
        subprocess.run(["umount", str(mount)], check=False)
