"""One measured job in its own process: `python -m benchmarks.worker SPEC.json RESULT.json`.

Setup (imports, tokenization, model load) is untimed; then the training epoch runs inside a
`Region` (wall time, peak memory); then the harness's held-out loss is computed on the result.
A fresh process per job keeps peak memory and caches from leaking between jobs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import sys
import traceback
from pathlib import Path


def run(spec) -> dict:
    import torch
    from transformers import AutoTokenizer

    from benchmarks import steps
    from benchmarks.assets import matmul_parameters, peak_flops
    from benchmarks.cases import CASES
    from benchmarks.common import device
    from benchmarks.evaluate import plain
    from benchmarks.measure import Region, device_kind, quiet

    os.environ["ALIGN_CACHE"] = str(Path(spec.run_dir) / "align-cache")  # fresh: the DPO reference cache is built
    case = CASES[spec.case]
    if spec.threads:
        torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    result: dict = {}
    with quiet():
        tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
        result["tokenizer_class"] = type(tokenizer).__name__  # picked from the model's type: see assets.py
        if spec.side == "floor":
            model = case.initial_model(spec).to(device())  # the held-out pass runs where the batches go
            result["initial_loss"] = case.heldout(spec, model, tokenizer)
            if hasattr(case, "tokens"):
                result["tokens"] = case.tokens(spec, tokenizer)
            prepared = case.floor(spec, model, tokenizer)
            del model
        else:
            prepared = getattr(case, spec.side)(spec)
    gc.collect()
    with Region() as region, profiled(os.environ.get("ALIGN_BENCH_PROFILE"),
                                      f"{spec.case} {spec.side} {spec.variant}") as profiler:
        clock = steps.StepClock(profiler)
        steps.install(clock)
        try:
            prepared.train()
        finally:
            steps.install(None)
    final = plain(prepared.model())  # (TRL's keeps accelerate's bf16 autocast wrapper)
    step_seconds = clock.step_seconds()  # the region's exit synchronized the device
    result.update(seconds=region.seconds, cpu_seconds=region.cpu_seconds, peak_bytes=region.peak_bytes, start_bytes=region.start_bytes,
                  step_seconds=step_seconds, **steps.summary(step_seconds), **steps.memory_summary(clock.memory),
                  growth_bytes=region.peak_bytes - region.start_bytes, largest_batch_tokens=clock.largest_batch or None,
                  memory_kind=region.memory_kind, steps=prepared.steps(), work=prepared.work(), device=device_kind(),
                  device_name=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                  matmul_params=matmul_parameters(final), peak_flops=peak_flops(),
                  train_log=prepared.log() if spec.log_every == 1 else [],  # (TRL logs the mean since its last log)
                  heldout_loss=case.heldout(spec, final, tokenizer))
    return result


PROFILED_STEPS = dict(wait=1, warmup=1, active=2)
"""The profiler's window: the first step skipped (setup, warm-up), one step to warm the profiler up,
then two steady optimizer steps recorded (each side marks its step ends: benchmarks.steps)."""


@contextlib.contextmanager
def profiled(path: str | None, title: str, rows: int = 30):
    """With a path (run.py --profile), yield a profiler whose window is PROFILED_STEPS (stepped by the
    step clock) and append to that file the window's device-busy and host-op seconds and its top
    operations by self device time and by self CPU time. Without one, yield None."""
    if not path:
        yield None
        return

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, schedule

    windows = []

    def report(prof):  # also called on exit mid-window, where only the step marker may have been recorded
        events = prof.key_averages()
        if any(not e.key.startswith("ProfilerStep") for e in events):
            windows.append(events)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, schedule=schedule(**PROFILED_STEPS, repeat=1), on_trace_ready=report) as prof:
        yield prof
    with open(path, "a") as f:
        if not windows:
            f.write(f"\n\n==== {title}: fewer steps than the profiler's window {PROFILED_STEPS}: nothing recorded\n")
            return
        events = windows[0]
        busy = sum(e.self_device_time_total for e in events if e.device_type != DeviceType.CPU) / 1e6  # kernels
        # only: an operator's row repeats the time of the kernels it launched
        cpu = sum(e.self_cpu_time_total for e in events) / 1e6
        device_sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        f.write(f"\n\n==== {title}: up to {PROFILED_STEPS['active']} steady steps (fewer when the run ends "
                f"first): device busy {busy:.3f} s, host ops {cpu:.3f} s\n")
        f.write(events.table(sort_by=device_sort, row_limit=rows, max_name_column_width=60))
        f.write(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))


def main(spec_path: str, result_path: str) -> None:
    from benchmarks.common import Spec

    spec = Spec(**json.loads(Path(spec_path).read_text()))
    try:
        result = {"ok": True, **run(spec)}
    except Exception as error:  # reported in the table as FAILED, with the traceback in the JSON
        result = {"ok": False, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    result["spec"] = dataclasses.asdict(spec)
    Path(result_path).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
