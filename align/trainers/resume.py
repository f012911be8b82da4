"""Saving and resuming, the part of `Trainer` that writes its weights and checkpoints and reads
them back (`align.trainers.checkpoint` holds the file format): the final model, a checkpoint's
state (under fsdp each process writes its own shards' rows; ZeRO's partitions are gathered; the
optimizer state is keyed by parameter name, so a checkpoint resumes under either, or DDP, or on one
process), and which recipe changes a resumed run may apply."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import torch

from align.config import flat_keys, same_by_default, saved_recipe_now
from align.distributed import from_main_process, gather_shares, sum_tensors_over_processes
from align.errors import AlignError
from align.models import sharding, zero
from align.models.policy import unwrap
from align.trainers import checkpoint, run_dir
from align.trainers.inputs import changed_inputs, input_fingerprints

log = logging.getLogger(__name__)


class Resumable:
    """Mixed into `Trainer`: uses its policy, optimizer, accelerator, step, recipe and output_dir."""

    def check_weights_finite(self, what: str) -> None:
        """AlignError if a trainable weight is NaN/inf (one host read; at saves only)."""
        params = [sharding.local_shard(p).detach() for p in self.policy.trainable_parameters()]
        finite = torch.stack([torch.isfinite(p).all() for p in params]).all() if params else torch.tensor(True)
        if self.lockstep:  # every process checks its own shards
            finite = sum_tensors_over_processes({"bad": (~finite).float()}, self.accelerator.device)["bad"] == 0
        if not bool(finite):
            raise AlignError(f"step {self.step}: the weights are NaN/inf, so the {what} was not written (earlier "
                             f"checkpoints are kept). Lower train.lr (it is {self.cfg.lr}) or clip gradients "
                             "(train.max_grad_norm)")

    def save(self, directory: Path) -> None:
        """Final weights (adapter or full model) and tokenizer, loadable by transformers/peft; never
        non-finite ones, never half-written (see `checkpoint.write_atomically`). Under fsdp the
        shards are gathered first (every process takes part) and written unsharded."""
        self.check_weights_finite("final model")
        state = sharding.full_state_dict(self.policy.module) if self.sharded else \
            zero.full_state_dict(self.zero_engine) if self.zero_engine is not None else None
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            write = self.policy.save if state is None else functools.partial(self.policy.save, state_dict=state)
            checkpoint.write_atomically(directory, write, "final model")

    def checkpoint_state(self) -> dict[str, object]:
        """What a checkpoint holds: nested dicts/lists of tensors, numbers and strings (stored as
        safetensors + JSON, see `align.trainers.checkpoint`); `restore_state` puts it back. Called on
        every process; the state is the same on all but the random generators (one per process). The
        learning-rate schedule is not in it: `resume` rebuilds it from the recipe at the step."""
        if self.sharded:  # each process's own rows of its shards, never gathered; parameters named
            model, optimizer = sharding.sharded_training_state(self.policy.module, self.torch_optimizer)
            model = self.policy.trainable_entries(model)
        elif self.zero_engine is not None:  # the same, from ZeRO's partitions
            model, optimizer = zero.full_training_state(self.zero_engine, self.torch_optimizer)
        else:
            model, optimizer = self.policy.state_dict(), self.optimizer.state_dict()
        return {"model": model, "optimizer": optimizer,
                "rng": gather_shares([checkpoint.rng_state()]),
                "skipped": torch.stack([self._nonfinite_total, self._nonfinite_in_row]).cpu()}

    def restore_state(self, objects: dict[str, object]) -> None:
        """Put `checkpoint_state`'s objects back (sharded tensors may come as `checkpoint.StoredRows`:
        under fsdp each process reads its own rows, elsewhere they are read whole)."""
        if not self.sharded:
            objects = checkpoint.materialize(objects)
        named = sharding.keyed_by_name(objects["optimizer"])  # written under fsdp or ZeRO: resumes anywhere
        if named and self.sharded:
            sharding.load_sharded_training_state(self.policy.module, self.torch_optimizer, objects["model"],
                                                 objects["optimizer"])
        elif named and self.zero_engine is not None:
            zero.load_training_state(self.zero_engine, objects["model"], objects["optimizer"])
        elif named:
            sharding.load_training_state(unwrap(self.policy.module), self.torch_optimizer, objects["model"],
                                         objects["optimizer"])
        elif self.sharded or self.zero_engine is not None:
            raise AlignError("this checkpoint was written without train.sharding: fsdp or ZeRO (its optimizer state "
                             "is numbered, not named); resume it with sharding: none, without DeepSpeed")
        else:
            self.policy.load_state_dict(objects["model"])
            self.optimizer.load_state_dict(objects["optimizer"])
        if "skipped" in objects:
            total, in_row = objects["skipped"].to(self.accelerator.device)
            self._nonfinite_total, self._nonfinite_in_row = total, in_row
        rng = objects["rng"]
        checkpoint.set_rng_state(rng[min(self.accelerator.process_index, len(rng) - 1)])

    @functools.cached_property
    def inputs(self) -> dict[str, str]:
        """Fingerprints of the local files the recipe names (`align.trainers.inputs`), read once: at
        the start of `fit`, so a checkpoint records the inputs the run started from."""
        return input_fingerprints(self.recipe.model_dump(mode="json"))

    def save_checkpoint(self) -> Path:
        """Checkpoint the current step (every process takes part: under fsdp each writes its shards'
        rows, the main process the rest)."""
        self.check_weights_finite("checkpoint")
        return checkpoint.save_checkpoint(self.output_dir / "checkpoints", self.step, self.checkpoint_state(),
                                          {"algorithm": self.algorithm, "total_steps": self.total_steps,
                                           "global_batch_size": self.global_batch_size,
                                           "recipe": self.recipe.model_dump(mode="json"), "inputs": self.inputs},
                                          keep=self.cfg.keep_checkpoints, run_id=self.run_id)

    def resume(self, where: str) -> None:
        """Continue from a checkpoint directory, or for `auto` from this run's newest loadable one in
        output_dir (a damaged one is skipped with a warning). The main process picks it and checks
        every file; the others resume from the same one, each checking the rows files it reads."""
        found, error = None, None
        if self.accelerator.is_main_process:
            try:
                found = self._checkpoint_to_resume(where)
            except AlignError as failure:
                error = str(failure)
        path, error = from_main_process((found and str(found[0]), error))
        if error:
            raise AlignError(error)
        if path is None:
            log.warning("train.resume_from=auto: no checkpoint of this run in %s; starting from scratch",
                        self.output_dir)
            return
        path = Path(path)
        state, objects = found[1:] if found else checkpoint.load_checkpoint(path, lazy=True, rows_when_read=True)
        check_steps_left(path, state, self.total_steps)
        applied = self.check_resumable(path, state)
        self.check_same_inputs(path, state)
        self.restore_state(objects)
        self.step = state["step"]
        self.accelerator.wait_for_everyone()  # (every process has read its rows before any is moved)
        if self.accelerator.is_main_process:
            abandoned = checkpoint.set_aside_after(self.output_dir / "checkpoints", self.run_id, self.step)
            if abandoned:
                log.warning("resumed at step %d: this run's later checkpoints belong to the timeline it leaves; "
                            "moved aside (not resumed by auto, nor rotated): %s", self.step,
                            ", ".join(str(p) for p in abandoned))
        for group in self.torch_optimizer.param_groups:  # this recipe's settings, not the checkpoint's
            group.update(betas=self.cfg.adam_betas, weight_decay=self.cfg.weight_decay)
        self.scheduler = self.make_scheduler(self.step)
        log.info("resumed from %s at step %d", path, self.step)
        if applied:
            log.warning("resumed with changed settings, applied from step %d on (the schedule re-evaluated there): %s",
                        self.step, "; ".join(applied))

    def _checkpoint_to_resume(self, where: str) -> tuple[Path, dict, dict] | None:
        """(path, state, objects) of the checkpoint `resume` continues from, every file checked; None
        for `auto` without one."""
        if where == "auto":
            return checkpoint.load_newest(self.output_dir / "checkpoints", self.run_id, lazy=True)
        path = self.checkpoint_path(where)
        return (path, *checkpoint.load_checkpoint(path, lazy=True))

    @staticmethod
    def checkpoint_path(where: str) -> Path:
        """train.resume_from's directory; AlignError if it holds no checkpoint (`fit` asks before it
        takes output_dir, so a wrong path leaves nothing behind)."""
        path = Path(where).expanduser()
        if not (path / checkpoint.STATE_FILE).is_file():
            raise AlignError(f"train.resume_from: {where!r} is not a complete checkpoint directory (no "
                             f"{checkpoint.STATE_FILE}): give one of OUTPUT_DIR/checkpoints/step-NNNNNN, or auto")
        return path

    RESUME_APPLIES = ("train.lr", "train.warmup", "train.schedule", "train.max_steps", "train.epochs",
                      "train.max_grad_norm", "train.weight_decay", "train.adam_betas", "train.max_nonfinite_steps",
                      "train.log_every", "train.eval_every", "train.eval_at_start", "train.eval_batch_size",
                      "train.save_every", "train.keep_checkpoints", "train.resume_from", "train.progress",
                      "train.plots", "train.report_to", "train.eval_samples", "output_dir",
                      "model.gradient_checkpointing", "model.checkpointed_layers", "model.checkpoint_mode",
                      "train.micro_batch_tokens", "model.compile", "data.num_proc", "train.ddp_timeout")
    """Recipe keys a resumed run may change (optimizer, schedule, cadence, output, activation
    checkpointing, the micro-batch token budget, compilation, tokenizing processes and the
    process-group timeout: the memory and time a step takes, not what it computes); any other change
    (model, adapter, data, algorithm, its section, seed, ...) is refused by `check_resumable`."""

    def check_resume(self, overwrite: bool) -> None:
        """Before `fit` takes output_dir (nothing written yet): AlignError where `resume` would refuse
        train.resume_from's checkpoint for this recipe (see `check_resume`)."""
        check_resume(self.recipe, overwrite, self.global_batch_size, self.RESUME_APPLIES, self.inputs, self.total_steps)

    def check_resumable(self, path: Path, state: dict) -> list[str]:
        """The changes from the checkpoint's recipe to this one, as "key: old -> new" lines; AlignError
        if one cannot be applied to a resumed run (`resume_changes`)."""
        return resume_changes(self.recipe, path, state, self.global_batch_size, self.RESUME_APPLIES)

    def check_same_inputs(self, path: Path, state: dict) -> None:
        check_same_inputs(self.recipe, path, state, self.inputs)


def resume_target(recipe, overwrite: bool = False) -> tuple[Path, dict] | None:
    """(path, state as written, its files not yet checked) of the checkpoint `recipe`'s
    train.resume_from names (auto: the newest of the run in output_dir); None where the run starts
    afresh (auto with no checkpoint, or with `overwrite`, which moves that run aside)."""
    where = recipe.train.resume_from
    if not where or (where == "auto" and overwrite):
        return None
    if where == "auto":
        run = run_dir.read_run(Path(recipe.output_dir))
        found = checkpoint.list_checkpoints(Path(recipe.output_dir) / "checkpoints", run["run_id"]) if run else []
        if not found:
            return None
        path = found[-1]
    else:
        path = Resumable.checkpoint_path(where)
    try:
        return path, json.loads((path / checkpoint.STATE_FILE).read_text())
    except (OSError, ValueError):
        return None  # (damaged: `resume` says so, or falls back to an older one)


def check_resume(recipe, overwrite: bool = False, global_batch_size: int | None = None,
                 applies: tuple[str, ...] = Resumable.RESUME_APPLIES, inputs: dict | None = None,
                 total_steps: int | None = None) -> None:
    """AlignError where the checkpoint `recipe` resumes from was trained with a recipe or on inputs this
    one may not go on from (`resume_changes`, `check_same_inputs`), or is past its steps: what `fit`
    and `align validate` check before anything is written. global_batch_size None (validate: the
    process count is not known yet): batch_size and grad_accum changes are left for `fit` to judge;
    total_steps None: train.max_steps, if set."""
    found = resume_target(recipe, overwrite)
    if found:
        check_steps_left(*found, total_steps or recipe.train.max_steps)
        resume_changes(recipe, *found, global_batch_size, applies)
        check_same_inputs(recipe, *found, inputs)


def check_steps_left(path: Path, state: dict, total_steps: int | None) -> None:
    """AlignError if the checkpoint is past the run's `total_steps` (None: not known yet)."""
    if total_steps is not None and state.get("step", 0) > total_steps:
        raise AlignError(f"train.resume_from: {path} is at step {state['step']}, past this run's "
                         f"{total_steps} steps; raise train.max_steps or start a new run")


def check_same_inputs(recipe, path: Path, state: dict, inputs: dict | None = None) -> None:
    """AlignError if a local input (the model, data, a reward file, ...) changed since the
    checkpoint was written (a checkpoint from before fingerprints were kept is not checked).
    inputs: the recipe's fingerprints, if taken already."""
    dumped = recipe.model_dump(mode="json")
    saved = state.get("inputs") or {}
    changed = changed_inputs(saved, input_fingerprints(dumped) if inputs is None and saved else inputs or {}, dumped)
    if changed:
        raise AlignError(f"train.resume_from: {path} was trained on other inputs than these files hold now: "
                         f"{', '.join(changed)} changed since (another model or data under the same name, "
                         "e.g. a run trained again into that directory); the resumed run would go on from the "
                         "old one's weights on the new inputs. Restore them, or start a new run (a new "
                         "output_dir, or --overwrite)")


def resume_changes(recipe, path: Path, state: dict, global_batch_size: int | None,
                   applies: tuple[str, ...] = Resumable.RESUME_APPLIES) -> list[str]:
    """The changes between the checkpoint's recipe and this one, as "key: old -> new" lines, if
    all are in `applies` (batch_size/grad_accum too when the global batch stays the same, as
    when resuming at another process count; not judged when global_batch_size is None); else
    AlignError listing the refused ones."""
    if "recipe" not in state:
        return []
    old = flat_keys(saved_recipe_now(state["recipe"], recipe.algorithm))
    new = flat_keys(recipe.model_dump(mode="json"))
    changed = sorted(k for k in old.keys() | new.keys()
                     if old.get(k) != new.get(k) and not same_by_default(k, old.get(k), new.get(k)))
    saved_batch = state.get("global_batch_size")
    same_global_batch = global_batch_size is None or saved_batch == global_batch_size
    batch_keys = ("train.batch_size", "train.grad_accum") if same_global_batch else ()
    lines = {k: f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed}
    refused = [k for k in changed if k not in applies and k not in batch_keys]
    if not same_global_batch and saved_batch is not None:
        lines["global batch"] = (f"global batch (examples per optimizer step, batch_size * grad_accum * "
                                 f"processes): {saved_batch} -> {global_batch_size}")
        refused.append("global batch")
    if refused:
        raise AlignError(f"train.resume_from: {path} was trained with another recipe; these changes cannot be "
                         "applied to a resumed run:\n  " + "\n  ".join(lines[k] for k in refused) +
                         "\nrevert them, or start a new run (a new output_dir, or --overwrite). Changes to the "
                         "optimizer, schedule and cadence keys are applied on resume.")
    return [lines[k] for k in changed if k not in ("train.resume_from", "output_dir")]
