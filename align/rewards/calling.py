"""Calling reward functions: arguments by signature, async functions concurrently, checks on what
they return, weighted combination and metrics (see `align.rewards` for the contract)."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from align.errors import AlignError
from align.rewards.loading import FORMS, STANDARD_ARGS, function_name, load_reward_function, spec_name

if TYPE_CHECKING:
    from align.config import RewardFunctionConfig

log = logging.getLogger(__name__)


def _is_async(fn: Callable) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def _excerpt(value, limit: int = 80) -> str:
    if isinstance(value, list) and value and isinstance(value[-1], dict):  # messages: the last turn
        value = value[-1].get("content", value[-1])
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class _EventLoop:
    """One asyncio loop in a daemon thread: works whether or not the caller already runs a loop, and
    keeps async clients (HTTP sessions) that a reward function caches valid across batches."""

    def __init__(self):
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def submit(self, awaitables: list):
        """Start awaiting all of them concurrently; returns a concurrent Future of their results
        (exceptions are returned in place of results)."""
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name="align-rewards", daemon=True).start()

        async def gather():
            return await asyncio.gather(*awaitables, return_exceptions=True)

        return asyncio.run_coroutine_threadsafe(gather(), self._loop)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop = None


class RewardFunctions:
    """Several reward functions with weights: `values = rewards(...)` -> [B, F], `rewards.combine(values)` -> [B].

    names: one metric name per function (unique); keys: where each came from in the recipe, or None.
    """

    def __init__(self, functions: list[Callable], weights: list[float] | None = None, names: list[str] | None = None,
                 keys: list[str | None] | None = None):
        if not functions:
            raise AlignError("no reward functions given; add at least one, e.g. grpo.rewards: [{fn: exact_answer}]")
        weights = [1.0] * len(functions) if weights is None else [float(w) for w in weights]
        names = names or [function_name(fn) for fn in functions]
        keys = keys or [None] * len(functions)
        if not len(weights) == len(names) == len(keys) == len(functions):
            raise ValueError(f"{len(functions)} reward functions but {len(weights)} weights, {len(names)} names")
        for fn, name, key in zip(functions, names, keys):
            if not callable(fn):
                raise AlignError(f"{key or 'reward ' + repr(name)}: {fn!r} is not callable")
        self.functions, self.weights, self.keys = list(functions), weights, keys
        self.names = _unique(names)
        self._loop = _EventLoop()
        self._warned_all_none = False

    @classmethod
    def from_config(cls, entries: list["RewardFunctionConfig"], key: str = "grpo.rewards") -> "RewardFunctions":
        """Load every `{fn, weight, name, kwargs}` entry of a recipe's reward list."""
        if not entries:
            raise AlignError(f"{key} is empty: add at least one reward, e.g.\n  {key}:\n    - {{fn: exact_answer}}\n"
                             f"A reward is {FORMS}")
        functions = [load_reward_function(e.fn, e.kwargs, key=f"{key}[{i}]") for i, e in enumerate(entries)]
        return cls(functions, [e.weight for e in entries], [e.name or spec_name(e.fn) for e in entries],
                   [f"{key}[{i}]" for i in range(len(entries))])

    # --- calling

    def __call__(self, prompts: list, completions: list[str], completion_ids: list[list[int]],
                 columns: dict[str, list]) -> torch.Tensor:
        """Every function on the batch -> float32 [B, F], NaN where a function returned None.

        Async functions are awaited together while the plain ones run. Raises AlignError naming the
        function and the first failing row (with an excerpt of its prompt and completion).
        """
        return self._call(prompts, completions, completion_ids, columns, phase="")

    def dry_run(self, prompts: list, completions: list[str], completion_ids: list[list[int]],
                columns: dict[str, list]) -> None:
        """Call each function once on real sample rows before training; AlignError on a signature the
        columns cannot satisfy, an exception, a wrong length, a non-numeric, NaN or infinite value."""
        values = self._call(prompts, completions, completion_ids, columns, phase="dry run before training: ")
        for f, name in enumerate(self.names):
            if values[:, f].isnan().all():
                log.warning("reward %s returned None for all %d sample rows of the dry run", name, len(completions))

    def _call(self, prompts, completions, completion_ids, columns, phase: str) -> torch.Tensor:
        batch = {**columns, "prompts": prompts, "completions": completions, "completion_ids": completion_ids}
        size = len(completions)
        for name, column in batch.items():
            if len(column) != size:
                raise ValueError(f"column {name!r} has {len(column)} values for {size} completions")
        labels = [phase + self._label(i) for i in range(len(self.functions))]
        plans = [self._arguments(fn, batch, label) for fn, label in zip(self.functions, labels)]
        results: list = [None] * len(self.functions)
        pending = [i for i, fn in enumerate(self.functions) if _is_async(fn)]
        future = self._loop.submit([self._invoke(i, plans[i], results) for i in pending]) if pending else None
        for i, fn in enumerate(self.functions):
            if i not in pending:
                try:
                    results[i] = self._await(fn(**plans[i]))
                except Exception as error:  # noqa: BLE001 - reported with the function and row below
                    results[i] = error
        if future is not None:
            future.result()
        out = []
        for fn, plan, label, result in zip(self.functions, plans, labels, results):
            if isinstance(result, Exception):
                self._raise_failure(fn, plan, batch, result, label)
            out.append(_check(result, size, batch, label))
        return torch.tensor(out, dtype=torch.float32).reshape(len(self.functions), size).T.contiguous()

    async def _invoke(self, i: int, arguments: dict, results: list) -> None:
        try:
            results[i] = await self.functions[i](**arguments)
        except Exception as error:  # noqa: BLE001
            results[i] = error

    def _await(self, result):
        """A plain function may still return an awaitable (e.g. an object with an async __call__)."""
        if not inspect.isawaitable(result):
            return result
        out = self._loop.submit([result]).result()[0]
        if isinstance(out, Exception):
            raise out
        return out

    def _label(self, i: int) -> str:
        return f"reward function {self.names[i]!r}" + (f" ({self.keys[i]})" if self.keys[i] else "")

    @staticmethod
    def _arguments(fn: Callable, batch: dict, label: str) -> dict:
        """The keyword arguments `fn` takes: all of `batch` (less kwargs already bound) if it has
        **kwargs, else the parameters it declares; AlignError if a required parameter is not there."""
        bound = fn.keywords if isinstance(fn, functools.partial) else {}
        available = {k: v for k, v in batch.items() if k not in bound}
        try:
            parameters = inspect.signature(fn).parameters
        except (TypeError, ValueError):  # some builtins and C callables have no signature
            return available
        out = {}
        for name, p in parameters.items():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if name in available and p.kind is not p.POSITIONAL_ONLY:
                out[name] = available[name]
            elif p.default is p.empty:
                columns = [k for k in batch if k not in STANDARD_ARGS]
                raise AlignError(
                    f"{label} requires a parameter {name!r}, which is neither one of {', '.join(STANDARD_ARGS)} "
                    f"nor a dataset column (columns: {', '.join(columns) or 'none'}). Rename it to a column, give "
                    f"it a default, or bind it with `kwargs: {{{name}: ...}}` in the recipe")
        return available if any(p.kind is p.VAR_KEYWORD for p in parameters.values()) else out

    def _raise_failure(self, fn: Callable, arguments: dict, batch: dict, error: Exception, label: str):
        """Re-call `fn` row by row to find the first failing row, then raise an AlignError naming it."""
        size = len(batch["completions"])
        for row in range(size):
            one = {k: v[row:row + 1] if isinstance(v, (list, tuple)) else v for k, v in arguments.items()}
            try:
                self._await(fn(**one))
            except Exception as row_error:  # noqa: BLE001
                raise AlignError(f"{label} raised {type(row_error).__name__}: {row_error}\n{_where(batch, row)}\n"
                                 "Fix the function, or return None for rows it does not apply to") from row_error
        raise AlignError(f"{label} raised {type(error).__name__}: {error}\n  on the batch of {size} rows "
                         "(each row alone succeeds)") from error

    # --- combining and logging

    def combine(self, values: torch.Tensor) -> torch.Tensor:
        """[B, F] -> [B]: sum over functions of weight * value, skipping None (NaN) entries.

        A row where every function returned None has no reward: NaN, never 0 (with a warning, once).
        GRPO gives it advantage 0 and leaves it out of its group's mean and std (as TRL does); PPO
        leaves it out of the loss.
        """
        if values.isnan().all(dim=1).any() and not self._warned_all_none:
            self._warned_all_none = True
            log.warning("every reward function returned None for some completions: their reward is NaN, not 0 "
                        "(GRPO: advantage 0, left out of the group's mean and std; PPO: not trained; metrics: "
                        "rewards/total/none). This is reported once")
        return self._combine(values)

    def _combine(self, values: torch.Tensor) -> torch.Tensor:
        weights = torch.tensor(self.weights, dtype=values.dtype, device=values.device)
        total = torch.nansum(values * weights, dim=1)
        return total.masked_fill(values.isnan().all(dim=1), math.nan)

    def metrics(self, values: torch.Tensor) -> dict[str, float]:
        """`rewards/<name>/mean`, `/std` (over the values that are not None) and `/none` (fraction of None)
        per function; `rewards/total/mean`, `/std` of the weighted sum over the rows with at least one
        value, and `rewards/total/none`, the fraction of rows where every function returned None."""
        out = {}
        for f, name in enumerate(self.names):
            out.update(_column_metrics(f"rewards/{name}", values[:, f]))
        out.update(_column_metrics("rewards/total", self._combine(values)))
        return out

    def close(self) -> None:
        """Stop the event loop thread used for async functions (it is a daemon; closing is optional)."""
        self._loop.close()


def _column_metrics(prefix: str, column: torch.Tensor) -> dict[str, float]:
    """`<prefix>/mean`, `/std` (population) over the values that are not NaN, when there are any, and
    `<prefix>/none`, the fraction of NaN."""
    present = column[~column.isnan()]
    out = {f"{prefix}/mean": present.mean().item(), f"{prefix}/std": present.std(correction=0).item()} \
        if len(present) else {}
    return {**out, f"{prefix}/none": column.isnan().float().mean().item()}


def _unique(names: list[str]) -> list[str]:
    """Suffix repeated names: [a, a, b] -> [a, a_2, b]."""
    out: list[str] = []
    for name in names:
        candidate, n = name, 1
        while candidate in out:
            n += 1
            candidate = f"{name}_{n}"
        out.append(candidate)
    return out


def _where(batch: dict, row: int) -> str:
    """`at row 3 of the batch` with excerpts of that row's prompt and completion."""
    return (f"  at row {row} of the batch\n  prompt: {_excerpt(batch['prompts'][row])}\n"
            f"  completion: {_excerpt(batch['completions'][row])}")


def _check(result, size: int, batch: dict, label: str) -> list[float]:
    """A function's result as `size` floats (NaN for None), or an AlignError saying what is wrong."""
    if isinstance(result, (str, bytes)) or not hasattr(result, "__len__") or not hasattr(result, "__iter__"):
        raise AlignError(f"{label} returned {type(result).__name__} {_excerpt(result)}; a reward function returns "
                         "a list with one float (or None) per completion")
    if len(result) != size:
        raise AlignError(f"{label} returned {len(result)} value(s) for {size} completions; return one value per "
                         "completion (None where it does not apply)")
    values = []
    for row, value in enumerate(result):
        if value is None:
            values.append(math.nan)
            continue
        if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
            raise AlignError(f"{label} returned {type(value).__name__} {_excerpt(value)}; values must be numbers "
                             f"(or None)\n{_where(batch, row)}")
        number = float(value)
        if not math.isfinite(number):
            raise AlignError(f"{label} returned {number}; values must be finite numbers (return None for a sample "
                             f"the function does not apply to)\n{_where(batch, row)}")
        values.append(number)
    return values
