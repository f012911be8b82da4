"""Reference log-probs computed once per (reference model, tokenized data, settings) and cached on disk.

The key is a hash of one JSON document that names everything the numbers depend on (see
`reference_key`): a content hash of every weight and buffer of the reference model (4-bit weights
with their quantization state), its config (RoPE, attention implementation, dtype), the tokenizer,
every token of the data, and the trainer's settings (dtype, autocast, max length, the loss's own
section). A second run, or a resume, where all of these are the same reuses the file; a change to
any of them computes it anew.

A file is `<cache>/reference/<key>.safetensors` (no pickle): one float32 tensor `logps` [N, k] (k values per example:
DPO's chosen and rejected, KTO's completion and KL pair) and
metadata with the key, N and a sha256 of the values. It is written atomically (temp file, fsync,
rename). A file is used only when its metadata, shape, checksum and values (finite log-probs, <= 0)
hold, and when the first micro-batch, recomputed, agrees with it (a spot check against a stale or
altered file); otherwise a warning names the file and the problem, and the values are recomputed
and the file replaced.

The content hashes (`tensors_hash`, `files_hash`) also key merged QLoRA bases
(`align.models.loading`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from fnmatch import fnmatch
from pathlib import Path

import torch
from accelerate import PartialState
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from transformers import PretrainedConfig

from align.distributed import from_main_process, map_in_shares
from align.models.tiny import cache_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # bump when what is cached, or how it is computed, changes
BLOCK_BYTES = 16 << 20  # unit of parallel hashing
VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_commit_hash", "use_cache"}
TOLERANCE = {False: (1e-4, 1e-4), True: (1e-2, 1e-3)}
"""(atol, rtol) of the spot check on sequence log-prob sums, by low precision (bf16 autocast or weights)."""


class _Unusable(Exception):
    """Why a cache file cannot be used."""


# ---- content hashes ---------------------------------------------------------------------------
def _digest(data) -> bytes:
    return hashlib.blake2b(data, digest_size=32).digest()


def _tree_hash(entries: Iterable[tuple[str, Sequence]], block_digest: Callable[[object], bytes]) -> str:
    """blake2b over each entry's label and the digests of its blocks, entries in the given order.

    Blocks are hashed in a thread pool (hashlib releases the GIL on large buffers), so the hash of
    one big entry uses every core too.
    """
    with ThreadPoolExecutor() as pool:
        jobs = [(label, [pool.submit(block_digest, block) for block in blocks]) for label, blocks in entries]
        digest = hashlib.blake2b(digest_size=32)
        for label, futures in jobs:
            digest.update(label.encode())
            for future in futures:
                digest.update(future.result())
    return digest.hexdigest()


def _named_tensors(module: torch.nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """Every parameter and buffer (non-persistent ones too: rotary inv_freq), and the quantization
    state of bitsandbytes 4-bit parameters (absmax, code, nested statistics)."""
    for name, param in module.named_parameters():
        yield name, param
        quant_state = getattr(param, "quant_state", None)
        if quant_state is not None:
            for key, value in quant_state.as_dict(packed=True).items():
                yield f"{name}:{key}", value
    yield from module.named_buffers()


def _tensor_block_digest(block: torch.Tensor) -> bytes:
    return _digest(block.cpu().numpy())  # copies only this block off a GPU


def tensors_hash(module: torch.nn.Module) -> str:
    """A content hash of `module`: every tensor's name, dtype, shape and raw bytes.

    blake2b per 16 MiB block, blocks hashed in parallel. Measured 0.65 GB/s on a 2-vCPU machine
    whose vCPUs do not scale (one thread: 0.62 GB/s), i.e. about 22 s for a 7B bf16 model (14 GB);
    it scales with cores elsewhere (hashlib releases the GIL).

    A module sharded by fsdp (DTensor weights) or partitioned by ZeRO-3: every process calls it,
    hashes the part it holds, and gets the hash of every process's hashes, the whole model's (the
    same model sharded over another number of processes hashes differently: a cache miss, never a
    wrong hit).
    """
    from torch.distributed.tensor import DTensor

    from align.models import sharding, zero

    def entry(name: str, tensor: torch.Tensor) -> tuple[str, list[torch.Tensor]]:
        shape, position = list(tensor.shape), []
        if isinstance(tensor, DTensor):  # this process's rows
            held, position = sharding.local_shard(tensor), list(sharding.rows_held(tensor))
        elif zero.partitioned(tensor):  # this process's slice of the flattened weight
            held, start = zero.held_part(tensor)
            shape, position = list(tensor.ds_shape), [start, held.numel()]
        else:
            held = tensor
        raw = held.detach().reshape(-1).view(torch.uint8)
        blocks = [raw[start:start + BLOCK_BYTES] for start in range(0, max(raw.numel(), 1), BLOCK_BYTES)]
        return json.dumps([name, str(tensor.dtype), shape, *position]), blocks

    with torch.no_grad():
        named = sorted(_named_tensors(module), key=lambda item: item[0])
        digest = _tree_hash([entry(name, tensor) for name, tensor in named], _tensor_block_digest)
    if any(isinstance(tensor, DTensor) or zero.partitioned(tensor) for _, tensor in named):
        digests = [None] * torch.distributed.get_world_size()  # (the process group the shards live in)
        torch.distributed.all_gather_object(digests, digest)
        digest = json_hash(digests)
    return digest


def _file_block_digest(block: tuple[Path, int]) -> bytes:
    path, offset = block
    with open(path, "rb") as f:
        f.seek(offset)
        return _digest(f.read(BLOCK_BYTES))


def files_hash(directory: str | os.PathLike, patterns: Sequence[str]) -> str:
    """A content hash of the files directly in `directory` whose names match one of `patterns`
    (names, sizes and bytes); as fast as `tensors_hash`."""
    def entry(path: Path) -> tuple[str, list[tuple[Path, int]]]:
        size = path.stat().st_size
        return json.dumps([path.name, size]), [(path, offset) for offset in range(0, max(size, 1), BLOCK_BYTES)]

    paths = sorted(p for p in Path(directory).iterdir()
                   if p.is_file() and any(fnmatch(p.name, pattern) for pattern in patterns))
    return _tree_hash([entry(path) for path in paths], _file_block_digest)


def json_hash(document) -> str:
    """A hash of a JSON-able document (keys sorted; values JSON cannot hold are written as str)."""
    return _digest(json.dumps(document, sort_keys=True, default=str).encode()).hex()


def tokenizer_hash(tokenizer) -> str:
    """Vocabulary, special and added tokens, padding id and chat template."""
    return json_hash({"class": type(tokenizer).__name__, "vocab": sorted(tokenizer.get_vocab().items()),
                      "special": tokenizer.special_tokens_map, "pad_token_id": tokenizer.pad_token_id,
                      "added": {i: repr(t) for i, t in tokenizer.added_tokens_decoder.items()},
                      "chat_template": tokenizer.chat_template})


def data_hash(examples, columns: Sequence[str]) -> str:
    """Every value of `columns` (token-id lists), row by row."""
    digest = hashlib.blake2b(digest_size=32)
    for column in columns:
        digest.update(f"{column}:{len(examples)}\n".encode())
        for row in examples[column]:
            digest.update(f"{row}\n".encode())
    return digest.hexdigest()


def model_identity(module: torch.nn.Module) -> dict:
    """What fixes a model's numbers besides its inputs: the content hash of its tensors, and its
    transformers config (RoPE and its scaling, dtype, quantization) with the attention implementation."""
    config = next(m.config for m in module.modules() if isinstance(getattr(m, "config", None), PretrainedConfig))
    settings = {k: v for k, v in config.to_dict().items() if k not in VOLATILE_CONFIG_KEYS}
    return {"weights": tensors_hash(module), "config": settings, "attn_implementation": config._attn_implementation}


def reference_key(document: dict) -> str:
    """The cache key of reference log-probs: a hash of `document`, which must name everything the
    numbers depend on (`model_identity`, `tokenizer_hash`, `data_hash`, the trainer's settings)."""
    return json_hash({"format": FORMAT_VERSION, **document})


# ---- the cache file ---------------------------------------------------------------------------
def cache_path(key: str) -> Path:
    return cache_dir() / "reference" / f"{key}.safetensors"


def _checksum(values: torch.Tensor) -> str:
    return hashlib.sha256(values.contiguous().numpy().tobytes()).hexdigest()


def _read(path: Path, key: str, rows: int, width: int) -> torch.Tensor:
    """The [rows, width] float32 values stored in `path`; raises _Unusable saying what is wrong."""
    try:
        with safe_open(path, "pt") as f:
            metadata, names = f.metadata() or {}, set(f.keys())
            values = f.get_tensor("logps") if names == {"logps"} else None
    except (OSError, SafetensorError) as error:
        raise _Unusable(f"it is not a readable safetensors file ({error})") from None
    if metadata.get("key") != key:
        raise _Unusable(f"its metadata names another key ({metadata.get('key')!r})")
    if values is None or values.dtype != torch.float32 or tuple(values.shape) != (rows, width):
        found = "no single `logps` tensor" if values is None else f"{values.dtype} {list(values.shape)}"
        raise _Unusable(f"it holds {found}, not float32 [{rows}, {width}]")
    if metadata.get("rows") != str(rows) or metadata.get("sha256") != _checksum(values):
        raise _Unusable("its checksum or row count does not match its values")
    if not (torch.isfinite(values).all() and (values <= 0).all()):
        raise _Unusable("it holds values that are not log-probs (not finite, or above 0)")
    return values


def _load(path: Path, key: str, rows: int, width: int) -> torch.Tensor | None:
    """The cached values, or None (with a warning naming the file and the problem) when unusable."""
    if not path.is_file():
        return None
    try:
        return _read(path, key, rows, width)
    except _Unusable as problem:
        log.warning("reference log-probs: ignoring %s: %s; recomputing them", path, problem)
        return None


def _write(path: Path, key: str, values: torch.Tensor) -> None:
    """Store values [N, width] under `path` atomically: a temp file beside it, fsynced, then renamed."""
    values = values.float().contiguous()
    blob = safetensors_bytes({"logps": values}, metadata={"format": str(FORMAT_VERSION), "key": key,
                                                          "rows": str(len(values)), "sha256": _checksum(values)})
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as f:
        try:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        except OSError:  # (a full disk: no partial file left behind)
            f.close()
            os.unlink(f.name)
            raise
    os.replace(f.name, path)


def _spot_check(path: Path, cached: torch.Tensor, fresh: torch.Tensor, low_precision: bool) -> bool:
    """Whether the first cached rows equal freshly computed ones [n, 2] within tolerance (logged)."""
    atol, rtol = TOLERANCE[low_precision]
    excess = (cached[:len(fresh)] - fresh).abs() - (atol + rtol * fresh.abs())
    if (excess <= 0).all():
        log.info("reference log-probs: reusing %s", path)
        return True
    row = int(excess.amax(-1).argmax())
    log.warning("reference log-probs: %s disagrees with a fresh computation of its first rows (row %d: cached %s, "
                "recomputed %s): it is stale or was altered; recomputing them", path, row, cached[row].tolist(),
                fresh[row].tolist())
    return False


def cached_reference(key: str, rows: int, compute: Callable[[], torch.Tensor],
                     compute_first: Callable[[], torch.Tensor], low_precision: bool = False,
                     width: int = 2) -> torch.Tensor:
    """The [rows, width] reference log-probs stored under `key`, or `compute()`d and stored.

    compute_first: the first micro-batch's rows [n, width], computed afresh to spot-check a cached
    file (low_precision: bf16 numbers, a looser tolerance). Under several processes only the main
    process reads, checks and writes the file (the others get its verdict and values), and
    `compute` and `compute_first` run on every process (a sharded model needs all of them).
    """
    path = cache_path(key)
    main = PartialState().is_main_process
    values = from_main_process(_load(path, key, rows, width) if main else None)
    if values is not None:
        fresh = compute_first()
        if from_main_process(_spot_check(path, values, fresh, low_precision) if main else None):
            return values
    values = compute()
    if main:
        try:
            _write(path, key, values)
        except OSError as error:
            log.warning("reference log-probs: cannot write %s (%s); they will be computed again next time", path, error)
        else:
            log.info("reference log-probs: computed and cached in %s", path)
    return values


def reference_settings(policy, recipe, shared_prompt: bool) -> dict:
    """The part of a cache key that the trainer fixes: the reference model (`model_identity`) and how
    the policy holds it, the tokenizer, dtype, attention, autocast, max length, prompt sharing and
    the algorithm's whole section."""
    return {"model": model_identity(policy.reference_module), "reference": policy.reference,
            "tokenizer": tokenizer_hash(policy.tokenizer), "dtype": recipe.model.dtype,
            "attn_implementation": recipe.model.attn_implementation,
            "mixed_precision": recipe.train.mixed_precision, "max_length": recipe.data.max_length,
            "shared_prompt": shared_prompt, recipe.section_key: recipe.section.model_dump()}


def low_precision(recipe) -> bool:
    """Whether reference numbers are computed in bf16/fp16 (autocast or weights): a looser spot check."""
    from align.models.loading import resolve_dtype

    return recipe.train.mixed_precision == "bf16" or resolve_dtype(recipe.model.dtype) != torch.float32


def precompute(data, columns: Sequence[str], settings: dict, values_of: Callable[[Sequence[int]], list],
               batch_size: int, low_precision: bool, width: int, even: bool = False) -> torch.Tensor:
    """[len(data), width] reference values of every example (each process computing its share of
    them, `batch_size` examples a call of `values_of(indices) -> [width] tensor per index`), reused
    from the cache when the key of `settings` (which must hold `model_identity`, the tokenizer and
    every setting the numbers depend on) and the data's `columns` was computed before. even: every
    process makes as many calls as the busiest (a sharded reference: each forward is a collective)."""
    def every_value() -> torch.Tensor:
        return torch.stack(map_in_shares(range(len(data)), batch_size, values_of, even=even))

    def first_values() -> torch.Tensor:
        return torch.stack(values_of(range(min(batch_size, len(data)))))

    key = reference_key({**settings, "data": data_hash(data, columns)})
    return cached_reference(key, len(data), every_value, first_values, low_precision, width)
