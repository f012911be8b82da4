"""DeepSpeed ZeRO stage 2 and 3 for the trained root, when the run is launched with accelerate's
DeepSpeed config (`accelerate launch --config_file recipes/accelerate/zero3.yaml -m align.cli
train recipe.yaml`): stage 2 partitions gradients and optimizer state over the processes, stage 3
the weights too.

Align reads the DeepSpeed configuration accelerate built from the launch's config, fills what the
recipe owns (micro-batch size, gradient accumulation, clipping: "auto" in the ready configs; a
different number is an error), and starts the engine itself (`deepspeed.initialize`) on the module
the loop trains. It then drives the engine as the loop drives DDP: one backward per micro-batch
(each loss already normalised by the step's items, as everywhere in Align, so DeepSpeed does not
divide it again), the accumulation boundary set on the last one, one engine step per optimizer step.

ZeRO-Offload (`offload_optimizer` and, under stage 3, `offload_param` to the CPU; the ready config
`recipes/accelerate/zero3_offload.yaml`) keeps the fp32 partitions and AdamW's moments in CPU memory
and steps there: Align's optimizer is torch's AdamW (one fused, vectorised CPU kernel), not
DeepSpeed's compiled CPU Adam, which would be a build step on every machine.

Precision: Align's own `train.mixed_precision` (bf16 autocast over fp32 weights) owns it; a
DeepSpeed config with fp16 or bf16 enabled is refused. Non-finite steps: in fp32, DeepSpeed skips a
step whose gradient norm is NaN or inf on any process (`engine.was_step_applied()`), which Align
counts as its own guard does.

Checkpoints never go through DeepSpeed's `save_checkpoint` (torch pickles): every process gathers
each trainable weight and its AdamW moments whole (`deepspeed.utils.safe_get_full_*`), and the main
process writes them in Align's own format, named as under fsdp, so a checkpoint resumes under ZeRO,
fsdp, DDP or on one process, on any number of processes.

GRPO, PPO and distillation sample between steps, each process its own prompts: under stage 2 from the trained
model (whole on each process), under stage 3 from an unpartitioned copy of the policy's model that
`copy_weights` syncs from the partitions before each round. Or they sample from a rollout server
(`sampling.engine: server`): then there is no copy, and before each round every weight is gathered
(`gathered_weights`) for the main process to send.

Under stage 3 a frozen reference or distillation teacher is partitioned too (`start_frozen`, as
TRL's `prepare_deepspeed`); under stage 2 it is whole on each process.

Under stage 3 the chunked log-probs read the lm-head weight inside the root's forward (not through
the lm-head module's own forward); it is registered as the root's external parameter, so it is
gathered there as any other weight the root's forward uses.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

import torch
from torch import nn

from align.errors import AlignError

log = logging.getLogger(__name__)

RECIPE_KEYS = {"train_micro_batch_size_per_gpu": "train.batch_size", "gradient_accumulation_steps": "train.grad_accum",
               "gradient_clipping": "train.max_grad_norm",
               "train_batch_size": "train.batch_size x train.grad_accum x processes"}
"""DeepSpeed settings the recipe owns: "auto" (or absent) in a DeepSpeed config, filled from these keys."""
ALGORITHMS = ("sft", "reward", "dpo", "kto", "grpo", "ppo", "distill")
"""The algorithms Align trains under ZeRO (every built-in one)."""


def launched() -> bool:
    """Whether accelerate launched this process with a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def engine_config(plugin_config: dict, train, world_size: int, zero3_init: bool = False) -> dict:
    """The DeepSpeed config for `deepspeed.initialize`: accelerate's (from the launch's config) with
    the recipe's batch size, accumulation and clipping filled in (`train`: the TrainConfig; no
    max_grad_norm: clipping 0, DeepSpeed's off). zero3_init: the accelerate config's zero3_init_flag."""
    config = dict(plugin_config)
    wanted = {"train_micro_batch_size_per_gpu": train.batch_size, "gradient_accumulation_steps": train.grad_accum,
              "gradient_clipping": train.max_grad_norm or 0.0,
              "train_batch_size": train.batch_size * train.grad_accum * world_size}
    for key, value in wanted.items():
        given = config.get(key, "auto")
        if given != "auto" and float(given) != float(value):
            raise AlignError(f"the DeepSpeed config sets {key}: {given}, the recipe's {RECIPE_KEYS[key]} is "
                             f"{value}: set it to \"auto\" in the DeepSpeed config (Align fills it from the recipe)")
        config[key] = value
    for precision in ("fp16", "bf16"):
        if str(config.get(precision, {}).get("enabled", False)).lower() == "true":
            raise AlignError(f"the DeepSpeed config enables {precision}: Align's train.mixed_precision owns precision "
                             "(bf16 autocast over fp32 weights); set mixed_precision: 'no' in the accelerate config "
                             "and train.mixed_precision: bf16 in the recipe")
        config.pop(precision, None)
    zero = config.setdefault("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    if stage not in (2, 3):
        raise AlignError(f"DeepSpeed zero_optimization.stage {stage}: Align runs stages 2 and 3 (for no sharding, "
                         "launch without the DeepSpeed config: DDP)")
    offloaded = {offload: str((zero.get(offload) or {}).get("device", "none")).lower()
                 for offload in ("offload_optimizer", "offload_param")}
    for offload, device in offloaded.items():
        if device not in ("none", "cpu"):
            raise AlignError(f"the DeepSpeed config's zero_optimization.{offload}.device is {device!r}: Align runs "
                             "ZeRO-Offload to the CPU (device: cpu), not to NVMe")
    if offloaded["offload_param"] == "cpu" and stage != 3:
        raise AlignError("the DeepSpeed config's zero_optimization.offload_param needs stage 3 (only stage 3 "
                         "partitions the weights)")
    if offloaded["offload_optimizer"] == "cpu":  # torch's AdamW steps on the CPU partitions (see the module doc)
        if str(config.get("zero_force_ds_cpu_optimizer", False)).lower() == "true":
            raise AlignError("the DeepSpeed config sets zero_force_ds_cpu_optimizer: true, but Align steps torch's "
                             "AdamW on the offloaded partitions; remove it")
        config["zero_force_ds_cpu_optimizer"] = False
        if float(zero["offload_optimizer"].get("ratio", 1.0)) != 1.0:
            raise AlignError("the DeepSpeed config's zero_optimization.offload_optimizer.ratio: a partial offload "
                             "needs DeepSpeed's own CPU Adam; Align offloads the whole optimizer (remove ratio)")
    if zero3_init:
        raise AlignError("the accelerate config's zero3_init_flag: true is not supported (Align loads the model "
                         "before the engine starts, then partitions it); set it to false")
    for owned in ("optimizer", "scheduler"):
        if owned in config:
            raise AlignError(f"the DeepSpeed config has an {owned!r} section: Align builds the {owned} from the "
                             f"recipe (train.optimizer, train.lr, train.schedule); remove it")
    config["zero_allow_untested_optimizer"] = True  # torch's AdamW, as Align builds it
    config["steps_per_print"] = 2 ** 62  # Align logs
    return config


def start(module: nn.Module, optimizer: torch.optim.Optimizer, config: dict):
    """The DeepSpeed engine over `module` (the trained root) and `optimizer` (torch's, over the root's
    trainable parameters). Under stage 3 the causal LM's output layer, which the root's forward reads
    directly (the chunked log-probs), is registered as the root's external parameter."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
    if stage(engine) == 3:
        _register_head(engine)
        _log_partitioned(engine, "")
    return engine


def start_frozen(module: nn.Module, name: str, reads_head: bool, config: dict | None = None):
    """A DeepSpeed engine without optimizer over a frozen root (a reference, teacher or reward model),
    partitioned as stage 3 partitions the policy (TRL's `prepare_deepspeed` does the same), so that no
    process holds it whole: each of its forwards gathers the weights it uses, so every process must run
    as many. config: default the launch's (`frozen_engine_config`). name: the model's name in the log;
    reads_head: whether the root's forward reads the lm-head weight directly (the chunked log-probs:
    then gathered with the root's weights)."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=module, config=config or frozen_engine_config())
    if reads_head:
        _register_head(engine)
    _log_partitioned(engine, f" of the frozen {name}")
    engine.eval()
    return engine


def frozen_engine_config() -> dict:
    """The launch's DeepSpeed config (accelerate's plugin, as `engine_config` checks it) for an engine
    without optimizer: its ZeRO settings without the optimizer's offload, one row per micro-batch."""
    from types import SimpleNamespace

    from accelerate.state import AcceleratorState

    one_row = SimpleNamespace(batch_size=1, grad_accum=1, max_grad_norm=None)
    config = engine_config(AcceleratorState().deepspeed_plugin.deepspeed_config, one_row,
                           torch.distributed.get_world_size())
    config["zero_optimization"] = {key: value for key, value in config["zero_optimization"].items()
                                   if key != "offload_optimizer"}
    config.pop("zero_force_ds_cpu_optimizer", None)
    return config


def is_engine(module) -> bool:
    """Whether `module` is a DeepSpeed engine (there is none unless deepspeed was imported)."""
    if "deepspeed" not in sys.modules:
        return False
    from deepspeed import DeepSpeedEngine

    return isinstance(module, DeepSpeedEngine)


def release_frozen(engine) -> None:
    """Free a frozen engine (`start_frozen`'s) once it is no longer used: DeepSpeed 0.19 keeps every
    stage-3 root on a module-level list (parameter_offload.FWD_MODULE_STACK), which would keep its
    partitions alive for the rest of the run."""
    from deepspeed.runtime.zero import parameter_offload

    stack = getattr(parameter_offload, "FWD_MODULE_STACK", [])
    if any(module is engine.module for module in stack):
        stack[:] = [module for module in stack if module is not engine.module]
    engine.destroy()


def _register_head(engine) -> None:
    """The causal LM's output layer, which the root's forward reads directly (the chunked log-probs),
    registered as the root's external parameter: gathered with the root's weights (stage 3)."""
    import deepspeed

    from align.models.policy import causal_lm

    lm = causal_lm(getattr(engine.module, "model", engine.module))  # the root wraps the causal LM
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if head is not None:
        deepspeed.zero.register_external_parameter(engine.module, head.weight)


def _log_partitioned(engine, what: str) -> None:
    if torch.distributed.get_rank() == 0:
        params = list(engine.module.parameters())
        partitioned = sum(p.numel() == 0 for p in params)  # outside forwards a partitioned weight holds nothing
        log.info("DeepSpeed ZeRO-3: %d of %d weights%s partitioned over %d processes (the others, below "
                 "stage3_param_persistence_threshold elements, whole on each)", partitioned, len(params), what,
                 torch.distributed.get_world_size())


def partitioned(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a weight partitioned by ZeRO-3 (its data empty outside forwards)."""
    return hasattr(tensor, "ds_tensor")


def held_part(param: nn.Parameter) -> tuple[torch.Tensor, int]:
    """(the elements of a ZeRO-3 weight this process holds, flattened, without the partition's padding;
    their offset in the flattened weight)."""
    part, size = param.ds_tensor.reshape(-1), param.ds_tensor.ds_numel  # every process holds `size` elements,
    start = torch.distributed.get_rank(param.ds_process_group) * size  # the last ones padded past the weight's end
    return part[:max(0, min(size, param.ds_numel - start))], start


def gathered_weights(module: nn.Module):
    """Every process calls it (under ZeRO-3 a collective): a context inside which `module`'s weights
    partitioned by ZeRO-3 are whole on every process, to be read (changes are not written back)
    outside the forward of the engine they belong to: a teacher's lm-head, read in the student's loss;
    the policy, sent to a rollout server. Costs those weights whole on each process while inside.
    Without partitioned weights (no DeepSpeed, or stage 2): nothing to do, and deepspeed, an
    optional dependency, is not imported."""
    params = [p for p in module.parameters() if partitioned(p)]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def stage(engine) -> int:
    return engine.zero_optimization_stage()


def partitions_weights(config: dict) -> bool:
    """Whether an engine config (`engine_config`'s) partitions the weights themselves (stage 3)."""
    return int(config["zero_optimization"]["stage"]) == 3


@torch.no_grad()
def copy_weights(engine, target: nn.Module) -> None:
    """Every process calls it (under stage 3 a collective per weight): `target`, an unpartitioned
    copy of the root's `model` (the sampler's, made before the engine started), gets the current
    trainable weights, each gathered whole in turn (frozen ones never change, so LoRA gathers only the
    adapter; a critic beside the policy in the root, PPO's, is not the sampler's)."""
    import deepspeed

    own = dict(target.named_parameters())
    for name, param in _named_trainable(engine):
        if name.startswith("model."):
            copy = own[name.removeprefix("model.")]
            with deepspeed.zero.GatheredParameters([param]):
                copy.copy_(param.data.reshape(copy.shape))


def backward(engine, loss: torch.Tensor, last: bool) -> None:
    """One micro-batch's backward; `last`: the step's last micro-batch (gradients reduced there).
    The loss is already this process's share of the step's normalised loss (not divided again)."""
    engine.set_gradient_accumulation_boundary(last)
    engine.backward(loss, scale_wrt_gas=False)


def step(engine, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The optimizer step (gradients clipped by the config's gradient_clipping; skipped by DeepSpeed
    when their norm is not finite on any process): (grad norm before clipping, 0-dim float, NaN when
    skipped; applied, 0-dim bool). Both are read on the host (DeepSpeed decides there)."""
    engine.step()
    applied = engine.was_step_applied()
    norm = engine.get_global_grad_norm() if applied else float("nan")
    return (torch.tensor(float(norm), device=device), torch.tensor(bool(applied), device=device))


def _named_trainable(engine) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]


def full_training_state(engine, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Every process calls it (collectives): (trainable weights, AdamW state), whole, on the CPU, keyed
    by parameter name as fsdp's checkpoints key them; the main process keeps
    the tensors (the others return the names and hyper-parameters only)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    model, state, names = {}, {}, []
    main = torch.distributed.get_rank() == 0
    step_count = _step_count(engine)  # 0 on every process until a step was applied: no moments yet
    for name, param in _named_trainable(engine):
        weight = safe_get_full_fp32_param(param)  # a collective; the whole tensor on every process,
        if main:                                  # kept by the main process only
            model[name] = weight.detach().cpu().reshape(_shape(param))
        if step_count:
            moments = {key: safe_get_full_optimizer_state(param, key) for key in ("exp_avg", "exp_avg_sq")}
            if main:
                state[name] = {"step": torch.tensor(float(step_count)),
                               **{key: m.detach().cpu().reshape(_shape(param)) for key, m in moments.items()}}
        names.append(name)
    hyper = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    return model, {"state": state, "param_groups": [{**hyper, "params": names}]}


def load_training_state(engine, model_state: dict, optimizer_state: dict) -> None:
    """Every process calls it with the whole state (`full_training_state`'s, or fsdp's): the trainable
    weights into both the engine's fp32 partitions and the module's weights, and AdamW's moments and
    step count into the optimizer's partitions."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    trainable = _named_trainable(engine)
    unknown = set(model_state) - {name for name, _ in trainable}
    if unknown:
        raise AlignError(f"checkpoint has weights this model does not train: {sorted(unknown)[:5]}")
    device = next(engine.module.parameters()).device
    for name, param in trainable:
        if name not in model_state:
            continue
        value = model_state[name].to(device)
        safe_set_full_fp32_param(param, value)  # the optimizer's fp32 copy, and the weights the forward uses:
        gathered = deepspeed.zero.GatheredParameters([param], modifier_rank=0) if stage(engine) == 3 \
            else contextlib.nullcontext()
        with gathered, torch.no_grad():
            if stage(engine) != 3 or torch.distributed.get_rank() == 0:
                param.data.copy_(value.reshape(param.data.shape))
    states = optimizer_state.get("state", {})
    if not states:
        return
    _create_adam_state(engine, int(next(iter(states.values()))["step"]))
    for name, param in trainable:
        for key in ("exp_avg", "exp_avg_sq"):
            if name in states:
                safe_set_full_optimizer_state(param, states[name][key].to(device), key)


def _create_adam_state(engine, step_count: int) -> None:
    """torch's AdamW makes its state at its first step, and DeepSpeed's setters write into it: make
    it for each flat fp32 partition the optimizer steps on (DeepSpeed internals, names as of 0.19;
    tests/test_zero.py resumes exactly through them)."""
    zero_optimizer = engine.optimizer
    flats = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None)  # stage 3
    if flats is None:
        flats = zero_optimizer.single_partition_of_fp32_groups  # stage 2
    inner = zero_optimizer.optimizer
    fused = inner.defaults.get("fused")  # fused AdamW keeps its step count on the weights' device
    for flat in flats:
        count = torch.tensor(float(step_count), dtype=torch.float32, device=flat.device if fused else "cpu")
        inner.state[flat] = {"step": count, "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
    if hasattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state"):  # stage 2: link the params to it
        zero_optimizer._lazy_init_hp_params_optimizer_state()


def _step_count(engine) -> int:
    """AdamW's step count (the same for every partition)."""
    inner = engine.optimizer.optimizer
    for state in inner.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def _shape(param: nn.Parameter) -> torch.Size:
    return getattr(param, "ds_shape", param.shape)


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """Every process calls it (under stage 3 a collective per weight): the root's whole state dict on
    the CPU for the main process, {} for the others. One weight is gathered at a time."""
    import deepspeed

    main = torch.distributed.get_rank() == 0
    state = {}
    for name, tensor in engine.module.state_dict(keep_vars=True).items():
        partitioned = stage(engine) == 3 and hasattr(tensor, "ds_id")
        with deepspeed.zero.GatheredParameters([tensor]) if partitioned else contextlib.nullcontext():
            if main:
                state[name] = tensor.detach().cpu().clone()
    return state


def check(algorithm: str, recipe) -> None:
    """What Align does not run under ZeRO yet: an AlignError naming it."""
    reasons = []
    if algorithm not in ALGORITHMS:
        reasons.append(f"algorithm {algorithm!r} (ZeRO trains {', '.join(ALGORITHMS)} so far; "
                       "use train.sharding: fsdp under torchrun)")
    if getattr(getattr(recipe.section, "sampling", None), "engine", None) == "vllm":
        reasons.append(f"{algorithm}.sampling.engine vllm (an engine inside each training process; under ZeRO "
                       "sample in process with auto, prefix_shared or hf, or from a rollout server: engine server)")
    if recipe.train.sharding == "fsdp":
        reasons.append("train.sharding: fsdp (one sharding at a time: launch without the DeepSpeed config, "
                       "or set sharding: none)")
    if recipe.train.optimizer != "adamw":
        reasons.append(f"train.optimizer {recipe.train.optimizer} (ZeRO partitions torch's AdamW state; use adamw)")
    if recipe.adapter.kind == "qlora":
        reasons.append("adapter.kind qlora (a 4-bit weight carries its quantization state, which a ZeRO "
                       "partition loses; use train.sharding: fsdp, which keeps the 4-bit base whole)")
    if recipe.model.compile:
        reasons.append("model.compile (compiled layers under DeepSpeed's hooks are untested here; set compile: false)")
    if recipe._reference_through_the_policy():
        reasons.append(f"{algorithm}.reference adapter_disabled (set it to frozen_copy)")
    if reasons:
        raise AlignError("a DeepSpeed launch cannot run " + "; ".join(reasons))
