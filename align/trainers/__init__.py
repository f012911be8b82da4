from align.trainers.base import Trainer
from align.trainers.callbacks import Callback
from align.trainers.sft import SFTTrainer

TRAINERS: dict[str, type[Trainer]] = {"sft": SFTTrainer}

__all__ = ["TRAINERS", "Callback", "SFTTrainer", "Trainer"]
