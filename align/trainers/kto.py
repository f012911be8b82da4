"""KTO (Ethayarajh et al., 2024) on unpaired rows: a prompt, a completion, and whether it is desirable.

Data: `prompt`/`completion`/`label` rows (label: true for a desirable completion), or preference
pairs (`prompt`/`chosen`/`rejected`, or an implicit prompt), each split into a desirable and an
undesirable row as TRL does. The loss is `align.losses.kto.kto_loss`.

The reference point z0 is the mean log-ratio of mismatched pairs, each row's prompt with the
completion of another row of its optimizer step (rotated by one within the step, as TRL rotates
within a batch), over the whole step: every micro-batch of every process (one all-reduce), computed
before the step's first backward (a forward without gradient), so that gradient accumulation and
data parallelism give the update of one big batch. Evaluation uses the mean over the eval split.

For those pairs to come from the row's own step and still have precomputable reference log-probs,
the rows of each step are fixed: a seeded partition of the training data into steps of the global
batch size, visited in a new order every epoch (TRL gets the same by sampling sequentially).
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field, model_validator

from align.config import Section, check_one_reference
from align.data import tokenize
from align.data.groups import group_tokens, sequence_sums
from align.data.unpaired import (LABEL_COLUMN, check_labels, kl_batch, kl_completions, kl_partners, pack_unpaired,
                                 unpair, unpaired_encoder)
from align.distributed import sum_tensors_over_processes
from align.errors import AlignError
from align.losses.kto import desirable_weight_advice, kl_reference_point, kl_sums, kto_loss
from align.models import Policy, reference_cache
from align.trainers.base import Trainer, register_trainer

log = logging.getLogger(__name__)


class KTOConfig(Section):
    beta: float = Field(0.1, gt=0)
    """How far the policy may move from the reference (higher: less)."""
    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"
    """kto: eq. 7 of the KTO paper, with the KL reference point; apo_zero_unpaired: the unpaired APO-zero
    loss (D'Oosterlinck et al., 2024), which has no reference point (no mismatched pairs are computed)."""
    desirable_weight: float = Field(1.0, ge=0, allow_inf_nan=False)
    """Weight of the desirable rows' losses (lambda_D)."""
    undesirable_weight: float = Field(1.0, ge=0, allow_inf_nan=False)
    """Weight of the undesirable rows' losses (lambda_U). With unbalanced data, keep
    desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in [1, 4/3] (a warning says
    when it is not)."""
    reference: Literal["auto", "adapter_disabled", "frozen_copy"] = "auto"
    """auto: the base under a LoRA/QLoRA adapter, else a frozen copy of the starting model."""
    reference_model: str | None = None
    """A different reference model (hub id or path); it must share the policy's tokenizer."""
    precompute_reference: bool = True
    """Compute reference log-probs (completions and mismatched pairs) once before training, cached on
    disk and reused across runs; the reference model is then freed."""

    @model_validator(mode="after")
    def _check_reference(self) -> "KTOConfig":
        check_one_reference(self.reference, self.reference_model)
        return self


def at_least_one(count: float | torch.Tensor) -> float | torch.Tensor:
    return count.clamp(min=1) if isinstance(count, torch.Tensor) else max(count, 1.0)


def measured(value: torch.Tensor, count: float | torch.Tensor) -> torch.Tensor:
    """`value`, or NaN where `count` rows measured it: none (a device-side choice, no host read)."""
    if isinstance(count, torch.Tensor):
        return torch.where(count > 0, value, torch.full_like(value, float("nan")))
    return value if count > 0 else torch.full_like(value, float("nan"))


@register_trainer("kto", KTOConfig)
class KTOTrainer(Trainer):
    """KTO and unpaired APO-zero (kto.loss_type); rows are the loss unit (`count_items`)."""

    UNMEASURED_IF_NAN = ("rewards/chosen", "logps/chosen", "rewards/rejected", "logps/rejected", "rewards/margin")

    formats = ("prompt_completion", "preference")
    dropout_by_default = False  # implicit rewards compare the training forward with the reference's

    _totals: dict | None = None
    """While a step or an evaluation runs: z0 and the desirable / undesirable row counts of the
    whole step (or eval split), which `compute_loss` uses instead of its own batch's."""

    # ---- data -----------------------------------------------------------------------------------
    @classmethod
    def check_format(cls, recipe, rows, key: str) -> str:
        fmt = super().check_format(recipe, rows, key)
        if fmt == "prompt_completion":
            source = getattr(recipe.data, key.split(".")[1]) or recipe.data.train
            check_labels(rows, key, source.path)
        return fmt

    @classmethod
    def build_policy(cls, recipe) -> Policy:
        cfg = recipe.kto
        return Policy.from_config(recipe.model, recipe.adapter, cfg.reference, cfg.reference_model,
                                  key="kto.reference_model")

    @classmethod
    def build_dataset(cls, recipe, tokenizer, rows, fmt, key):
        if fmt == "preference":
            rows = unpair(rows)
        data = tokenize(rows, unpaired_encoder(tokenizer, recipe.data.max_length, key), key, recipe.data.num_proc)
        if key == "data.train":
            desirable = sum(data[LABEL_COLUMN])
            advice = desirable_weight_advice(desirable, len(data) - desirable, recipe.kto.desirable_weight,
                                             recipe.kto.undesirable_weight)
            if advice:
                log.warning("%s: %s", key, advice)
        return data

    @property
    def uses_kl(self) -> bool:
        return self.recipe.kto.loss_type == "kto"

    def step_rows(self) -> list[list[int]]:
        """The rows of each training step: a partition of the data, seeded by train.seed, into chunks
        of the global batch size (the last one may be shorter)."""
        order = torch.randperm(len(self.train_data), generator=torch.Generator().manual_seed(self.cfg.seed)).tolist()
        size = self.global_batch_size
        return [order[i:i + size] for i in range(0, len(order), size)]

    def eval_rows(self) -> list[list[int]]:
        size = self.cfg.eval_batch_size or self.cfg.batch_size
        return [list(range(i, min(i + size, len(self.eval_data)))) for i in range(0, len(self.eval_data), size)]

    def prepare_data(self) -> None:
        """Give each row its mismatched KL completion (from its own step; for eval rows, from its eval
        batch), then precompute reference log-probs when kto.precompute_reference is on: [completion,
        KL pair] per row, cached on disk; then free the reference."""
        if self.uses_kl:
            if self.global_batch_size < 2:
                raise AlignError("kto estimates its KL reference point from the other rows of a step, and a step here "
                                 "holds one row: raise train.batch_size or train.grad_accum (or use kto.loss_type: "
                                 "apo_zero_unpaired, which has no reference point)")
            self._step_rows = self.step_rows()
            max_length = self.recipe.data.max_length
            self.train_data = self.train_data.add_column(
                "kl_ids", kl_completions(self.train_data, kl_partners(self._step_rows), max_length))
            if self.eval_data is not None:
                self.eval_data = self.eval_data.add_column(
                    "kl_ids", kl_completions(self.eval_data, kl_partners(self.eval_rows()), max_length))
        if not self.recipe.kto.precompute_reference or self.policy.reference == "none":
            return
        settings = reference_cache.reference_settings(self.policy, self.recipe, shared_prompt=False)
        columns = ("prompt_ids", "completion_ids") + (("kl_ids",) if self.uses_kl else ())
        for name in ("train_data", "eval_data"):
            data = getattr(self, name)
            if data is None or "ref_logps" in data.column_names:
                continue

            @torch.no_grad()
            def reference(indices, data=data) -> list[torch.Tensor]:  # one [completion, KL pair] row per example
                batch = self._to_device(self.collate([data[i] for i in indices]))
                with self.autocast():
                    values = [self.reference_sums(batch, len(indices))]
                    if self.uses_kl:
                        values.append(self.reference_sums(kl_batch(batch), len(indices)))
                return list(torch.stack(values, -1).float().cpu())

            with self.policy.eval_mode():  # a fixed number per row: no dropout
                values = reference_cache.precompute(data, columns, settings, reference,
                                                    self.cfg.eval_batch_size or self.cfg.batch_size,
                                                    reference_cache.low_precision(self.recipe),
                                                    width=2 if self.uses_kl else 1,
                                                    even=self.policy.reference_sharded)
            setattr(self, name, data.add_column("ref_logps", values.tolist()))
        self.policy.release_reference()

    def micro_batches(self, step: int) -> list[dict]:
        """This process's micro-batches of step `step`: the rows of one chunk of `step_rows` (the
        chunks in a new order each epoch). Without a reference point (apo_zero_unpaired), the
        base order: rows shuffled anew every epoch."""
        if not self.uses_kl:
            return super().micro_batches(step)
        epoch, index = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self._step_rows), generator=torch.Generator().manual_seed(self.cfg.seed + 1 + epoch))
        rows = self._step_rows[int(order[index])]
        return self.share_micro_batches([self.train_data[i] for i in rows], self.cfg.batch_size)

    def collate(self, examples: list[dict]) -> dict:
        batch = pack_unpaired(examples, with_kl=self.uses_kl, packed=self.packs_rows)
        if "ref_logps" in examples[0]:
            batch["ref_logps"] = torch.tensor([e["ref_logps"] for e in examples])
        return batch

    def count_items(self, batch: dict) -> float:
        return float(len(batch[LABEL_COLUMN]))

    def item_tokens(self, row) -> int:
        """The row [prompt | completion] and, with the KL reference point, its mismatched pair."""
        kl = [len(row["kl_ids"])] if self.uses_kl and "kl_ids" in row else []
        return group_tokens(len(row["prompt_ids"]), [len(row["completion_ids"])] + kl, shared_prompt=False)

    # ---- log-probs and the reference point ------------------------------------------------------
    def reference_sums(self, batch: dict, rows: int) -> torch.Tensor:
        """[rows] sequence log-probs of a packed batch's rows (one sequence each) under the reference."""
        return sequence_sums(self.policy.reference_logprobs(batch), batch["sequence_ids"], rows)

    @torch.no_grad()
    def kl_pair_sums(self, host_batch: dict) -> torch.Tensor:
        """[2] `kl_sums` of a batch's mismatched pairs under the policy and the reference; only their
        tensors are moved to the device."""
        keys = [k for k in host_batch if k.startswith("kl_")] + (["ref_logps"] if "ref_logps" in host_batch else [])
        batch = self._to_device({k: host_batch[k] for k in keys})
        pairs, rows = kl_batch(batch), len(host_batch[LABEL_COLUMN])
        with self.autocast():
            policy = sequence_sums(self.policy.logprobs(pairs), pairs["sequence_ids"], rows)
            reference = batch["ref_logps"][:, 1] if "ref_logps" in batch else self.reference_sums(pairs, rows)
        return kl_sums(policy, reference)

    def totals(self, batches: list[dict]) -> dict:
        """z0 and the desirable / undesirable row counts of `batches` (host batches; padding ones
        count for nothing), over every process: one all-reduce (none with one process), nothing read
        on the host, no host number copied to the device with one process."""
        device = self.accelerator.device
        real = [b for b in batches if not b.get("padding")]
        counts = {"desirable": sum(b["num_desirable"] for b in real),
                  "undesirable": sum(b["num_undesirable"] for b in real)}
        kl = torch.zeros(2, device=device)
        if self.uses_kl:
            for batch in batches if self.lockstep else real:  # fsdp, ZeRO: every process runs as many
                sums = self.kl_pair_sums(batch)
                if not batch.get("padding"):
                    kl = kl + sums
        if self.accelerator.num_processes > 1:
            values = {"kl_sum": kl[0], "kl_pairs": kl[1],
                      **{k: torch.full((), v, device=device) for k, v in counts.items()}}
            values = sum_tensors_over_processes(values, device)
            kl, counts = torch.stack([values["kl_sum"], values["kl_pairs"]]), {k: values[k] for k in counts}
        return {"z0": kl_reference_point(kl) if self.uses_kl else None, **counts}

    def accumulate_gradients(self, micro_batches: list[dict]):
        """The base accumulation, with z0 and the row counts of the whole step computed first."""
        self._totals = self.totals(micro_batches)
        try:
            return super().accumulate_gradients(micro_batches)
        finally:
            self._totals = None

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The base evaluation, with z0 and the row counts of the whole eval split (every process's
        batches, as the base evaluation shares them out)."""
        with self.policy.eval_mode():
            self._totals = self.totals(self.eval_batches())
        try:
            return super().evaluate()
        finally:
            self._totals = None

    # ---- the loss -------------------------------------------------------------------------------
    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`kto_loss` of this micro-batch's rows (a share of the step's), with the step's z0; its
        metrics rescaled so that the loop's weighted sum over micro-batches (weight rows / num_items)
        gives the means over the whole step's desirable / undesirable rows; NaN for a kind the step has
        no row of (`log` leaves those out). Called on a batch alone (outside a step or an evaluation),
        z0 and the means are that batch's."""
        cfg = self.recipe.kto
        totals = self._totals or self.totals([batch])
        rows = self.count_items(batch)
        policy = sequence_sums(self.policy.logprobs(batch), batch["sequence_ids"], int(rows))
        reference = batch["ref_logps"][:, 0] if "ref_logps" in batch else self.reference_sums(batch, int(rows))
        num_items = batch.get("num_items", rows)
        loss, metrics = kto_loss(policy, reference, batch[LABEL_COLUMN], totals["z0"] if self.uses_kl else 0.0,
                                 cfg.beta, cfg.desirable_weight, cfg.undesirable_weight, num_items, cfg.loss_type)
        # batch mean -> this batch's share of the step's mean, times num_items / rows (the loop's weight)
        scale = {kind: batch[f"num_{kind}"] / at_least_one(totals[kind]) * num_items / rows
                 for kind in ("desirable", "undesirable")}
        for kind, keys in (("desirable", ("rewards/chosen", "logps/chosen")),
                           ("undesirable", ("rewards/rejected", "logps/rejected"))):
            for key in keys:  # NaN (left out of the record) where the step has no row of this kind, as TRL
                metrics[key] = measured(metrics[key] * scale[kind], totals[kind])
        metrics["rewards/margin"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        return loss, metrics
