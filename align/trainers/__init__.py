"""Trainers, one module each; each registers itself under its algorithm name (`register_trainer`),
and the registry imports every module here on its first lookup, so a new trainer is a new file."""

from align.registry import TRAINERS
from align.trainers.base import Trainer, register_trainer
from align.trainers.callbacks import Callback
from align.trainers.dpo import DPOTrainer
from align.trainers.grpo import GRPOTrainer
from align.trainers.ppo import PPOTrainer
from align.trainers.reward import RewardTrainer
from align.trainers.sft import SFTTrainer

__all__ = ["TRAINERS", "Callback", "DPOTrainer", "GRPOTrainer", "PPOTrainer", "RewardTrainer", "SFTTrainer", "Trainer",
           "register_trainer"]
