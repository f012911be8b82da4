from align.trainers.base import Trainer
from align.trainers.callbacks import Callback
from align.trainers.dpo import DPOTrainer
from align.trainers.reward import RewardTrainer
from align.trainers.sft import SFTTrainer

TRAINERS: dict[str, type[Trainer]] = {"sft": SFTTrainer, "reward": RewardTrainer, "dpo": DPOTrainer}

__all__ = ["TRAINERS", "Callback", "DPOTrainer", "RewardTrainer", "SFTTrainer", "Trainer"]
