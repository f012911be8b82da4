"""Time and peak memory of one region of a process (the training), model loading excluded.

CPU: peak resident memory (VmHWM), reset just before the region through /proc/self/clear_refs so
that imports and tokenization before it do not count; the model, already loaded, does. Where the
reset is not possible, the process's lifetime peak (ru_maxrss) is reported instead.
GPU: torch.cuda.max_memory_allocated, its peak reset at the same point.
"""

from __future__ import annotations

import contextlib
import resource
import time

import torch


def _read_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_time() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def device_kind() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Region:
    """`with Region() as r: train()` then r.seconds (wall), r.cpu_seconds (this process's user+system
    time: on a shared CPU it moves less with other people's load than wall time), r.peak_bytes,
    r.memory_kind, r.start_bytes (resident/allocated when the region began)."""

    def __enter__(self) -> "Region":
        if device_kind() == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.memory_kind = "cuda_max_allocated"
            self.start_bytes = torch.cuda.memory_allocated()
        else:
            reset = _reset_peak_rss()
            self.memory_kind = "rss_peak" if reset else "rss_lifetime_peak"
            self.start_bytes = _read_status("VmRSS") or 0
        self.t0, self.cpu0 = time.perf_counter(), _cpu_time()
        return self

    def __exit__(self, *exc) -> None:
        if device_kind() == "cuda":
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0
        self.cpu_seconds = _cpu_time() - self.cpu0
        if device_kind() == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated()
        elif self.memory_kind == "rss_peak":
            self.peak_bytes = _read_status("VmHWM") or 0
        else:
            self.peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def quiet():
    """Silence transformers/datasets progress bars and info logs during setup."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    yield
