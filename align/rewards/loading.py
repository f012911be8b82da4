"""Loading reward functions by name: the registry, `module:func`, `path/to/file.py:func` and
reward-model directories (see `align.rewards` for the contract).

    exact_answer                  a built-in (see REGISTRY) or a name given with @register
    my_package.rewards:concise    module:func (the current directory is importable)
    path/to/my_rewards.py:concise a Python file, relative to the current directory
    runs/rm                       a reward-model directory trained by Align
"""

from __future__ import annotations

import difflib
import functools
import inspect
import logging
import os
from collections.abc import Callable
from pathlib import Path

from align.errors import AlignError
from align.registry import import_module, is_missing, load_file

log = logging.getLogger(__name__)


def function_name(fn: Callable) -> str:
    """The name a function (or a partial of one, or a callable object) goes by in messages."""
    fn = fn.func if isinstance(fn, functools.partial) and not hasattr(fn, "__name__") else fn
    return getattr(fn, "__name__", None) or type(fn).__name__


REGISTRY: dict[str, str | Callable] = {
    "exact_answer": "align_rewards.math:exact_answer",
    "numeric_answer": "align_rewards.math:numeric_answer",
    "format_tags": "align_rewards.format:format_tags",
    "format_regex": "align_rewards.format:format_regex",
    "length_penalty": "align_rewards.length:length_penalty",
    "overlong_penalty": "align_rewards.length:overlong_penalty",
    "code_tests": "align_rewards.code:code_tests",
    "judge": "align_rewards.judge:judge",
}
"""Reward name -> `module:func` (built-ins, imported on first use) or the function itself (@register)."""

FORMS = ("a registry name (" + ", ".join(REGISTRY) + ", or one added with @register), `module:func`, "
         "`path/to/file.py:func` (relative to the current directory), or a reward-model directory trained by Align")
STANDARD_ARGS = ("prompts", "completions", "completion_ids")


def register(name: str) -> Callable[[Callable], Callable]:
    """Decorator: make a reward function loadable by `name` once the module defining it is imported."""

    def add(fn: Callable) -> Callable:
        if REGISTRY.get(name, fn) is not fn:
            raise AlignError(f"reward name {name!r} is already registered for {REGISTRY[name]}; pick another name")
        REGISTRY[name] = fn
        return fn

    return add


# ----------------------------------------------------------------------------------------------- loading

def _unknown(spec: str) -> AlignError:
    """The error for a spec of no known form, with the likeliest fix first."""
    close = difflib.get_close_matches(spec, REGISTRY, n=1)
    if ("/" in spec or os.sep in spec) and not os.path.exists(os.path.expanduser(spec)):
        hint = f"There is no such file or directory (paths are relative to {os.getcwd()})"
        hint += f"; name the function too, e.g. {spec}:my_reward. " if spec.endswith(".py") else ". "
    elif spec.endswith(".py"):
        hint = f"Name the function too, e.g. {spec}:my_reward. "
    elif os.path.isfile(os.path.expanduser(spec)):
        hint = "It is a file: give a reward-model run's directory, or a Python file with its function. "
    elif "." in spec:
        hint = f"Did you mean {':'.join(spec.rsplit('.', 1))!r}? "
    else:
        hint = f"Did you mean {close[0]!r}? " if close else ""
    return AlignError(f"unknown reward {spec!r}. {hint}A reward is {FORMS}")


def _resolve(spec: str) -> Callable:
    """The function a registry name, `module:func` or `file.py:func` spec points to."""
    target = REGISTRY.get(spec, spec)
    if callable(target):
        return target
    if ":" not in target:
        raise _unknown(spec)
    where, attr = target.rsplit(":", 1)
    is_file = where.endswith(".py") or "/" in where or os.sep in where
    try:
        module = load_file(where) if is_file else import_module(where)
    except AlignError:
        raise
    except ModuleNotFoundError as error:
        if spec in REGISTRY:
            raise AlignError(f"the built-in rewards package is not importable ({error}); reinstall Align "
                             "(pip install -e . in a checkout)") from None
        if is_missing(error, where):
            raise AlignError(f"no module named {where!r} (looked on sys.path and in {os.getcwd()}). "
                             f"A reward is {FORMS}") from None
        raise AlignError(f"importing {where!r} failed: {error}") from error
    except Exception as error:
        raise AlignError(f"importing {where!r} failed: {type(error).__name__}: {error}") from error
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
    if fn is not None and not callable(fn):
        raise AlignError(f"{where!r}: {attr} is a {type(fn).__name__}, not a function")
    if not callable(fn):
        names = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_"))
        close = difflib.get_close_matches(attr, names, n=1, cutoff=0.5)
        raise AlignError(f"{where!r} has no function {attr!r}."
                         + (f" Did you mean {close[0]!r}?" if close else "")
                         + (f" Functions there: {', '.join(names)}" if names else ""))
    return fn


def names_a_reward_model(spec: str) -> bool:
    """Whether a reward spec names a reward-model directory, trained or not yet: no registry name or
    `:func`, and an existing directory, or a path that is neither a file nor a `.py` file's name."""
    if spec in REGISTRY or ":" in spec:
        return False
    path = os.path.expanduser(spec)
    return os.path.isdir(path) or (("/" in spec or os.sep in spec) and not spec.endswith(".py")
                                   and not os.path.exists(path))


def spec_name(spec: str) -> str:
    """The default metric name of a reward: the registry name for a built-in, `module.func` for
    `module:func` and `file.py:func` (module = the last dotted part / the file's stem), the
    directory's name for a reward model."""
    if spec in REGISTRY:
        return spec
    if names_a_reward_model(spec):
        return Path(os.path.abspath(os.path.expanduser(spec))).name
    builtin = {target: name for name, target in REGISTRY.items() if isinstance(target, str)}
    if spec in builtin:
        return builtin[spec]
    where, _, attr = spec.rpartition(":")
    module = Path(where).stem if where.endswith(".py") else where.rsplit(".", 1)[-1]
    return f"{module}.{attr}" if module else attr


def _bind(fn: Callable, kwargs: dict, key: str) -> Callable:
    """functools.partial(fn, **kwargs) keeping fn's name. A kwarg must be a named parameter of fn, or
    reach a `**kwargs` catch-all (a warning); one that would fall into `**_` (ignored) is an error."""
    if not kwargs:
        return fn
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        parameters = {}
    named = [n for n, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    catch_all = next((n for n, p in parameters.items() if p.kind is p.VAR_KEYWORD), None)
    for name in kwargs:
        if name in named or not parameters:
            continue
        if catch_all is None or catch_all.startswith("_"):
            close = difflib.get_close_matches(name, named, n=1)
            raise AlignError(f"{key}: {function_name(fn)} has no parameter {name!r}"
                             + (f"; did you mean {close[0]!r}?" if close else "")
                             + f" Its parameters: {', '.join(named)}")
        log.warning("%s: %r is not a named parameter of %s; it reaches the function only through **%s",
                    key, name, function_name(fn), catch_all)
    bound = functools.partial(fn, **kwargs)
    bound.__name__ = bound.__qualname__ = function_name(fn)
    bound.__doc__ = getattr(fn, "__doc__", None)
    return bound


def check_reward_model_dir(path: str, key: str) -> None:
    """AlignError naming `key` unless directory `path` holds a reward model: a sequence-classification
    model with one label, or an adapter of one (task SEQ_CLS), as an Align reward-model run saves them.
    Reads no weights. Loaded as a reward model, any other model (a causal LM, e.g. an SFT run) would
    score with a newly initialized head: random rewards."""
    from align.models.kinds import inspect_checkpoint

    checkpoint = inspect_checkpoint(path, key)
    train_one = "give the output_dir of an Align reward-model run (algorithm: reward)"
    if checkpoint is None:
        raise AlignError(f"{key}: {path!r} is a directory but not a model (no config.json or adapter_config.json); "
                         f"{train_one}")
    if not checkpoint.is_reward_model:
        raise AlignError(f"{key}: {path!r} holds {checkpoint.what}, not a reward model (a ...ForSequenceClassification "
                         f"or its SEQ_CLS adapter): loaded as one, its score head would be random; {train_one}")
    if checkpoint.labels not in (None, 1):
        raise AlignError(f"{key}: {path!r} is a classifier of {checkpoint.labels} labels; a reward model has one "
                         f"score (num_labels 1); {train_one}")


def check_reward_model_kwargs(kwargs: dict, key: str) -> None:
    """AlignError naming `key` (the entry's kwargs) for a setting a reward-model directory does not take."""
    unknown = set(kwargs) - {"dtype", "batch_size", "device", "shard"}
    if unknown:
        raise AlignError(f"{key}: a reward model takes only dtype, batch_size, device and shard, not "
                         f"{', '.join(sorted(unknown))}")
    if "device" in kwargs:
        check_device(kwargs["device"], f"{key}.device")
    if not isinstance(kwargs.get("shard", False), bool):
        raise AlignError(f"{key}.shard: {kwargs['shard']!r} is not true or false")
    if kwargs.get("shard") and "device" in kwargs:
        raise AlignError(f"{key}: shard and device together (a sharded reward model lives on each process's own "
                         "device, as the policy's shards do); drop device")


def check_device(device, key: str) -> None:
    """AlignError naming `key` unless `device` is a torch device this machine has."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise AlignError(f"{key}: {device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if parsed.type == "cpu":
        return
    kind = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    count = torch.accelerator.device_count() if kind is not None else 0
    if kind is None or parsed.type != kind.type or (parsed.index or 0) >= count:
        has = f"{count} {kind.type} device(s)" if kind is not None else "no accelerator"
        raise AlignError(f"{key}: {device!r}, but this machine has {has}; use cpu or one it has")


def load_reward_function(spec: str, kwargs: dict | None = None, *, key: str | None = None) -> Callable:
    """The reward callable named by `spec` (see the module docstring for the forms), with `kwargs` bound.

    For a reward-model directory the kwargs go to `load_reward_model` (`dtype`, `batch_size`,
    `device`: where it is placed, e.g. cpu or cuda:1, default this process's accelerator; `shard`:
    sharded over the processes under train.sharding: fsdp or a DeepSpeed ZeRO-3 launch).
    key: where the spec came from (e.g. `grpo.rewards[0]`), for error messages.
    """
    where_fn, where_kwargs = (f"{key}.fn", f"{key}.kwargs") if key else (f"reward {spec!r}", f"reward {spec!r} kwargs")
    kwargs = dict(kwargs or {})
    if names_a_reward_model(spec) and os.path.isdir(os.path.expanduser(spec)):
        path = os.path.expanduser(spec)
        check_reward_model_dir(path, where_fn)
        check_reward_model_kwargs(kwargs, where_kwargs)
        from align.models.reward import load_reward_model

        return load_reward_model(path, **kwargs)
    try:
        fn = _resolve(spec)
    except AlignError as error:
        raise AlignError(f"{where_fn}: {error}") from error.__cause__
    return _bind(fn, kwargs, where_kwargs)


