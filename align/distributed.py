"""Data parallelism: how the processes of a launch (`accelerate launch`, `torchrun`) share out a
list of work items and put the results back together.

A list is shared out round-robin: process p of N takes items p, p+N, p+2N, ... With one process
every function here is the identity (or a plain sum), so the trainers read the same either way.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object


def shard(items: Sequence) -> Sequence:
    """This process's share of `items`: items p, p+N, p+2N, ... (p: process index, N: processes)."""
    state = PartialState()
    return items[state.process_index::state.num_processes]


def shares(items: Sequence) -> list[Sequence]:
    """Every process's share of `items` (`shard`'s), in process order."""
    n = PartialState().num_processes
    return [items[p::n] for p in range(n)]


def most_chunks(num_items: int, chunk_size: int) -> int:
    """The number of chunks of `chunk_size` the busiest process cuts its share of `num_items` items
    into (the first: shares are round-robin, see `shard`)."""
    return math.ceil(math.ceil(num_items / PartialState().num_processes) / chunk_size)


def gather_shares(share: list) -> list:
    """The inverse of `shard`: every process's share, back in the original order, on every process."""
    parts = gather_object([share])
    return [parts[i % len(parts)][i // len(parts)] for i in range(sum(len(part) for part in parts))]


def map_in_shares(items: Sequence, chunk_size: int, fn: Callable[[Sequence], list], even: bool = False) -> list:
    """`fn` over this process's share of `items`, `chunk_size` items a call (fn returns one result
    per item of its chunk); every process gets all the results, in the order of `items`. even: every
    process calls fn as often as the process with the most items (fn runs a collective, e.g. a
    forward of a sharded model), the extra calls on the first items, their results dropped."""
    mine = shard(items)
    results: list = []
    for start in range(0, len(mine), chunk_size):
        results.extend(fn(mine[start:start + chunk_size]))
    if even and items:
        for _ in range(most_chunks(len(items), chunk_size) - math.ceil(len(mine) / chunk_size)):
            fn(items[:chunk_size])
    return gather_shares(results)


def sum_over_processes(values: dict[str, float]) -> dict[str, float]:
    """Each value summed over the processes (a key missing on a process counts as 0 there)."""
    total: dict[str, float] = {}
    for part in gather_object([values]):
        for key, value in part.items():
            total[key] = total.get(key, 0.0) + value
    return total


def sum_tensors_over_processes(values: dict[str, torch.Tensor | float],
                               device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Each value (a 0-dim tensor or a number) summed over the processes, as 0-dim tensors on
    `device` (default: the first tensor's): one all-reduce of their stack, in sorted key order, so
    every process must pass the same keys. A collective, not a host read: nothing waits here."""
    keys = sorted(values)
    if device is None:
        device = next(v.device for v in values.values() if isinstance(v, torch.Tensor))
    dtype = torch.float32 if device.type == "mps" else torch.float64
    stacked = torch.stack([torch.as_tensor(values[k], dtype=dtype, device=device).reshape(()) for k in keys])
    if PartialState().num_processes > 1:
        torch.distributed.all_reduce(stacked)
    return dict(zip(keys, stacked.unbind()))


@contextlib.contextmanager
def main_processes_first() -> Iterator[None]:
    """Runs the block on the main process first, then on each machine's main process, then on the
    others: work that fills a cache (datasets' downloads and tokenized splits) is done once per cache
    the processes share (a shared disk: once; a disk per machine: once per machine), and the rest
    read it. One process: just runs the block. The process state must be set up first (a trainer's
    `process_accelerator`): on a machine without a GPU a bare PartialState() would see one process,
    and every later Accelerator would keep that state.

    Three stages, two barriers on every process: the main process, then the other machines' main
    processes, then the rest. A process that raises in the block still reaches its barriers, so the
    others go on (and meet the same error, where it comes from the data) instead of waiting until the
    process group's timeout."""
    if not PartialState._shared_state:
        raise RuntimeError("main_processes_first: set up the process state first (process_accelerator())")
    state = PartialState()
    stage = 0 if state.is_main_process else 1 if state.is_local_main_process else 2
    for _ in range(stage):
        state.wait_for_everyone()
    try:
        yield
    finally:
        for _ in range(stage, 2):
            state.wait_for_everyone()


def from_every_process(value) -> list:
    """Every process's `value`, in process order, on every process."""
    return gather_object([value])


def from_main_process(value):
    """The main process's `value`, on every process."""
    return broadcast_object_list([value])[0]
