"""Learning-rate schedules: the factor that multiplies `train.lr` at each optimizer step.

Linear warm-up from 0 over the first `warmup` steps, then constant, linear decay to 0, or a half
cosine to 0 at `total` steps: the formulas of transformers' `get_scheduler` ("constant_with_warmup",
"linear", "cosine" with half a cycle), to the same floats, so runs compare with TRL's step by step.
Written here because importing `transformers.optimization` imports peft, bitsandbytes and torch's
inductor (~1.4 s of every run's start, a full fine-tune's included).
"""

from __future__ import annotations

import functools
import math

from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(step: int, schedule: str, warmup: int, total: int) -> float:
    """The learning rate at optimizer step `step` (0-based) over `train.lr`."""
    if step < warmup:
        return float(step) / float(max(1, warmup))
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, float(total - step) / float(max(1, total - warmup)))
    if schedule == "cosine":
        progress = float(step - warmup) / float(max(1, total - warmup))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown schedule {schedule!r}; one of {SCHEDULES}")


def lr_scheduler(optimizer, schedule: str, warmup: int, total: int) -> LambdaLR:
    """torch's LambdaLR over `optimizer` with `lr_factor`."""
    return LambdaLR(optimizer, functools.partial(lr_factor, schedule=schedule, warmup=warmup, total=total))
