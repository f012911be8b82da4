"""Typed recipe configs: YAML in, validated pydantic models out.

A recipe is one flat YAML file. The keys every recipe has are declared here, an algorithm's own
section next to its trainer (`register_trainer("dpo", DPOConfig)` in align/trainers/dpo.py); an
unknown key, a wrong type or a missing local file fails before any model loads, with the file, the
key and the closest valid key.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model, ValidationError, field_validator, model_validator

from align.errors import AlignError

DATA_FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class Section(BaseModel):
    """Base for every recipe section: unknown keys are errors, values are type-checked."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value, info):
        """`lr: true` is a mistake, not 1.0 (pydantic's lax mode reads a bool as a number)."""
        bools = [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, bool)]
        if bools and _takes_numbers_not_bools(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"{str(bools[0]).lower()} is not a number; write the number you mean (0 for off, "
                             "or null where the key may be unset)")
        return value


def _takes_numbers_not_bools(annotation) -> bool:
    """Whether a field's type (or its items' type) takes an int or a float but no bool: unions,
    Annotated, lists and tuples unpacked, a Literal by the types of its values."""
    types, todo = set(), [annotation]
    while todo:
        kind = todo.pop()
        args = typing.get_args(kind)
        if typing.get_origin(kind) is Literal:
            types.update(type(v) for v in args)
        elif args:
            todo.extend(a for a in args if a is not Ellipsis)
        else:
            types.add(kind)
    return bool(types & {int, float}) and bool not in types and Any not in types


def check_keyword_arguments(fn, kwargs: dict, taken: tuple[str, ...], key: str) -> None:
    """ValueError naming the first of `kwargs` that `fn` has no keyword parameter for (besides the
    `taken` ones the caller passes itself); a function with **kwargs accepts anything."""
    parameters = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return
    own = [n for n, p in parameters.items() if n not in taken and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for name in kwargs:
        if name not in own:
            close = difflib.get_close_matches(name, own, n=1)
            raise ValueError(f"{key}: {getattr(fn, '__name__', fn)} has no parameter {name!r}"
                             + (f"; did you mean {close[0]!r}?" if close else "")
                             + f" (its own: {', '.join(own) or 'none'})")


def check_one_reference(reference: str, reference_model: str | None) -> None:
    """ValueError if a section names both a reference strategy and a reference model (the model won)."""
    if reference_model and reference != "auto":
        raise ValueError(f"reference: {reference} and reference_model: {reference_model!r} together; a reference_model "
                         "is the reference, so drop one of them")


def registered(registry_name: str):
    """The type of a recipe value that names an entry of `align.registry.<registry_name>` (or a
    `module:Name` plug-in, imported now): a typo fails when the recipe is read, listing the names."""

    def check(value: str) -> str:
        from align import registry

        try:
            getattr(registry, registry_name).get(value, key="")
        except AlignError as error:
            raise ValueError(str(error)) from None
        return value

    return Annotated[str, AfterValidator(check)]


class ModelConfig(Section):
    name_or_path: str
    """Hub id, local directory, or `builtin:tiny-llama` (a small model built offline)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    trust_remote_code: bool = False
    revision: str | None = None
    tokenizer: str | None = None
    """Tokenizer hub id or path when it differs from the model's (the model's own vocabulary, tokens
    added to it at most: `check_same_vocabulary`)."""
    chat_template: str | None = None
    """A Jinja chat template, or a path to a file holding one, replacing the tokenizer's."""
    gradient_checkpointing: bool = False
    checkpointed_layers: float = Field(1.0, gt=0.0, le=1.0)
    """With gradient_checkpointing: the fraction of decoder layers whose activations are recomputed
    in the backward, spread evenly (0.5: every other layer); each saves its layer's activations for
    about a third of its compute. 1.0: every layer."""
    checkpoint_mode: Literal["full", "selective"] = "full"
    """With gradient_checkpointing: what a checkpointed layer keeps for the backward. full: its input
    only (the whole layer runs again). selective: also the outputs of its matmuls and attention,
    so only the elementwise ops between them run again: about 0.6x the activation memory of no
    checkpointing (bf16 autocast), without recomputing any matmul (align/models/recompute.py). On a
    GPU those ops are many small kernels, nearly a forward's time, unless `compile` fuses them into
    the backward's (one 1.5b layer: ~52 KiB of activations a token compiled and selective, ~76
    compiled, ~117 eager)."""

    compile: bool = False
    """Compile each decoder layer of the trained model(s) with torch.compile (regional compilation:
    every layer of a class shares its graphs), fusing the elementwise ops between the matmuls (norms,
    activations, rotary, residual adds). The first steps pay the compilation (tens of seconds with
    a cold cache) and sequence lengths that vary compile once more. Values equal the eager forward's
    to rounding (under bf16, ~1e-3 in log-probs, also between a training and a no-grad pass of the
    same weights); dropout draws other masks. Sampling runs eagerly (`align.models.compiled`)."""

    @field_validator("name_or_path", "tokenizer")
    @classmethod
    def _expand_home(cls, value: str | None) -> str | None:
        """`~/models/x` is a local directory (not a hub id)."""
        return os.path.expanduser(value) if value and value.startswith("~") else value

    @model_validator(mode="after")
    def _check_checkpointed_layers(self) -> "ModelConfig":
        if self.checkpointed_layers < 1 and not self.gradient_checkpointing:
            raise ValueError("checkpointed_layers < 1 needs gradient_checkpointing: true (it picks the layers "
                             "that gradient checkpointing recomputes)")
        if self.checkpoint_mode != "full" and not self.gradient_checkpointing:
            raise ValueError(f"checkpoint_mode: {self.checkpoint_mode} needs gradient_checkpointing: true (it says "
                             "what a checkpointed layer keeps)")
        return self


class AdapterConfig(Section):
    kind: Literal["none", "lora", "qlora"] = "none"
    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0, allow_inf_nan=False)
    dropout: float | None = Field(None, ge=0.0, lt=1.0)
    """LoRA dropout; unset: 0.05, or 0 for a model whose MoE experts peft adapts as parameters
    (`align.models.lora.lora_dropout`)."""
    target_modules: str | list[str] = "all-linear"
    modules_to_save: list[str] | None = None

    @model_validator(mode="after")
    def _check_kind(self) -> "AdapterConfig":
        """LoRA settings with no `kind` would train the whole model (kind: none, the default; in TRL a
        peft config is what turns LoRA on): refused, where a setting differs from its default."""
        given = [name for name in ("r", "alpha", "dropout", "target_modules", "modules_to_save")
                 if getattr(self, name) != type(self).model_fields[name].default]
        if "kind" not in self.model_fields_set and given:
            raise ValueError(f"no kind is given, so the whole model would be trained (kind: none), but "
                             f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} set, which only a LoRA reads: "
                             "set kind: lora (or qlora), or kind: none to train the whole model")
        return self


class DataSource(Section):
    path: str
    """Local .jsonl/.json/.parquet/.csv file or directory, or a hub dataset id."""
    name: str | None = None
    """Hub dataset config name."""
    split: str = "train"
    columns: dict[str, str] = Field(default_factory=dict)
    """Rename map {name in the file: name Align expects}, e.g. {conversation: messages}."""
    max_rows: int | None = Field(None, gt=0)

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("empty: a local .jsonl/.json/.parquet/.csv file or directory, or a hub dataset id")
        return value

    @property
    def is_local(self) -> bool:
        p = self.path
        return Path(p).suffix in DATA_FILE_TYPES or p.startswith((".", "/", "~")) or os.path.exists(p)


class DataConfig(Section):
    train: DataSource
    eval: DataSource | None = None
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Hold out this fraction of train as the eval split when `eval` is not given."""
    format: Literal["auto", "text", "messages", "prompt_completion", "preference", "prompt"] = "auto"
    max_length: int = Field(1024, gt=0)
    packing: bool = True
    """Padding-free packing: examples packed into rows no longer than the batch's longest one (best-fit
    decreasing), position ids restarting per example. false (sft only): one example per row, padded, as
    every trainer does by itself for a family that cannot run packed rows (`align.models.layouts`)."""
    pack_length: int | None = Field(None, gt=0)
    """Packed rows of up to this many tokens instead (sft): fewer, longer rows; a row's mask is
    quadratic in its length. Not used where the varlen kernel takes every attention call (CUDA under
    bf16, `align.models.varlen.one_row`): a micro-batch is one row there, unpadded, and attention
    costs what each example needs."""
    num_proc: int | None = Field(None, gt=0)
    """Processes that tokenize each split (datasets' `map(num_proc=...)`; chat templates cost ~0.5 ms
    a row): worth it from tens of thousands of rows. The result is the same and is cached, so a
    second run (or `align validate` before `align train`) does not tokenize again. Default: one."""

    @model_validator(mode="after")
    def _one_eval_split(self) -> "DataConfig":
        if self.eval is not None and self.eval_fraction > 0:
            raise ValueError(f"eval_fraction: {self.eval_fraction} holds out part of data.train as the eval split, "
                             "but data.eval gives one; drop one of them")
        return self


SHARDABLE_ALGORITHMS = ("sft", "reward", "dpo", "kto", "grpo", "ppo", "distill")
"""Algorithms train.sharding=fsdp runs (the others are refused by the recipe's validation)."""


_Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class TrainConfig(Section):
    lr: float = Field(1e-5, gt=0, allow_inf_nan=False)
    epochs: float = Field(1.0, gt=0, allow_inf_nan=False)
    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps; overrides epochs when set."""
    batch_size: int = Field(8, gt=0)
    """Examples per micro-batch."""
    grad_accum: int = Field(1, gt=0)
    micro_batch_tokens: int | None = Field(None, gt=0)
    """A token budget per micro-batch: each holds at most batch_size examples (pairs, prompt groups)
    and at most this many tokens, the step's tokens spread evenly over as few micro-batches as that
    allows (`align.data.budget`). A step still holds batch_size x grad_accum examples and its update
    is the same (up to dropout's random masks; grpo.loss_norm: bnpo, which averages per micro-batch,
    is refused); only the grouping changes, so peak memory follows the budget instead of the longest
    micro-batch. Padding is not counted: with data.pack_length at least the budget (or where the
    varlen kernel runs) a micro-batch is one packed row, otherwise its rows are padded to the
    widest. An example longer than the budget is a micro-batch of its own. Training only (evaluation and reference passes keep their batches).
    Default (null): batch_size examples per micro-batch, in order."""
    warmup: float = Field(0.0, ge=0, allow_inf_nan=False)
    """Warm-up length: a fraction of all steps if < 1, else a number of steps."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False)
    adam_betas: tuple[_Beta, _Beta] = (0.9, 0.999)
    max_grad_norm: float | None = Field(1.0, gt=0, allow_inf_nan=False)
    """Clip the gradient's global norm to this (null: no clipping; the norm is still logged)."""
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    """adamw: torch's (fused where it can be); adamw_8bit / paged_adamw_8bit: bitsandbytes' 8-bit states
    (paged: moved to host memory under GPU memory pressure), CUDA only."""
    max_nonfinite_steps: int = Field(3, gt=0)
    """A step whose loss or gradient norm is NaN/inf is skipped (no update, counted as
    train/skipped_steps); this many in a row stop the run with an error."""
    seed: int = Field(0, ge=0)
    dropout_during_training: bool | None = None
    """Dropout (the model's own and LoRA's adapter.dropout) while training. Default (null): on for SFT
    and reward models, off for DPO, KTO, GRPO and PPO, whose reference and old-log-prob passes must see the
    same model as the training pass (as TRL's DPO does). true keeps it on in those passes too."""
    mixed_precision: Literal["no", "bf16"] = "no"
    """bf16 autocast for forward passes; weights and optimizer state stay in their own dtype."""
    sharding: Literal["none", "fsdp"] = "none"
    """Under several processes: none = DDP (each process holds the whole model and optimizer state);
    fsdp = torch's FSDP2, weights, gradients and optimizer state sharded over the processes (per
    decoder layer), for a model whose training state does not fit one device. fsdp runs every
    built-in algorithm (references, teachers and reward models are frozen whole copies on each
    process, or the reference or teacher sharded with fsdp_reference, a reward model with its kwargs shard: true;
    under QLoRA the 4-bit base whole, the rest sharded); each process writes its own shards into a checkpoint, which resumes on any number of
    processes (`align.models.sharding`). DeepSpeed ZeRO is chosen by the
    launch instead (accelerate's config, `recipes/accelerate/`), with sharding: none (`align.models.zero`)."""
    fsdp_offload: bool = False
    """Under sharding: fsdp, keep the shards (weights, gradients, optimizer state) in CPU memory:
    each layer's weights are copied to the device for its forward and backward, and the optimizer
    steps on the CPU (torch's CPUOffloadPolicy). Slower; for a model whose shards do not fit the GPUs."""
    fsdp_reference: Literal["whole", "sharded"] = "whole"
    """Under sharding: fsdp, the frozen-copy reference model (DPO/KTO, also while they precompute
    its log-probs; GRPO/PPO with a KL term; distillation's teacher): whole on each process, or sharded
    like the policy (its weights divided by the processes; each layer gathered for its forward; a
    teacher's embedding, norm and lm-head stay gathered until the student's loss has read the lm-head).
    No effect where no such reference is loaded (an adapter-disabled one, a reference-free loss, beta 0).
    Under DeepSpeed ZeRO-3 references and teachers are partitioned whatever this says."""
    ddp_timeout: int = Field(1800, gt=0)
    """Seconds a process of a launch waits for the others at a collective before the launch fails
    (torch's process-group timeout; Hugging Face's `ddp_timeout`). The others wait while the main
    process reads and tokenizes the data: raise it for data that takes longer (or fill datasets'
    cache first: `align validate` tokenizes a local dataset, `data.num_proc` in parallel)."""
    log_every: int = Field(1, gt=0)
    eval_every: int | None = Field(None, gt=0)
    eval_at_start: bool = False
    """Also evaluate before the first step (the baseline point in metrics.jsonl and the plots)."""
    eval_batch_size: int | None = Field(None, gt=0)
    save_every: int | None = Field(None, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    resume_from: str | None = None
    """A checkpoint directory, or `auto` for the newest checkpoint in output_dir."""
    progress: bool = True
    plots: bool = True
    """Write PNG curves of metrics.jsonl to OUTPUT_DIR/plots at the end (needs matplotlib)."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(default_factory=list)
    """Experiment trackers that also get every logged record (logging dir OUTPUT_DIR/trackers); each
    needs its package installed (`pip install tensorboard`, ...). wandb/mlflow/trackio read their
    usual environment variables (WANDB_MODE=offline, MLFLOW_TRACKING_URI, ...)."""
    eval_samples: int = Field(4, ge=0)
    """GRPO/PPO evaluation: also sample this many completions per eval prompt at the training sampling
    settings (a fixed seed) and report their mean reward as eval/reward_sampled; 0: greedy only."""


class RewardFunctionConfig(Section):
    """One reward for GRPO/PPO: a registry name (`exact_answer`), `module:func`,
    `path/to/file.py:func`, or a reward-model directory trained by Align."""

    fn: str
    weight: float = Field(1.0, allow_inf_nan=False)
    name: str | None = None
    """Metric name (default: derived from `fn`)."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments bound to the function, e.g. {max_length: 64} for a length penalty."""
    timeout_s: float | None = Field(600.0, gt=0)
    """Longest one call (one batch of completions) may take, sync or async; null: no limit."""
    max_abs: float = Field(1e6, gt=0)
    """A returned reward with |r| above this is an error naming the row (NaN/inf always are)."""


class VLLMConfig(Section):
    """The vLLM engine (sampling.engine: vllm): a second copy of the model, in vLLM, on the
    training device, that receives the policy's weights before every rollout."""

    gpu_memory_utilization: float = Field(0.3, gt=0.0, le=1.0)
    """Share of the GPU's memory vLLM may take (weights + KV cache); the rest is training's."""
    kv_cache_memory_bytes: int | None = Field(None, gt=0)
    """KV-cache size in bytes; overrides gpu_memory_utilization (on a CPU: else vLLM's own default)."""
    max_model_len: int | None = Field(None, gt=0)
    """Longest prompt + completion vLLM must hold; default max_prompt_length + max_new_tokens."""
    enforce_eager: bool = False
    """Skip CUDA-graph capture (faster start, slower decoding)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """vLLM's tensor parallelism: the model split over this many GPUs, in worker processes of vLLM's
    own. Only in a rollout server (`align serve-rollouts`, whose GPUs are its own; model.name_or_path
    then a local directory with safetensors weights, vLLM's starting point); an engine inside a
    training process (sampling.engine: vllm) has that process's GPU alone."""


class ServerConfig(Section):
    """A rollout server (sampling.engine: server): `align serve-rollouts RECIPE` in a process of its own,
    on GPUs of its own, which gets the policy's weights before every rollout."""

    url: str = "http://127.0.0.1:8000"
    transport: Literal["collective", "http"] = "collective"
    """How the weights travel: collective, through a process group of two (trainer and server; NCCL on
    GPUs, gloo on CPUs); http, as safetensors in the request (small models)."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """The collective transport's backend; auto: nccl where the trainer has a GPU, else gloo."""
    engine: registered("ROLLOUT_ENGINES") = "vllm"
    """The engine the server samples with (its own setting: `align serve-rollouts` reads it)."""
    timeout_s: float = Field(600.0, gt=0)
    """Longest a request (a rollout, a weight sync) may take."""

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an http:// address; e.g. http://gpu-node-2:8000")
        return value


class SamplingConfig(Section):
    """How the rollout engine samples completions (temperature 0 = greedy)."""

    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    """0 turns top-k off."""
    min_p: float = Field(0.0, ge=0.0, lt=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    stop: list[str] = Field(default_factory=list)
    """Stop strings; the completion ends with the token that completes one."""
    engine: registered("ROLLOUT_ENGINES") = "auto"
    """auto: prefix_shared where a probe at start finds it samples the model exactly, else hf;
    prefix_shared: our sampler (prompt KV computed once per group); hf: transformers' generate;
    vllm: vLLM (optional dependency: pip install vllm), settings in `vllm`; server: a rollout
    server's (`align serve-rollouts`), settings in `server`."""
    cuda_graphs: bool = True
    """prefix_shared on CUDA: decode over a static KV cache, each step a replayed CUDA graph (one
    launch instead of hundreds; finished rows ride along). false: the eager loop, where finished
    rows leave the batch. Models with sliding-window layers always decode the eager way."""
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    max_prompt_length: int | None = Field(None, gt=0)
    """Prompts longer than this (in tokens) are an error naming the row; default data.max_length."""

    @model_validator(mode="after")
    def _tensor_parallel_in_a_server(self) -> "SamplingConfig":
        if self.engine == "vllm" and self.vllm.tensor_parallel_size > 1:
            raise ValueError(f"vllm.tensor_parallel_size {self.vllm.tensor_parallel_size} splits the model over "
                             "GPUs of vLLM's own: run it in a rollout server (align serve-rollouts on those GPUs, "
                             "engine: server in training), or set it to 1")
        return self


class Recipe(Section):
    """The keys every recipe has. The algorithm's own section (`dpo:`, `grpo:`, ...) is a field of
    the subclass `recipe_class(algorithm)` makes, from the trainer registered under that name: a
    recipe carries its own algorithm's section only."""

    algorithm: str
    """A registered trainer: sft, reward, dpo, ppo, grpo, ... (`align.registry.TRAINERS`)."""
    plugins: list[str] = Field(default_factory=list)
    """Modules (`my_package.algos`) or files (`path/to/my_loss.py`) imported before the recipe is
    checked, so that the trainers, losses and estimators they register can be named in it."""
    output_dir: str
    model: ModelConfig
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)

    section_key: ClassVar[str] = ""
    """The name of the algorithm's own section (set by `recipe_class`)."""

    @property
    def section(self) -> Section | None:
        """The algorithm's own settings (recipe.dpo for a DPO recipe, ...); None if it has none."""
        return getattr(self, self.section_key) if self.section_key else None

    @field_validator("output_dir")
    @classmethod
    def _check_output_dir(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("empty: name a directory of its own for this run, e.g. runs/my-run "
                             "(an empty one would write into the current directory)")
        return os.path.expanduser(value)  # (as data and model paths are: not a directory named "~")

    @model_validator(mode="after")
    def _check_sharding(self) -> "Recipe":
        """What train.sharding=fsdp does not do yet is refused before a model loads."""
        from align.models.zero import launched as zero_launched  # (align.models imports this module)

        rewards = getattr(self.section, "rewards", [])
        sharded_rewards = [f"{self.section_key}.rewards[{i}]" for i, entry in enumerate(rewards)
                           if entry.kwargs.get("shard") is True]
        if sharded_rewards and self.train.sharding != "fsdp" and not zero_launched():
            raise ValueError(f"{sharded_rewards[0]}.kwargs.shard: true shards the reward model like the policy: it "
                             "needs train.sharding: fsdp (or a DeepSpeed ZeRO-3 launch)")
        if self.train.sharding != "fsdp":
            if self.train.fsdp_offload:
                raise ValueError("train.fsdp_offload offloads FSDP's shards: it needs train.sharding: fsdp")
            if self.train.fsdp_reference == "sharded":
                raise ValueError("train.fsdp_reference: sharded shards the reference like the policy: it needs "
                                 "train.sharding: fsdp")
            return self
        refused = [(self.algorithm not in SHARDABLE_ALGORITHMS, f"algorithm {self.algorithm!r} (fsdp trains "
                    f"{', '.join(SHARDABLE_ALGORITHMS)} so far)"),
                   (self._reference_through_the_policy(), f"{self.algorithm}.reference adapter_disabled (the "
                    "reference would run through the sharded policy; set it to frozen_copy, a full copy per process)"),
                   (getattr(getattr(self.section, "sampling", None), "engine", None) == "vllm",
                    f"{self.algorithm}.sampling.engine vllm (under fsdp each process samples from an unsharded copy "
                    "with auto, prefix_shared or hf)"),
                   (self.model.compile, "model.compile (compiled layers under FSDP2's hooks are untested here; "
                    "set compile: false)")]
        reasons = [reason for bad, reason in refused if bad]
        if reasons:
            raise ValueError("train.sharding: fsdp cannot run with " + "; ".join(reasons) +
                             "; use sharding: none (DDP) for this recipe")
        return self

    def _uses_reference(self) -> bool:
        """Whether the algorithm's loss takes reference log-probs: DPO's when its loss needs one, GRPO's
        with beta > 0, PPO's with kl_coef > 0, any other section's that has a reference (KTO's)."""
        section = self.section
        if self.algorithm == "dpo":
            from align.registry import PREFERENCE_LOSSES

            return PREFERENCE_LOSSES.get(section.loss_type).needs_reference
        if self.algorithm == "grpo":
            return section.beta > 0
        if self.algorithm == "ppo":
            return section.kl_coef > 0
        return True

    def _reference_through_the_policy(self) -> bool:
        """Whether the reference model is the policy with its adapter disabled (an adapter, the
        reference on auto or adapter_disabled, no separate reference model; a loss that needs one)."""
        section = self.section
        if self.adapter.kind == "none" or getattr(section, "reference", "frozen_copy") == "frozen_copy" \
                or getattr(section, "reference_model", None):
            return False
        return self._uses_reference()

    @model_validator(mode="after")
    def _check_packing(self) -> "Recipe":
        if not self.data.packing and self.algorithm != "sft":
            raise ValueError(f"data.packing: false pads one example per row for sft only; {self.algorithm} packs its "
                             "sequences (pairs, prompt groups) into rows wherever the model runs them exactly, and "
                             "else gives each its own row by itself (align.models.layouts): remove data.packing")
        if self.data.pack_length is not None and self.algorithm != "sft":
            raise ValueError(f"data.pack_length sets sft's packed rows; {self.algorithm} packs its sequences (pairs, "
                             "prompt groups) into rows of the longest one's length, and ignores it: remove "
                             "data.pack_length")
        return self

    @model_validator(mode="after")
    def _check_files(self) -> "Recipe":
        sources = [("data.train", self.data.train), ("data.eval", self.data.eval)]
        for key, source in sources:
            if source is None:
                continue
            problem = unsupported_data_file(source.path)
            if problem:
                raise ValueError(f"{key}.path: {problem}")
            if source.is_local and not os.path.exists(os.path.expanduser(source.path)):
                raise ValueError(f"{key}.path: file not found: {source.path!r} (paths are relative to the "
                                 f"directory you run from: {os.getcwd()})")
        resume = self.train.resume_from
        if resume not in (None, "auto") and not os.path.isdir(os.path.expanduser(resume)):
            raise ValueError(f"train.resume_from: no directory {resume!r}: give a checkpoint directory "
                             "(OUTPUT_DIR/checkpoints/step-NNNNNN), or auto for the newest in output_dir")
        return self


def unsupported_data_file(path: str) -> str | None:
    """Why `path` is a local file Align cannot read (an unknown suffix on a file that exists, or a
    suffix close to a known one), or None. Such a path must not go to the hub as a dataset id."""
    suffix = Path(path).suffix
    if not suffix or suffix in DATA_FILE_TYPES or os.path.isdir(os.path.expanduser(path)):
        return None
    close = difflib.get_close_matches(suffix.lower(), list(DATA_FILE_TYPES), n=1, cutoff=0.6)
    if not close and not os.path.isfile(os.path.expanduser(path)):
        return None  # a hub id with a dot in it
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (f"{path!r}: unsupported file type {suffix!r}{hint}; data files must end in "
            f"{', '.join(DATA_FILE_TYPES)} (or give a directory of them, or a hub dataset id)")


TRL_NAMES = {
    "learning_rate": "train.lr", "num_train_epochs": "train.epochs", "per_device_train_batch_size": "train.batch_size",
    "per_device_eval_batch_size": "train.eval_batch_size", "gradient_accumulation_steps": "train.grad_accum",
    "warmup_ratio": "train.warmup", "lr_scheduler_type": "train.schedule", "logging_steps": "train.log_every",
    "save_steps": "train.save_every", "eval_steps": "train.eval_every", "save_total_limit": "train.keep_checkpoints",
    "bf16": "train.mixed_precision: bf16", "fp16": "train.mixed_precision: fp16", "optim": "train.optimizer",
    "resume_from_checkpoint": "train.resume_from", "gradient_checkpointing": "model.gradient_checkpointing",
    "model_name_or_path": "model.name_or_path", "torch_dtype": "model.dtype", "max_seq_length": "data.max_length",
    "max_length": "data.max_length", "dataset_name": "data.train.path", "lora_r": "adapter.r",
    "lora_alpha": "adapter.alpha", "lora_dropout": "adapter.dropout", "lora_target_modules": "adapter.target_modules",
    "use_peft": "adapter.kind: lora", "load_in_4bit": "adapter.kind: qlora",
    "num_generations": "{section}.group_size",
    "max_completion_length": ("{section}.sampling.max_new_tokens", "data.max_length"),
    "max_prompt_length": ("{section}.sampling.max_prompt_length", "data.max_length"),
    "temperature": "{section}.sampling.temperature", "top_p": "{section}.sampling.top_p",
    "use_vllm": "{section}.sampling.engine: vllm",
}
"""TRL's (and transformers' TrainingArguments) names of settings, for a recipe written with them:
Align's key ({section}: the algorithm's own section; of several, the first this recipe has), named
in the error instead of a spelling guess (num_generations is not num_iterations)."""


def _trl_name(model: type[BaseModel], loc: tuple) -> str | None:
    """Align's key for a TRL setting named at `loc`, if it is one (and this algorithm has it)."""
    targets = TRL_NAMES.get(str(loc[-1]), ())
    section = getattr(model, "section_key", None) or ""
    for target in (targets,) if isinstance(targets, str) else targets:
        target = target.format(section=section)
        key = target.split(":")[0]
        if _has_key(model, key.split(".")) and ".".join(map(str, loc)) != key:  # (not the key itself)
            return target
    return None


def _section_type(model: type[BaseModel], name) -> type[BaseModel] | None:
    """The pydantic model `model`'s field `name` holds (a section, optional or not), or None."""
    field = model.model_fields.get(name) if isinstance(name, str) else None
    if field is None:
        return None
    return next((c for c in getattr(field.annotation, "__args__", (field.annotation,))
                 if isinstance(c, type) and issubclass(c, BaseModel)), None)


def _has_key(model: type[BaseModel], path: list[str]) -> bool:
    """Whether the recipe model has the nested key `path` (sections followed through their types)."""
    for part in path[:-1]:
        model = _section_type(model, part)
        if model is None:
            return False
    return path[-1] in model.model_fields


def _closest_key(model: type[BaseModel], loc: tuple) -> str | None:
    """The valid key nearest to the unknown one at `loc`, looked up in the nested pydantic model."""
    for part in loc[:-1]:
        model = _section_type(model, part) or model  # (a list index, or no section: the same model)
    match = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.5)
    return match[0] if match else None


def format_validation_error(error: ValidationError, source: str, model: type[BaseModel] = Recipe) -> str:
    """One line per problem: `file: key: message (did you mean ...?)`."""
    lines = [f"invalid recipe {source}:"]
    for item in error.errors():
        loc = tuple(item["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            hint, trl = _closest_key(model, loc), _trl_name(model, loc)
            msg = f"unknown key; TRL's {str(loc[-1])!r} is {trl!r} here" if trl else \
                "unknown key" + (f"; did you mean {'.'.join(map(str, loc[:-1] + (hint,)))!r}?" if hint else "")
        elif item["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = item["msg"].removeprefix("Value error, ")
            if "input" in item and not isinstance(item["input"], dict):
                msg += f" (got {item['input']!r})"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=2e-5` -> (["train", "lr"], 2e-5); the value is parsed as YAML."""
    if "=" not in text:
        raise AlignError(f"--set {text!r}: expected KEY=VALUE, for example --set train.lr=2e-5")
    key, value = text.split("=", 1)
    path = key.strip().split(".")
    if "" in path:
        raise AlignError(f"--set {text!r}: expected KEY=VALUE with a dotted key, for example --set train.lr=2e-5")
    try:
        return path, yaml.safe_load(value)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise AlignError(f"--set {text!r}: the value {value!r} is not valid YAML ({problem}); close its brackets "
                         f"(e.g. [1, 2]) or quote it as a string (--set '{key}=\"...\"')") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`--set` values written into the recipe dict; a section key may index a list of sections
    (`grpo.rewards[1].weight=0.5`)."""
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for depth, part in enumerate(path[:-1]):
            name, index = re.fullmatch(r"(.+?)(?:\[(\d+)\])?", part).groups()
            node = node.setdefault(name, {} if index is None else [])
            if index is not None:
                if not isinstance(node, list) or int(index) >= len(node):
                    size = f"has {len(node)} entries" if isinstance(node, list) else "is not a list"
                    whole = ".".join(path[:depth] + [name])
                    raise AlignError(f"--set {text!r}: {whole!r} {size}; set the whole list instead "
                                     f"(--set '{whole}=[{{...}}, ...]')")
                node = node[int(index)]
            if not isinstance(node, dict):
                raise AlignError(f"--set {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return raw


def recipe_from_dict(raw: dict, source: str = "<dict>") -> Recipe:
    """Validate a recipe dict: import its plug-ins, find its algorithm's trainer, and check it
    against `recipe_class` of that algorithm (AlignError listing every problem)."""
    raw = dict(raw)
    plugins = raw.get("plugins") or []
    if isinstance(plugins, list):
        from align.registry import load_plugin

        for i, where in enumerate(plugins):
            if isinstance(where, str):
                load_plugin(where, f"{source}: plugins[{i}]")
    algorithm = raw.get("algorithm")
    model: type[Recipe] = Recipe
    if isinstance(algorithm, str):
        try:
            model = recipe_class(algorithm)
        except AlignError as error:
            raise AlignError(f"invalid recipe {source}:\n  {error}") from None
        raw = drop_default_sections(raw, model.section_key, source)
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        raise AlignError(format_validation_error(error, source, model)) from None


@functools.cache
def recipe_class(algorithm: str) -> type[Recipe]:
    """The Recipe of `algorithm` (a registered name or a `module:Name` trainer): the common keys
    plus the trainer's own section, named after it (`dpo:` holding a DPOConfig)."""
    from align.registry import TRAINERS

    trainer = TRAINERS.get(algorithm)
    key, section = trainer.algorithm, trainer.config_class
    fields = {key: (section, Field(default_factory=section))} if section is not None else {}
    model = create_model(f"{trainer.__name__.removesuffix('Trainer')}Recipe", __base__=Recipe, **fields)
    model.section_key = key
    return model


def sections_of_other_algorithms(raw: dict, own: str) -> dict[str, type[Section]]:
    """{key: section class} for the keys of `raw` that are another registered algorithm's section."""
    from align.registry import TRAINERS

    sections = {}
    for name in TRAINERS.names():
        trainer = TRAINERS.get(name)
        if name != own and name in raw and name not in Recipe.model_fields and trainer.config_class is not None:
            sections[name] = trainer.config_class
    return sections


def _reference_free(values: dict) -> bool:
    from align.registry import PREFERENCE_LOSSES

    try:
        return not PREFERENCE_LOSSES.get(values.get("loss_type", "sigmoid"), key="dpo.loss_type").needs_reference
    except AlignError:
        return False


IGNORED = [
    ("data", "eval_fraction", lambda data, _: bool(data.get("eval")), 0.0),
    ("dpo", "reference", lambda dpo, _: bool(dpo.get("reference_model")), "auto"),
    ("kto", "reference", lambda kto, _: bool(kto.get("reference_model")), "auto"),
    ("dpo", "reference_model", lambda dpo, _: _reference_free(dpo), None),
    ("dpo", "reference", lambda dpo, _: _reference_free(dpo), "auto"),
    ("dpo", "precompute_reference", lambda dpo, _: _reference_free(dpo), True),
    ("grpo", "reference", lambda grpo, _: grpo.get("beta", 0.0) == 0, "auto"),
    ("ppo", "reference", lambda ppo, _: ppo.get("kl_coef", 0.05) == 0, "auto"),
    ("ppo", "value_model", lambda ppo, _: ppo.get("critic") == "shared", None),
    ("grpo", "normalize_advantages", lambda grpo, _: grpo.get("advantage") in ("grpo", "reinforce_pp"), False),
    ("data", "pack_length", lambda data, algorithm: algorithm != "sft", None),
]
"""(section, key, when a saved run ignored the key (given the section's values and the algorithm),
the value it had in effect): pairs an earlier version accepted and ignored one side of, now refused
together."""


def saved_recipe_now(saved: dict, algorithm: str) -> dict:
    """A recipe saved by an earlier run (a checkpoint's) as this version reads it: without the other
    algorithms' sections (saved before recipes carried their own only; that run ignored them) and
    with the keys added since at their defaults, so that neither counts as a change on resume; and
    without the settings that run ignored which are now refused beside the one it used (`IGNORED`)."""
    saved = {k: v for k, v in saved.items() if k not in sections_of_other_algorithms(saved, algorithm)}
    for section, key, ignored_beside, cleared in IGNORED:
        values = saved.get(section)
        if isinstance(values, dict) and values.get(key) not in (None, cleared) and ignored_beside(values, algorithm):
            saved[section] = {**values, key: cleared}
    try:
        return recipe_class(algorithm).model_validate(saved).model_dump(mode="json")
    except (ValidationError, AlignError):
        return saved


RETIRED_DEFAULTS = {"adapter.dropout": (0.05, None), "sampling.engine": ("prefix_shared", "auto")}
"""Key (or dotted tail) -> (its default before, its default now): a checkpoint's recipe holds the
old default where the new one computes the same for every model the old could run (LoRA dropout
0.05 stays 0.05 where peft allows dropout; auto is prefix_shared where that engine can sample)."""


def same_by_default(key: str, old, new) -> bool:
    """Whether a saved `old` and a current `new` at `key` are one setting: a default that changed name."""
    return any((key == tail or key.endswith("." + tail)) and (old, new) == pair
               for tail, pair in RETIRED_DEFAULTS.items())


def drop_default_sections(raw: dict, own: str, source: str) -> dict:
    """`raw` without the sections of other algorithms that hold only their defaults (a recipe.yaml
    saved before recipes carried their own section only holds all five). Any other such section is
    an AlignError: its settings would be ignored."""
    raw = dict(raw)
    for key, section in sections_of_other_algorithms(raw, own).items():
        try:
            given = section.model_validate(raw[key] or {}).model_dump(mode="json")
            default = section().model_dump(mode="json")
        except ValidationError:  # not valid, or a section with required keys: it has no all-defaults form
            given = default = None
        if given is not None and given == default:
            del raw[key]
            continue
        own_section = recipe_class(raw["algorithm"]).model_fields.get(own)
        own_keys = own_section.annotation.model_fields if own_section else {}
        moves = [f"{key}.{k} -> {own}.{k}" for k in (raw[key] if isinstance(raw[key], dict) else ()) if k in own_keys]
        raise AlignError(f"invalid recipe {source}:\n  {key}: this section belongs to algorithm {key!r}, but the "
                         f"recipe's algorithm is {raw['algorithm']!r}, which would ignore it. "
                         + (f"Did you mean {', '.join(moves)}? " if moves else "")
                         + f"Move its settings under {own}: or remove it.")
    return raw

class RecipeLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, (str, int, float, bool)):
                continue  # SafeLoader reports an unhashable key
            if key in seen:
                raise AlignError(f"{key_node.start_mark.name}: key {key!r} is given twice in the same section "
                                 f"(lines {seen[key]} and {line}); YAML would keep only the last: merge them into one")
            seen[key] = line
        return super().construct_mapping(node, deep)


def read_yaml_mapping(path: str | os.PathLike, what: str = "recipe") -> dict:
    """A YAML file of keys (a recipe, or another config: `what`), read with `RecipeLoader`; a missing
    file, bad YAML or a non-mapping is an AlignError naming the file."""
    path = str(path)
    if os.path.isdir(path):
        yamls = sorted(name for name in os.listdir(path) if name.endswith((".yaml", ".yml")))
        raise AlignError(f"{path} is a directory; give a {what} file" + (f", e.g. {os.path.join(path, yamls[0])}"
                                                                        if yamls else ""))
    if not os.path.isfile(path):
        raise AlignError(f"{what} file not found: {path}")
    with open(path, "rb") as f:  # bytes: bad UTF-8 is a YAML error, not a traceback
        try:
            raw = yaml.load(f, Loader=RecipeLoader) or {}
        except yaml.YAMLError as error:
            raise AlignError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise AlignError(f"{path}: a {what} is a mapping of keys, got {type(raw).__name__}")
    return raw


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe YAML file."""
    return recipe_from_dict(apply_overrides(read_yaml_mapping(path), overrides or []), str(path))


def flat_keys(tree: dict, prefix: str = "") -> dict[str, object]:
    """A recipe dict with dotted keys: {"train": {"lr": 1}} -> {"train.lr": 1} (lists, and empty
    sections, are values)."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flat_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    """Write the resolved recipe to `path` atomically (a failed write leaves the old file whole)."""
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        yaml.safe_dump(recipe.model_dump(mode="json"), f, sort_keys=False)
    os.replace(temporary, path)
