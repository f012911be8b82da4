"""`align export`: a plain transformers model directory from a run's output (its adapter merged into
the base) or from one of its checkpoints (the weights at that step, as the run would have saved them)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from align.config import AdapterConfig, ModelConfig, recipe_from_dict, saved_recipe_now
from align.errors import AlignError
from align.models.kinds import inspect_checkpoint
from align.models.loading import load_model, load_tokenizer
from align.rollout.sampling import write_eos_ids

MODEL_INPUTS = ("model.",)
"""The recipe keys whose files make an exported checkpoint's model: it holds only the trained weights
on top of them (data, reward, reference and critic files do not change what it exports)."""
STAGING, ADAPTER = ".staging-export", ".staging-adapter"
"""Hidden folders inside the output directory while an export writes (what a killed one leaves)."""


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
    write_new_dir(out_dir, lambda staging: save_merged(run_dir, staging, dtype))


def save_merged(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "auto") -> None:
    """The adapter in `adapter_dir` merged into its base (a score head kept for a reward model)."""
    config = ModelConfig(name_or_path=str(adapter_dir), dtype=dtype)
    reward_model = inspect_checkpoint(str(adapter_dir), "run_dir").is_reward_model  # (a score head, not an lm-head)
    model = load_model(config, AdapterConfig(kind="none"), head="score" if reward_model else "causal_lm")
    tokenizer = load_tokenizer(config)
    write_eos_ids(model, tokenizer)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def export_checkpoint(path: str, out_dir: str) -> None:
    """The trained weights of checkpoint `path` on the model its recipe names, saved as the run's
    final model would be (`Trainer.build_exported_policy`: no reference, teacher or critic loaded),
    an adapter then merged into its base; refused when a model file the recipe names changed since
    the checkpoint (its weights would sit on another base)."""
    from align.builtins import build_builtins
    from align.models.policy import unwrap
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
        raise AlignError(f"{path}: {', '.join(changed)} changed since this checkpoint was written (a file in that "
                         "folder); its trained weights would sit on another model. Restore the model it was "
                         "trained from")
    build_builtins(recipe.model.name_or_path)
    policy = TRAINERS[recipe.algorithm].build_exported_policy(recipe)
    own = set(unwrap(policy.module).state_dict())
    weights = {k: v for k, v in objects["model"].items() if k in own}  # (not a critic's or a teacher's)
    missing = sorted(set(policy.state_dict()) - set(weights))
    if missing:
        raise AlignError(f"{path}: the checkpoint lacks trained weights its recipe's model has (e.g. {missing[0]!r}); "
                         "it was not written for this model")
    policy.load_state_dict(weights)

    def write(staging: Path) -> None:
        if not policy.has_adapter:
            policy.save(staging)
            return
        adapter = staging.parent / ADAPTER
        try:
            policy.save(adapter)
            save_merged(adapter, staging)
        finally:
            shutil.rmtree(adapter, ignore_errors=True)

    write_new_dir(out_dir, write)


def write_new_dir(out_dir: str, write) -> None:
    """`write(staging)` into a hidden folder inside `out_dir` (made if new), then each file moved in,
    weights before configs: a full disk leaves nothing (the folder removed if the export made it), a
    kill at most that hidden folder, which the next export clears."""
    path = Path(out_dir).expanduser()
    made = not path.exists()
    staging = path / STAGING
    try:
        path.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        write(staging)
        for entry in sorted(staging.iterdir(), key=lambda p: p.suffix == ".json"):
            os.replace(entry, path / entry.name)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        if made:
            shutil.rmtree(path, ignore_errors=True)
        raise AlignError(f"{out_dir}: could not write the model ({error.strerror or error}); nothing was "
                         "written there") from None
    shutil.rmtree(staging, ignore_errors=True)


def check_out_dir(out_dir: str) -> None:
    """AlignError unless `out_dir` is a new or empty directory (export never writes over files; what a
    killed export left is not counted)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise AlignError(f"{out_dir}: is a file; export writes a model directory: give a new or empty one")
    if os.path.isdir(out_dir) and set(os.listdir(out_dir)) - {STAGING, ADAPTER}:
        raise AlignError(f"{out_dir}: not empty; export writes a new model directory: give a new or empty one")
