"""The one training loop. Trainers subclass `Trainer` and override a few named hooks:

- `build_policy(recipe)`           the Policy (and its reference strategy)
- `build_dataset(recipe, tokenizer, ...)` rows -> tokenized examples (no model needed)
- `collate(examples)`              examples -> a batch of tensors
- `count_items(batch)`             how many units (tokens, pairs, examples) the loss averages over, read
                                   from the host batch (the collator's CPU tensors, before `.to(device)`)
- `compute_loss(batch)`            -> (loss, metrics as detached 0-dim tensors: the loop reads them
                                   only at log steps); the loss is normalized by `batch["num_items"]`,
                                   the item count of the whole optimizer step (all micro-batches of
                                   all processes), so gradient accumulation and data parallelism give
                                   exactly the update of one big batch.

Under several processes (`accelerate launch`, `torchrun`: DDP), `train.batch_size` is per process:
an optimizer step holds batch_size * grad_accum * num_processes examples, shared out among the
processes (see `align.distributed`). Logged metrics are those of the whole step; only the
main process writes files.

The training step never waits on the device: metrics stay on it and are read once per log step
(`Trainer.log`); tests/test_host_syncs.py counts the host reads of a step. A step whose loss or
gradient norm is not finite is skipped on the device (`optimizer_step`) and counted; the count is
read at log steps, and train.max_nonfinite_steps such steps in a row stop the run.

What a step's data is (the examples' order, micro-batches, each process's share, the batch layout
and `collate`) lives in `align.trainers.batches`, saving the final model, checkpoints and resuming
in `align.trainers.resume` (both mixed in).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import signal
import threading
import time
import warnings
from pathlib import Path

import torch
from accelerate.utils import DistributedType, set_seed

from align.config import Recipe, Section, apply_overrides, load_recipe, recipe_from_dict, save_recipe
from align.data import detect_format, load_rows
from align.errors import AlignError
from align.registry import TRAINERS
from align.models import Policy, sharding, zero
from align.models.compiled import compile_layers
from align.models.packed import attention_kernels
from align.models.layouts import check_rope_lengths
from align.models.policy import Trainable
from align.rollout import in_process_engine
from align.trainers import run_dir, samples
from align.trainers.inputs import check_inputs_outside_output_dir
from align.trainers.batches import Batches
from align.trainers.callbacks import Callback, MetricsFile, Plots, ProgressBar, Trackers
from align.trainers.optimizers import make_optimizer
from align.trainers.processes import process_accelerator
from align.trainers.resume import Resumable
from align.trainers.schedule import lr_scheduler
from align.distributed import main_processes_first, sum_over_processes, sum_tensors_over_processes

log = logging.getLogger(__name__)


def register_trainer(name: str, config: type[Section] | None = None):
    """Class decorator: recipes with `algorithm: name` train with this class, and their section
    `name:` is validated as `config` (None: the algorithm has no section)."""

    def add(cls: type[Trainer]) -> type[Trainer]:
        cls.algorithm, cls.config_class = name, config
        return TRAINERS.register(name)(cls)

    return add


def check_constructed(trainer: type, recipe, policy, *splits) -> None:
    """AlignError unless a trainer is built as `from_recipe` builds it (not as TRL's trainers are: a
    transformers model and raw rows): a validated Recipe, a Policy (or reward model) and tokenized
    examples (`build_dataset`'s)."""
    name = trainer.__name__
    if not isinstance(recipe, Recipe):
        raise AlignError(f"{name}(recipe, ...): recipe must be an align Recipe (recipe_from_dict(d) or load_recipe(path)),"
                         f" got {type(recipe).__name__}; or build it all with {name}.from_recipe(recipe)")
    if not isinstance(policy, Trainable):
        raise AlignError(f"{name}(recipe, policy, ...): policy must be an align Policy (Policy(model, tokenizer), "
                         f"or {name}.build_policy(recipe)), got {type(policy).__name__}")
    for key, data in zip(("train_data", "eval_data"), splits):
        row = data[0] if data is not None and len(data) else None
        if isinstance(row, dict) and not {"input_ids", "prompt_ids"} & set(row):
            raise AlignError(f"{name}: {key} holds rows of columns {sorted(row)}, not tokenized examples; tokenize "
                             f"them with {name}.build_dataset(recipe, policy.tokenizer, rows, format, key), or build "
                             f"the trainer with {name}.from_recipe(recipe)")


class Trainer(Batches, Resumable):
    algorithm: str = ""
    """The name the trainer is registered under (`register_trainer`)."""
    config_class: type[Section] | None = None
    """The class of the algorithm's own recipe section (`recipe.section`)."""
    formats: tuple[str, ...] = ()
    """Data formats this trainer accepts (see align.data.formats)."""
    dropout_by_default: bool = True
    """Whether dropout is on while training when train.dropout_during_training is not set."""
    run_id: str | None = None
    """The id of the run in output_dir (its run.json), set by `fit`; carried by checkpoints and metrics."""
    _samples_engine = None
    """The engine that writes eval samples (`greedy_samples`), made at the first evaluation."""
    shares_prompts: bool = False
    """Whether batches put a prompt once before its completions (`align.data.groups`) where exact."""

    def __init__(self, recipe: Recipe, policy: Policy, train_data, eval_data=None,
                 callbacks: list[Callback] | None = None):
        check_constructed(type(self), recipe, policy, train_data, eval_data)
        self.recipe, self.cfg = recipe, recipe.train
        self.policy = policy
        self.check_layouts()
        self.train_data, self.eval_data = train_data, eval_data
        self.output_dir = Path(recipe.output_dir)
        self.callbacks = ([MetricsFile()] + ([ProgressBar()] if self.cfg.progress else [])
                          + ([Plots()] if self.cfg.plots else [])
                          + ([Trackers(self.cfg.report_to)] if self.cfg.report_to else []) + (callbacks or []))
        self.dropout = self.dropout_by_default if self.cfg.dropout_during_training is None \
            else self.cfg.dropout_during_training
        if not self.dropout:
            policy.disable_dropout()
        longest, setting = self.longest_sequence
        check_rope_lengths(policy.module, longest, setting)
        if getattr(policy, "_reference_module", None) is not None:
            check_rope_lengths(policy._reference_module, longest, setting, f"the {policy.reference_name} model")
        self.accelerator = process_accelerator(self.cfg.ddp_timeout)
        self.sharded = self.cfg.sharding == "fsdp" and self.accelerator.num_processes > 1  # one process: nothing to shard
        self.sampling_copy: torch.nn.Module | None = None
        """Under fsdp or ZeRO-3, for trainers that sample while training: an unsharded copy of the policy's
        model on each process, synced from the shards before each sampling (`sync_sampler`)."""
        if self.sharded:  # before the optimizer: its parameters become the shards
            if not self.cfg.fsdp_offload:  # offloaded, fully_shard moves one unit at a time
                policy.module.to(self.accelerator.device)
            if self.samples_in_process():  # (with offloaded shards too: the copy samples on the device)
                self.sampling_copy = self.copy_for_sampling(policy)
            sharding.shard(policy.module, offload=self.cfg.fsdp_offload)
            if self.cfg.fsdp_reference == "sharded" and policy.reference == "frozen_copy":
                policy.shard_reference(self.accelerator.device, offload=self.cfg.fsdp_offload)
        self.optimizer = make_optimizer(self.cfg.optimizer, policy.trainable_parameters(), lr=self.cfg.lr,
                                        betas=self.cfg.adam_betas, weight_decay=self.cfg.weight_decay)
        self.zero_engine = None
        """DeepSpeed's engine over the trained root, under a DeepSpeed launch (`align.models.zero`)."""
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            zero.check(self.algorithm, recipe)
            plugin = self.accelerator.state.deepspeed_plugin
            config = zero.engine_config(plugin.deepspeed_config, self.cfg, self.accelerator.num_processes,
                                        zero3_init=plugin.zero3_init_flag)
            if zero.partitions_weights(config) and self.samples_in_process():  # as under fsdp (stage 2 keeps
                self.sampling_copy = self.copy_for_sampling(policy)  # whole weights: it samples from them)
            self.zero_engine = policy.module = zero.start(policy.module, self.optimizer, config)
            if zero.partitions_weights(config) and policy.reference == "frozen_copy":  # a reference or teacher
                policy.partition_reference()  # partitioned as the policy is (as TRL does under ZeRO-3)
        elif not self.sharded:  # DDP (or nothing, on one process); FSDP2 reduce-scatters by itself
            with warnings.catch_warnings():  # torch >= 2.13 deprecates DDP's broadcast_buffers for an
                # argument accelerate 1.15 cannot pass: a warning in every process the user cannot act on
                warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
                self.policy.module, self.optimizer = self.accelerator.prepare(self.policy.module, self.optimizer)
        if recipe.model.compile:  # (the recipe refuses it with fsdp, zero.check under ZeRO)
            compile_layers(self.policy.module)
        self.lockstep = self.sharded or self.zero_engine is not None
        """Whether every process must run as many forwards and backwards as the others (fsdp, ZeRO:
        collectives inside them); their shares of a step or an eval split are then padded to match."""
        # training mode from here on, as in `fit`: from_pretrained leaves the model in eval mode, where
        # transformers skips activation checkpointing (and dropout) in a `train_step` called directly
        self.policy.module.train()
        self.steps_per_epoch = self.count_steps_per_epoch()
        self.total_steps = self.cfg.max_steps or math.ceil(self.cfg.epochs * self.steps_per_epoch)
        self.scheduler = self.make_scheduler(step=0)
        self.step = 0
        device = self.accelerator.device
        self._nonfinite_in_row = torch.zeros((), device=device)
        """Steps skipped in a row (loss or gradient norm not finite), a device counter read at log steps."""
        self._nonfinite_total = torch.zeros((), device=device)
        self._stop_signal: int | None = None
        self.stopped_by: str | None = None
        """The signal's name when a SIGTERM/SIGINT stopped `fit` after a checkpoint, else None."""
        self._samples_file: samples.SamplesFile | None = None
        self.prepare_data()

    def copy_for_sampling(self, policy: Policy) -> torch.nn.Module:
        """A frozen copy of the policy's model, whole, on this process's device: made before the model
        is sharded or partitioned, synced before each sampling (`OnlineTrainer.sync_sampler`)."""
        return copy.deepcopy(policy.model).to(self.accelerator.device).requires_grad_(False).eval()

    @property
    def torch_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer itself, under accelerate's wrapper (its param_groups and defaults)."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def make_scheduler(self, step: int):
        """The learning-rate schedule of this recipe (lr, warmup, schedule, total steps), positioned
        at `step`: the optimizer's learning rates set to the schedule's value there. On resume the
        schedule is rebuilt from the current recipe, so a changed lr or max_steps takes effect from
        the resumed step on."""
        optimizer = self.torch_optimizer
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] = self.cfg.lr
        warmup = self.cfg.warmup if self.cfg.warmup >= 1 else self.cfg.warmup * self.total_steps
        scheduler = lr_scheduler(self.optimizer, self.cfg.schedule, round(warmup), self.total_steps)
        if step:  # LambdaLR's value at `step` in closed form, as its own step() computes it
            lrs = [fn(step) * base for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
            for group, lr in zip(optimizer.param_groups, lrs):
                group["lr"] = lr
            scheduler.last_epoch, scheduler._last_lr = step, lrs
        return scheduler

    # ---- construction from a recipe -------------------------------------------------------------
    @classmethod
    def from_recipe(cls, recipe: Recipe | dict | str | os.PathLike, overrides: list[str] | None = None, **kwargs):
        """Build policy and data as the recipe says. `recipe` may be a dict (as a YAML file holds it)
        or a path to a YAML file.

        The data is read and its format checked before the model loads, so data mistakes fail fast.
        Under a launch of several processes the main ones read and tokenize first, and the others
        read what they left in datasets' cache.
        """
        if isinstance(recipe, dict):
            recipe = recipe_from_dict(apply_overrides(copy.deepcopy(recipe), overrides or []))
        elif not isinstance(recipe, Recipe):
            recipe = load_recipe(recipe, overrides)
        sharding.check_accelerate_launch(recipe.train, recipe.model)  # before any model loads
        process_accelerator(recipe.train.ddp_timeout)  # the launch's process state, as the trainer sets it up
        set_seed(recipe.train.seed)
        with main_processes_first():
            splits = cls.load_splits(recipe)
        policy = cls.build_policy(recipe)
        with main_processes_first():
            datasets = [cls.build_dataset(recipe, policy.tokenizer, rows, fmt, key) if rows is not None else None
                        for key, (rows, fmt) in splits.items()]
        return cls(recipe, policy, *datasets, **kwargs)

    @classmethod
    def load_splits(cls, recipe: Recipe) -> dict[str, tuple]:
        """{"data.train": (rows, format), "data.eval": (rows, format) or (None, None)}."""
        data = recipe.data
        train = load_rows(data.train, "data.train")
        evaluation = load_rows(data.eval, "data.eval") if data.eval else None
        if evaluation is None and data.eval_fraction > 0:
            try:
                split = train.train_test_split(test_size=data.eval_fraction, seed=recipe.train.seed)
            except ValueError as error:  # a split left empty
                raise AlignError(f"data.eval_fraction: {data.eval_fraction} of {len(train)} rows of data.train "
                                 f"leaves a split empty ({error}); lower it, or give data.eval a file") from None
            train, evaluation = split["train"], split["test"]
        splits = {"data.train": train, "data.eval": evaluation}
        return {key: (rows, cls.check_format(recipe, rows, key)) if rows is not None else (None, None)
                for key, rows in splits.items()}

    @classmethod
    def check_format(cls, recipe: Recipe, rows, key: str) -> str:
        fmt = detect_format(rows.column_names, recipe.data.format, key)
        if fmt not in cls.formats:
            raise AlignError(f"{key}: {cls.algorithm} trains on {' / '.join(cls.formats)} data, but "
                             f"{getattr(recipe.data, key.split('.')[1]).path!r} looks like {fmt!r} data "
                             f"(columns {rows.column_names})")
        return fmt

    @classmethod
    def build_policy(cls, recipe: Recipe) -> Policy:
        return Policy.from_config(recipe.model, recipe.adapter, reference="none")

    @classmethod
    def build_exported_policy(cls, recipe: Recipe) -> Trainable:
        """The trained model alone, as `align export` of a checkpoint loads it (no reference, teacher
        or critic): a checkpoint's weights of its module are put into it. The base trainer's policy."""
        return Trainer.build_policy(recipe)

    @classmethod
    def build_dataset(cls, recipe: Recipe, tokenizer, rows, fmt: str, key: str):
        """Rows of format `fmt` -> tokenized examples (a datasets.Dataset or a list). Needs no model:
        `align validate` runs it where the tokenizer is on the machine."""
        raise NotImplementedError

    @property
    def longest_sequence(self) -> tuple[int, str]:
        """The most tokens one sequence of this run holds, and the setting that bounds it."""
        return self.recipe.data.max_length, "data.max_length"

    # ---- hooks ----------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Called once the model sits on its device: precompute what the data needs (e.g. reference
        log-probs). Default: nothing."""

    def count_items(self, batch: dict) -> float:
        """Default: the batch's examples (`pack` and `pad` record them: a packed batch's rows depend
        on the device, `one_row`), else its rows."""
        return float(batch["num_examples"]) if "num_examples" in batch else float(batch["input_ids"].shape[0])

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def linear_loss(self, batch: dict, loss_of_logprobs, token_weights, temperature: float = 1.0,
                    return_entropy: bool = False):
        """`loss_of_logprobs(policy.logprobs(batch)) -> (loss, metrics)` computed faster, for a loss
        whose gradient in the [B, T] token log-probs is `token_weights`: [B, T] for a linear loss (SFT's
        NLL; on-policy GRPO, whose ratios are all 1), or `align.ops.logprobs.TokenWeights` when a
        weight depends on its token's own log-prob (on-policy GRPO's KL term): the lm-head's gradient
        is made in the forward and its logits are never recomputed. The value and metrics come from `loss_of_logprobs` itself; the
        gradient is the weights' (each loss's weight function sits next to it in `align.losses` and
        tests check it against autograd). Returns (loss, metrics, [B, T] entropies or None)."""
        total, logps, entropy = self.policy.weighted_logprob_sum(batch, token_weights, temperature, return_entropy)
        loss, metrics = loss_of_logprobs(logps)
        return loss.detach() + (total - total.detach()), metrics, entropy

    def scoring_mode(self):
        """The mode of the passes whose numbers the loss compares with the training forward (reference
        and old log-probs): the training mode, dropout included, when dropout is on, else eval mode."""
        return self.policy.mode(training=self.dropout)

    # ---- the loop -------------------------------------------------------------------------------
    def samples_in_process(self) -> bool:
        """Whether the trainer generates from the policy in this process between steps (online RL with
        an in-process engine): under fsdp it then samples from an unsharded copy (`sampling_copy`), as
        each process samples its own prompts and a sharded forward is a collective."""
        return False

    def fit(self, overwrite: bool = False) -> dict[str, float]:
        """Train in output_dir, which this run holds until it returns (see `align.trainers.run_dir`):
        a directory holding another run is refused unless train.resume_from resumes it or
        `overwrite` moves it aside. Returns the last logged record."""
        check_inputs_outside_output_dir(self.recipe.model_dump(mode="json"))
        self.inputs  # (fingerprinted before training: what the run starts from)
        self.check_resume(overwrite)  # (before output_dir is touched: a refused resume writes nothing)
        with self.hold_output_dir(overwrite), self.stop_on_signals():
            if self.cfg.resume_from:
                self.resume(self.cfg.resume_from)
            if self.accelerator.is_main_process:  # (once the resume is accepted: the recipe the weights go on with)
                save_recipe(self.recipe, self.output_dir / "recipe.yaml")
            return self.train_loop()

    @contextlib.contextmanager
    def stop_on_signals(self):
        """While training, SIGTERM (a preemption notice) and SIGINT (Ctrl-C) let the current step end,
        then `train_loop` saves a checkpoint and returns with `stopped_by` set; a second signal
        interrupts at once. Only in the main thread (Python delivers signals there)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):
            if self._stop_signal is not None:  # the second one: stop now
                raise KeyboardInterrupt
            self._stop_signal = signum
            log.warning("%s: stopping after this step and saving a checkpoint (send it again to stop at once)",
                        signal.Signals(signum).name)

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def stop_requested(self, at_log_step: bool) -> bool:
        """Whether a signal asked this run to stop: at once with one process; with several, all of
        them must agree, which they do at log and save steps (one all-reduce, no extra host read)."""
        if self.accelerator.num_processes == 1:
            return self._stop_signal is not None
        if not at_log_step:
            return False
        return sum_over_processes({"stop": float(self._stop_signal is not None)})["stop"] > 0

    @contextlib.contextmanager
    def hold_output_dir(self, overwrite: bool):
        """Claim output_dir (main process) and set `run_id` on every process."""
        main = self.accelerator.is_main_process
        claim = run_dir.hold(self.output_dir, self.cfg.resume_from, overwrite) if main \
            else contextlib.nullcontext()
        with claim:
            self.accelerator.wait_for_everyone()
            self.run_id = run_dir.read_run(self.output_dir)["run_id"]
            yield

    def train_loop(self) -> dict[str, float]:
        """From `self.step` to total_steps, then the final evaluation and save; a stop requested by a
        signal ends it after a checkpoint instead. Either way the callbacks' `on_train_end` runs
        (progress bar closed, plots drawn, trackers finished)."""
        for cb in self.callbacks:
            cb.on_train_begin(self)
        if self.eval_data is not None and self.cfg.eval_at_start and self.step == 0:
            self.log(self.evaluate())
        self.policy.module.train()
        record: dict[str, float] = {}
        while self.step < self.total_steps:
            record = self.train_step(self.micro_batches(self.step))
            self.step += 1
            if self.eval_data is not None and self.cfg.eval_every and self.step % self.cfg.eval_every == 0:
                with self.not_training():
                    record.update(self.evaluate())
            evaluated = any(key.startswith("eval/") for key in record)
            logged = self.step % self.cfg.log_every == 0 or self.step == self.total_steps or evaluated
            saving = bool(self.cfg.save_every and self.step % self.cfg.save_every == 0)
            if logged:
                self.log(record)
            if saving:
                with self.not_training():
                    self.save_checkpoint()
            if self.stop_requested(at_log_step=logged or saving):
                if not logged:
                    self.log(record)
                if not saving:
                    self.save_checkpoint()
                self.stopped_by = signal.Signals(self._stop_signal or signal.SIGTERM).name
                log.warning("stopped by %s at step %d; checkpoint saved; resume with train.resume_from=auto",
                            self.stopped_by, self.step)
                break
        else:
            if self.eval_data is not None and not any(key.startswith("eval/") for key in record):
                self.log(self.evaluate())
            self.save(self.output_dir)
        for cb in self.callbacks:  # finished, or stopped by a signal after its checkpoint
            cb.on_train_end(self)
        return record

    def train_step(self, micro_batches: list[dict]) -> dict[str, torch.Tensor | float]:
        """One optimizer step over its micro-batches (gradient accumulation), without reading the
        device: the returned record holds 0-dim device tensors (loss, metrics, grad_norm) and host
        numbers (lr, num_items, num_tokens); `log` reads it (`read_record`) on log steps only."""
        if self._log_clock is None:
            self._log_clock = time.perf_counter()
        record = self.accumulate_gradients(micro_batches)
        record["lr"] = self.scheduler.get_last_lr()[0]
        if self.zero_engine is not None:  # clipping, the step and its skip when not finite are DeepSpeed's
            grad_norm, finite = zero.step(self.zero_engine, self.accelerator.device)
        else:
            params = self.policy.trainable_parameters()
            if self.sharded:  # from each process's shards, on the device (offloaded shards are on the CPU)
                grad_norm = sharding.clip_grad_norm(params, self.cfg.max_grad_norm, self.accelerator.device)
            elif self.cfg.max_grad_norm is not None:
                grad_norm = self.accelerator.clip_grad_norm_(params, self.cfg.max_grad_norm)
            else:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            finite = torch.isfinite(grad_norm) & self.loss_is_finite(record["loss"])
            self.optimizer_step(finite)
            self.optimizer.zero_grad(set_to_none=True)
        record["grad_norm"] = grad_norm.detach()
        self.scheduler.step()
        skipped = (~finite).float()
        self._nonfinite_in_row = (self._nonfinite_in_row + 1) * skipped
        self._nonfinite_total = self._nonfinite_total + skipped
        record["skipped_steps"], record["skipped_in_row"] = self._nonfinite_total, self._nonfinite_in_row
        self._tokens_since_log += record["num_tokens"]
        return record

    def loss_is_finite(self, loss: torch.Tensor) -> torch.Tensor:
        """0-dim bool on the device: this step's loss is finite on every process (an all-reduce under
        several processes, so that all of them skip or none does)."""
        finite = torch.isfinite(loss)
        if self.accelerator.num_processes > 1:
            finite = sum_tensors_over_processes({"bad": (~finite).float()}, self.accelerator.device)["bad"] == 0
        return finite

    def optimizer_step(self, finite: torch.Tensor) -> None:
        """Update the weights unless `finite` (0-dim bool on the device) is False. Fused AdamW skips
        on the device itself, through the found-inf input it has for gradient scaling: weights,
        moments and step counts stay as they were, and the host does not wait. Other optimizers
        (the foreach fallback, bitsandbytes') ask the host, one read per step."""
        optimizer = self.torch_optimizer
        if optimizer.defaults.get("fused"):  # on the weights' device (the CPU when fsdp offloads them)
            optimizer.found_inf = (~finite).float().to(optimizer.param_groups[0]["params"][0].device)
            try:
                self.optimizer.step()
            finally:
                del optimizer.found_inf
        elif bool(finite):
            self.optimizer.step()

    _log_clock: float | None = None
    """perf_counter() at the last log (or the first step): tokens_per_s is measured since then."""
    _tokens_since_log: float = 0.0
    """This process's tokens trained since the last log."""
    UNMEASURED_IF_NAN: tuple[str, ...] = ()
    """Metrics that are NaN where a step (or an evaluation) had nothing to measure them on, left out
    of its record then (KTO's rejected rewards on a step of desirable rows only), as TRL does."""
    _paused_since_log: float = 0.0
    """Seconds since the last log spent evaluating and saving checkpoints: not in tokens_per_s."""

    @contextlib.contextmanager
    def not_training(self):
        """Time spent inside (an evaluation, a checkpoint's save) is left out of tokens_per_s."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._paused_since_log += time.perf_counter() - started

    PER_STEP_KEYS = ("grad_norm", "lr", "num_items", "skipped_steps", "skipped_in_row")
    """Record entries that are already the whole step's: not summed over the processes."""
    HOST_SUMS = ("num_tokens", "tokens_since_log")
    """Record entries counted on the host, per process, and summed over the processes."""

    def count_step_items(self, batches: list[dict]) -> float | torch.Tensor:
        """`count_items` of the host batches summed over every process (padding batches count 0): a
        float with one process, else a 0-dim float32 tensor on the device, all-reduced (a collective,
        not a host read)."""
        items = sum(self.count_items(b) for b in batches if not b.get("padding"))
        if self.accelerator.num_processes == 1:
            return float(items)
        items = torch.tensor(float(items), device=self.accelerator.device)
        return sum_tensors_over_processes({"items": items})["items"].float()

    def accumulate_gradients(self, micro_batches: list[dict]) -> dict[str, torch.Tensor | float]:
        """Forward and backward this process's micro-batches (host tensors, moved here); the
        gradients, once DDP has averaged them over the processes, equal those of one big batch.

        Returns this process's share of the step's record: "loss" (the sum over its micro-batches)
        and each metric weighted by count_items / num_items, as 0-dim device tensors accumulated in
        float64 (float32 where the device has none); "num_tokens" (a host number) and "num_items"
        (the whole step's). Nothing is read from the device (see tests/test_host_syncs.py)."""
        num_items = self.count_step_items(micro_batches)
        # what the losses divide by, as they would by a float: at least 1, so that a step whose every item
        # is masked (GRPO's mask_truncated, every completion cut) trains nothing (its loss and gradients
        # 0, as TRL's clamp makes them) rather than dividing by 0; the record keeps the true count
        divisor = num_items.clamp(min=1.0) if isinstance(num_items, torch.Tensor) else max(num_items, 1.0)
        dtype = torch.float32 if self.accelerator.device.type == "mps" else torch.float64
        nothing = torch.zeros((), dtype=dtype, device=self.accelerator.device)
        record: dict[str, torch.Tensor | float] = {"loss": nothing, "num_tokens": 0.0}
        for i, host_batch in enumerate(micro_batches):
            padding = bool(host_batch.get("padding"))
            weight = 0.0 if padding else self.count_items(host_batch) / divisor
            batch = self._to_device({**host_batch, "num_items": divisor})
            last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if last or self.zero_engine is not None else self.accelerator.no_sync(self.policy.module):
                with self.autocast():
                    loss, metrics = self.compute_loss(batch)
                if padding:
                    loss = loss * 0.0
                # each process's loss is its share of the step's sum; DDP (and ZeRO) average, so scale it
                # back up; under the forward's attention kernels (activation checkpointing recomputes it here)
                with attention_kernels(self.accelerator.device):
                    if self.zero_engine is not None:
                        zero.backward(self.zero_engine, loss * self.accelerator.num_processes, last)
                    else:
                        self.accelerator.backward(loss * self.accelerator.num_processes)
            if not padding:
                record["loss"] = record["loss"] + loss.detach().to(dtype)
                record["num_tokens"] += int(host_batch["num_tokens"])
            for key, value in metrics.items():  # padding adds zeros: every process has the same keys
                value = torch.as_tensor(value, device=nothing.device).detach().to(dtype)
                record[key] = record.get(key, nothing) + (torch.zeros_like(value) if padding else value * weight)
        return {**record, "num_items": num_items}

    def read_record(self, record: dict) -> dict[str, float]:
        """A step's record as numbers, read from the device at once: its per-process tensors (loss,
        metrics; not `PER_STEP_KEYS`) and num_tokens summed over the processes (one all-reduce of
        their stack), every tensor then turned into a float. Host numbers pass through."""
        summed = {k: v for k, v in record.items()
                  if k not in self.PER_STEP_KEYS and (isinstance(v, torch.Tensor) or k in self.HOST_SUMS)}
        if self.accelerator.num_processes > 1 and summed:
            summed = sum_tensors_over_processes(summed, self.accelerator.device)
        values = {**record, **summed}
        tensors = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
        if tensors:
            stacked = torch.stack([values[k].detach().to(torch.float64 if values[k].device.type != "mps"
                                                         else torch.float32).reshape(()) for k in tensors])
            values.update(zip(tensors, stacked.tolist()))  # the one host read of a log step
        return {k: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
                for k, v in values.items()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Metrics over the whole eval split (its batches shared out among the processes), each
        averaged with the loss's own normalization. Not the hot path: it reads the host per batch."""
        batches = self.eval_batches()
        num_items = float(sum_over_processes({"items": sum(self.count_items(b) for b in batches
                                                           if not b.get("padding"))})["items"])
        totals: dict[str, float] = {"loss": 0.0}
        with self.policy.eval_mode():
            for batch in batches:
                with self.autocast():
                    loss, metrics = self.compute_loss(self._to_device({**batch, "num_items": num_items}))
                if batch.get("padding"):
                    continue
                totals["loss"] += loss.item()
                for key, value in metrics.items():
                    totals[key] = totals.get(key, 0.0) + float(value) * self.count_items(batch) / num_items
        metrics = {f"eval/{k}": v for k, v in sum_over_processes(totals).items()}
        self.show_samples(self.greedy_samples())
        return metrics

    # ---- eval samples ---------------------------------------------------------------------------
    def sample_prompt_ids(self) -> list[list[int]]:
        """Prompt ids of the first eval rows (samples.SHOWN of those with a prompt among the first
        rows): a row's `prompt_ids`, else its tokens before the first trained one (an SFT row; plain
        text has none). Trainers of a model that does not generate (the reward model) return []."""
        prompts = []
        for i in range(min(len(self.eval_data), 4 * samples.SHOWN)):
            row = self.eval_data[i]
            ids = row["prompt_ids"] if "prompt_ids" in row else samples.untrained_prefix(row["input_ids"], row["labels"])
            if ids:
                prompts.append(ids)
            if len(prompts) == samples.SHOWN:
                break
        return prompts

    def greedy_samples(self) -> list[dict]:
        """{"prompt", "completion"} of greedy completions of `sample_prompt_ids`, made on the main
        process during `fit` only (where `show_samples` writes them). Under fsdp every process makes
        them, on weights gathered whole (`sharding.gathered`): FSDP records the order in which its
        units ran forward to prefetch their weights in the next backward, and a forward on the main
        process alone would make that order differ between the processes (their collectives then
        deadlock). Under ZeRO every process makes them too (stage 3 gathers each layer's weights in its
        forward, a collective), the same greedy tokens from the same weights."""
        if self.run_id is None or not (self.accelerator.is_main_process or self.lockstep):
            return []
        prompts = self.sample_prompt_ids()  # the same on every process: all of them take part, or none
        if not prompts:
            return []
        with sharding.gathered(self.policy.module) if self.sharded else contextlib.nullcontext(), self.autocast():
            if self._samples_engine is None:  # chosen once (its probe runs on the whole weights, as here)
                self._samples_engine = in_process_engine(self.policy.model, self.policy.tokenizer)
            texts = samples.greedy_completions(self._samples_engine, self.policy.tokenizer, prompts,
                                               self.recipe.data.max_length)
        if not self.accelerator.is_main_process:
            return []
        tokenizer = self.policy.tokenizer
        return [{"prompt": tokenizer.decode(ids, skip_special_tokens=True), "completion": text}
                for ids, text in zip(prompts, texts)]

    def show_samples(self, shown: list[dict]) -> None:
        """Append this evaluation's samples to OUTPUT_DIR/samples.jsonl and hand them to the callbacks
        (`on_samples`: the trackers' tables); main process, during `fit` only."""
        if not shown or not self.accelerator.is_main_process or self.run_id is None:
            return
        if self._samples_file is None:
            self._samples_file = samples.SamplesFile(self.output_dir, self.run_id)
        self._samples_file.write(self.step, shown)
        for cb in self.callbacks:
            cb.on_samples(self, shown)

    def autocast(self):
        """bf16 autocast when train.mixed_precision is bf16 (our own, so each Trainer may differ)."""
        return torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16,
                              enabled=self.cfg.mixed_precision == "bf16")

    def log(self, record: dict) -> None:
        """Hand a record to the callbacks, as numbers: a step's record is read from the device here
        (`read_record`), with tokens_per_s over the interval since the last log, and the caller's
        record is updated in place to what was logged."""
        if "num_tokens" in record:
            record.update(self.read_record({**record, "tokens_since_log": self._tokens_since_log}))
            now = time.perf_counter()
            interval = now - (self._log_clock if self._log_clock is not None else now) - self._paused_since_log
            record["tokens_per_s"] = record.pop("tokens_since_log") / max(interval, 1e-9)
            self._log_clock, self._tokens_since_log, self._paused_since_log = now, 0.0, 0.0
            self.check_nonfinite(record.pop("skipped_in_row", 0.0), record)
        unmeasured = [key for key, value in record.items()
                      if key.removeprefix("eval/") in self.UNMEASURED_IF_NAN and math.isnan(value)]
        for key in unmeasured:
            del record[key]
        record = {"step": self.step, "epoch": self.step / self.steps_per_epoch, **record}
        for cb in self.callbacks:
            cb.on_log(self, record)

    def check_nonfinite(self, in_row: float, record: dict) -> None:
        """Stop the run (AlignError) once train.max_nonfinite_steps steps in a row were skipped."""
        if in_row >= self.cfg.max_nonfinite_steps:
            raise AlignError(
                f"stopped at step {self.step}: the loss or gradient norm was NaN/inf in the last {int(in_row)} steps "
                f"(loss {record.get('loss')}, grad_norm {record.get('grad_norm')}); those steps were skipped, so "
                f"the weights are the last finite ones, but nothing more was saved. Usual causes: train.lr too high "
                f"(it is {self.cfg.lr}), no gradient clipping (train.max_grad_norm), bad data or rewards. Resume "
                f"from the newest checkpoint with train.resume_from=auto after fixing it, or allow more with "
                f"train.max_nonfinite_steps")
