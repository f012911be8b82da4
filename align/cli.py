"""`align train | validate | export`: the command line. User mistakes exit with code 2, no traceback."""

from __future__ import annotations

import argparse
import logging
import sys

from align.errors import AlignError


def _train(args) -> None:
    from align.config import load_recipe
    from align.trainers import TRAINERS

    recipe = load_recipe(args.recipe, args.set)
    trainer = TRAINERS[recipe.algorithm].from_recipe(recipe)
    record = trainer.fit()
    print(f"done: {trainer.step} steps; outputs in {recipe.output_dir} "
          f"(weights, recipe.yaml, metrics.jsonl); last loss {record.get('loss', float('nan')):.4f}")


def _validate(args) -> None:
    from align.config import load_recipe
    from align.trainers import TRAINERS

    recipe = load_recipe(args.recipe, args.set)
    if all(s is None or s.is_local for s in (recipe.data.train, recipe.data.eval)):
        for key, (rows, fmt) in TRAINERS[recipe.algorithm].load_splits(recipe).items():
            if rows is not None:
                print(f"{key}: {len(rows)} rows, format {fmt}")
    else:
        print("data from the hub: checked when `align train` downloads it")
    print(f"{args.recipe}: valid {recipe.algorithm} recipe")


def _export(args) -> None:
    from align.export import export_merged

    export_merged(args.run_dir, args.out_dir)
    print(f"merged model written to {args.out_dir}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="align", description="Post-training for causal language models.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn, text in [("train", _train, "run a recipe end to end"),
                           ("validate", _validate, "check a recipe and its data without loading a model")]:
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("recipe", help="path to a recipe YAML file")
        cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a recipe key, e.g. --set train.lr=2e-5 (repeatable)")
        cmd.set_defaults(fn=fn)
    cmd = sub.add_parser("export", help="merge a LoRA/QLoRA adapter into a plain transformers model directory")
    cmd.add_argument("run_dir", help="an output dir (or checkpoint) holding an adapter")
    cmd.add_argument("out_dir")
    cmd.set_defaults(fn=_export)
    return p


def quiet_libraries() -> None:
    """Keep the terminal for Align's own progress: no per-file bars or import chatter from libraries."""
    for noisy in ("httpx", "datasets", "transformers", "accelerate", "bitsandbytes", "peft"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    try:
        args.fn(args)
    except AlignError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
