"""Reward model (Bradley-Terry) on long-prompt preference pairs.

Both start from the same saved sequence-classification model (`rm/`: the benchmark backbone and
a one-scalar head initialized once). Align: shared-prompt packed pairs (the prompt runs once per
pair); TRL: its default, [prompt+chosen; prompt+rejected] right-padded with an attention mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.assets import long_prompt_preference_rows
from benchmarks.common import (Prepared, Spec, align_job, align_recipe, floor_job, group_steps, hf_dataset,
                               load_rows, trl_args, trl_job)

VARIANTS = ("default",)
ALGORITHM = "reward"
MODEL = "rm"


def data(n_train: int, n_eval: int, context_lines=(12, 28), seeds=(21, 22)) -> tuple[list[dict], list[dict]]:
    return (long_prompt_preference_rows(n_train, seed=seeds[0], context_lines=context_lines),
            long_prompt_preference_rows(n_eval, seed=seeds[1], context_lines=context_lines))


def pairs(spec: Spec, tokenizer) -> list[dict]:
    """Align's tokenization of the pairs: {"prompt_ids", "chosen_ids", "rejected_ids", "margin"}."""
    from align.data.preference import preference_encoder

    encode = preference_encoder(tokenizer, spec.max_length, "data.train")
    return [encode(row, i) for i, row in enumerate(load_rows(spec.train_path))]


def tokens(spec: Spec, tokenizer) -> int:
    """Distinct tokens of one epoch: prompt + chosen + rejected of every pair (the prompt once)."""
    return sum(len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs(spec, tokenizer))


def initial_model(spec: Spec):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(spec.model_dir, dtype=torch.float32, num_labels=1)


def align(spec: Spec) -> Prepared:
    from align.trainers.reward import RewardTrainer

    return align_job(RewardTrainer, align_recipe(spec, ALGORITHM))


def trl(spec: Spec) -> Prepared:
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
    args = RewardConfig(**trl_args(spec), max_length=spec.max_length)
    trainer = RewardTrainer(model=initial_model(spec), args=args, train_dataset=hf_dataset(spec.train_path),
                            processing_class=tokenizer)
    return trl_job(trainer)


def floor(spec: Spec, model, tokenizer) -> Prepared:
    """Shared-prompt packed pairs (laid out by Align's collator before timing), the score head on
    each sequence's last token, the Bradley-Terry loss."""
    from align.data.preference import pack_pairs

    examples = pairs(spec, tokenizer)
    batches = [pack_pairs(examples[i:i + spec.batch_size]) for i in range(0, len(examples), spec.batch_size)]

    def loss_fn(model, batch, num_items):
        hidden = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                             attention_mask=batch["attention_mask"]).last_hidden_state
        scores = model.score(hidden.flatten(0, 1)[batch["last_index"]]).float()[:, 0]
        return -F.logsigmoid(scores[0::2] - scores[1::2]).sum() / num_items

    return floor_job(spec, model, group_steps(batches, spec.grad_accum), loss_fn, lambda b: float(len(b["margin"])))


def heldout(spec: Spec, model, tokenizer) -> float:
    from benchmarks.evaluate import reward_loss

    return reward_loss(model, tokenizer, load_rows(spec.eval_path))
