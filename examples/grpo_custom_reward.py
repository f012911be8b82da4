"""GRPO with a reward function from your own file, given as `examples/my_reward.py:careful_answer`.

The recipe is a plain dict here (the same keys as a YAML recipe). The model is builtin:tiny-llama-arith,
which Align trains itself on first use (~20 s, cached): it often hedges ("Hmm, I am not sure."),
so a reward that penalizes hedging has something to teach.

Run from the repository root: python examples/grpo_custom_reward.py [OUTPUT_DIR]
"""

from __future__ import annotations

import sys

from align import GRPOTrainer
from align.builtins import build_builtin
from align.cli import quiet_libraries
from align.config import recipe_from_dict


def main(output_dir: str = "runs/example-grpo-custom-reward", max_steps: int = 10) -> dict:
    build_builtin("builtin:tiny-llama-arith")  # trained by Align once per model cache (~1 min)
    recipe = recipe_from_dict({
        "algorithm": "grpo",
        "output_dir": output_dir,
        "model": {"name_or_path": "builtin:tiny-llama-arith", "dtype": "float32"},
        "adapter": {"kind": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"train": {"path": "recipes/data/arith_prompts_train.jsonl"},
                 "eval": {"path": "recipes/data/arith_prompts_eval.jsonl", "max_rows": 16},
                 "max_length": 64},
        "train": {"lr": 2e-3, "max_steps": max_steps, "batch_size": 32, "schedule": "constant",
                  "log_every": 1, "eval_every": max_steps, "progress": False},
        "grpo": {
            "group_size": 8,  # 32 completions per step = 4 prompts x 8 samples
            "sampling": {"max_new_tokens": 24, "temperature": 1.0},
            "rewards": [
                # a path to your file (relative to the current directory) : the function's name;
                # `name` is what metrics.jsonl calls it, `kwargs` are bound to the function
                {"fn": "examples/my_reward.py:careful_answer", "name": "careful", "kwargs": {"hedge_penalty": 0.5}},
            ],
        },
    })
    record = GRPOTrainer.from_recipe(recipe).fit()
    print(f"step {max_steps}: train reward {record['reward']:.3f} "
          f"(careful_answer mean {record['rewards/careful/mean']:.3f}), "
          f"greedy eval reward {record['eval/reward']:.3f}")
    return record


if __name__ == "__main__":
    quiet_libraries()  # no per-file progress bars from datasets/transformers, as in the CLI
    main(*sys.argv[1:2])
