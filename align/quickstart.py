"""The offline quickstart: pre-training -> SFT -> reward model -> PPO, SFT -> DPO and SFT -> GRPO
on a tiny Llama that Align trains itself, then a short report of what each stage changed.

`align quickstart` runs the recipes in recipes/quickstart/ (each stage reads the previous stage's
output dir) from the repository root. The pre-trained and SFT models are kept once trained
(`--fresh` redoes them).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from align.config import load_recipe

STAGES = ("pretrain", "sft", "rm", "dpo", "grpo", "ppo")
KEPT = ("pretrain", "sft")
"""Stages whose output a later run reuses (unless --fresh)."""
EVAL_PROMPTS = "recipes/data/arith_prompts_eval.jsonl"
SAMPLES = ("Question: What is 7 + 5?\nAnswer:", "Question: What is 14 - 9?\nAnswer:")


def run_stage(recipe_path: Path, overrides: list[str]) -> float:
    """Train one stage; returns its wall time in seconds."""
    from align.trainers import TRAINERS

    recipe = load_recipe(recipe_path, overrides)
    start = time.perf_counter()
    TRAINERS[recipe.algorithm].from_recipe(recipe).fit(overwrite=True)  # a rerun moves the last one aside
    return time.perf_counter() - start


def eval_records(run_dir: Path) -> list[dict]:
    """The evaluation records of a run's metrics.jsonl, in step order."""
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if line.strip()]
    return [r for r in records if any(k.startswith("eval/") for k in r)]


def first_last(run_dir: Path, key: str) -> tuple[float, float]:
    values = [r[key] for r in eval_records(run_dir) if key in r]
    return values[0], values[-1]


def main(recipes: str = "recipes/quickstart", fresh: bool = False, progress: bool = True) -> dict:
    """Run every stage and print the report; returns its numbers."""
    from align.generate import evaluate, generate, load

    recipes_dir = Path(recipes)
    overrides = [] if progress else ["train.progress=false"]
    outputs = {name: Path(load_recipe(recipes_dir / f"{name}.yaml").output_dir) for name in STAGES}
    seconds = {}
    for name in STAGES:
        if name in KEPT and not fresh and (outputs[name] / "config.json").exists():
            print(f"== {name}: reusing {outputs[name]} (--fresh retrains it)")
            continue
        fresh = fresh or name in KEPT  # a retrained stage invalidates the kept ones after it
        print(f"== {name}: align train {recipes_dir / name}.yaml")
        seconds[name] = run_stage(recipes_dir / f"{name}.yaml", overrides)

    report = {"seconds": seconds}
    report["pretrain_eval_loss"] = first_last(outputs["pretrain"], "eval/loss")
    report["sft_eval_loss"] = first_last(outputs["sft"], "eval/loss")
    report["rm_accuracy"] = first_last(outputs["rm"], "eval/accuracy")
    report["dpo_accuracy"] = first_last(outputs["dpo"], "eval/rewards/accuracy")
    report["dpo_margin"] = first_last(outputs["dpo"], "eval/rewards/margin")
    models = {name: load(str(outputs[name])) for name in ("sft", "dpo", "grpo", "ppo")}
    report["exact_answer"] = {name: evaluate(model, EVAL_PROMPTS, ["exact_answer"], max_new_tokens=32).means["exact_answer"]
                              for name, model in models.items()}
    report["samples"] = {name: generate(model, list(SAMPLES), max_new_tokens=32) for name, model in models.items()}
    print_report(report, outputs)
    return report


def print_report(report: dict, outputs: dict[str, Path]) -> None:
    pretrain, sft, rm, dpo, margin = (report[k] for k in ("pretrain_eval_loss", "sft_eval_loss", "rm_accuracy",
                                                          "dpo_accuracy", "dpo_margin"))
    exact = report["exact_answer"]
    lines = [
        "", "Align quickstart report (greedy decoding, held-out prompts)",
        f"  Pre-training eval loss           {pretrain[0]:.3f} -> {pretrain[1]:.3f}   (plain arithmetic text)",
        f"  SFT   eval loss                  {sft[0]:.3f} -> {sft[1]:.3f}",
        f"  RM    held-out pair accuracy     {rm[0]:.2f} -> {rm[1]:.2f}",
        f"  DPO   preference accuracy        {dpo[0]:.2f} -> {dpo[1]:.2f}   (reward margin {margin[0]:.2f} -> {margin[1]:.2f})",
        f"  exact-answer accuracy            SFT {exact['sft']:.2f} | DPO {exact['dpo']:.2f} | "
        f"GRPO {exact['grpo']:.2f} | PPO {exact['ppo']:.2f}",
        "", "Greedy samples:"]
    for i, prompt in enumerate(SAMPLES):
        lines.append(f"  {prompt.splitlines()[0]}")
        for name, texts in report["samples"].items():
            lines.append(f"    {name:>4}: {texts[i].strip()!r}")
    seconds = report["seconds"]
    if seconds:
        lines += ["", "Stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items())]
    lines += ["", "Plots: " + ", ".join(str(outputs[name] / "plots") for name in STAGES),
              "Outputs (weights, recipe.yaml, metrics.jsonl) in " + str(outputs["sft"].parent)]
    print("\n".join(lines))
