"""Fingerprints of a run's local inputs: every file or directory the recipe names (the model, its
tokenizer and chat template, a reference, teacher, value or reward model, reward-function files,
data files). Each checkpoint stores them, and a resume on inputs that changed since is refused: an
adapter trained on one base and resumed on another (runs/sft trained again into the same
directory), or on other data, would go on silently spoiled.

A fingerprint reads a file whole up to 64 MiB (data files, configs, tokenizers); of a larger one
(weights) its size and 16 chunks of 64 KiB spread over it, which any retraining changes. Hub ids
and built-ins are not local files and are not fingerprinted.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

WHOLE_FILE_BYTES = 64 << 20
CHUNKS, CHUNK_BYTES = 16, 64 << 10
NOT_INPUTS = ("output_dir", "train.resume_from")
PATH_KEYS = ("name_or_path", "tokenizer", "chat_template", "reference_model", "teacher_model", "value_model",
             "path", "fn", "model")
"""Keys whose strings may name a local file or directory. Elsewhere only a reward's kwargs may name
an input, a file given with a "/" (a constitution): so that `train` (a split) is no input where
./train is, nor a stop string "/" the root directory."""
SKIPPED = ("__pycache__",)
"""Directories written beside the code they cache (a reward package's .pyc files): never inputs."""


def recipe_strings(tree, prefix: str = ""):
    """(dotted key, string) for every string in a recipe dict, lists included ("grpo.rewards[0].fn")."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from recipe_strings(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from recipe_strings(value, f"{prefix}[{i}]")
    elif isinstance(tree, str):
        yield prefix, tree


def local_path(key: str, value: str) -> Path | None:
    """The existing file or directory the recipe string at `key` names (`path/to/file.py:fn` names
    the file), else None. A chat template's own text (not a path) names nothing."""
    name = re.sub(r"\[\d+\]$", "", key).rsplit(".", 1)[-1]
    in_kwargs = ".kwargs." in key and "/" in value
    if key in NOT_INPUTS or (name not in PATH_KEYS and not in_kwargs) or "{" in value or "\n" in value:
        return None
    for candidate in (value, value.rsplit(":", 1)[0]) if key.endswith("fn") else (value,):
        path = os.path.expanduser(candidate)
        if candidate and (os.path.isfile(path) or (os.path.isdir(path) and not in_kwargs)):
            return Path(path)
    return None


def check_inputs_outside_output_dir(recipe: dict) -> None:
    """AlignError if a local input the recipe (as dumped to JSON) names is its output_dir or lies in
    it: the run writes there (its final model over a model it started from; --overwrite moves it all
    aside), so an adapter trained there would name itself as its base."""
    from align.errors import AlignError

    if not recipe.get("output_dir"):
        return
    output_dir = Path(os.path.expanduser(recipe["output_dir"])).resolve()
    for key, value in recipe_strings(recipe):
        path = local_path(key, value)
        if path is not None and path.resolve().is_relative_to(output_dir):
            where = "is" if path.resolve() == output_dir else "lies in"
            raise AlignError(f"{key}: {value!r} {where} output_dir {recipe['output_dir']!r}, which the run writes "
                             "(its model, checkpoints; --overwrite moves it aside): choose another output_dir")


def file_fingerprint(path: Path, digest) -> None:
    size = path.stat().st_size
    digest.update(f"{size}\0".encode())
    with open(path, "rb") as f:
        if size <= WHOLE_FILE_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
            return
        for i in range(CHUNKS):
            f.seek((size - CHUNK_BYTES) * i // (CHUNKS - 1))
            digest.update(f.read(CHUNK_BYTES))


def fingerprint(path: Path, output_dir: Path | None = None) -> str:
    """sha256 over a file, or over a directory's files (names and contents), leaving out hidden ones,
    caches of compiled code, and the run's own `output_dir` where it lies inside."""
    def kept(file: Path) -> bool:
        parts = file.relative_to(path).parts
        return file.is_file() and not any(part.startswith(".") or part in SKIPPED for part in parts) and not (
            output_dir is not None and file.resolve().is_relative_to(output_dir))

    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(filter(kept, path.rglob("*")))
    for file in files:
        digest.update(f"{file.relative_to(path) if file != path else file.name}\0".encode())
        file_fingerprint(file, digest)
    return digest.hexdigest()


def input_fingerprints(recipe: dict) -> dict[str, str]:
    """{recipe key: fingerprint} of every local input a recipe (as dumped to JSON) names; the run's
    own output directory (and anything in it) is no input."""
    output_dir = Path(os.path.expanduser(recipe["output_dir"])).resolve() if recipe.get("output_dir") else None
    fingerprints = {}
    for key, value in recipe_strings(recipe):
        path = local_path(key, value)
        if path is not None and not (output_dir and path.resolve().is_relative_to(output_dir)):
            fingerprints[key] = fingerprint(path, output_dir)
    return fingerprints


def changed_inputs(saved: dict[str, str], now: dict[str, str], recipe: dict) -> list[str]:
    """"key (value)" of each input whose fingerprint differs from the one a checkpoint saved."""
    values = dict(recipe_strings(recipe))
    return [f"{key} ({values.get(key)!r})" for key in sorted(saved) if key in now and now[key] != saved[key]]
