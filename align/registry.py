"""Registries: where trainers, losses, advantage estimators and rollout engines are found by name.

Each kind of variant has one `Registry`; its built-ins register themselves with a decorator where
they are defined (as verl's `@register_adv_est`), and a recipe names them:

    @PREFERENCE_LOSSES.register("sigmoid")
    def sigmoid(pairs, beta, label_smoothing): ...

A name may also be a plug-in outside Align, `module:Name` or `path/to/file.py:Name` (imported on
first use, as reward functions are), or a module the recipe lists under `plugins:` (imported before
the recipe is validated, so its own `register` calls count). An unknown name is an AlignError that
lists the registered ones.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import os
import pkgutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from align.errors import AlignError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> objects of one kind (e.g. preference losses), filled by `register`.

    kind: what an entry is, for messages ("preference loss"); key: the recipe key that names one
    ("dpo.loss_type"); builtins: the package whose modules hold the built-in entries, imported on
    the first lookup (so that a registry can live in a light module).
    """

    def __init__(self, kind: str, key: str, builtins: str | None = None):
        self.kind, self.key, self.builtins = kind, key, builtins
        self._entries: dict[str, T] = {}
        self.adapt: Callable[[object], T] | None = None
        """Turns an object a `module:Name` plug-in names (a plain function) into an entry; set by the
        module that defines the entry type."""

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: enter the decorated object under `name` (a name may be taken once)."""

        def add(entry: T) -> T:
            if self._entries.get(name, entry) is not entry:
                raise AlignError(f"{self.kind} {name!r} is already registered ({self._entries[name]!r}); "
                                 "register yours under another name")
            self._entries[name] = entry
            return entry

        return add

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._entries)

    def get(self, name: str, key: str | None = None) -> T:
        """The entry registered as `name`, or the object a `module:Name` / `file.py:Name` plug-in
        names. key: the recipe key it came from, for the error (default: the registry's; "": none)."""
        self._load_builtins()
        if name in self._entries:
            return self._entries[name]
        key = self.key if key is None else key
        if ":" in name:
            target = load_object(name, key)
            for entry in self._entries.values():  # a function its module registered: that entry
                if entry is target or getattr(entry, "fn", None) is target:
                    return entry
            return self.adapt(target) if self.adapt else target
        close = difflib.get_close_matches(name, self._entries, n=1)
        raise AlignError((f"{key}: " if key else "") + f"unknown {self.kind} {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                         + f" Registered: {', '.join(sorted(self._entries))}; or a plug-in as module:Name, "
                         "path/to/file.py:Name, or a module listed under `plugins:` that registers it")

    __getitem__ = get

    def _load_builtins(self) -> None:
        if self.builtins:
            package, self.builtins = self.builtins, None
            import_submodules(package)


def import_submodules(package: str) -> None:
    """Import `package` and every module in it (each registers what it defines)."""
    module = importlib.import_module(package)
    for info in pkgutil.iter_modules(module.__path__, package + "."):
        importlib.import_module(info.name)


# ------------------------------------------------------------------------------------------ plug-ins

def import_module(module: str):
    """import_module, also trying the current directory (a console script does not put it on sys.path)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if not is_missing(error, module) or os.getcwd() in sys.path or "" in sys.path:
            raise
    sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(os.getcwd())


def is_missing(error: ModuleNotFoundError, module: str) -> bool:
    """True if `module` itself is missing, False if it exists but one of its own imports is."""
    return bool(error.name) and (module == error.name or module.startswith(error.name + "."))


def load_file(path: str):
    """Execute a Python file as a module (once per absolute path), kept in sys.modules under a private name."""
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(full):
        raise AlignError(f"file not found: {path!r} (paths are relative to the current directory {os.getcwd()})")
    name = f"_align_plugin_{Path(full).stem}_{hashlib.sha1(full.encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, full)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def is_file_spec(where: str) -> bool:
    return where.endswith(".py") or "/" in where or os.sep in where


def load_plugin(where: str, key: str = "plugins"):
    """Import a plug-in module (`my_package.losses`) or file (`path/to/my_algo.py`); its `register`
    calls add its entries. AlignError naming `key` if it cannot be imported."""
    prefix = f"{key}: " if key else ""
    try:
        return load_file(where) if is_file_spec(where) else import_module(where)
    except AlignError as error:
        raise AlignError(f"{prefix}{error}") from None
    except ModuleNotFoundError as error:
        if is_missing(error, where):
            raise AlignError(f"{prefix}no module named {where!r} (looked on sys.path and in {os.getcwd()}); give an "
                             "importable module or a path to a .py file") from None
        raise AlignError(f"{prefix}importing {where!r} failed: {error}") from error
    except Exception as error:
        raise AlignError(f"{prefix}importing {where!r} failed: {type(error).__name__}: {error}") from error


def load_object(spec: str, key: str):
    """The object `module:Name` or `path/to/file.py:Name` names (dotted Name for nested attributes)."""
    where, _, attr = spec.rpartition(":")
    module = load_plugin(where, key)
    target = module
    for part in attr.split("."):
        target = getattr(target, part, None)
    if target is None:
        names = sorted(n for n in vars(module) if not n.startswith("_"))
        close = difflib.get_close_matches(attr, names, n=1, cutoff=0.5)
        raise AlignError((f"{key}: " if key else "") + f"{where!r} has no {attr!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                         + (f" It defines: {', '.join(names[:20])}" if names else ""))
    return target


# ------------------------------------------------------------------------------- the registries

TRAINERS: Registry = Registry("algorithm", "algorithm", builtins="align.trainers")
"""algorithm name -> Trainer class (`align.trainers.base.register_trainer`)."""
PREFERENCE_LOSSES: Registry = Registry("preference loss", "dpo.loss_type", builtins="align.losses")
"""dpo.loss_type -> `align.losses.preference.PreferenceLoss`."""
LOSS_NORMS: Registry = Registry("loss normalization", "grpo.loss_norm", builtins="align.losses")
"""grpo.loss_norm -> `align.losses.policy_gradient.LossNorm`."""
ADVANTAGE_ESTIMATORS: Registry = Registry("advantage estimator", "grpo.advantage", builtins="align.losses")
"""grpo.advantage -> `align.losses.advantages.AdvantageEstimator`."""
ROLLOUT_ENGINES: Registry = Registry("rollout engine", "sampling.engine", builtins="align.rollout")
"""sampling.engine -> engine factory `(model, tokenizer, vllm_config, max_model_len) -> RolloutEngine`."""
