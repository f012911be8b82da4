"""`align export`: a plain transformers model directory from a run's output (its adapter merged into
the base) or from one of its checkpoints (the weights at that step, as the run would have saved them)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from align.config import AdapterConfig, ModelConfig, recipe_from_dict, saved_recipe_now
from align.errors import AlignError
from align.models.kinds import inspect_checkpoint
from align.models.loading import load_model, load_tokenizer
from align.rollout.sampling import write_eos_ids

MODEL_INPUTS = ("model.", "ppo.value_model")
"""The recipe keys whose files make a checkpoint's model: a checkpoint holds only the trained weights
on top of them (data, reward and reference files do not change what it exports)."""


def export(path: str, out_dir: str) -> None:
    """`export_checkpoint` for a checkpoint directory, else `export_merged` for a run's output."""
    from align.trainers.checkpoint import STATE_FILE

    if os.path.isfile(os.path.join(path, STATE_FILE)):
        export_checkpoint(path, out_dir)
    else:
        export_merged(path, out_dir)


def export_merged(run_dir: str, out_dir: str, dtype: str = "auto") -> None:
    """Load `run_dir`'s base in full precision (also for QLoRA), merge its adapter, save to `out_dir`."""
    if not os.path.isfile(os.path.join(run_dir, "adapter_config.json")):
        raise AlignError(f"{run_dir}: no adapter_config.json here; only LoRA/QLoRA outputs need exporting "
                         "(a full fine-tune output is already a transformers model directory; a checkpoint "
                         "is OUTPUT_DIR/checkpoints/step-NNNNNN)")
    check_out_dir(out_dir)
    config = ModelConfig(name_or_path=run_dir, dtype=dtype)
    reward_model = inspect_checkpoint(run_dir, "run_dir").is_reward_model  # (a score head, not an lm-head)
    model = load_model(config, AdapterConfig(kind="none"), head="score" if reward_model else "causal_lm")
    tokenizer = load_tokenizer(config)
    write_eos_ids(model, tokenizer)
    write_new_dir(out_dir, lambda staging: (model.save_pretrained(staging), tokenizer.save_pretrained(staging)))


def export_checkpoint(path: str, out_dir: str) -> None:
    """The trained weights of checkpoint `path` on the model its recipe names, saved as the run's
    final output would be, then an adapter merged into its base; refused when a model file the recipe
    names changed since the checkpoint (its weights would sit on another base)."""
    from align.builtins import build_for_recipe
    from align.trainers import TRAINERS
    from align.trainers.checkpoint import load_checkpoint
    from align.trainers.inputs import changed_inputs, input_fingerprints

    check_out_dir(out_dir)
    state, objects = load_checkpoint(Path(path))
    if "recipe" not in state:
        raise AlignError(f"{path}: this checkpoint does not hold its recipe (written by an older Align); resume it "
                         "with align train --set train.resume_from=... --set train.max_steps=<its step> to save it")
    saved = saved_recipe_now(state["recipe"], state["algorithm"])
    recipe = recipe_from_dict(saved, f"{path} (the checkpoint's recipe)")
    fingerprints = {k: v for k, v in (state.get("inputs") or {}).items() if k.startswith(MODEL_INPUTS)}
    changed = changed_inputs(fingerprints, input_fingerprints(saved), saved)
    if changed:
        raise AlignError(f"{path}: {', '.join(changed)} changed since this checkpoint was written; its trained "
                         "weights would sit on another model. Restore the model it was trained from")
    build_for_recipe(recipe)
    policy = TRAINERS[recipe.algorithm].build_policy(recipe)
    trained = set(policy.state_dict())
    if trained - set(objects["model"]):
        raise AlignError(f"{path}: the checkpoint lacks trained weights its recipe's model has (e.g. "
                         f"{sorted(trained - set(objects['model']))[0]!r}); it was not written for this model")
    policy.load_state_dict(objects["model"])
    if not policy.has_adapter:
        write_new_dir(out_dir, policy.save)
        return
    with tempfile.TemporaryDirectory(prefix="align-export-") as adapter:
        policy.save(adapter)
        export_merged(adapter, out_dir)


def write_new_dir(out_dir: str, write) -> None:
    """`write(staging)` into a hidden directory beside `out_dir`, then renamed to it: a kill or a full
    disk never leaves a model directory without some of its files (the staging one is removed)."""
    path = Path(out_dir).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.export-")
    try:
        write(staging)
        os.replace(staging, path)  # (out_dir, if there, is empty: renamed over)
    except OSError as error:
        raise AlignError(f"{out_dir}: could not write the model ({error.strerror or error}); nothing was "
                         "written there") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_out_dir(out_dir: str) -> None:
    """AlignError unless `out_dir` is a new or empty directory (export never writes over files)."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise AlignError(f"{out_dir}: not empty; export writes a new model directory: give a new or empty one")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise AlignError(f"{out_dir}: is a file; export writes a model directory: give a new or empty one")
