"""Per-step timing of a job's timed region, and the profiler's window on a few steady steps.

Every side (Align, TRL, the floor) calls `step_done()` after each optimizer step. The worker
installs a `StepClock`, which marks the step ends: on a GPU with CUDA events on the current stream
(no host sync, so the measurement does not change what it measures), on a CPU with perf_counter.
`step_seconds()` then splits the region into its first step (setup inside the region: trainer
construction, the DPO reference cache, CUDA warm-up) and the steady steps after it: what a long run
is made of. On a GPU each mark also reads the caching allocator's counters (host-side, no sync):
the memory held between steps (weights, gradients, optimizer state, caches) and the peak so far,
which tell a persistent cost from a transient one.
"""

from __future__ import annotations

import time

import torch

_clock: "StepClock | None" = None


class StepClock:
    """Marks the start of the region and the end of every optimizer step; `profiler` (optional) is
    stepped at each step end, so its schedule can skip the first steps."""

    def __init__(self, profiler=None):
        self.cuda = torch.cuda.is_available()
        self.marks: list = []
        self.memory: list[tuple[int, int]] = []
        """(bytes allocated, peak bytes allocated so far) at each mark (GPU only)."""
        self.profiler = profiler
        self.largest_batch = 0
        """Tokens of the largest training micro-batch, padding included (`batch_seen`)."""
        self.mark()

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
            self.memory.append((torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()))
        else:
            self.marks.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        """Seconds of each step (the first from the region's start); call after a device sync."""
        if self.cuda:
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def install(clock: StepClock | None) -> None:
    global _clock
    _clock = clock


def step_done() -> None:
    """Called by every side after each optimizer step; a no-op unless a clock is installed."""
    if _clock is not None:
        _clock.mark()
        if _clock.profiler is not None:
            _clock.profiler.step()


def batch_seen(batch):
    """Called by the sides with each training micro-batch (a mapping with "input_ids"; anything else
    is passed through unseen); the clock keeps the largest one's size in tokens, padding included:
    what its forward computes, and what peak memory follows. Returns the batch."""
    if _clock is not None and hasattr(batch, "get") and isinstance(batch.get("input_ids"), torch.Tensor):
        _clock.largest_batch = max(_clock.largest_batch, batch["input_ids"].numel())
    return batch


def memory_summary(memory: list[tuple[int, int]]) -> dict:
    """{"held_between_steps_bytes": the most allocated at a step's end (the region's start
    excluded), "peak_step": the step (1-based) during which the region's peak was reached} from
    `StepClock.memory`; empty without marks (a CPU)."""
    if len(memory) < 2:
        return {}
    peaks = [peak for _, peak in memory]
    return {"held_between_steps_bytes": max(allocated for allocated, _ in memory[1:]),
            "peak_step": next(i for i, peak in enumerate(peaks) if peak == peaks[-1])}


def summary(seconds: list[float]) -> dict:
    """{"first_step_s", "steady_step_s" (median of the others), "steps_timed"}."""
    import statistics

    if not seconds:
        return {"first_step_s": None, "steady_step_s": None, "steps_timed": 0}
    rest = seconds[1:]
    return {"first_step_s": seconds[0], "steady_step_s": statistics.median(rest) if rest else None,
            "steps_timed": len(seconds)}
