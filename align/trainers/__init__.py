from align.trainers.base import Trainer
from align.trainers.callbacks import Callback
from align.trainers.dpo import DPOTrainer
from align.trainers.grpo import GRPOTrainer
from align.trainers.ppo import PPOTrainer
from align.trainers.reward import RewardTrainer
from align.trainers.sft import SFTTrainer

TRAINERS: dict[str, type[Trainer]] = {"sft": SFTTrainer, "reward": RewardTrainer, "dpo": DPOTrainer,
                                      "grpo": GRPOTrainer, "ppo": PPOTrainer}

__all__ = ["TRAINERS", "Callback", "DPOTrainer", "GRPOTrainer", "PPOTrainer", "RewardTrainer", "SFTTrainer", "Trainer"]
