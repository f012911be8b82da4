"""Merge a trained adapter into its base model and save a plain transformers model directory."""

from __future__ import annotations

import os

from align.config import AdapterConfig, ModelConfig
from align.errors import AlignError
from align.models.kinds import inspect_checkpoint
from align.models.loading import load_model, load_tokenizer
from align.rollout.sampling import write_eos_ids


def export_merged(run_dir: str, out_dir: str, dtype: str = "auto") -> None:
    """Load `run_dir`'s base in full precision (also for QLoRA), merge its adapter, save to `out_dir`."""
    if not os.path.isfile(os.path.join(run_dir, "adapter_config.json")):
        raise AlignError(f"{run_dir}: no adapter_config.json here; only LoRA/QLoRA outputs need exporting "
                         "(a full fine-tune output is already a transformers model directory)")
    check_out_dir(out_dir)
    config = ModelConfig(name_or_path=run_dir, dtype=dtype)
    reward_model = inspect_checkpoint(run_dir, "run_dir").is_reward_model  # (a score head, not an lm-head)
    model = load_model(config, AdapterConfig(kind="none"), head="score" if reward_model else "causal_lm")
    tokenizer = load_tokenizer(config)
    write_eos_ids(model, tokenizer)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def check_out_dir(out_dir: str) -> None:
    """AlignError unless `out_dir` is a new or empty directory (export never writes over files)."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise AlignError(f"{out_dir}: not empty; export writes a new model directory: give a new or empty one")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise AlignError(f"{out_dir}: is a file; export writes a model directory: give a new or empty one")
