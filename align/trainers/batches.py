"""What a training step's data is, the part of `Trainer` that makes its batches: the order of the
examples (a pure function of seed, step and process), their micro-batches (`train.batch_size`,
`train.micro_batch_tokens`) and each process's share, the batch layout the model runs exactly
(packed rows, shared prompts: `align.models.layouts`), the collated tensors, and their move to the
device with what the forward needs from the host (label positions, packed rows' boundaries)."""

from __future__ import annotations

import functools
import logging
import math

import torch

from align.data import pack, pad
from align.data.budget import budget_groups
from align.distributed import most_chunks, shard, shares
from align.models import varlen
from align.models.layouts import PACKED_ROWS, SHARED_PROMPTS
from align.ops.logprobs import label_positions

log = logging.getLogger(__name__)


class Batches:
    """Mixed into `Trainer`: uses its recipe, cfg, policy, accelerator, train and eval data,
    `shares_prompts`, `lockstep` and `count_items`."""

    @property
    def packs_rows(self) -> bool:
        """Whether batches may hold several sequences in a row: unless the model cannot run packed
        rows exactly (`align.models.layouts`); then each sequence has a row of its own, padded."""
        return PACKED_ROWS not in self.policy.inexact_layouts

    @property
    def shared_prompt(self) -> bool:
        """Whether batches put each prompt once before its completions: for trainers that do
        (`shares_prompts`, their recipe switch in their override), unless the attention takes no 4-D
        mask (flash_attention_2) or the model cannot run the layout exactly (`align.models.layouts`)."""
        return self.shares_prompts and self.recipe.model.attn_implementation != "flash_attention_2" and \
            self.packs_rows and SHARED_PROMPTS not in self.policy.inexact_layouts

    def check_layouts(self) -> None:
        """Say which of Align's batch layouts the model cannot run exactly, and what runs instead
        (`packs_rows`, `shared_prompt`): the same log-probs, slower."""
        inexact = self.policy.inexact_layouts
        if PACKED_ROWS in inexact and (self.recipe.data.packing or self.shares_prompts):
            log.warning("%s; each sequence gets a row of its own instead (padded: the same log-probs, slower)",
                        inexact[PACKED_ROWS])
        elif SHARED_PROMPTS in inexact and self.shares_prompts:
            log.warning("%s; each sequence gets its own copy of its prompt instead (the same log-probs, slower)",
                        inexact[SHARED_PROMPTS])

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Examples -> packed rows (`align.data.pack`: rows of at most data.pack_length tokens, by
        default the longest example's; one row holding them all, unpadded, where every attention
        call takes the varlen kernel: `one_row`), or one padded row each."""
        if self.recipe.data.packing and self.packs_rows:
            whole = sum(len(e["input_ids"]) for e in examples) if self.one_row else None
            return pack(examples, whole or self.recipe.data.pack_length)
        return pad(examples, self.policy.tokenizer.pad_token_id)

    @functools.cached_property
    def one_row(self) -> bool:
        """Whether packed examples go as one row a batch: where the policy's every attention call takes
        the varlen kernel (`align.models.varlen.one_row`), which computes inside each example whatever
        the rows, so rows would only add padding; not elsewhere, where a row's mask is quadratic in
        its length."""
        autocast = torch.bfloat16 if self.cfg.mixed_precision == "bf16" else None
        return varlen.one_row(self.policy.model, self.accelerator.device, autocast)

    @property
    def global_batch_size(self) -> int:
        """Examples in one optimizer step, over all micro-batches of all processes."""
        return self.cfg.batch_size * self.cfg.grad_accum * self.accelerator.num_processes

    def count_steps_per_epoch(self) -> int:
        """Optimizer steps in one pass over the training data."""
        return math.ceil(len(self.train_data) / self.global_batch_size)

    def micro_batches(self, step: int) -> list[dict]:
        """This process's collated micro-batches of optimizer step `step` (a pure function of seed,
        step and process)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.train_data), generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
        size = self.global_batch_size
        return self.share_micro_batches([self.train_data[int(i)] for i in order[index * size:(index + 1) * size]],
                                        self.cfg.batch_size)

    def share_micro_batches(self, items: list, per_batch: int) -> list[dict]:
        """This process's share of one optimizer step's items (examples, prompt groups), collated in
        micro-batches (`group_items`). A process left without items (a short last step) gets the
        step's first item as a `padding` batch, trained with weight 0: DDP needs every process's backward.
        Under fsdp and ZeRO (`lockstep`) each process gets as many micro-batches as the process with the
        most (every process groups every share to know it), padded the same way."""
        batches = [self.collate(group) for group in self.group_items(shard(items), per_batch)]
        most = max(len(self.group_items(share, per_batch)) for share in shares(items)) if self.lockstep else 1
        return self.padded(batches, most, items[0])

    def group_items(self, items: list, per_batch: int) -> list[list]:
        """`items` cut into micro-batches: `per_batch` at a time in order, or under
        `train.micro_batch_tokens` at most `per_batch` items and that many tokens (`item_tokens`)
        each, the step's tokens spread evenly (`align.data.budget`). The update is the same either
        way (losses are normalized by the whole step's item count); the budget bounds memory."""
        budget = self.cfg.micro_batch_tokens
        if budget is None:
            return [items[i:i + per_batch] for i in range(0, len(items), per_batch)]
        groups = budget_groups([self.item_tokens(item) for item in items], per_batch, budget)
        return [[items[i] for i in group] for group in groups]

    def item_tokens(self, item) -> int:
        """The tokens `item` adds to a micro-batch (padding aside): what `train.micro_batch_tokens`
        counts. Default: an example's input_ids."""
        return len(item["input_ids"])

    def padded(self, batches: list[dict], count: int, item) -> list[dict]:
        """`batches` and, up to `count` batches, `padding` ones of `item` alone (a process's forwards
        and backwards matched to the others'; the loop and evaluation count them for nothing)."""
        missing = count - len(batches)
        return batches + [{**self.collate([item]), "padding": True}] * missing if missing > 0 else batches

    def _to_device(self, batch: dict) -> dict:
        """The batch on the training device; a host batch with labels first gets its
        `label_positions` (computed on the host: selecting them on the device would wait for it),
        and packed rows bound for CUDA their boundaries where the policy takes the varlen kernel
        (`align.models.varlen.segments`)."""
        labels = batch.get("labels")
        if isinstance(labels, torch.Tensor) and labels.device.type == "cpu" and "label_positions" not in batch:
            batch = {**batch, "label_positions": label_positions(labels)}
        device = self.accelerator.device
        positions = batch.get("position_ids")
        if device.type in varlen.KERNEL_DEVICES and varlen.uses_varlen(self.policy.model.config) and \
                isinstance(positions, torch.Tensor) and positions.device.type == "cpu" and \
                batch.get("attention_mask") is None and "cu_seq_lens" not in batch:  # (groups carry a None mask)
            found = varlen.segments(positions)  # packed rows: their boundaries, for the varlen kernel
            if found is not None:
                batch = {**batch, "cu_seq_lens": found[0], "max_seq_len": found[1]}

        def move(value):
            if not isinstance(value, torch.Tensor):
                return value
            if device.type == "cuda" and value.device.type == "cpu":  # from pinned memory: no stream sync
                return value.pin_memory().to(device, non_blocking=True)  # (torch keeps the block until copied)
            return value.to(device)

        return {k: move(v) for k, v in batch.items()}

    def eval_batches(self) -> list[dict]:
        """This process's share of the eval split's batches, collated. Under fsdp and ZeRO (`lockstep`)
        each process gets as many as the first, padded with `padding` batches (which count for nothing)."""
        size = self.cfg.eval_batch_size or self.cfg.batch_size
        starts = range(0, len(self.eval_data), size)
        batches = [self.collate([self.eval_data[j] for j in range(i, min(i + size, len(self.eval_data)))])
                   for i in shard(starts)]
        return self.padded(batches, most_chunks(len(starts), 1), self.eval_data[0]) if self.lockstep else batches
