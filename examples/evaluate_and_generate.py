"""Train briefly, then use the result: generate answers and score them with a reward.

1. DPO (LoRA) on builtin:tiny-llama-arith, a model that often hedges, with pairs preferring a
   worked answer over the hedge.
2. `align.generate.generate` on the output dir (a LoRA adapter, loaded merged into its base).
3. `align.generate.evaluate`: greedy answers to held-out questions scored by `exact_answer`,
   before and after training. The same from the shell:
       align generate OUTPUT_DIR --prompt $'Question: What is 2 + 3?\\nAnswer:'
       align eval OUTPUT_DIR --data recipes/data/arith_prompts_eval.jsonl --reward exact_answer

Run from the repository root: python examples/evaluate_and_generate.py [OUTPUT_DIR]
"""

from __future__ import annotations

import sys

from align import DPOTrainer
from align.builtins import build_builtin
from align.cli import quiet_libraries
from align.config import recipe_from_dict
from align.generate import evaluate, generate, load

BASE = "builtin:tiny-llama-arith"
QUESTIONS = ["Question: What is 2 + 3?\nAnswer:", "Question: What is 15 - 9?\nAnswer:"]


def train(output_dir: str, max_steps: int) -> None:
    recipe = recipe_from_dict({
        "algorithm": "dpo",
        "output_dir": output_dir,
        "model": {"name_or_path": BASE, "dtype": "float32"},
        "adapter": {"kind": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"train": {"path": "recipes/data/arith_pref_train.jsonl"}, "max_length": 64},
        "train": {"lr": 5e-4, "max_steps": max_steps, "batch_size": 16, "schedule": "constant",
                  "log_every": 4, "progress": False},
        "dpo": {"beta": 0.1, "rpo_alpha": 1.0},  # rpo_alpha: plus SFT on the chosen answers, keeps it fluent
    })
    DPOTrainer.from_recipe(recipe).fit()


def main(output_dir: str = "runs/example-evaluate", max_steps: int = 20, limit: int = 64) -> dict:
    build_builtin(BASE)  # trained by Align once per model cache (~1 min)
    train(output_dir, max_steps)

    trained = load(output_dir)  # load once, then generate and evaluate with it
    for question, answer in zip(QUESTIONS, generate(trained, QUESTIONS, max_new_tokens=24)):
        print(f"{question!r} -> {answer!r}")

    scores = {}
    for name, model in [("before", BASE), ("after", trained)]:
        result = evaluate(model, "recipes/data/arith_prompts_eval.jsonl", ["exact_answer"],
                          max_new_tokens=24, limit=limit)
        hedged = sum("not sure" in c for c in result.completions) / len(result.completions)
        scores[name] = result.means["exact_answer"]
        print(f"{name:>6} training: exact_answer {scores[name]:.3f}, hedged {hedged:.2f} "
              f"({len(result.rows)} questions)")
    return scores


if __name__ == "__main__":
    quiet_libraries()  # no per-file progress bars from datasets/transformers, as in the CLI
    main(*sys.argv[1:2])
