"""DPO and its loss family on preference pairs, with the prompt of each pair computed once."""

from __future__ import annotations

import logging

import torch

from align.data.preference import pack_pairs, pair_sums, preference_encoder, warn_identical
from align.data.formats import tokenize
from align.config import DPOConfig
from align.losses.preference import PairLogps, preference_loss
from align.models import Policy, reference_cache
from align.registry import PREFERENCE_LOSSES
from align.trainers.base import Trainer, register_trainer

log = logging.getLogger(__name__)

PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


class PreferenceTrainer(Trainer):
    """What DPO and reward modeling share: pair data, packed pairs, pairs as the loss unit."""

    formats = ("preference",)

    @classmethod
    def build_dataset(cls, recipe, policy, rows, fmt, key):
        data = tokenize(rows, preference_encoder(policy.tokenizer, recipe.data.max_length, key), key)
        warn_identical(data, key)
        return data.remove_columns("identical")

    @property
    def shared_prompt(self) -> bool:
        return self.recipe.model.attn_implementation != "flash_attention_2"

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = pack_pairs(examples, shared_prompt=self.shared_prompt)
        if "ref_logps" in examples[0]:
            batch["ref_logps"] = torch.tensor([e["ref_logps"] for e in examples])
        return batch

    def count_items(self, batch: dict) -> float:
        return float(len(batch["margin"]))


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
                                                    reference_cache.low_precision(self.recipe), width=2)
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
        return preference_loss(self.pair_logps(batch), cfg.loss_type, cfg.beta, cfg.label_smoothing, cfg.rpo_alpha,
                               batch["num_items"], **cfg.loss_kwargs)
