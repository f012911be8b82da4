"""Fully sharded data parallelism for the policy: torch's FSDP2 (`fully_shard`).

Each decoder layer is one FSDP unit and the root is the module the loop trains (the
`TokenLogprobModel`, or the reward model's `ScalarHeadModel`), so the lm-head or score head (and
the embedding it may be tied to) is gathered by the root's own forward, where the chunked log-probs
read it: a weight read outside a sharded module's forward is a DTensor shard, and
`weight.full_tensor()` there runs but gives the wrong gradient. For the same reason a reference
model must not be the sharded policy with its adapter disabled (a forward around the root): DPO
and KTO under fsdp use a frozen copy, unsharded on each process. Online trainers (GRPO) sample
from another unsharded copy on each process, synced from the shards before each round
(`copy_weights`): each process samples its own prompts, a number of forwards only the data decides.

This is called directly rather than through accelerate's FSDP plugin, which on a CPU silently falls
back to DDP (so the gloo tests would prove nothing) and prepares one model per call; a launch with
accelerate's FSDP config is checked against the recipe (`check_accelerate_launch`) and runs this.

Supported here: every built-in algorithm (`align.config.SHARDABLE_ALGORITHMS`; PPO's critic is part
of the trained root and sharded with the policy; references, teachers and reward models are frozen
roots of their own, whole on each process unless the recipe shards them), full fine-tuning, LoRA and QLoRA (see `shard`), activation checkpointing. The
gradients are reduce-scattered and averaged over the processes as DDP's are, so a step equals DDP's.
Checkpoints are never gathered: each process saves its own rows of the shards
(`sharded_training_state`) and reads back the rows it holds (`load_sharded_training_state`).
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from align.errors import AlignError


def accelerate_launched() -> bool:
    """Whether `accelerate launch` started this process with an FSDP config (its distributed_type: FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def check_accelerate_launch(train, model) -> None:
    """Under `accelerate launch` with an FSDP config, Align shards with its own FSDP2 (`shard`), not
    accelerate's plugin: the recipe must ask for it (`train.sharding: fsdp`), and what the launch
    config sets must agree with the recipe (an AlignError naming both). Its memory-saving loading
    (`fsdp_cpu_ram_efficient_loading`: weights read on the main process only, broadcast by
    accelerate's FSDP) is turned off, as Align loads every model whole on every process, references
    and reward models included. train, model: the recipe's TrainConfig and ModelConfig."""
    if not accelerate_launched():
        return
    env = lambda name, default="false": os.environ.get(name, default).lower()  # noqa: E731
    problems = []
    if train.sharding != "fsdp":
        problems.append("train.sharding is none: set it to fsdp (Align shards with FSDP2 itself; --set "
                        "train.sharding=fsdp), or launch without the FSDP config for DDP")
    if env("ACCELERATE_MIXED_PRECISION", "no") != "no":
        problems.append(f"the launch's mixed_precision is {env('ACCELERATE_MIXED_PRECISION')}: Align's "
                        "train.mixed_precision owns precision; set mixed_precision: 'no' in the accelerate config "
                        "and train.mixed_precision: bf16 in the recipe")
    offload = env("FSDP_OFFLOAD_PARAMS") == "true"
    if offload != train.fsdp_offload:
        problems.append(f"fsdp_offload_params is {str(offload).lower()} and train.fsdp_offload "
                        f"{str(train.fsdp_offload).lower()}: set them alike")
    if env("FSDP_ACTIVATION_CHECKPOINTING") == "true" and not model.gradient_checkpointing:
        problems.append("fsdp_activation_checkpointing is true and model.gradient_checkpointing false: set "
                        "model.gradient_checkpointing: true (Align checkpoints the decoder layers itself)")
    reshard = env("FSDP_RESHARD_AFTER_FORWARD", "true")  # FSDP2: a bool; FSDP1: a sharding strategy
    if reshard not in ("true", "full_shard", "1"):
        problems.append(f"fsdp_reshard_after_forward is {reshard}: Align shards weights, gradients and optimizer "
                        "state and reshards each layer after its forward (FULL_SHARD; true under FSDP2)")
    if problems:
        raise AlignError("accelerate launched with an FSDP config: " + "; ".join(problems))
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of `model` (transformers' `GradientCheckpointingLayer`s)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def shard(module: nn.Module, offload: bool = False) -> nn.Module:
    """Shard `module` (the trained root: a TokenLogprobModel or ScalarHeadModel) in place over the
    default process group: each decoder layer, then the root. Call before building the optimizer (its parameters become DTensors).
    offload: keep the shards in CPU memory (`CPUOffloadPolicy`; pinned where there is a GPU).
    QLoRA's 4-bit weights are left out (FSDP's `ignored_params`): frozen, and a 4-bit tensor carries
    its quantization state, which a shard would lose, so each process keeps the whole 4-bit base
    (~0.55 bytes per parameter) and the rest (adapters, embeddings, norms, heads) is sharded."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    layers = decoder_layers(module)
    if not layers:
        raise AlignError(f"train.sharding=fsdp: found no decoder layers in {type(module).__name__} to shard "
                         "(transformers' GradientCheckpointingLayer); use sharding: none")
    quantized = {p for p in module.parameters() if getattr(p, "quant_state", None) is not None} or None
    policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()
    for layer in layers:
        fully_shard(layer, offload_policy=policy, ignored_params=quantized)
    fully_shard(module, offload_policy=policy, ignored_params=quantized)
    return module


@contextlib.contextmanager
def gathered(module: nn.Module):
    """Every process calls it (gathering is a collective): inside, every FSDP unit of `module` holds
    its whole weights on every process, kept across forwards, so forwards outside training (greedy
    generation: as many as the data decides) need no collective; resharded on exit. Every process
    must still run the same forwards: FSDP records their order for the next backward's prefetch.
    Costs the whole model's weights on each process while inside."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:  # as `shard` and FSDP set them: the layers reshard after forward, the root
            unit.reshard()  # (`module`) does not, its weights being needed again at once by the backward
            unit.set_reshard_after_forward(unit is not module, recurse=False)


def reshard_frozen(root: nn.Module) -> None:
    """After a forward of a frozen root sharded by FSDP, drop the whole weights its forward gathered:
    FSDP keeps a root's weights after its forward, for a backward a frozen root never has. Any other
    module (a ZeRO-3 engine releases its weights itself): nothing to do."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(root, FSDPModule):
        root.reshard()


@torch.no_grad()
def copy_weights(root: nn.Module, target: nn.Module) -> None:
    """Every process calls it (a collective per weight): `target`, an unsharded copy of `root.model`
    (the sampler's, made before sharding), gets its current trainable weights, gathered whole one
    at a time (frozen ones never change, so LoRA gathers only the adapter; a critic beside the
    policy in `root`, PPO's, is not the sampler's)."""
    own = dict(target.named_parameters())
    for name, param in root.named_parameters():
        if param.requires_grad and name.startswith("model."):
            own[name.removeprefix("model.")].copy_(whole(param.detach()))


def clip_grad_norm(params: list[nn.Parameter], max_norm: float | None, device: torch.device) -> torch.Tensor:
    """Every process calls it: the total norm of the sharded gradients of `params`, a 0-dim float32
    tensor on `device`, after scaling them down to `max_norm` as `torch.nn.utils.clip_grad_norm_`
    does (None: measured only). Each process sums the squares of its local shards on `device` and one
    all-reduce adds them there, so shards offloaded to the CPU need no collective on the CPU (a
    process group of NCCL alone has none)."""
    grads = [local_shard(p.grad).detach() for p in params if p.grad is not None]
    squares = torch.zeros((), dtype=torch.float32, device=device)
    for grad in grads:
        squares = squares + grad.float().pow(2).sum().to(device)
    torch.distributed.all_reduce(squares)
    total = squares.sqrt()
    if max_norm is not None:
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for grad in grads:
            grad.mul_(scale.to(grad.device, grad.dtype))
    return total


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a DTensor (e.g. a norm computed over sharded gradients) as a plain tensor,
    gathered where it is sharded or partial; other tensors as they are."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded parameter (a DTensor; or a ZeRO-3 parameter, whose own data is
    empty outside forwards: its `ds_tensor`); other tensors as they are."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        return tensor.to_local()
    return getattr(tensor, "ds_tensor", tensor)


def shard_rows(rows: int, processes: int, process: int) -> tuple[int, int]:
    """Rows [start, stop) of a dim-0 size `rows` that FSDP2 (`Shard(0)`, torch.chunk's split) gives
    process `process` of `processes`: ceil(rows / processes) each, the last ones shorter or empty."""
    size = -(-rows // processes)
    return min(process * size, rows), min((process + 1) * size, rows)


def rows_held(tensor) -> tuple[int, int]:
    """Rows [start, stop) of a sharded tensor this process holds; AlignError for a layout other than
    fsdp's one-dimensional Shard(0) (checked against the local shard's own size)."""
    from torch.distributed.tensor import Shard

    mesh, placements = tensor.device_mesh, tuple(tensor.placements)
    if mesh.ndim != 1 or placements != (Shard(0),) or tensor.dim() == 0:
        raise AlignError(f"a sharded weight is placed as {placements} on a {mesh.ndim}-d mesh; Align's checkpoints "
                         "store fsdp's Shard(0) over one process group")
    start, stop = shard_rows(tensor.shape[0], mesh.size(), mesh.get_local_rank())
    if tensor.to_local().shape[0] != stop - start:
        raise AlignError(f"a sharded weight of {tensor.shape[0]} rows holds {tensor.to_local().shape[0]} here, not "
                         f"torch.chunk's {stop - start}: unknown fsdp layout")
    return start, stop


def _local_rows(tree):
    """`tree` with each DTensor as this process's `RowShard` (its own rows, not gathered)."""
    from torch.distributed.tensor import DTensor

    from align.trainers.checkpoint import RowShard

    if isinstance(tree, DTensor):
        start, _ = rows_held(tree)
        return RowShard(tree.to_local().detach(), start, tuple(tree.shape))
    if isinstance(tree, dict):
        return {key: _local_rows(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_local_rows(value) for value in tree]
    return tree


def sharded_training_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Every process calls it: (model state, optimizer state) keyed by parameter name, each sharded
    tensor as this process's rows (`RowShard`): nothing is gathered, each process saves its own share
    (`align.trainers.checkpoint`), and `load_sharded_training_state` reads it back on any number of
    processes (or `load_training_state`, whole, unsharded)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model, optim = get_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=False))
    return _local_rows(model), _local_rows(optim)


def load_sharded_training_state(module: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                                optimizer_state: dict) -> None:
    """Every process calls it: a checkpoint's named state into the sharded `module` and `optimizer`,
    each process reading only the rows it holds. Values are `StoredRows` (a sharded checkpoint, read
    on demand) or whole tensors; model_state may hold only some weights (the trainable ones)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    from torch.distributed.tensor import DTensor

    from align.trainers.checkpoint import StoredRows

    def held(now, saved):  # `now` (this process's tensor, as the module holds it) filled from `saved`
        if isinstance(now, DTensor):
            if tuple(saved.shape) != tuple(now.shape):
                raise AlignError(f"checkpoint: a weight of shape {list(saved.shape)} for one of {list(now.shape)}")
            start, stop = rows_held(now)
            rows = saved.rows(start, stop) if isinstance(saved, StoredRows) else saved[start:stop]
            now.to_local().copy_(rows)
            return now
        return saved.whole() if isinstance(saved, StoredRows) else saved

    model_now, optim_now = get_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=False))
    unknown = sorted(set(model_state) - set(model_now)) + sorted(set(optimizer_state["state"]) - set(optim_now["state"]))
    if unknown:
        raise AlignError(f"checkpoint has weights this model lacks: {unknown[:5]}")
    model = {name: held(model_now[name], saved) for name, saved in model_state.items()}
    state = {name: {key: held(optim_now["state"][name].get(key), saved) for key, saved in entry.items()}
             for name, entry in optimizer_state["state"].items()}
    set_state_dict(module, optimizer, model_state_dict=model,
                   optim_state_dict={"state": state, "param_groups": optimizer_state["param_groups"]},
                   options=StateDictOptions(strict=False))


def load_training_state(module: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                        optimizer_state: dict) -> None:
    """Put a checkpoint's named state back, whole, into an unsharded `module` and `optimizer` (each
    process holds all of it): model_state may hold only some weights (a checkpoint keeps the trainable ones)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(module, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True, strict=False))


def keyed_by_name(optimizer_state: dict) -> bool:
    """Whether an optimizer state dict is keyed by parameter name (written under fsdp or ZeRO), not numbered."""
    groups = optimizer_state.get("param_groups") or [{}]
    return any(isinstance(name, str) for name in groups[0].get("params", []))


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every process calls it (a collective): the whole, unsharded state dict on the CPU for the main
    process, {} for the others."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
