"""kill -9 at a seeded random step of every trainer, then `resume_from: auto`: the resumed run's
metrics equal an uninterrupted run's at every step, and so do its final weights. The kill is real
(SIGKILL of a separate process, no cleanup runs): after a logged step, or in the middle of writing a
checkpoint (after its files are written, before it is renamed into place)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from align.config import recipe_from_dict
from align.toy import chat_rows, preference_rows, prompt_rows
from align.trainers import TRAINERS
from tests.conftest import deep_update, write_jsonl

pytestmark = pytest.mark.usefixtures("arith_builtin")  # builtin:tiny-llama-arith, trained once

REPO = Path(__file__).resolve().parents[1]
KILLER = """
import os, signal, sys
from align.config import load_recipe
from align.trainers import TRAINERS, checkpoint
from align.trainers.callbacks import Callback

recipe, kill_at, where = load_recipe(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

class KillAfterLog(Callback):
    def on_log(self, trainer, record):
        if where == "after-log" and trainer.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

real_fsync = checkpoint._fsync_tree
def fsync_then_die(path):  # the checkpoint's files are written; the rename has not happened
    real_fsync(path)
    if where == "mid-save" and path.name == f".staging-step-{kill_at:06d}":
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint._fsync_tree = fsync_then_die
TRAINERS[recipe.algorithm].from_recipe(recipe, callbacks=[KillAfterLog()]).fit()
"""
LORA = {"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.0}
ARITH = {"name_or_path": "builtin:tiny-llama-arith", "dtype": "float32"}
STEPS = 5
CASES = {
    "sft": dict(rows=lambda: chat_rows(40, seed=5)),
    "dpo": dict(rows=lambda: preference_rows(40, seed=11), adapter=LORA,
                train={"dropout_during_training": True}, dpo={"precompute_reference": False}),
    "grpo": dict(rows=lambda: prompt_rows(24, seed=21), adapter=LORA, model=ARITH, train={"batch_size": 8},
                 grpo={"group_size": 4, "num_iterations": 2, "beta": 0.05,
                       "sampling": {"max_new_tokens": 8}, "rewards": [{"fn": "exact_answer"}]}),
    "ppo": dict(rows=lambda: prompt_rows(24, seed=31), adapter=LORA, model=ARITH,
                ppo={"ppo_epochs": 2, "num_mini_batches": 2, "kl_coef": 0.05, "critic": "separate",
                     "sampling": {"max_new_tokens": 8}, "rewards": [{"fn": "exact_answer"}]}),
}


def recipe_dict(tmp_path: Path, name: str, out: str) -> dict:
    case = dict(CASES[name])
    recipe = {"algorithm": name, "output_dir": str(tmp_path / out),
              "model": {"name_or_path": "builtin:tiny-llama", "dtype": "float32"},
              "data": {"train": {"path": write_jsonl(tmp_path / f"{name}.jsonl", case.pop("rows")())},
                       "max_length": 128},
              "train": {"lr": 3e-3, "batch_size": 4, "max_steps": STEPS, "save_every": 1, "keep_checkpoints": 2,
                        "schedule": "cosine", "warmup": 1, "log_every": 1, "progress": False, "plots": False}}
    return deep_update(recipe, case)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (run / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(run / name)


@pytest.mark.parametrize("name", list(CASES))
def test_kill_9_at_a_random_step_then_resume_equals_the_uninterrupted_run(name, tmp_path):
    rng = random.Random(f"kill-{name}")  # seeded: the same steps on every machine
    kill_at, where = rng.randint(1, STEPS - 1), rng.choice(["after-log", "mid-save"])
    whole = recipe_dict(tmp_path, name, "whole")
    TRAINERS[name].from_recipe(recipe_from_dict(whole)).fit()

    killed = recipe_dict(tmp_path, name, "killed")
    (tmp_path / "killed.yaml").write_text(yaml.safe_dump(killed))
    (tmp_path / "killer.py").write_text(KILLER)
    proc = subprocess.run([sys.executable, str(tmp_path / "killer.py"), str(tmp_path / "killed.yaml"), str(kill_at),
                           where], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    run = tmp_path / "killed"
    assert not (run / "adapter_model.safetensors").exists() and not (run / "model.safetensors").exists()

    TRAINERS[name].from_recipe(recipe_from_dict(deep_update(killed, {"train": {"resume_from": "auto"}}))).fit()
    got, want = metrics(run), metrics(tmp_path / "whole")
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1)), (kill_at, where)
    for g, w in zip(got, want):
        for key in ("loss", "grad_norm", "lr", "reward", "kl", "rewards/margins"):
            if key in w:
                assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-7), (kill_at, where, g["step"], key)
    for key, tensor in final_weights(tmp_path / "whole").items():
        torch.testing.assert_close(final_weights(run)[key], tensor, atol=1e-6, rtol=0, msg=key)
