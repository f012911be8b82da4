"""Calling reward functions: arguments by signature, async functions concurrently, a time limit per
call, checks on what they return, weighted combination and metrics (see `align.rewards` for the contract)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from align.errors import AlignError
from align.rewards.loading import FORMS, STANDARD_ARGS, function_name, load_reward_function, spec_name

if TYPE_CHECKING:
    from align.config import RewardFunctionConfig

log = logging.getLogger(__name__)

TIMEOUT_S = 600.0
"""Default longest time one call (one batch) of a reward function may take, as `timeout_s` in a recipe."""
MAX_ABS = 1e6
"""Default bound on |reward|, as `max_abs` in a recipe."""


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

    def submit(self, call: Callable) -> concurrent.futures.Future:
        """Start awaiting `call()` on the loop; a concurrent Future of `(True, result)` or `(False, what it
        raised)`. Cancelling the future cancels the task."""
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name="align-rewards", daemon=True).start()

        async def outcome():
            try:
                return True, await call()
            except asyncio.CancelledError:
                raise
            except BaseException as error:  # noqa: BLE001 - SystemExit too: it must not stop the loop
                return False, error

        return asyncio.run_coroutine_threadsafe(outcome(), self._loop)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop = None


def _in_thread(fn: Callable, arguments: dict) -> concurrent.futures.Future:
    """Run fn(**arguments) in a daemon thread (a hung one does not keep the process alive at exit) with
    the caller's grad mode and CUDA device; a Future of `(True, result)` or `(False, what it raised)`.
    Only the thread catches what fn raises: a Ctrl-C reaches the waiting caller as usual."""
    future = concurrent.futures.Future()
    future.set_running_or_notify_cancel()  # cancel() is then a no-op: a thread cannot be stopped
    grad = torch.is_grad_enabled()
    device = torch.cuda.current_device() if torch.cuda.is_initialized() else None

    def run():
        try:
            if device is not None:
                torch.cuda.set_device(device)
            with torch.set_grad_enabled(grad):
                future.set_result((True, fn(**arguments)))
        except BaseException as error:  # noqa: BLE001 - SystemExit and KeyboardInterrupt too: reported by name
            future.set_result((False, error))

    threading.Thread(target=run, name="align-reward", daemon=True).start()
    return future


PROMPT_COLUMNS = ("prompt", "prompt_ids")
"""Dataset columns that do not reach a reward function as columns: the prompt comes as `prompts`."""


def require_rewards(entries: list, key: str) -> None:
    """AlignError naming `key` if a recipe's reward list is empty."""
    if not entries:
        raise AlignError(f"{key} is empty: add at least one reward, e.g.\n  {key}:\n    - {{fn: exact_answer}}\n"
                         f"A reward is {FORMS}")


def describe(name: str, key: str | None) -> str:
    """How messages name a reward function: its metric name and where the recipe gives it."""
    return f"reward function {name!r}" + (f" ({key})" if key else "")


def check_columns(fn: Callable, columns: list[str], name: str, key: str | None, split: str) -> None:
    """AlignError, the one a call would raise, if `fn` requires a parameter that is neither a standard
    argument nor one of a split's `columns`: checked before any model loads."""
    reaching = [c for c in columns if c not in PROMPT_COLUMNS]
    arguments_for(fn, dict.fromkeys([*reaching, *STANDARD_ARGS]), f"{split}: {describe(name, key)}")


def arguments_for(fn: Callable, batch: dict, label: str) -> dict:
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
        elif p.kind is p.POSITIONAL_ONLY and p.default is p.empty:
            raise AlignError(f"{label}: its parameter {name!r} is positional-only (before a `/`), but reward functions "
                             "are called with keyword arguments (prompts=..., completions=..., columns by name): "
                             "drop the `/`")
        elif p.default is p.empty:
            columns = [k for k in batch if k not in STANDARD_ARGS]
            raise AlignError(
                f"{label} requires a parameter {name!r}, which is neither one of {', '.join(STANDARD_ARGS)} "
                f"nor a dataset column (columns: {', '.join(columns) or 'none'}). Rename it to a column, give "
                f"it a default, or bind it with `kwargs: {{{name}: ...}}` in the recipe (align eval, which takes "
                f"no recipe: name a column of the data file {name!r})")
    return available if any(p.kind is p.VAR_KEYWORD for p in parameters.values()) else out


class _Timeout(Exception):
    """A call ran past its function's timeout."""


class RewardFunctions:
    """Several reward functions with weights: `values = rewards(...)` -> [B, F], `rewards.combine(values)` -> [B].

    names: one metric name per function (unique); keys: where each came from in the recipe, or None.
    timeouts: seconds one call may take (None: no limit), max_abs: bound on |reward|; one for all
    functions or one per function.
    """

    def __init__(self, functions: list[Callable], weights: list[float] | None = None, names: list[str] | None = None,
                 keys: list[str | None] | None = None, timeouts: float | None | list[float | None] = TIMEOUT_S,
                 max_abs: float | list[float] = MAX_ABS):
        if not functions:
            raise AlignError("no reward functions given; add at least one, e.g. grpo.rewards: [{fn: exact_answer}]")
        n = len(functions)
        weights = [1.0] * n if weights is None else [float(w) for w in weights]
        names = names or [function_name(fn) for fn in functions]
        keys = keys or [None] * n
        timeouts = list(timeouts) if isinstance(timeouts, (list, tuple)) else [timeouts] * n
        max_abs = [float(m) for m in max_abs] if isinstance(max_abs, (list, tuple)) else [float(max_abs)] * n
        if not len(weights) == len(names) == len(keys) == len(timeouts) == len(max_abs) == n:
            raise ValueError(f"{n} reward functions but {len(weights)} weights, {len(names)} names, {len(keys)} "
                             f"keys, {len(timeouts)} timeouts, {len(max_abs)} max_abs")
        for fn, name, key, weight, timeout, bound in zip(functions, names, keys, weights, timeouts, max_abs):
            where = key or "reward " + repr(name)
            if not callable(fn):
                raise AlignError(f"{where}: {fn!r} is not callable")
            if not math.isfinite(weight):
                raise AlignError(f"{where}: weight {weight} is not a finite number")
            if timeout is not None and not timeout > 0:
                raise AlignError(f"{where}: timeout {timeout} must be a number of seconds > 0 (None: no limit)")
            if not bound > 0:
                raise AlignError(f"{where}: max_abs {bound} must be > 0")
        self.functions, self.weights, self.keys = list(functions), weights, keys
        self.timeouts, self.max_abs = [None if t is None else float(t) for t in timeouts], max_abs
        self.names = _unique(names)
        self._loop = _EventLoop()
        self._warned_all_none = False

    @classmethod
    def from_config(cls, entries: list["RewardFunctionConfig"], key: str = "grpo.rewards") -> "RewardFunctions":
        """Load every `{fn, weight, name, kwargs, timeout_s, max_abs}` entry of a recipe's reward list."""
        require_rewards(entries, key)
        functions = [load_reward_function(e.fn, e.kwargs, key=f"{key}[{i}]") for i, e in enumerate(entries)]
        return cls(functions, [e.weight for e in entries], [e.name or spec_name(e.fn) for e in entries],
                   [f"{key}[{i}]" for i in range(len(entries))], [e.timeout_s for e in entries],
                   [e.max_abs for e in entries])

    def match_policy(self, tokenizer, eos_ids: list[int]) -> None:
        """AlignError unless every reward model among the functions reads the policy's `tokenizer`;
        they take `eos_ids` as the ids that end the policy's completions (`RewardScorer.match_policy`)."""
        for i, fn in enumerate(self.functions):
            if callable(getattr(fn, "match_policy", None)):
                fn.match_policy(tokenizer, eos_ids, self._label(i))

    @property
    def sharded(self) -> bool:
        """Whether a function is a reward model sharded over the processes (`RewardScorer.sharded`):
        every process must then call the functions at the same points."""
        return any(getattr(fn, "sharded", False) for fn in self.functions)

    def pad_sharded(self) -> None:
        """On a process with no completions where the others score theirs: the sharded reward models'
        forwards, in the order `__call__` runs them, so that every process runs as many."""
        for fn in self.functions:
            if getattr(fn, "sharded", False):
                fn([], [], [])

    # --- calling

    def __call__(self, prompts: list, completions: list[str], completion_ids: list[list[int]],
                 columns: dict[str, list]) -> torch.Tensor:
        """Every function on the batch -> float32 [B, F], NaN where a function returned None.

        Async functions are awaited together while the plain ones run, one after another, each in a
        worker thread. Raises AlignError naming the function and the first failing row (with an excerpt
        of its prompt and completion), or the function that ran past its timeout.
        """
        return self._call(prompts, completions, completion_ids, columns, phase="")

    def dry_run(self, prompts: list, completions: list[str], completion_ids: list[list[int]],
                columns: dict[str, list]) -> None:
        """Call each function once on real sample rows before training; AlignError on a signature the
        columns cannot satisfy, an exception or exit, a timeout, a wrong length or shape, a non-numeric,
        NaN, infinite or too large value."""
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
        plans = [arguments_for(fn, batch, label) for fn, label in zip(self.functions, labels)]
        start = time.monotonic()
        running = {i: self._start(i, plans[i]) for i, fn in enumerate(self.functions) if _is_async(fn)}
        outcomes: list = [None] * len(self.functions)
        try:
            for i in range(len(self.functions)):
                if i not in running:
                    outcomes[i] = self._outcome(i, self._start(i, plans[i]), time.monotonic())
            for i, future in running.items():
                outcomes[i] = self._outcome(i, future, start)
        except _Timeout as timeout:
            for future in running.values():
                future.cancel()
            i = timeout.args[0]
            setting = self._setting(i, "timeout_s", "timeouts")
            raise AlignError(f"{labels[i]} took longer than {self.timeouts[i]:g} s on a batch of {size} completions; "
                             "make it faster (a plain function keeps running in its thread), or raise the limit "
                             f"with {setting} (null: no limit)") from None
        out = []
        for i, ((ok, result), label) in enumerate(zip(outcomes, labels)):
            if not ok:
                self._raise_failure(i, plans[i], batch, result, label)
            out.append(_check(result, size, batch, label, self.max_abs[i], self._setting(i, "max_abs", "max_abs")))
        return torch.tensor(out, dtype=torch.float32).reshape(len(self.functions), size).T.contiguous()

    def _start(self, i: int, arguments: dict) -> concurrent.futures.Future:
        """Start function i: an async one on the event loop, a plain one in a worker thread."""
        fn = self.functions[i]
        return self._loop.submit(functools.partial(fn, **arguments)) if _is_async(fn) else _in_thread(fn, arguments)

    def _outcome(self, i: int, future: concurrent.futures.Future, start: float) -> tuple[bool, object]:
        """(True, result) or (False, what it raised) of a call started at `start`; _Timeout(i) past its timeout.
        A plain function may still return an awaitable (e.g. an object with an async __call__): awaited too."""
        deadline = None if self.timeouts[i] is None else start + self.timeouts[i]
        while True:
            try:
                ok, result = future.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
            except concurrent.futures.TimeoutError:
                future.cancel()
                raise _Timeout(i) from None
            if not (ok and inspect.isawaitable(result)):
                return ok, result
            future = self._loop.submit(lambda awaitable=result: awaitable)

    def _setting(self, i: int, recipe: str, argument: str) -> str:
        """Where to change a setting of function i: its recipe key, or the RewardFunctions argument."""
        return f"{self.keys[i]}.{recipe}" if self.keys[i] else f"RewardFunctions({argument}=...)"

    def _label(self, i: int) -> str:
        return describe(self.names[i], self.keys[i])

    def _raise_failure(self, i: int, arguments: dict, batch: dict, error: BaseException, label: str):
        """Re-call function i row by row to find the first failing row, then raise an AlignError naming it.
        An exit (SystemExit, KeyboardInterrupt) raised by the function is reported as it is."""
        if not isinstance(error, Exception):
            what = (f"called sys.exit({error.code!r}) / raised SystemExit" if isinstance(error, SystemExit)
                    else f"raised {type(error).__name__}")
            raise AlignError(f"{label} {what}; a reward must return scores (one float or None per completion), "
                             "not end the run") from error
        size = len(batch["completions"])
        if getattr(self.functions[i], "sharded", False):  # its calls are collectives: no retry on this process alone
            raise AlignError(f"{label} raised {type(error).__name__}: {error} on a batch of {size} rows") from error
        for row in range(size):
            one = {k: v[row:row + 1] if isinstance(v, (list, tuple)) else v for k, v in arguments.items()}
            try:
                ok, row_error = self._outcome(i, self._start(i, one), time.monotonic())
            except _Timeout:
                break
            if not ok:
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
    """`<prefix>/mean`, `/std` (unbiased, as TRL's and GRPO's reward_std; 0 for one value) over the
    values that are not NaN, when there are any, and `<prefix>/none`, the fraction of NaN."""
    present = column[~column.isnan()]
    std = present.std().item() if len(present) > 1 else 0.0
    out = {f"{prefix}/mean": present.mean().item(), f"{prefix}/std": std} if len(present) else {}
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


def _check(result, size: int, batch: dict, label: str, max_abs: float, setting: str) -> list[float]:
    """A function's result as `size` floats (NaN for None), or an AlignError saying what is wrong.
    setting: where to raise max_abs (its recipe key)."""
    ndim = getattr(result, "ndim", None)
    if ndim == 0 or isinstance(result, (str, bytes)) or not hasattr(result, "__len__") \
            or not hasattr(result, "__iter__"):
        raise AlignError(f"{label} returned {type(result).__name__} {_excerpt(result)}; a reward function returns "
                         "a list with one float (or None) per completion")
    nested = next((v for v in result if isinstance(v, (list, tuple)) or getattr(v, "ndim", 0) > 0), None) \
        if ndim is None else None
    if (ndim or 1) > 1 or nested is not None:
        shape = list(result.shape) if ndim else [len(result), len(nested)]
        raise AlignError(f"{label} returned a {type(result).__name__} of shape {shape}; a reward function returns "
                         f"one number per completion: a flat list (or 1-D tensor) of {size} floats or None, e.g. "
                         "scores.squeeze(-1).tolist() for scores of shape [B, 1]")
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
        if abs(number) > max_abs:
            raise AlignError(f"{label} returned {number:g}, more than max_abs={max_abs:g} in absolute value\n"
                             f"{_where(batch, row)}\nScale the reward down, or raise the bound with {setting}")
        values.append(number)
    return values
