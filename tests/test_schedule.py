"""Learning-rate schedules (`align.trainers.schedule`): transformers' formulas to the same floats,
and a fresh start leaves the heavy imports behind."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from align.trainers.schedule import lr_scheduler


@pytest.mark.parametrize("schedule, name", [("constant", "constant_with_warmup"), ("linear", "linear"),
                                            ("cosine", "cosine")])
@pytest.mark.parametrize("warmup, total", [(0, 1), (0, 17), (3, 17), (5, 5), (7, 3)])
def test_schedules_equal_transformers_step_by_step(schedule, name, warmup, total):
    from transformers import get_scheduler

    def lrs(make):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
        scheduler, out = make(optimizer), []
        for _ in range(total + 3):  # past the end too
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out

    ours = lrs(lambda optimizer: lr_scheduler(optimizer, schedule, warmup, total))
    theirs = lrs(lambda optimizer: get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total))
    assert ours == theirs
    assert len(set(ours)) > 1 or (schedule == "constant" and warmup == 0)  # the schedule does something


def test_training_needs_no_peft_bitsandbytes_or_inductor_import(make_recipe):
    """`transformers.get_scheduler` imported peft, bitsandbytes and torch's inductor (~1.4 s) inside
    the first optimizer step; a full fine-tune's loop needs none of them."""
    recipe = make_recipe(raw=True, train={"max_steps": 1, "warmup": 1, "schedule": "cosine"})
    code = ("import sys\nfrom align.config import recipe_from_dict\nfrom align.trainers import SFTTrainer\n"
            f"SFTTrainer.from_recipe(recipe_from_dict({recipe!r})).fit()\n"
            "print(sorted(m for m in ('peft', 'bitsandbytes', 'torch._inductor.compile_fx', 'transformers.optimization')"
            " if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
