"""SFT on variable-length chats (loss on assistant turns).

Align: its default, padding-free packing (each micro-batch of `batch_size` chats packed best-fit
decreasing into rows no longer than its longest chat, or than `pack_length` where the preset sets it).
TRL variants:
  default       right padding to the longest chat of the batch, with an attention mask
  padding_free  `padding_free=True`: the same `batch_size` chats flattened into one row (TRL
                documents it for FlashAttention; with sdpa, transformers derives the per-chat
                causal mask from the restarting position ids). Same batches as Align, so the
                loss comparison is tight.
  packing       `packing=True` (best-fit-decreasing, padding-free): chats are packed ahead of time
                into rows of `max_length` tokens and a batch is `batch_size` rows. To keep the
                tokens per optimizer step (and so the number of steps) close to Align's, the row
                length is set to batch_size * mean chat length and TRL's batch size to 1 row.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from benchmarks.assets import sft_rows
from benchmarks.common import (Prepared, Spec, align_job, align_recipe, floor_job, group_steps, hf_dataset,
                               load_rows, trl_args, trl_job)

VARIANTS = ("default", "padding_free", "packing")
ALGORITHM = "sft"
MODEL = "lm"


def data(n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    return sft_rows(n_train, seed=11), sft_rows(n_eval, seed=12)


def _examples(spec: Spec, tokenizer) -> list[dict]:
    """Align's tokenization of the training chats: {"input_ids", "labels"} (labels shifted)."""
    from align.data import sft_encoder

    encode = sft_encoder(tokenizer, "messages", spec.max_length, "data.train")
    return [encode(row, i) for i, row in enumerate(load_rows(spec.train_path))]


def tokens(spec: Spec, tokenizer) -> int:
    """Trained tokens of one epoch: every non-pad token of every chat (what each forward must run)."""
    return sum(len(e["input_ids"]) for e in _examples(spec, tokenizer))


def initial_model(spec: Spec):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=torch.float32)


def packing_row(spec: Spec, tokenizer) -> int:
    """TRL `packing`'s row length here: batch_size x the mean chat (at least the longest chat), so
    its steps hold about as many tokens as Align's."""
    lengths = [len(e["input_ids"]) for e in _examples(spec, tokenizer)]
    return max(max(lengths), math.ceil(spec.batch_size * sum(lengths) / len(lengths)))


def align(spec: Spec) -> Prepared:
    from transformers import AutoTokenizer

    from align import SFTTrainer

    if spec.micro_batch_tokens == "trl_row":
        # micro-batches of at most TRL packing's row; where pack_length is set, each one row no longer
        # than TRL's (a shorter pack_length cut some in two: padding, and in compiled layers a
        # recompilation for the rows)
        row = packing_row(spec, AutoTokenizer.from_pretrained(spec.model_dir))
        pack_length = spec.pack_length and max(spec.pack_length, row)
        spec = dataclasses.replace(spec, micro_batch_tokens=str(row), pack_length=pack_length)
    recipe = align_recipe(spec, ALGORITHM)
    recipe["data"]["pack_length"] = spec.pack_length
    return align_job(SFTTrainer, recipe)


def trl(spec: Spec) -> Prepared:
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
    model = initial_model(spec)
    kwargs = trl_args(spec) | dict(max_length=spec.max_length, assistant_only_loss=True)
    if spec.variant == "padding_free":
        kwargs |= dict(padding_free=True, max_length=None)  # TRL asks for pre-truncated data here; ours fits
    elif spec.variant == "packing":
        kwargs |= dict(packing=True, max_length=packing_row(spec, tokenizer), per_device_train_batch_size=1)
    trainer = SFTTrainer(model=model, args=SFTConfig(**kwargs), train_dataset=hf_dataset(spec.train_path),
                         processing_class=tokenizer)
    return trl_job(trainer)


def floor(spec: Spec, model, tokenizer) -> Prepared:
    """Each micro-batch of `batch_size` chats packed as Align packs it where the varlen kernel does not
    run (`align.data.pack`: rows no longer than the longest chat, or `pack_length`, position ids
    restarting per chat; on CUDA Align puts a micro-batch in one unpadded row, `Trainer.one_row`),
    laid out before timing; the lm-head run on the trained positions only, cross-entropy summed over
    the step's trained tokens."""
    from align.data import pack

    examples = _examples(spec, tokenizer)
    batches = [pack(examples[start:start + spec.batch_size], spec.pack_length)
               for start in range(0, len(examples), spec.batch_size)]

    def loss_fn(model, batch, num_items):
        hidden = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
        mask = batch["labels"] != -100
        logits = model.lm_head(hidden[mask]).float()
        return F.cross_entropy(logits, batch["labels"][mask], reduction="sum") / num_items

    return floor_job(spec, model, group_steps(batches, spec.grad_accum), loss_fn,
                     lambda b: float((b["labels"] != -100).sum()))


def heldout(spec: Spec, model, tokenizer) -> float:
    from benchmarks.evaluate import sft_loss

    return sft_loss(model, tokenizer, load_rows(spec.eval_path))
