"""Train with the Python API instead of YAML, and subclass a trainer to change its loss.

Run: python examples/python_api_sft.py [OUTPUT_DIR]
"""

import sys

import torch

from align.cli import quiet_libraries
from align.config import recipe_from_dict
from align.trainers import SFTTrainer


class LabelSmoothedSFT(SFTTrainer):
    """SFT with a loss of one's own: the hook is `compute_loss(batch) -> (loss, metrics)`."""

    smoothing = 0.1

    def compute_loss(self, batch):
        loss, metrics = super().compute_loss(batch)
        mask = batch["labels"] != -100
        # push a little probability mass off the targets: penalize over-confident log-probs
        logps = self.policy.logprobs(batch)
        extra = self.smoothing * (logps.exp() * mask).sum() / batch["num_items"]
        return loss + extra, {**metrics, "confidence": float((logps.detach().exp() * mask).sum() / mask.sum())}


def main(output_dir: str = "runs/example-python-api", max_steps: int = 20) -> dict:
    recipe = recipe_from_dict({
        "algorithm": "sft",
        "output_dir": output_dir,
        "model": {"name_or_path": "builtin:tiny-llama", "dtype": "float32"},
        "adapter": {"kind": "lora", "r": 8, "alpha": 16},
        "data": {"train": {"path": "recipes/data/arith_chat_train.jsonl"}, "max_length": 256},
        "train": {"lr": 5e-3, "max_steps": max_steps, "batch_size": 8, "log_every": 5},
    })
    trainer = LabelSmoothedSFT.from_recipe(recipe)
    record = trainer.fit()
    print(f"loss {record['loss']:.3f}, confidence {record['confidence']:.3f}; adapter saved in {output_dir}")
    return record


if __name__ == "__main__":
    quiet_libraries()  # no per-file progress bars from datasets/transformers, as in the CLI
    torch.manual_seed(0)
    main(*sys.argv[1:2])
