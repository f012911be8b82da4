"""The offline quickstart: pre-training -> SFT -> reward model -> PPO, SFT -> DPO and SFT -> GRPO
on a tiny Llama that Align trains itself, then a short report of what each stage changed.

`align quickstart` runs the recipes in recipes/quickstart/ (each stage reads the previous stage's
output dir) from the repository root. The pre-trained and SFT models are kept once trained
(`--fresh` redoes them). `--seeds N` runs the whole pipeline with N training seeds and reports each
number's mean and spread: one run's RL numbers move with the seed (and from machine to machine).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from align.config import Recipe, apply_overrides, load_recipe, read_yaml_mapping, recipe_from_dict
from align.errors import AlignError

STAGES = ("pretrain", "sft", "rm", "dpo", "grpo", "ppo")
KEPT = ("pretrain", "sft")
"""Stages whose output a later run reuses (unless --fresh)."""
EVAL_PROMPTS = "recipes/data/arith_prompts_eval.jsonl"
SAMPLES = ("Question: What is 7 + 5?\nAnswer:", "Question: What is 14 - 9?\nAnswer:")


def load_stage(path: Path, overrides: list[str], seed: int | None = None) -> Recipe:
    """A stage's recipe; with `seed`, train.seed = seed, and for seed k > 0 every path under the
    quickstart's root (runs/quickstart/...) moved to <root>/seed<k>/..., so that the seeds' runs
    stay apart and each stage reads its own seed's previous stage."""
    if seed is None:
        return load_recipe(path, overrides)
    raw = read_yaml_mapping(path)
    if seed:
        root = Path(read_yaml_mapping(path.parent / "pretrain.yaml")["output_dir"]).parent.as_posix() + "/"
        raw = relocated(raw, root, f"{root}seed{seed}/")
    return recipe_from_dict(apply_overrides(raw, [*overrides, f"train.seed={seed}"]), str(path))


def relocated(tree, old: str, new: str):
    """`tree` with every string starting with `old` starting with `new` instead."""
    if isinstance(tree, dict):
        return {key: relocated(value, old, new) for key, value in tree.items()}
    if isinstance(tree, list):
        return [relocated(value, old, new) for value in tree]
    return new + tree[len(old):] if isinstance(tree, str) and tree.startswith(old) else tree


def run_stage(recipe: Recipe) -> float:
    """Train one stage; returns its wall time in seconds."""
    from align.trainers import TRAINERS

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


def main(recipes: str = "recipes/quickstart", fresh: bool = False, progress: bool = True, seeds: int = 1) -> dict:
    """Run every stage and print the report; returns its numbers. With seeds > 1, the whole pipeline
    once per seed (train.seed = 0 .. seeds-1; seed 0 in the recipes' output dirs, seed k under
    <root>/seed<k>/), then each number's mean and spread: {"runs": [report per seed], "spread":
    {number: (mean, std, min, max)}}."""
    if seeds < 1:
        raise AlignError(f"--seeds: need at least 1, got {seeds}")
    if seeds == 1:
        report, outputs = run_pipeline(Path(recipes), fresh, progress)
        print_report(report, outputs)
        return report
    runs = []
    for seed in range(seeds):
        print(f"==== seed {seed} of {seeds}")
        report, outputs = run_pipeline(Path(recipes), fresh, progress, seed)
        print_report(report, outputs)
        runs.append(report)
    spread = {key: summary([headline(run)[key] for run in runs]) for key in headline(runs[0])}
    print_spread(spread, seeds)
    return {"runs": runs, "spread": spread}


def run_pipeline(recipes_dir: Path, fresh: bool, progress: bool, seed: int | None = None) -> tuple[dict, dict]:
    """Train every stage (reusing the kept ones unless `fresh`), then measure: (report, output dirs)."""
    from align.generate import evaluate, generate, load

    overrides = [] if progress else ["train.progress=false"]
    stages = {name: load_stage(recipes_dir / f"{name}.yaml", overrides, seed) for name in STAGES}
    outputs = {name: Path(recipe.output_dir) for name, recipe in stages.items()}
    seconds = {}
    for name in STAGES:
        if name in KEPT and not fresh and (outputs[name] / "config.json").exists():
            print(f"== {name}: reusing {outputs[name]} (--fresh retrains it)")
            continue
        fresh = fresh or name in KEPT  # a retrained stage invalidates the kept ones after it
        print(f"== {name}: align train {recipes_dir / name}.yaml" + (f" train.seed={seed}" if seed is not None else ""))
        seconds[name] = run_stage(stages[name])

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
    return report, outputs


def headline(report: dict) -> dict[str, float]:
    """The numbers a seed's run ends with: each stage's final eval value and each model's exact-answer accuracy."""
    finals = {key: report[key][1] for key in ("pretrain_eval_loss", "sft_eval_loss", "rm_accuracy", "dpo_accuracy",
                                              "dpo_margin")}
    return {**finals, **{f"exact_answer/{name}": value for name, value in report["exact_answer"].items()}}


def summary(values: list[float]) -> tuple[float, float, float, float]:
    """(mean, sample standard deviation, min, max)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std, min(values), max(values)


def print_spread(spread: dict, seeds: int) -> None:
    lines = ["", f"Align quickstart over {seeds} seeds (train.seed 0..{seeds - 1}): mean +- std [min, max]"]
    for key, (mean, std, low, high) in spread.items():
        lines.append(f"  {key:<28} {mean:7.3f} +- {std:.3f}   [{low:.3f}, {high:.3f}]")
    print("\n".join(lines))


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
