"""DPO and its loss family on preference pairs, with the prompt of each pair computed once."""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

from pydantic import Field, model_validator
import torch

from align.data.preference import pack_pairs, pair_sums, preference_encoder, warn_identical
from align.data.formats import tokenize
from align.data.groups import group_tokens
from align.config import Section, check_keyword_arguments, check_one_reference, registered
from align.errors import AlignError
from align.losses.preference import PairLogps, preference_loss
from align.models import Policy, reference_cache
from align.registry import PREFERENCE_LOSSES
from align.trainers.base import Trainer, register_trainer

log = logging.getLogger(__name__)

PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


class DPOConfig(Section):
    beta: float = Field(0.1, gt=0)
    loss_type: registered("PREFERENCE_LOSSES") = "sigmoid"
    """A preference loss (`align.losses.preference`): sigmoid (DPO), robust, ipo, hinge, and the
    reference-free ones that load no reference model; or a plug-in (`module:Name`)."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    """Label-flip rate for `sigmoid` (conservative DPO), `robust` and `simpo`."""
    rpo_alpha: float = Field(0.0, ge=0.0)
    """Weight of an SFT term (mean NLL of the chosen completion) added to the loss (RPO); `orpo` has
    that term already (this adds to it)."""
    loss_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments of the preference loss (e.g. {gamma: 0.5} for simpo)."""
    reference: Literal["auto", "adapter_disabled", "frozen_copy"] = "auto"
    """auto: the base under a LoRA/QLoRA adapter, else a frozen copy of the starting model."""
    reference_model: str | None = None
    """A different reference model (hub id or path); it must share the policy's tokenizer."""
    precompute_reference: bool = True
    """Compute reference log-probs once before training, cached on disk and reused across runs."""
    shared_prompt: bool = True
    """Run each pair's prompt once ([prompt | chosen | rejected] with a 4D attention mask)."""

    @model_validator(mode="after")
    def _check_loss_kwargs(self) -> "DPOConfig":
        """Each loss_kwargs name must be a keyword parameter of the loss (a typo would fail at step 1)."""
        if self.loss_kwargs:
            check_keyword_arguments(PREFERENCE_LOSSES.get(self.loss_type, key="dpo.loss_type").fn, self.loss_kwargs,
                                    ("pairs", "beta", "label_smoothing"), "loss_kwargs")
        return self

    @model_validator(mode="after")
    def _check_label_smoothing(self) -> "DPOConfig":
        """A label_smoothing the loss refuses (a ValueError) is refused here (it failed at the first
        step): the loss is tried on two made-up pairs. A plug-in that cannot run on them otherwise is
        left to its first step."""
        if self.label_smoothing:
            loss = PREFERENCE_LOSSES.get(self.loss_type, key="dpo.loss_type")
            logps, tokens = torch.tensor([-1.0, -3.0]), torch.tensor([2.0, 3.0])
            pairs = PairLogps(logps, logps * 2, tokens, tokens, *((logps * 1.5, logps * 1.5) if loss.needs_reference
                                                                  else (None, None)))
            try:
                loss.fn(pairs, self.beta, self.label_smoothing, **self.loss_kwargs)
            except ValueError as error:
                raise ValueError(f"label_smoothing: {error}; set it to 0, or use a loss that takes it "
                                 "(sigmoid, robust, simpo)") from None
            except Exception:  # noqa: BLE001 (a plug-in's own needs: not this check's to judge)
                pass
        return self

    @model_validator(mode="after")
    def _check_reference(self) -> "DPOConfig":
        check_one_reference(self.reference, self.reference_model)
        if not PREFERENCE_LOSSES.get(self.loss_type, key="dpo.loss_type").needs_reference:
            ignored = [f"{key}: {value}" for key, value, unset in (("reference_model", self.reference_model, None),
                                                                   ("reference", self.reference, "auto"),
                                                                   ("precompute_reference",
                                                                    self.precompute_reference, True))
                       if value != unset]
            if ignored:
                raise ValueError(f"{', '.join(ignored)}: loss_type {self.loss_type} is reference-free and loads no "
                                 f"reference model; drop {'it' if len(ignored) == 1 else 'them'}")
        return self


class PreferenceTrainer(Trainer):
    """What DPO and reward modeling share: pair data, packed pairs, pairs as the loss unit."""

    formats = ("preference",)
    shares_prompts = True

    @classmethod
    def build_dataset(cls, recipe, tokenizer, rows, fmt, key):
        data = tokenize(rows, preference_encoder(tokenizer, recipe.data.max_length, key), key, recipe.data.num_proc)
        warn_identical(data, key)
        own = [i for i, eps in enumerate(data["label_smoothing"]) if not math.isnan(eps)]
        if own:
            cls.check_pair_smoothing(recipe, key, own[0])
        return data.remove_columns(["identical"] + ([] if own else ["label_smoothing"]))

    @classmethod
    def check_pair_smoothing(cls, recipe, key: str, row: int) -> None:
        """AlignError unless this trainer's loss reads a per-pair label_smoothing (rows of `key` carry one,
        the first is `row`; `align label` writes them for ties it keeps)."""
        raise AlignError(f"{key} row {row} has its own label_smoothing (a tie `align label` kept), which the "
                         f"{recipe.algorithm} loss does not take; drop those rows (align label with ties: drop) "
                         "or train them with dpo and loss_type: sigmoid")

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = pack_pairs(examples, shared_prompt=self.shared_prompt, packed=self.packs_rows)
        if "ref_logps" in examples[0]:
            batch["ref_logps"] = torch.tensor([e["ref_logps"] for e in examples])
        return batch

    def count_items(self, batch: dict) -> float:
        return float(len(batch["margin"]))

    def item_tokens(self, pair) -> int:
        return group_tokens(len(pair["prompt_ids"]), [len(pair["chosen_ids"]), len(pair["rejected_ids"])],
                            self.shared_prompt)


@register_trainer("dpo", DPOConfig)
class DPOTrainer(PreferenceTrainer):
    """DPO and the preference losses registered in `align.losses.preference` (dpo.loss_type); a
    reference-free loss loads no reference model."""

    dropout_by_default = False  # implicit rewards compare the training forward with the reference's

    @property
    def shared_prompt(self) -> bool:
        return self.recipe.dpo.shared_prompt and super().shared_prompt

    @staticmethod
    def uses_reference(recipe) -> bool:
        return PREFERENCE_LOSSES.get(recipe.dpo.loss_type).needs_reference

    @classmethod
    def build_policy(cls, recipe) -> Policy:
        cfg = recipe.dpo
        if not cls.uses_reference(recipe):
            return Policy.from_config(recipe.model, recipe.adapter)
        return Policy.from_config(recipe.model, recipe.adapter, cfg.reference, cfg.reference_model,
                                  key="dpo.reference_model")

    def prepare_data(self) -> None:
        """Precompute reference log-probs for every pair, cached on disk, then free the reference."""
        if not self.recipe.dpo.precompute_reference or self.policy.reference == "none":
            return
        settings = reference_cache.reference_settings(self.policy, self.recipe, self.shared_prompt)
        for name in ("train_data", "eval_data"):
            data = getattr(self, name)
            if data is None or "ref_logps" in data.column_names:
                continue

            @torch.no_grad()
            def reference(indices, data=data) -> list[torch.Tensor]:  # one [2] (chosen, rejected) row per pair
                batch = self._to_device(self.collate([data[i] for i in indices]))
                with self.autocast():
                    logps = self.policy.reference_logprobs(batch)
                return list(torch.stack(pair_sums(logps, batch["sequence_ids"], len(indices)), -1).float().cpu())

            with self.policy.eval_mode():  # a fixed number per pair: no dropout (see train.dropout_during_training)
                values = reference_cache.precompute(data, PAIR_COLUMNS, settings, reference,
                                                    self.cfg.eval_batch_size or self.cfg.batch_size,
                                                    reference_cache.low_precision(self.recipe), width=2,
                                                    even=self.policy.reference_sharded)
            setattr(self, name, data.add_column("ref_logps", values.tolist()))
        self.policy.release_reference()

    def pair_logps(self, batch: dict) -> PairLogps:
        """The policy's (and, where the loss uses one, the reference's) sequence log-probs of the
        batch's pairs, and their completion lengths."""
        pairs = len(batch["margin"])
        chosen, rejected = pair_sums(self.policy.logprobs(batch), batch["sequence_ids"], pairs)
        ones = torch.ones_like(batch["sequence_ids"], dtype=torch.float32)
        result = PairLogps(chosen, rejected, *pair_sums(ones, batch["sequence_ids"], pairs))
        if "ref_logps" in batch:
            result.ref_chosen, result.ref_rejected = batch["ref_logps"].unbind(-1)
        elif self.policy.reference != "none":
            result.ref_chosen, result.ref_rejected = pair_sums(self.policy.reference_logprobs(batch),
                                                               batch["sequence_ids"], pairs)
        return result

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`preference_loss` of this micro-batch's pairs (a share of the step's), and its metrics as
        detached 0-dim tensors (the loop reads them at log steps only)."""
        cfg = self.recipe.dpo
        smoothing = cfg.label_smoothing
        if "label_smoothing" in batch:  # the pairs' own, where they have one
            own = batch["label_smoothing"]
            smoothing = torch.where(own.isnan(), torch.full_like(own, cfg.label_smoothing), own)
        return preference_loss(self.pair_logps(batch), cfg.loss_type, cfg.beta, smoothing, cfg.rpo_alpha,
                               batch["num_items"], **cfg.loss_kwargs)

    @classmethod
    def check_pair_smoothing(cls, recipe, key: str, row: int) -> None:
        """Per-pair label smoothing is conservative DPO's flip rate, pair by pair: loss_type sigmoid only
        (robust divides by 1 - 2 eps, undefined for a tie's 0.5)."""
        if recipe.dpo.loss_type != "sigmoid":
            super().check_pair_smoothing(recipe, key, row)
