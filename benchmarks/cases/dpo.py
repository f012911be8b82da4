"""DPO (sigmoid loss) on long-prompt preference pairs: prompts of ~170-380 tokens, answers of ~10-25.

Align: its defaults, shared prompt (the prompt runs once per pair) and reference log-probs
precomputed before training and cached on disk. The cache lives in a fresh ALIGN_CACHE per run and
is built inside the timed region (trainer construction), so its cost counts.
TRL: DPOTrainer's defaults: [prompt+chosen; prompt+rejected] right-padded, the reference model
run on every batch during training (`precompute_ref_log_probs=False`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from benchmarks.cases import rm
from benchmarks.common import (Prepared, Spec, align_job, align_recipe, device, floor_job, group_steps, hf_dataset,
                               load_rows, trl_args, trl_job)

VARIANTS = ("default",)
ALGORITHM = "dpo"
MODEL = "lm"


def data(n_train: int, n_eval: int, context_lines=(12, 28)) -> tuple[list[dict], list[dict]]:
    return rm.data(n_train, n_eval, context_lines, seeds=(31, 32))  # the reward model's pairs, other seeds


tokens = rm.tokens  # distinct tokens: prompt + chosen + rejected of every pair


def initial_model(spec: Spec):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=torch.float32)


def align(spec: Spec) -> Prepared:
    from align.trainers.dpo import DPOTrainer

    return align_job(DPOTrainer, align_recipe(spec, ALGORITHM, dpo={"beta": spec.beta}))


def trl(spec: Spec) -> Prepared:
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
    args = DPOConfig(**trl_args(spec), max_length=spec.max_length, beta=spec.beta)
    trainer = DPOTrainer(model=initial_model(spec), args=args, train_dataset=hf_dataset(spec.train_path),
                         processing_class=tokenizer)
    return trl_job(trainer)


def _sequence_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [B], rejected [B]) summed completion log-probs; lm-head on labelled positions only."""
    hidden = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                         attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["labels"] != -100
    logps = model.lm_head(hidden[mask]).float().log_softmax(-1).gather(-1, batch["labels"][mask][:, None])[:, 0]
    sums = torch.zeros(2 * len(batch["margin"]), device=logps.device).index_add(0, batch["sequence_ids"][mask], logps)
    return sums[0::2], sums[1::2]


def floor(spec: Spec, model, tokenizer) -> Prepared:
    """Shared-prompt packed pairs (laid out by Align's collator before timing); each step runs the
    frozen reference forward once (no grad) and the policy forward+backward, then AdamW."""
    from align.data.preference import pack_pairs

    reference = copy.deepcopy(model).to(device()).eval().requires_grad_(False)
    examples = rm.pairs(spec, tokenizer)
    batches = [pack_pairs(examples[i:i + spec.batch_size]) for i in range(0, len(examples), spec.batch_size)]

    def loss_fn(model, batch, num_items):
        with torch.no_grad():
            ref_chosen, ref_rejected = _sequence_logps(reference, batch)
        chosen, rejected = _sequence_logps(model, batch)
        h = (chosen - ref_chosen) - (rejected - ref_rejected)
        return -F.logsigmoid(spec.beta * h).sum() / num_items

    return floor_job(spec, model, group_steps(batches, spec.grad_accum), loss_fn, lambda b: float(len(b["margin"])))


def heldout(spec: Spec, model, tokenizer) -> float:
    from benchmarks.evaluate import completion_logps, dpo_loss, model_device

    rows = load_rows(spec.eval_path)
    reference_model = initial_model(spec).to(model_device(model))
    reference = completion_logps(reference_model, tokenizer, rows)
    del reference_model
    return dpo_loss(model, reference, tokenizer, rows, spec.beta)
