"""The Policy: the trainable causal LM and everything a trainer asks of it.

It owns loading (through `align.models.loading`), adapters, memory-lean token log-probs, the
reference model used by DPO/PPO/GRPO, generation, and saving. No trainer loads a model itself.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from typing import Literal

import torch
from torch import nn

from align.config import AdapterConfig, ModelConfig
from align.errors import AlignError
from align.models import sharding, tiny, zero
from align.models.compiled import eager
from align.models.dropout import disable_dropout
from align.models.head import check_logprobs_match_forward, logit_transform
from align.models.layouts import inexact_layouts
from align.models.loading import check_vocabulary, load_model, load_tokenizer
from align.models.packed import decoder_hidden
from align.ops.logprobs import token_logprobs, weighted_logprob_sum
from align.rollout.sampling import write_eos_ids

log = logging.getLogger(__name__)

ReferenceStrategy = Literal["auto", "adapter_disabled", "frozen_copy", "none"]


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP/compile wrappers (not peft)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model with its lm-head (adapters injected), under any peft/DDP wrapper."""
    model = unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def separate_model_config(model: ModelConfig, name_or_path: str, tokenizer, key: str, reads: str) -> ModelConfig:
    """`model`'s settings for a second model (a reference, a teacher, a value model) at `name_or_path`,
    after checking that its own tokenizer is the policy's `tokenizer`: it `reads` the policy's tokens.
    AlignError naming `key` if it is another, or if the directory holds none to check."""
    config = model.model_copy(update={"name_or_path": name_or_path, "tokenizer": None})
    try:
        own = load_tokenizer(config)
    except AlignError:
        raise AlignError(f"{key}: {name_or_path!r} holds no tokenizer that loads, so Align cannot check that it "
                         f"{reads}; save the policy's tokenizer there (tokenizer.save_pretrained)") from None
    if own.get_vocab() != tokenizer.get_vocab():
        raise AlignError(f"{key}: {name_or_path!r} has a different tokenizer than model.name_or_path "
                         f"{model.name_or_path!r}; it {reads}, so use one with the policy's tokenizer")
    return config


def load_separate_model(model: ModelConfig, name_or_path: str, tokenizer, key: str) -> nn.Module:
    """A second model (a reference, a teacher) loaded with `model`'s settings and no adapter, after
    checking that it shares the policy's `tokenizer`: its log-probs must score the same tokens."""
    config = separate_model_config(model, name_or_path, tokenizer, key, "scores the policy's tokens")
    return load_model(config, AdapterConfig(kind="none"))


class TokenLogprobModel(nn.Module):
    """Wraps a causal LM so that its forward returns token log-probs instead of logits.

    Being one module, it is what accelerate prepares (DDP/FSDP see the whole computation), and the
    [B, T, vocab] logits are never materialized: see `align.ops.token_logprobs`.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, temperature: float = 1.0, return_entropy: bool = False,
                token_weights: torch.Tensor | None = None, label_positions: torch.Tensor | None = None,
                cu_seq_lens: torch.Tensor | None = None, max_seq_len: int | None = None, **_):
        """input_ids, labels, position_ids, attention_mask: [B, T] -> log-probs of labels [B, T]
        (and with return_entropy, the next-token entropy at the labelled positions [B, T]).
        With token_weights [B, T]: (sum(token_weights * log-probs), its gradient made in the forward;
        the log-probs; the entropies or None) instead (`align.ops.weighted_logprob_sum`).
        label_positions: [n] flat indices of the labelled positions, computed on the host
        (`align.ops.logprobs.label_positions`), so that selecting them does not wait for the device;
        cu_seq_lens, max_seq_len: packed rows' boundaries, from the host (`align.models.varlen`)."""
        lm = causal_lm(self.model)
        hidden = decoder_hidden(lm, input_ids, position_ids, attention_mask, cu_seq_lens, max_seq_len)
        if token_weights is not None:
            return weighted_logprob_sum(hidden, lm.get_output_embeddings(), labels, token_weights,
                                        return_entropy=return_entropy, temperature=temperature,
                                        transform=logit_transform(lm.config), positions=label_positions)
        return token_logprobs(hidden, lm.get_output_embeddings(), labels, temperature=temperature,
                              return_entropy=return_entropy, transform=logit_transform(lm.config),
                              positions=label_positions)


class Trainable:
    """What every trained model wrapper offers the loop: `module` (what accelerate prepares), its
    tokenizer, trainable parameters, eval mode, checkpoint state and saving."""

    module: nn.Module
    tokenizer: object
    inexact_layouts: dict[str, str]
    """{layout: why} for the batch layouts its models cannot run exactly (`align.models.layouts`)."""

    def probe_layouts(self, model: nn.Module) -> None:
        """Add to `inexact_layouts` those of `model`, a model that runs on this wrapper's batches (its
        own, a reference, a teacher, a critic)."""
        self.inexact_layouts = {**inexact_layouts(causal_lm(model)), **getattr(self, "inexact_layouts", {})}

    @property
    def model(self) -> nn.Module:
        """The transformers (or peft) model being trained."""
        return unwrap(self.module).model

    @property
    def has_adapter(self) -> bool:
        return hasattr(unwrap(self.module).model, "disable_adapter")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    @property
    def training(self) -> bool:
        """Whether the trained module is in training mode (read on the module itself: a DeepSpeed
        engine's own `training` stays True whatever mode its module is in)."""
        return unwrap(self.module).training

    @contextlib.contextmanager
    def mode(self, training: bool):
        """Run in training (dropout active) or eval mode, then restore the mode it had."""
        was_training = self.training
        self.module.train(training)
        try:
            yield
        finally:
            self.module.train(was_training)

    def eval_mode(self):
        return self.mode(training=False)

    def disable_dropout(self) -> None:
        """No dropout while training, nor in the passes compared with it (see `align.models.dropout`)."""
        disable_dropout(self.module)

    def save(self, directory: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Adapter in peft format, or full weights as safetensors; plus the tokenizer. state_dict: the
        whole state of `self.module` (as `sharding.full_state_dict` gathers it), else the module's own."""
        os.makedirs(directory, exist_ok=True)
        if state_dict is not None:  # keys of the TokenLogprobModel: "model." + the model's own
            state_dict = {k.removeprefix("model."): v for k, v in state_dict.items()}
        write_eos_ids(causal_lm(self.model), self.tokenizer)
        self.model.save_pretrained(directory, state_dict=state_dict)
        self.tokenizer.save_pretrained(directory)
        adapter_config = os.path.join(directory, "adapter_config.json")
        if os.path.isfile(adapter_config):  # name a built-in base portably, not by this cache's path
            with open(adapter_config) as f:
                settings = json.load(f)
            settings["base_model_name_or_path"] = tiny.portable(settings["base_model_name_or_path"])
            with open(adapter_config, "w") as f:
                json.dump(settings, f, indent=2)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable weights only (the adapter for LoRA/QLoRA): what a checkpoint must hold."""
        return self.trainable_entries(unwrap(self.module).state_dict())

    def trainable_entries(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The entries of a state dict of `self.module` (its own, or one gathered from FSDP shards)
        that are trainable weights."""
        names = {name for name, p in unwrap(self.module).named_parameters() if p.requires_grad}
        return {k: v for k, v in state.items() if k in names}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(state) - set(unwrap(self.module).state_dict())
        if missing:
            raise ValueError(f"checkpoint has weights this model lacks: {sorted(missing)[:5]}")
        unwrap(self.module).load_state_dict(state, strict=False)


class Policy(Trainable):
    """A trainable causal LM with its tokenizer and reference strategy.

    reference: `adapter_disabled` (LoRA/QLoRA: the base model is the reference), `frozen_copy`
    (a frozen deep copy taken before training), `none`, or `auto` (adapter_disabled when the model
    has an adapter, else frozen_copy).
    """

    reference_name = "reference"
    """What the frozen reference model is called in logs (a distillation policy's: teacher)."""

    def __init__(self, model: nn.Module, tokenizer, reference: ReferenceStrategy = "none"):
        check_vocabulary(model, tokenizer)
        check_logprobs_match_forward(causal_lm(model))
        self.probe_layouts(model)
        self.module = self.wrap(model)
        self.tokenizer = tokenizer
        if reference == "auto":
            reference = "adapter_disabled" if self.has_adapter else "frozen_copy"
        if reference == "adapter_disabled" and not self.has_adapter:
            raise ValueError("reference strategy 'adapter_disabled' needs a LoRA/QLoRA adapter")
        self.reference = reference
        self.reference_sharded = False
        self._reference_module = None
        if reference == "frozen_copy":
            self._reference_module = TokenLogprobModel(copy.deepcopy(model)).eval().requires_grad_(False)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module accelerate prepares and the loop trains (subclasses add e.g. a critic)."""
        return TokenLogprobModel(model)

    @classmethod
    def from_config(cls, model: ModelConfig, adapter: AdapterConfig, reference: ReferenceStrategy = "none",
                    reference_model: str | None = None, key: str = "reference_model"):
        """Load the policy as `model` and `adapter` say; its reference by the strategy, or the
        separate model `reference_model` (hub id or path; `key` names the recipe key in errors)."""
        policy = cls(load_model(model, adapter), load_tokenizer(model), "none" if reference_model else reference)
        if reference_model:
            policy.use_reference_model(load_separate_model(model, reference_model, policy.tokenizer, key))
        return policy

    def use_reference_model(self, model: nn.Module) -> None:
        """Use a separately loaded model (frozen here) as the reference; its log-probs must be its own
        forward()'s (the probe the policy passes)."""
        check_logprobs_match_forward(causal_lm(model))
        self.probe_layouts(model)
        self._reference_module = TokenLogprobModel(model).eval().requires_grad_(False)
        self.reference = "frozen_copy"

    @property
    def reference_module(self) -> nn.Module:
        """The module whose weights define the reference (the policy itself under adapter_disabled)."""
        return self._reference_module if self._reference_module is not None else TokenLogprobModel(self.model)

    def disable_dropout(self) -> None:
        super().disable_dropout()
        if self._reference_module is not None:
            disable_dropout(self._reference_module)

    def shard_reference(self, device: torch.device, offload: bool = False) -> None:
        """Shard the frozen-copy reference over the processes as the policy is (`sharding.shard`; every
        process must then run its forwards in step, as under fsdp it does for the policy's)."""
        if not offload:
            self._reference_module.to(device)
        try:
            sharding.shard(self._reference_module, offload=offload)
        except AlignError as error:
            raise AlignError(f"train.fsdp_reference=sharded: {error} (for the reference: set fsdp_reference: whole)") \
                from None
        self.reference_sharded = True
        params = list(self._reference_module.parameters())
        log.info("train.fsdp_reference: the frozen %s is sharded over %d processes: this one holds %d of %d weights",
                 self.reference_name, torch.distributed.get_world_size(),
                 sum(sharding.local_shard(p).numel() for p in params), sum(p.numel() for p in params))

    def partition_reference(self) -> None:
        """Under DeepSpeed ZeRO-3: partition the frozen-copy reference over the processes as the policy
        is (`zero.start_frozen`, an engine without optimizer; every process must then run its forwards
        in step, as it does the policy's)."""
        self._reference_module = zero.start_frozen(self._reference_module, self.reference_name,
                                                   reads_head=isinstance(self._reference_module, TokenLogprobModel))
        self.reference_sharded = True

    def release_reference(self) -> None:
        """Free the reference model once its log-probs are cached."""
        if zero.is_engine(self._reference_module):  # DeepSpeed keeps a partitioned one alive otherwise
            zero.release_frozen(self._reference_module)
        self._reference_module, self.reference = None, "none"

    def logprobs(self, batch: dict, temperature: float = 1.0, return_entropy: bool = False):
        """[B, T] log-probs of `batch["labels"]` under the trainable model (with gradient); with
        return_entropy also the [B, T] next-token entropies (no gradient)."""
        return self.module(**batch, temperature=temperature, return_entropy=return_entropy)

    def weighted_logprob_sum(self, batch: dict, token_weights: torch.Tensor, temperature: float = 1.0,
                             return_entropy: bool = False):
        """(sum(token_weights [B, T] * log-probs of `batch["labels"]`), a scalar with gradient; the
        [B, T] log-probs and, with return_entropy, next-token entropies, both without gradient, else
        None): the fast path for losses whose token weights are known before the forward
        (`Trainer.linear_loss`)."""
        return self.module(**batch, token_weights=token_weights, temperature=temperature,
                           return_entropy=return_entropy)

    @torch.no_grad()
    def reference_logprobs(self, batch: dict, temperature: float = 1.0) -> torch.Tensor:
        """[B, T] log-probs of `batch["labels"]` under the reference model (no gradient)."""
        if self.reference == "frozen_copy" and self.reference_sharded:
            module = self._reference_module
            module.train(self.training)  # (a DeepSpeed engine's train() returns None)
            try:
                return module(**batch, temperature=temperature)
            finally:  # FSDP keeps a root's weights gathered after its forward, for a backward a frozen root never
                sharding.reshard_frozen(module)  # has (ZeRO-3 releases them itself)
        if self.reference == "frozen_copy":  # in the policy's mode: the same dropout setting
            device = batch["input_ids"].device  # (not a policy weight's: under fsdp offload those are on the CPU)
            return self._reference_module.to(device).train(self.training)(**batch, temperature=temperature)
        if self.reference == "adapter_disabled":
            with self.model.disable_adapter():
                return TokenLogprobModel(self.model)(**batch, temperature=temperature)
        raise RuntimeError("this policy has no reference model (reference='none')")

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """transformers' generate on the trainable model; returns [B, T_prompt + T_new] ids."""
        lm = unwrap(self.module).model
        kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        with self.eval_mode(), eager():
            return lm.generate(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **kwargs)
