"""Counting the host reads a GPU would wait for, on the CPU.

On a GPU, `.item()`, `float(t)`, `bool(t)`, `.tolist()`, `.cpu()`, `.numpy()`, a copy to the host,
`nonzero` and anything whose output size depends on the data (boolean-mask indexing,
`masked_select`) make the host wait for the device. On the CPU nothing waits, and the profiler's
`aten::_local_scalar_dense` / `aten::nonzero` miss `.tolist()`, `.cpu()` and `.numpy()` (they
dispatch nothing on a CPU tensor), so `HostReads` watches both levels: a `TorchFunctionMode` for the
Python-level conversions and a `TorchDispatchMode` for the aten ops.

Host tensors are not counted: the collated batch is built on the CPU before `.to(device)`, and what
is computed from host tensors alone (e.g. `(labels != -100).sum()` of the CPU batch) stays on the
host. `HostReads(host=...)` takes those tensors; every op whose tensor inputs are all host tensors
makes host tensors, and `.to(device)` of a host tensor makes a (new) device tensor, as on a GPU.
"""

from __future__ import annotations

import traceback
import weakref
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

_CONVERSIONS = {torch.Tensor.tolist: "tolist", torch.Tensor.numpy: "numpy", torch.Tensor.cpu: "cpu"}
_SIZE_DEPENDS_ON_DATA = {aten.nonzero.default: "nonzero", aten.nonzero_static.default: None,
                         aten.masked_select.default: "masked_select", aten.unique_consecutive.default: "unique",
                         aten._unique2.default: "unique", aten.repeat_interleave.Tensor: "repeat_interleave"}
_BOOL_INDEXED = {aten.index.Tensor: "bool index", aten.index_put.default: "bool index_put",
                 aten.index_put_.default: "bool index_put", aten._index_put_impl_.default: "bool index_put"}


class _IdentitySet:
    """A set of tensors by identity (a WeakSet compares tensors with ==); entries die with them."""

    def __init__(self, tensors=()):
        self._refs: dict[int, weakref.ref] = {}
        for t in tensors:
            self.add(t)

    def add(self, t: torch.Tensor) -> None:
        key = id(t)
        self._refs[key] = weakref.ref(t, lambda _, key=key: self._refs.pop(key, None))

    def discard(self, t: torch.Tensor) -> None:
        self._refs.pop(id(t), None)

    def __contains__(self, t: torch.Tensor) -> bool:
        ref = self._refs.get(id(t))
        return ref is not None and ref() is t


def _tensors(args, kwargs) -> list[torch.Tensor]:
    return [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]


def _to_host(args, kwargs) -> bool:
    """Whether a `Tensor.to(...)` call names the CPU as its device."""
    for value in list(args[1:]) + [kwargs.get("device")]:
        if isinstance(value, str) and value.startswith("cpu"):
            return True
        if isinstance(value, torch.device) and value.type == "cpu":
            return True
        if isinstance(value, torch.Tensor) and value.device.type == "cpu" and not kwargs.get("dtype"):
            return True
    return False


class HostReads(TorchFunctionMode):
    """with HostReads(host=tensors) as reads: ... ; reads.count, reads.by_kind (a Counter; reads made
    inside transformers' own code, e.g. its mask preparation, are keyed "transformers:<kind>")."""

    def __init__(self, host=()):
        super().__init__()
        self.host = _IdentitySet(t for t in host if isinstance(t, torch.Tensor))
        self.by_kind: Counter = Counter()
        self._dispatch = _DispatchWatch(self)

    @property
    def count(self) -> int:
        """Host reads made by Align's code (and torch's), not counting the model's own forward."""
        return sum(n for kind, n in self.by_kind.items() if not kind.startswith("transformers:"))

    @property
    def in_transformers(self) -> int:
        """Host reads inside transformers' code (its mask preparation checks packed rows and padding)."""
        return sum(n for kind, n in self.by_kind.items() if kind.startswith("transformers:"))

    def record(self, kind: str) -> None:
        inside = any("/transformers/" in frame.filename for frame in traceback.extract_stack())
        self.by_kind[f"transformers:{kind}" if inside else kind] += 1

    def __enter__(self):
        super().__enter__()
        self._dispatch.__enter__()
        return self

    def __exit__(self, *exc):
        self._dispatch.__exit__(*exc)
        return super().__exit__(*exc)

    def on_device(self, t: torch.Tensor) -> bool:
        return t not in self.host

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CONVERSIONS and self.on_device(args[0]):
            self.record(_CONVERSIONS[func])
        if func is torch.Tensor.to and isinstance(args[0], torch.Tensor):
            source = args[0]
            # On a CPU machine `.to(device)` is `.to("cpu")`: a copy to the host cannot be told from a
            # move to the training device, so only `.cpu()` counts as one (Align copies to the host that way).
            if _to_host(args, kwargs) and source in self.host:  # host -> device: a new device tensor
                    out = func(*args, **kwargs)
                    out = out.clone() if out is source else out
                    self.host.discard(out)
                    return out
        return func(*args, **kwargs)


class _DispatchWatch(TorchDispatchMode):
    def __init__(self, reads: HostReads):
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = _tensors(args, kwargs)
        out = func(*args, **kwargs)
        host = self.reads.host
        if inputs and all(t in host for t in inputs):
            for t in _tensors(out, {}):
                host.add(t)
            return out
        kind = None
        if func is aten._local_scalar_dense.default:
            kind = "item"
        elif func in _SIZE_DEPENDS_ON_DATA:
            kind = _SIZE_DEPENDS_ON_DATA[func]
        elif func in _BOOL_INDEXED:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(i is not None and i.dtype == torch.bool for i in indices):
                kind = _BOOL_INDEXED[func]
        elif func in (aten.masked_scatter.default, aten.masked_scatter_.default):
            kind = None  # sizes are known: no wait
        if kind:
            self.reads.record(kind)
        return out
