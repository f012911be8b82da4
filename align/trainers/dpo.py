"""DPO and its loss family on preference pairs, with the prompt of each pair computed once."""

from __future__ import annotations

import logging

import torch

from align.data.preference import pack_pairs, pair_sums, preference_encoder, warn_identical
from align.data.formats import tokenize
from align.errors import AlignError
from align.losses.preference import dpo_loss, rpo_sft_loss
from align.models import Policy
from align.models import reference_cache
from align.models.loading import load_model, load_tokenizer, resolve_dtype
from align.config import AdapterConfig
from align.trainers.base import Trainer
from align.trainers.distributed import map_in_shares

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


class DPOTrainer(PreferenceTrainer):
    algorithm = "dpo"
    dropout_by_default = False  # implicit rewards compare the training forward with the reference's

    @property
    def shared_prompt(self) -> bool:
        return self.recipe.dpo.shared_prompt and super().shared_prompt

    @classmethod
    def build_policy(cls, recipe) -> Policy:
        cfg = recipe.dpo
        reference = "none" if cfg.reference_model else cfg.reference
        policy = Policy.from_config(recipe.model, recipe.adapter, reference=reference)
        if cfg.reference_model:
            ref_config = recipe.model.model_copy(update={"name_or_path": cfg.reference_model, "tokenizer": None})
            ref_tokenizer = load_tokenizer(ref_config)
            if ref_tokenizer.get_vocab() != policy.tokenizer.get_vocab():
                raise AlignError(f"dpo.reference_model: {cfg.reference_model!r} has a different tokenizer than "
                                 f"model.name_or_path {recipe.model.name_or_path!r}; the reference must score the "
                                 "same tokens, so use a reference with the policy's tokenizer")
            policy.use_reference_model(load_model(ref_config, AdapterConfig(kind="none")))
        return policy

    def prepare_data(self) -> None:
        """Precompute reference log-probs for every pair, cached on disk, then free the reference."""
        if not self.recipe.dpo.precompute_reference:
            return
        recipe = self.recipe
        settings = {"model": reference_cache.model_identity(self.policy.reference_module),
                    "reference": self.policy.reference,
                    "tokenizer": reference_cache.tokenizer_hash(self.policy.tokenizer),
                    "dtype": recipe.model.dtype, "attn_implementation": recipe.model.attn_implementation,
                    "mixed_precision": self.cfg.mixed_precision, "max_length": recipe.data.max_length,
                    "shared_prompt": self.shared_prompt, "dpo": recipe.dpo.model_dump()}
        low_precision = self.cfg.mixed_precision == "bf16" or resolve_dtype(recipe.model.dtype) != torch.float32
        for name in ("train_data", "eval_data"):
            data = getattr(self, name)
            if data is None or "ref_logps" in data.column_names:
                continue
            key = reference_cache.reference_key({**settings, "data": reference_cache.data_hash(data, PAIR_COLUMNS)})
            values = reference_cache.cached_reference(key, len(data), lambda: self._reference_logps(data),
                                                      lambda: self._reference_logps(data, first_batch=True),
                                                      low_precision)
            setattr(self, name, data.add_column("ref_logps", values.tolist()))
        self.policy.release_reference()

    @torch.no_grad()
    def _reference_logps(self, data, first_batch: bool = False) -> torch.Tensor:
        """[N, 2] reference (chosen, rejected) sequence log-probs of every pair, in data order (each
        process computes its share of the pairs); with first_batch, [n, 2] for the first micro-batch's
        n pairs only, computed whole by every process."""
        size = self.cfg.eval_batch_size or self.cfg.batch_size

        def reference(indices) -> list[torch.Tensor]:  # one [2] row per pair
            batch = self._to_device(self.collate([data[i] for i in indices]))
            with self.autocast():
                logps = self.policy.reference_logprobs(batch)
            return list(torch.stack(pair_sums(logps, batch["sequence_ids"], len(indices)), -1).float().cpu())

        with self.policy.eval_mode():  # a fixed number per pair: no dropout (see train.dropout_during_training)
            if first_batch:
                return torch.stack(reference(range(min(size, len(data)))))
            return torch.stack(map_in_shares(range(len(data)), size, reference))

    def sequence_logps(self, batch: dict) -> tuple[torch.Tensor, ...]:
        """(policy chosen, policy rejected, ref chosen, ref rejected, chosen lengths, rejected lengths), each [B]."""
        pairs = len(batch["margin"])
        chosen, rejected = pair_sums(self.policy.logprobs(batch), batch["sequence_ids"], pairs)
        if "ref_logps" in batch:
            ref_chosen, ref_rejected = batch["ref_logps"].unbind(-1)
        else:
            ref_chosen, ref_rejected = pair_sums(self.policy.reference_logprobs(batch), batch["sequence_ids"], pairs)
        ones = torch.ones_like(batch["sequence_ids"], dtype=torch.float32)
        lengths = pair_sums(ones, batch["sequence_ids"], pairs)
        return chosen, rejected, ref_chosen, ref_rejected, *lengths

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The DPO-family loss of this micro-batch's pairs (a share of the step's), and its metrics as
        detached 0-dim tensors (the loop reads them at log steps only)."""
        cfg = self.recipe.dpo
        chosen, rejected, ref_chosen, ref_rejected, n_chosen, n_rejected = self.sequence_logps(batch)
        if cfg.loss_type == "ipo":  # IPO regresses length-normalized log-ratios
            chosen, rejected = chosen / n_chosen, rejected / n_rejected
            ref_chosen, ref_rejected = ref_chosen / n_chosen, ref_rejected / n_rejected
        losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, cfg.beta,
                                                            cfg.loss_type, cfg.label_smoothing)
        if cfg.rpo_alpha:
            losses = losses + cfg.rpo_alpha * rpo_sft_loss(chosen if cfg.loss_type != "ipo" else chosen * n_chosen,
                                                            n_chosen)
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": chosen.detach().mean(),
            "logps/rejected": rejected.detach().mean(),
        }
        return losses.sum() / batch["num_items"], metrics
