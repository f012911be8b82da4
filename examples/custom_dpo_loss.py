"""Subclass DPOTrainer and replace its loss: length-normalized DPO with SimPO's target margin.

Plain DPO compares *summed* log-prob ratios, so long answers move the loss more than short ones.
Here each answer's log-ratio is divided by its length and the chosen answer must win by a margin
`gamma` (SimPO, Meng et al. 2024); with `use_reference = False` it is SimPO exactly (no reference).

Run from the repository root: python examples/custom_dpo_loss.py [OUTPUT_DIR]
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from align import DPOTrainer
from align.cli import quiet_libraries
from align.config import recipe_from_dict


class LengthNormalizedDPO(DPOTrainer):
    """The hook is `compute_loss(batch) -> (loss, metrics)`; `sequence_logps(batch)` gives the
    per-pair pieces: policy and reference log-probs of chosen/rejected, and their lengths, each [B]."""

    gamma = 0.5           # target margin between the chosen and rejected rewards
    use_reference = True  # False: SimPO (rewards from the policy alone)

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        beta = self.recipe.dpo.beta
        chosen, rejected, ref_chosen, ref_rejected, n_chosen, n_rejected = self.sequence_logps(batch)
        if not self.use_reference:
            ref_chosen, ref_rejected = torch.zeros_like(chosen), torch.zeros_like(rejected)
        chosen_reward = beta * (chosen - ref_chosen) / n_chosen        # [B] per-token log-ratio
        rejected_reward = beta * (rejected - ref_rejected) / n_rejected
        losses = -F.logsigmoid(chosen_reward - rejected_reward - self.gamma)
        margin = (chosen_reward - rejected_reward).detach()
        metrics = {"rewards/accuracy": (margin > 0).float().mean().item(),
                   "rewards/margin": margin.mean().item(),
                   "rewards/beats_gamma": (margin > self.gamma).float().mean().item()}
        # normalize by the step's pair count (not the micro-batch's): gradient accumulation stays exact
        return losses.sum() / batch["num_items"], metrics


def main(output_dir: str = "runs/example-custom-dpo", max_steps: int = 16) -> dict:
    recipe = recipe_from_dict({
        "algorithm": "dpo",
        "output_dir": output_dir,
        "model": {"name_or_path": "builtin:tiny-llama", "dtype": "float32"},
        "adapter": {"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": {"path": "recipes/data/arith_pref_train.jsonl"},
                 "eval": {"path": "recipes/data/arith_pref_eval.jsonl", "max_rows": 32},
                 "max_length": 128},
        "train": {"lr": 5e-3, "max_steps": max_steps, "batch_size": 16, "schedule": "constant",
                  "log_every": 4, "eval_every": max_steps, "progress": False},
        "dpo": {"beta": 2.0},  # length-normalized rewards are per-token: a larger beta than DPO's 0.1
    })
    record = LengthNormalizedDPO.from_recipe(recipe).fit()
    print(f"loss {record['loss']:.3f}; train accuracy {record['rewards/accuracy']:.2f}, "
          f"eval accuracy {record['eval/rewards/accuracy']:.2f}, "
          f"eval pairs beating the margin {record['eval/rewards/beats_gamma']:.2f}")
    return record


if __name__ == "__main__":
    quiet_libraries()  # no per-file progress bars from datasets/transformers, as in the CLI
    main(*sys.argv[1:2])
