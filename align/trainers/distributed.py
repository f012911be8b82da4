"""Data parallelism: how the processes of a launch (`accelerate launch`, `torchrun`) share out a
list of work items and put the results back together.

A list is shared out round-robin: process p of N takes items p, p+N, p+2N, ... With one process
every function here is the identity (or a plain sum), so the trainers read the same either way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object


def shard(items: Sequence) -> Sequence:
    """This process's share of `items`: items p, p+N, p+2N, ... (p: process index, N: processes)."""
    state = PartialState()
    return items[state.process_index::state.num_processes]


def gather_shares(share: list) -> list:
    """The inverse of `shard`: every process's share, back in the original order, on every process."""
    parts = gather_object([share])
    return [parts[i % len(parts)][i // len(parts)] for i in range(sum(len(part) for part in parts))]


def map_in_shares(items: Sequence, chunk_size: int, fn: Callable[[Sequence], list]) -> list:
    """`fn` over this process's share of `items`, `chunk_size` items a call (fn returns one result
    per item of its chunk); every process gets all the results, in the order of `items`."""
    mine = shard(items)
    results: list = []
    for start in range(0, len(mine), chunk_size):
        results.extend(fn(mine[start:start + chunk_size]))
    return gather_shares(results)


def sum_over_processes(values: dict[str, float]) -> dict[str, float]:
    """Each value summed over the processes (a key missing on a process counts as 0 there)."""
    total: dict[str, float] = {}
    for part in gather_object([values]):
        for key, value in part.items():
            total[key] = total.get(key, 0.0) + value
    return total


def from_main_process(value):
    """The main process's `value`, on every process."""
    return broadcast_object_list([value])[0]
