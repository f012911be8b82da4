"""What every case shares: the job spec, the untimed/timed split, and the one set of
hyper-parameters handed to Align (as a recipe) and to TRL (as a TrainingArguments config).

A case's side (`align`, `trl`, `floor`) is a function `spec -> Prepared`: everything it does before
returning is setup (untimed: imports, tokenization, model load); `Prepared.train()` is the timed
epoch; `Prepared.model()` hands back the trained model for the held-out loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.steps import batch_seen, step_done


@dataclasses.dataclass
class Spec:
    """One job: a case, a side and variant, its data, model and hyper-parameters."""

    case: str
    side: str            # align | trl | floor
    variant: str         # default | padding_free | packing ...
    model_dir: str
    train_path: str
    eval_path: str
    run_dir: str
    lr: float
    batch_size: int      # examples (pairs) per micro-batch
    grad_accum: int
    max_length: int
    seed: int = 0
    beta: float = 0.1    # DPO's beta; GRPO's KL weight
    log_every: int = 10
    threads: int = 0          # torch threads in the worker; 0: torch's default (all cores)
    group_size: int = 8       # GRPO: completions per prompt
    max_new_tokens: int = 64  # GRPO / PPO
    pack_length: int | None = None  # SFT: packed rows of up to this many tokens (None: the batch's longest chat)
    checkpointed_layers: float = 0.0  # Align: this fraction of the layers under activation checkpointing (0: none)
    checkpoint_mode: str = "full"     # Align, with checkpointed_layers: what those layers keep (full | selective)
    micro_batch_tokens: str = ""      # Align: train.micro_batch_tokens, a number or (sft cases) "trl_row": TRL
                                      # packing's row length on this data ("": none)

    compile: bool = False             # Align: model.compile (each decoder layer under torch.compile)
    precision: str = "auto"           # auto: bf16 autocast on CUDA, fp32 elsewhere; bf16 | fp32 on any device
                                      # (--set CASE.precision=bf16 gives a CPU run a GPU run's precision)

    @property
    def cuda(self) -> bool:
        return torch.cuda.is_available()

    @property
    def bf16(self) -> bool:
        """Both sides' forwards under bf16 autocast (fp32 weights), the floor's too."""
        return self.precision == "bf16" or (self.precision == "auto" and self.cuda)


@dataclasses.dataclass
class Prepared:
    train: Callable[[], None]
    model: Callable[[], torch.nn.Module]
    steps: Callable[[], int] = lambda: 0
    """Optimizer steps actually taken (a check that both sides ran the same schedule)."""
    work: Callable[[], dict] = dict
    """Online RL: {"completions": n, "completion_tokens": n} sampled during the epoch."""
    log: Callable[[], list[dict]] = list
    """The trainer's logged steps, [{"step", "loss", "grad_norm"}]; recorded with `--set
    CASE.log_every=1` only (Align logs the logged step's loss, TRL the mean since its last log): where
    two sides' training first parts."""


LOGGED = ("step", "loss", "grad_norm")
"""What `Prepared.log` keeps of each logged step (the gradient norm before clipping, on both sides)."""


def logged_steps(records) -> list[dict]:
    """The training records among a trainer's logged ones (those with a loss), cut to `LOGGED`."""
    return [{k: r.get(k) for k in LOGGED} for r in records if "loss" in r]


def load_rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def floor_forward(spec: Spec):
    """The floor's forwards: bf16 autocast with `spec.bf16` (weights stay fp32; what both trainers do) and
    the fastest SDPA kernels for changing shapes (`align.models.packed.attention_kernels`: the
    floor is a lower bound); nothing on the CPU."""
    from align.models.packed import attention_kernels

    with torch.autocast(device().type, dtype=torch.bfloat16, enabled=spec.bf16), attention_kernels(device()):
        yield


# ---- Align ---------------------------------------------------------------------------------------
def align_recipe(spec: Spec, algorithm: str, **sections) -> dict:
    recipe = {
        "algorithm": algorithm,
        "output_dir": str(Path(spec.run_dir) / "align"),
        "model": {"name_or_path": spec.model_dir, "dtype": "float32"},
        "data": {"train": {"path": spec.train_path}, "max_length": spec.max_length, "packing": True},
        "train": {"lr": spec.lr, "epochs": 1, "batch_size": spec.batch_size, "grad_accum": spec.grad_accum,
                  "warmup": 0, "schedule": "linear", "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": spec.seed,
                  "mixed_precision": "bf16" if spec.bf16 else "no", "log_every": spec.log_every,
                  "progress": False, "plots": False},
    }
    if spec.checkpointed_layers:  # (TRL checkpoints every layer or none: its side stays without)
        recipe["model"].update(gradient_checkpointing=True, checkpointed_layers=spec.checkpointed_layers,
                               checkpoint_mode=spec.checkpoint_mode)
    elif spec.checkpoint_mode != "full":
        raise ValueError(f"checkpoint_mode={spec.checkpoint_mode!r} needs checkpointed_layers > 0 (the layers it applies to)")
    if spec.compile:  # (TRL's side stays eager: its default, padding_free and packing variants)
        recipe["model"]["compile"] = True
    if spec.micro_batch_tokens:
        if not spec.micro_batch_tokens.isdigit():
            raise ValueError(f"micro_batch_tokens={spec.micro_batch_tokens!r}: a number of tokens here")
        recipe["train"]["micro_batch_tokens"] = int(spec.micro_batch_tokens)
    recipe.update(sections)
    return recipe


def align_job(trainer_class, raw_recipe: dict) -> Prepared:
    """Setup as `Trainer.from_recipe` does it (data read and tokenized, model loaded and moved to the
    device), untimed; the
    trainer's construction (optimizer, and for DPO the reference log-prob cache) and `fit()` are
    timed. The final save of `fit()` is skipped and plots are off: TRL's `train()` does neither.
    Online trainers count the completions they sample (`Prepared.work`)."""
    from accelerate.utils import set_seed

    from align.config import recipe_from_dict

    work = {"completions": 0, "completion_tokens": 0}

    def train_step(self, micro_batches):
        for batch in micro_batches if isinstance(micro_batches, (list, tuple)) else ():
            batch_seen(batch)
        record = trainer_class.train_step(self, micro_batches)
        step_done()
        return record

    methods = {"save": lambda self, directory: None, "train_step": train_step}
    if hasattr(trainer_class, "make_experience"):
        def make_experience(self, round_):
            experience = trainer_class.make_experience(self, round_)
            completions = [c for group in experience["groups"] for c in group["completions"]]
            work["completions"] += len(completions)
            work["completion_tokens"] += sum(len(c) for c in completions)
            return experience

        methods["make_experience"] = make_experience
    cls = type(trainer_class.__name__, (trainer_class,), methods)
    recipe = recipe_from_dict(raw_recipe)
    set_seed(recipe.train.seed)
    splits = cls.load_splits(recipe)
    policy = cls.build_policy(recipe)
    policy.module.to(device())  # on the device before the timed region, as TRL's model is (its trainer moves it)
    datasets = [cls.build_dataset(recipe, policy.tokenizer, rows, fmt, key) if rows is not None else None
                for key, (rows, fmt) in splits.items()]
    state = {}

    def train():
        state["trainer"] = trainer = cls(recipe, policy, *datasets)
        trainer.fit()

    def log() -> list[dict]:
        path = Path(recipe.output_dir) / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return logged_steps(r for r in records if "step" in r)

    return Prepared(train=train, model=lambda: state["trainer"].policy.model,
                    steps=lambda: state["trainer"].step, work=lambda: dict(work), log=log)


# ---- TRL -----------------------------------------------------------------------------------------
def trl_args(spec: Spec) -> dict:
    """Keyword arguments shared by every TRL config: TRL's defaults, except the shared
    hyper-parameters and gradient checkpointing (TRL defaults it on, Align off)."""
    return dict(
        output_dir=str(Path(spec.run_dir) / "trl"), learning_rate=spec.lr, num_train_epochs=1,
        per_device_train_batch_size=spec.batch_size, gradient_accumulation_steps=spec.grad_accum,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=spec.seed,
        bf16=spec.bf16, gradient_checkpointing=False, logging_steps=spec.log_every, save_strategy="no",
        eval_strategy="no", report_to="none", dataloader_num_workers=0, disable_tqdm=True,
    ) | ({"use_cpu": True} if spec.bf16 and not spec.cuda else {})  # (bf16 off CUDA: transformers asks for it)


def trl_job(trainer) -> Prepared:
    from transformers import TrainerCallback

    class StepDone(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_done()

    trainer.add_callback(StepDone())
    collate = trainer.data_collator  # (read by the train dataloader, which train() builds)
    trainer.data_collator = lambda features: batch_seen(collate(features))
    return Prepared(train=trainer.train, model=lambda: trainer.model, steps=lambda: trainer.state.global_step,
                    log=lambda: logged_steps(trainer.state.log_history))


def hf_dataset(path: str):
    import datasets

    return datasets.Dataset.from_list(load_rows(path))


# ---- the floor -----------------------------------------------------------------------------------
def floor_job(spec: Spec, model: torch.nn.Module, steps: list[list[dict]],
              loss_fn: Callable[[torch.nn.Module, dict, float], torch.Tensor],
              items: Callable[[dict], float]) -> Prepared:
    """A bare loop: for each optimizer step, forward+backward every micro-batch (laid out before
    timing), then one fused AdamW step; no clipping, scheduler, logging or metrics. `loss_fn(model, batch, num_items)`; `items(batch)` counts the
    loss's units so accumulation normalizes like the trainers do."""
    model.to(device()).train()
    optimizer = fastest_adamw(model, spec.lr)
    steps = [[{k: v.to(device()) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in step]
             for step in steps]

    def train():
        for micro_batches in steps:
            num_items = sum(items(b) for b in micro_batches)
            for batch in micro_batches:
                batch_seen(batch)
                with floor_forward(spec):
                    loss = loss_fn(model, batch, num_items)
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_done()

    return Prepared(train=train, model=lambda: model, steps=lambda: len(steps))


def fastest_adamw(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """The fastest AdamW torch has here (TRL's default too): the floor is a lower bound."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=True)


def group_steps(batches: list[dict], grad_accum: int) -> list[list[dict]]:
    return [batches[i:i + grad_accum] for i in range(0, len(batches), grad_accum)]


def num_steps(n: int, spec: Spec) -> int:
    return math.ceil(math.ceil(n / spec.batch_size) / spec.grad_accum)
