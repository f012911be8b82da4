"""Align: post-training for causal language models (SFT, reward models, DPO and its family, KTO, PPO,
GRPO and its estimators).

Public names are imported on first use, so `import align` (and the CLI) start fast.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "AlignError": "align.errors",
    "Recipe": "align.config",
    "load_recipe": "align.config",
    "Policy": "align.models",
    "TRAINERS": "align.trainers",
    "Callback": "align.trainers",
    "Trainer": "align.trainers",
    "SFTTrainer": "align.trainers",
    "DPOTrainer": "align.trainers",
    "KTOTrainer": "align.trainers.kto",
    "DistillTrainer": "align.trainers.distill",
    "RewardTrainer": "align.trainers",
    "GRPOTrainer": "align.trainers",
    "PPOTrainer": "align.trainers",
    "RewardFunctions": "align.rewards",
    "load_reward_model": "align.models.reward",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'align' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
