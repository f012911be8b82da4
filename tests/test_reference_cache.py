"""The DPO reference cache: a key that changes whenever the reference numbers could, a safe file
format, and files that are corrupt, stale or altered recomputed with a warning, never used."""

import json
import logging
import math
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from align.config import AdapterConfig, ModelConfig
from align.models import reference_cache
from align.models.loading import load_model
from align.models.tiny import resolve
from align.toy import preference_rows
from align.trainers import DPOTrainer
from tests.test_dpo import dpo_recipe as any_dpo_recipe  # noqa: F401 (a fixture)

WEIGHT = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture
def dpo_recipe(any_dpo_recipe):
    """A DPO recipe with less data (these tests build many trainers and train none)."""
    def make(**sections):
        return any_dpo_recipe(**{"rows": preference_rows(16, seed=11), "eval_rows": preference_rows(8, seed=12),
                                 **sections})
    return make


def tiny(**kwargs):
    return AutoModelForCausalLM.from_pretrained(resolve("builtin:tiny-llama"), dtype=torch.float32, **kwargs)


# ---- content hashes ---------------------------------------------------------------------------
def test_tensors_hash_is_stable_across_loads_and_sees_every_byte():
    model = tiny()
    before = reference_cache.tensors_hash(model)
    assert reference_cache.tensors_hash(tiny()) == before
    with torch.no_grad():
        weight = model.get_parameter(WEIGHT)
        weight[0, [1, 2]] = weight[0, [2, 1]].clone()  # same sum, same strided sample: a fingerprint missed it
    swapped_elements = reference_cache.tensors_hash(model)
    with torch.no_grad():
        other = model.get_parameter("model.layers.0.self_attn.o_proj.weight")
        copy = weight.clone()
        weight.copy_(other)
        other.copy_(copy)
    swapped_tensors = reference_cache.tensors_hash(model)
    model.model.rotary_emb.inv_freq.mul_(0.5)  # a non-persistent buffer
    rope_buffer = reference_cache.tensors_hash(model)
    bf16 = reference_cache.tensors_hash(tiny().to(torch.bfloat16))
    assert len({before, swapped_elements, swapped_tensors, rope_buffer, bf16}) == 5


def test_tensors_hash_covers_4bit_weights_and_their_quantization_state():
    def load():
        torch.manual_seed(0)  # the same LoRA init (the adapter's weights are hashed too)
        return load_model(ModelConfig(name_or_path="builtin:tiny-llama", dtype="float32"),
                          AdapterConfig(kind="qlora", r=4))

    model = load()
    before = reference_cache.tensors_hash(model)
    assert reference_cache.tensors_hash(load()) == before
    param = next(p for p in model.parameters() if getattr(p, "quant_state", None) is not None)
    param.quant_state.absmax[0] += 1  # the packed 4-bit codes stay; their scale moves
    assert reference_cache.tensors_hash(model) != before


def test_model_identity_names_attention_implementation_and_rope():
    sdpa = reference_cache.model_identity(tiny())
    assert reference_cache.model_identity(tiny()) == sdpa
    assert reference_cache.model_identity(tiny(attn_implementation="eager")) != sdpa
    rope = tiny()
    rope.config.rope_parameters["rope_theta"] = 5e5  # the config alone (inv_freq is hashed too)
    assert reference_cache.model_identity(rope)["config"] != sdpa["config"]


def test_files_hash_sees_content_not_dates(tmp_path):
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "w.safetensors").write_bytes(bytes(range(256)) * 5000)
    (tmp_path / "notes.txt").write_text("not hashed")
    before = reference_cache.files_hash(tmp_path, ["*.json", "*.safetensors"])
    (tmp_path / "notes.txt").write_text("changed")
    (tmp_path / "a.json").write_text("{}")
    assert reference_cache.files_hash(tmp_path, ["*.json", "*.safetensors"]) == before
    (tmp_path / "w.safetensors").write_bytes(bytes(range(256)) * 4999 + bytes(range(255, -1, -1)))
    assert reference_cache.files_hash(tmp_path, ["*.json", "*.safetensors"]) != before


# ---- the file -----------------------------------------------------------------------------------
def fake_logps(rows: int = 6) -> torch.Tensor:
    return -torch.rand(rows, 2, generator=torch.Generator().manual_seed(rows)) * 40


def cached(key: str, values: torch.Tensor) -> torch.Tensor:
    return reference_cache.cached_reference(key, len(values), lambda: values.clone(), lambda: values[:2].clone())


def rewrite(path, values: torch.Tensor | None = None, **metadata) -> None:
    """Store `values` in `path` as an attacker would: a valid file with a consistent checksum."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
    values = load_file(path)["logps"] if values is None else values
    header["sha256"] = reference_cache._checksum(values)
    save_file({"logps": values}, path, metadata={**header, **metadata})


@pytest.mark.parametrize("corrupt,problem", [
    (lambda p, v: p.write_bytes(p.read_bytes()[:-5]), "not a readable safetensors file"),
    (lambda p, v: p.write_bytes(b"\x00" * 100), "not a readable safetensors file"),
    (lambda p, v: p.write_bytes(b""), "not a readable safetensors file"),
    (lambda p, v: rewrite(p, key="another"), "names another key"),
    (lambda p, v: rewrite(p, v[:-1]), r"holds torch.float32 \[5, 2\], not float32 \[6, 2\]"),
    (lambda p, v: rewrite(p, v.double()), "holds torch.float64"),
    (lambda p, v: save_file({"logps": v - 1}, p, metadata=load_header(p)), "checksum or row count"),
    (lambda p, v: rewrite(p, v.index_fill(0, torch.tensor([4]), float("nan"))), "not log-probs"),
    (lambda p, v: rewrite(p, v.abs()), "not log-probs"),
    (lambda p, v: rewrite(p, v.index_fill(0, torch.tensor([0]), -1.0)), "disagrees with a fresh computation"),
])
def test_a_bad_file_is_recomputed_with_a_warning_naming_it(caplog, monkeypatch, tmp_path, corrupt, problem):
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path))
    values, key = fake_logps(), "k"
    path = reference_cache.cache_path(key)
    torch.testing.assert_close(cached(key, values), values)
    corrupt(path, values)
    caplog.clear()
    torch.testing.assert_close(cached(key, values), values)
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and str(path) in warning[0] and re.search(problem, warning[0]), warning
    assert "computed and cached" in caplog.text
    torch.testing.assert_close(load_file(path)["logps"], values)  # the file was replaced by a good one
    caplog.clear()
    cached(key, values)
    assert "reusing" in caplog.text and "WARNING" not in caplog.text


def load_header(path) -> dict:
    with open(path, "rb") as f:
        return json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]


# ---- the key, as DPO builds it ------------------------------------------------------------------
def reference_files(trainer_logs: str) -> set[str]:
    """Cache files a DPOTrainer used or wrote, from its log."""
    return set(re.findall(r"reference log-probs: (?:reusing|computed and cached in) (\S+)", trainer_logs))


def model_copy(tmp_path, edit=None) -> dict:
    """The recipe's model section for a copy of builtin:tiny-llama, `edit`ed (config, weights)."""
    directory = tmp_path / "model"
    shutil.copytree(resolve("builtin:tiny-llama"), directory)
    if edit is not None:
        edit(directory)
    return {"name_or_path": str(directory)}


def raise_rope_theta(directory) -> None:
    config = json.loads((directory / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = 5e5
    (directory / "config.json").write_text(json.dumps(config))


def swap_two_weights(directory) -> None:
    weights = load_file(directory / "model.safetensors")
    weights[WEIGHT][0, [1, 2]] = weights[WEIGHT][0, [2, 1]].clone()
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})


VARIANTS = {
    "autocast bf16": lambda tmp_path: {"train": {"mixed_precision": "bf16"}},
    "eager attention": lambda tmp_path: {"model": {"attn_implementation": "eager"}},
    "bf16 weights": lambda tmp_path: {"model": {"dtype": "bfloat16"}},
    "rope theta": lambda tmp_path: {"model": model_copy(tmp_path, raise_rope_theta)},
    "two weights swapped": lambda tmp_path: {"model": model_copy(tmp_path, swap_two_weights)},
    "chat template": lambda tmp_path: {"model": {"chat_template": "{{ messages[0]['content'] }}"}},
    "max length": lambda tmp_path: {"data": {"max_length": 48}},
    "data": lambda tmp_path: {"rows": preference_rows(16, seed=99), "eval_rows": preference_rows(8, seed=98)},
    "loss type": lambda tmp_path: {"dpo": {"loss_type": "ipo"}},
    "two-row pairs": lambda tmp_path: {"dpo": {"shared_prompt": False}},
    "full fine-tuning": lambda tmp_path: {"adapter": {"kind": "none"}},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_key_changes_with_everything_the_reference_numbers_depend_on(dpo_recipe, caplog, tmp_path, variant):
    caplog.set_level(logging.INFO)
    DPOTrainer.from_recipe(dpo_recipe())
    base = reference_files(caplog.text)
    assert len(base) == 2  # train and eval
    caplog.clear()
    DPOTrainer.from_recipe(dpo_recipe(**VARIANTS[variant](tmp_path)))
    changed = reference_files(caplog.text)
    assert len(changed) == 2 and not changed & base and "computed and cached" in caplog.text


@pytest.mark.parametrize("train", [{}, {"mixed_precision": "bf16"}])
def test_the_key_is_stable_across_loads_and_copies_of_the_model(dpo_recipe, caplog, tmp_path, train):
    """The spot check passes (no warning) under bf16 autocast too."""
    caplog.set_level(logging.INFO)
    DPOTrainer.from_recipe(dpo_recipe(train=train))
    base = reference_files(caplog.text)
    for sections in ({}, {"model": model_copy(tmp_path)}):  # the same weights elsewhere: the same numbers
        caplog.clear()
        DPOTrainer.from_recipe(dpo_recipe(train=train, **sections))
        assert reference_files(caplog.text) == base and "computed" not in caplog.text
        assert caplog.text.count("reusing") == 2 and "WARNING" not in caplog.text


# ---- what a trainer does with bad files ----------------------------------------------------------
def test_an_altered_cache_is_caught_and_the_first_dpo_loss_is_ln2(dpo_recipe, caplog, monkeypatch):
    """Policy == reference at step 0 (a fresh LoRA), so the first DPO loss is ln 2 unless the
    reference log-probs are wrong; an attacker's file (checksum recomputed) must not be used."""
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load (pickle) used on a cache file"))
    recipe = dpo_recipe()
    DPOTrainer.from_recipe(recipe)
    for path in reference_files(caplog.text):
        values = load_file(path)["logps"]
        rewrite(path, values - torch.tensor([5.0, 0.0]))  # every chosen looks 5 nats less likely
    caplog.clear()
    trainer = DPOTrainer.from_recipe(recipe)
    loss = trainer.accumulate_gradients(trainer.micro_batches(0))["loss"]
    assert loss == pytest.approx(math.log(2), abs=1e-4)
    assert caplog.text.count("is stale or was altered") == 2


def test_a_truncated_cache_is_recomputed_with_a_warning_naming_it(dpo_recipe, caplog):
    caplog.set_level(logging.INFO)
    recipe = dpo_recipe()
    first = DPOTrainer.from_recipe(recipe)
    paths = sorted(reference_files(caplog.text))
    for path in paths:
        with open(path, "r+b") as f:
            f.truncate(100)
    caplog.clear()
    again = DPOTrainer.from_recipe(recipe)
    for path in paths:
        assert f"ignoring {path}: it is not a readable safetensors file" in caplog.text
    assert again.train_data["ref_logps"] == first.train_data["ref_logps"]
    assert not list(reference_cache.cache_path("x").parent.glob("*.pt"))


def test_a_failed_cache_write_leaves_no_partial_file(tmp_path, monkeypatch):
    """(a full disk left the temp file, up to its size, in the cache directory: the disk stayed full)"""
    import errno
    import os

    from align.models import reference_cache

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(reference_cache.os, "fsync", no_space)
    path = tmp_path / "reference" / "key.safetensors"
    with pytest.raises(OSError):
        reference_cache._write(path, "key", torch.zeros(4, 2))
    assert list(path.parent.iterdir()) == []
