"""Reference log-probs computed once per (reference model, tokenized data) and cached on disk.

The key hashes the reference model's weights (a cheap per-tensor fingerprint) and every token of
the data, so a second run, or a resume, on the same model and data reuses the file, and any change
to either computes it anew.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable

import torch
from accelerate import PartialState

from align.models.tiny import cache_dir
from align.trainers.distributed import from_main_process

log = logging.getLogger(__name__)


def model_fingerprint(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            flat = tensor.detach().reshape(-1)
            values = flat.double() if flat.is_floating_point() else flat.view(torch.uint8).double()
            digest.update(f"{name}{tuple(tensor.shape)}{values.sum().item():.10e}"
                          f"{values[:: max(1, len(values) // 64)].sum().item():.10e}".encode())
    return digest.hexdigest()


def data_fingerprint(examples, columns: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for column in columns:
        for row in examples[column]:
            digest.update(repr(row).encode())
    return digest.hexdigest()


def cached_reference(key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Load the tensor stored under `key`, or compute and store it atomically.

    Under several processes only the main process reads and writes the file (the others get the
    tensor from it), and `compute` runs on every process, each returning the whole tensor.
    """
    path = cache_dir() / "reference" / f"{key}.pt"
    main = PartialState().is_main_process
    values = from_main_process(torch.load(path) if main and path.is_file() else None)
    if values is not None:
        log.info("reference log-probs: reusing %s", path)
        return values
    values = compute()
    if main:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as f:
            torch.save(values, f)
        os.replace(f.name, path)
        log.info("reference log-probs: computed and cached in %s", path)
    return values


def cache_key(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]
