"""PPO against Align's own GRPO (TRL 1.16 ships no PPO trainer): the cost of a sampled token.

Same prompts, model, reward and sampling as the `grpo` case, and the same work: the PPO data
holds each prompt G times (PPO samples one completion per prompt), so both sides sample the same
number of completions from the same prompts and take the same optimizer steps. PPO runs one
epoch over each rollout as one mini-batch (like GRPO's one iteration), with its other defaults:
a separate critic (a second copy of the model with a value head), the KL penalty to a frozen
reference (kl_coef 0.05), GAE. So the ratio is what PPO's critic and reference cost on top of
GRPO's sampling and policy update. No floor: the `grpo` case has one.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.assets import write_jsonl
from benchmarks.cases import grpo
from benchmarks.common import Prepared, Spec, align_job, align_recipe, load_rows

VARIANTS = ("GRPO",)
BASELINE = "Align"
ALGORITHM = "ppo"
MODEL = "lm"
COMPARE = "work"
GROUP_SIZE = 8
"""Each prompt appears this many times in the PPO data: the GRPO side's group size."""

initial_model = grpo.initial_model


def data(n_train: int, n_eval: int, context_lines=(2, 10)) -> tuple[list[dict], list[dict]]:
    train, evaluation = grpo.data(n_train, n_eval, context_lines)
    return [row for row in train for _ in range(GROUP_SIZE)], evaluation


def align(spec: Spec) -> Prepared:
    from align.trainers.ppo import PPOTrainer

    settings = {"sampling": {"max_new_tokens": spec.max_new_tokens, "temperature": 1.0},
                "rewards": [{"fn": "benchmarks.cases.grpo:length_reward"}], "ppo_epochs": 1, "num_mini_batches": 1}
    return align_job(PPOTrainer, align_recipe(spec, ALGORITHM, ppo=settings))


def trl(spec: Spec) -> Prepared:
    """The baseline: Align's GRPO on the distinct prompts, G completions each."""
    from align.trainers.grpo import GRPOTrainer

    rows = load_rows(spec.train_path)[::GROUP_SIZE]
    prompts = write_jsonl(rows, Path(spec.run_dir) / "grpo-prompts.jsonl")
    recipe = align_recipe(spec, "grpo", grpo={**grpo.align_settings(spec), "group_size": GROUP_SIZE})
    recipe["data"]["train"] = {"path": prompts}
    return align_job(GRPOTrainer, recipe)


def heldout(spec: Spec, model, tokenizer) -> None:
    return None
