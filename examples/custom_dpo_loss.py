"""Plug in your own preference loss: length-normalized DPO with SimPO's target margin.

Plain DPO compares *summed* log-prob ratios, so long answers move the loss more than short ones.
Here each answer's log-ratio is divided by its length and the chosen answer must win by a margin
`gamma` (as SimPO, Meng et al. 2024, does without a reference). Registering the function makes
`dpo.loss_type: length_normalized_margin` a valid recipe value; `dpo.loss_kwargs` reaches its
keyword arguments. A YAML recipe would list this file under `plugins:` so that `align train` and
`align validate` import it first.

Run from the repository root: python examples/custom_dpo_loss.py [OUTPUT_DIR]
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from align import DPOTrainer
from align.cli import quiet_libraries
from align.config import recipe_from_dict
from align.losses.preference import PairLogps, register_preference_loss


@register_preference_loss("length_normalized_margin")
def length_normalized_margin(pairs: PairLogps, beta: float, label_smoothing: float = 0.0, gamma: float = 0.5):
    """-logsigmoid(beta (per-token log-ratio of chosen - of rejected) - gamma); pairs hold [B] sums."""
    mean = pairs.per_token()  # every log-prob divided by its completion's length
    chosen = beta * (mean.chosen - mean.ref_chosen)
    rejected = beta * (mean.rejected - mean.ref_rejected)
    losses = -F.logsigmoid(chosen - rejected - gamma)
    return losses, chosen, rejected  # per-pair losses [B] and the implicit rewards behind the metrics


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
        # length-normalized rewards are per-token: a larger beta than DPO's 0.1
        "dpo": {"loss_type": "length_normalized_margin", "beta": 2.0, "loss_kwargs": {"gamma": 0.5}},
    })
    record = DPOTrainer.from_recipe(recipe).fit()
    print(f"loss {record['loss']:.3f}; train accuracy {record['rewards/accuracy']:.2f}, "
          f"eval accuracy {record['eval/rewards/accuracy']:.2f}, eval margin {record['eval/rewards/margin']:.2f}")
    return record


if __name__ == "__main__":
    quiet_libraries()  # no per-file progress bars from datasets/transformers, as in the CLI
    main(*sys.argv[1:2])
