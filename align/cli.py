"""`align train | validate | serve-rollouts | export | plot | generate | eval | label | revise`: the command line. User mistakes exit
with code 2, no traceback."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from align.errors import AlignError


def _train(args) -> int:
    from align.builtins import build_for_recipe
    from align.config import load_recipe
    from align.trainers import TRAINERS, run_dir
    from align.trainers.inputs import check_inputs_outside_output_dir

    _refuse_task_file(args.recipe)
    recipe = load_recipe(args.recipe, args.set)
    if os.environ.get("RANK", "0") == "0":  # the main process (torchrun / accelerate launch set RANK)
        run_dir.check(recipe.output_dir, recipe.train.resume_from, args.overwrite)  # before the model loads
        check_inputs_outside_output_dir(recipe.model_dump(mode="json"))
    _check_adapter(recipe)
    build_for_recipe(recipe)  # the built-ins Align trains itself, before the trainer loads them
    trainer = TRAINERS[recipe.algorithm].from_recipe(recipe)
    record = trainer.fit(overwrite=args.overwrite)
    if trainer.stopped_by:  # preempted: a checkpoint is saved; the shell's code for death by that signal
        print(f"stopped by {trainer.stopped_by} at step {trainer.step}; checkpoint saved in {recipe.output_dir}/"
              f"checkpoints; continue with: align train {Path(recipe.output_dir) / 'recipe.yaml'} "
              "--set train.resume_from=auto", file=sys.stderr)
        return 128 + getattr(signal, trainer.stopped_by)
    if trainer.accelerator.is_main_process:
        last = f"last loss {record['loss']:.4f}" if "loss" in record else "no step left to train (resumed at the end)"
        print(f"done: {trainer.step} steps; outputs in {recipe.output_dir} (weights, recipe.yaml, metrics.jsonl); "
              f"{last}")
    return 0


def _validate(args) -> None:
    from align.config import load_recipe
    from align.models.loading import check_not_a_reward_model, local_tokenizer
    from align.trainers import TRAINERS, run_dir
    from align.trainers.inputs import check_inputs_outside_output_dir

    if _is_task_file(args.recipe):
        return _validate_task(args)
    recipe = load_recipe(args.recipe, args.set)
    run_dir.check(recipe.output_dir, recipe.train.resume_from, args.overwrite)
    check_inputs_outside_output_dir(recipe.model_dump(mode="json"))
    print(f"output_dir: {recipe.output_dir} ok")
    if recipe.train.resume_from:
        from align.trainers.resume import check_resume

        check_resume(recipe, args.overwrite, applies=TRAINERS[recipe.algorithm].RESUME_APPLIES)
        print(f"train.resume_from: {recipe.train.resume_from} ok")
    if recipe.algorithm != "reward":
        check_not_a_reward_model(recipe.model)
    columns = {}  # split -> its columns, where the data is on this machine
    if all(s is None or s.is_local for s in (recipe.data.train, recipe.data.eval)):
        trainer, tokenizer = TRAINERS[recipe.algorithm], local_tokenizer(recipe.model)
        for key, (rows, fmt) in trainer.load_splits(recipe).items():
            if rows is None:
                continue
            columns[key] = rows.column_names
            line = f"{key}: {len(rows)} rows, format {fmt}"
            if tokenizer is not None:
                line += f", {len(trainer.build_dataset(recipe, tokenizer, rows, fmt, key))} examples tokenized"
            print(line)
        if tokenizer is None:
            print("tokenizing: checked when `align train` loads the tokenizer (not on this machine)")
    else:
        print("data from the hub: checked when `align train` downloads it")
    _check_rewards(recipe, columns)
    _check_rollout_server(recipe)
    if recipe.adapter.kind != "none":
        print(f"adapter: {recipe.adapter.kind} " + ("ok" if _check_adapter(recipe) else
                                                    "checked when `align train` loads the model (not on this machine)"))
    print(f"{args.recipe}: valid {recipe.algorithm} recipe")


def _serve_rollouts(args) -> None:
    from align.builtins import build_for_recipe
    from align.config import load_recipe
    from align.rollout.server import serve

    _refuse_task_file(args.recipe)
    recipe = load_recipe(args.recipe, args.set)
    build_for_recipe(recipe)
    serve(recipe, args.engine, args.host, args.port)


def _is_task_file(path: str) -> bool:
    """A label/revise config (top-level `task:`), not a training recipe; read without importing models."""
    if not path.endswith((".yaml", ".yml")) or not os.path.isfile(path):
        return False
    from align.feedback.config import is_task_file

    return is_task_file(path)


def _refuse_task_file(path: str) -> None:
    if _is_task_file(path):
        from align.feedback.config import read_yaml

        task = read_yaml(path)["task"]
        raise AlignError(f"{path} is an `align {task}` config (task: {task}), not a training recipe; run it with "
                         f"`align {task} {path}`")


def _validate_task(args) -> None:
    """`align validate` of a label/revise config: keys, the constitution, the data rows and their
    `prompt` column, the output file, and the judge's labels when its tokenizer is on this machine."""
    from align.feedback import output
    from align.feedback.config import load_task
    from align.feedback.judge import check_labels_offline
    from align.feedback.policy import load_prompt_rows

    config = load_task(args.recipe, args.set)
    name = {"label": "pairs.jsonl", "revise": "sft.jsonl"}[config.task]
    target = os.path.join(config.output_dir, name)
    if os.path.exists(target) and not args.overwrite:
        output.prepare(config.output_dir, name, False, config.task)  # raises the usual message
    print(f"output_dir: {config.output_dir} ok")
    if config.data.is_local:
        rows = load_prompt_rows(config.data)
        print(f"data: {len(rows)} rows with a prompt column")
    else:
        print("data from the hub: checked when the task downloads it")
    judge = getattr(config, "judge", None)
    if judge is not None:
        print(f"judge: {judge.model}, constitution {judge.constitution} ok; labels "
              + ("ok" if check_labels_offline(judge) else "checked when the judge loads (its tokenizer is not on "
                                                         "this machine)"))
    print(f"{args.recipe}: valid {config.task} config")


def _check_adapter(recipe) -> bool:
    """Check the adapter's module names, rank and dropout against the model's skeleton (built on the meta
    device from its config: no weights are read). False if there is no adapter or no config to read."""
    from align.models.loading import model_skeleton
    from align.models.lora import lora_config

    if recipe.adapter.kind == "none":
        return False
    score = recipe.algorithm == "reward"
    skeleton = model_skeleton(recipe.model, "score" if score else "causal_lm")
    if skeleton is not None:
        lora_config(skeleton, recipe.adapter, "SEQ_CLS" if score else "CAUSAL_LM")
    return skeleton is not None


def _check_rollout_server(recipe) -> None:
    """With sampling.engine: server, the server must answer (an AlignError naming the url if not)."""
    sampling = getattr(recipe.section, "sampling", None)
    if sampling is None or sampling.engine != "server":
        return
    from align.rollout.remote import request

    health = request(sampling.server.url, "GET", "/health", timeout_s=10)
    print(f"rollout server {sampling.server.url}: {health['engine']}, {health['weights']} weights in {health['dtype']}")


def _check_rewards(recipe, columns: dict[str, list[str]]) -> None:
    """Resolve every reward of a GRPO/PPO recipe (imports functions; reads a reward-model directory's
    config, no weights) and check that each function's required parameters are columns of every
    split in `columns`."""
    from align.models.kinds import inspect_checkpoint
    from align.rewards.calling import check_columns, require_rewards
    from align.rewards.loading import (check_reward_model_dir, check_reward_model_kwargs, load_reward_function,
                                       names_a_reward_model, spec_name)

    if not hasattr(recipe.section, "rewards"):
        return
    require_rewards(recipe.section.rewards, f"{recipe.section_key}.rewards")
    for i, entry in enumerate(recipe.section.rewards):
        key = f"{recipe.section_key}.rewards[{i}]"
        if names_a_reward_model(entry.fn):
            check_reward_model_kwargs(entry.kwargs, f"{key}.kwargs")
            path = os.path.expanduser(entry.fn)
            if inspect_checkpoint(path, f"{key}.fn") is None and (not os.path.exists(path)
                                                                  or os.path.isfile(os.path.join(path, "run.json"))):
                print(f"{key}: reward model {entry.fn!r} not there yet (train it first)")
                continue
            check_reward_model_dir(path, f"{key}.fn")
            print(f"{key}: reward model {entry.fn!r} found")
            continue
        fn = load_reward_function(entry.fn, entry.kwargs, key=key)
        for split, names in columns.items():
            check_columns(fn, names, entry.name or spec_name(entry.fn), key, split)
        check = getattr(getattr(fn, "func", fn), "check", None)  # a reward that checks its own kwargs
        note = check(key=f"{key}.kwargs", **entry.kwargs) if callable(check) else None
        print(f"{key}: {entry.fn} ok" + (f" ({note})" if note else ""))


def _label(args) -> None:
    from align.feedback.config import load_task
    from align.feedback.label import run

    stats = run(load_task(args.config, args.set, want="label"), overwrite=args.overwrite)
    print(f"{stats['pairs_written']} pairs from {stats['pairs_judged']} judged ({stats['ties']} ties, both orders "
          f"agree on {stats.get('orders_agree', 0):.0%}) -> {stats['path']}")
    if not stats["pairs_written"]:
        print("warning: no pairs written: every pair was a tie (the judge's choice followed the position, not the "
              "answers) or the completions were all the same; check the judge, or keep ties with --set ties=keep",
              file=sys.stderr)
    print(f"train on them: set data.train.path: {stats['path']} in a dpo or reward recipe")


def _revise(args) -> None:
    from align.feedback.config import load_task
    from align.feedback.revise import run

    stats = run(load_task(args.config, args.set, want="revise"), overwrite=args.overwrite)
    print(f"{stats['rows_written']} revised answers ({stats['changed']} differ from the first answer) -> "
          f"{stats['path']}")
    print(f"train on them: set data.train.path: {stats['path']} in an sft recipe")


def _build(args) -> None:
    from align.builtins import build_builtin

    for name in args.names:
        print(f"{name}: {build_builtin(name)}")


def _export(args) -> None:
    from align.export import export

    export(args.run_dir, args.out_dir)
    print(f"model written to {args.out_dir}")


def _quickstart(args) -> None:
    from align.errors import AlignError
    from align.quickstart import main as quickstart

    if not (Path(args.recipes) / "sft.yaml").is_file():
        raise AlignError(f"--recipes: no sft.yaml in {args.recipes!r}; run `align quickstart` from the repository "
                         "root (it reads recipes/quickstart/ and recipes/data/)")
    quickstart(args.recipes, fresh=args.fresh, seeds=args.seeds)


def _plot(args) -> None:
    from align.plot import plot_metrics

    for path in plot_metrics(args.run_dir, args.out):
        print(path)


def _read_prompts(args) -> list:
    """--prompt values, then the `prompt` of every row of --file (jsonl)."""
    import json
    from pathlib import Path

    prompts = list(args.prompt)
    if args.file:
        try:
            lines = Path(args.file).read_text().splitlines()
        except OSError as error:
            raise AlignError(f"--file: cannot read {args.file!r}: {error.strerror}") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise AlignError(f"--file {args.file} line {n}: not JSON; each line must be an object like "
                                 '{"prompt": "..."}') from None
            if not isinstance(row, dict) or "prompt" not in row:
                raise AlignError(f"--file {args.file} line {n}: no `prompt` key; each line must be an object like "
                                 '{"prompt": "..."} (a string or a list of messages)')
            prompts.append(row["prompt"])
    if not prompts:
        raise AlignError("no prompts: give --prompt TEXT (repeatable) and/or --file prompts.jsonl")
    return prompts


def _generate(args) -> None:
    from align.builtins import build_builtins
    from align.generate import check_sampling, generate

    check_sampling(args.max_new_tokens, args.temperature, args.top_p, args.n, cli=True)  # before the model loads
    build_builtins(args.model)
    prompts = _read_prompts(args)
    texts = generate(args.model, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     top_p=args.top_p, n=args.n, chat=args.chat, seed=args.seed, dtype=args.dtype)
    for i, prompt in enumerate(prompts):
        shown = prompt if isinstance(prompt, str) else prompt[-1].get("content", prompt)
        print(f"### prompt {i}: {shown}")
        for j in range(args.n):
            print(("" if args.n == 1 else f"--- sample {j}:\n") + texts[i * args.n + j])
        print()


def _eval(args) -> None:
    from align.builtins import build_builtins
    from align.generate import check_sampling, evaluate

    build_builtins(args.model)
    check_sampling(args.max_new_tokens, cli=True)
    for flag, value, least in (("--limit", args.limit, 1), ("--show", args.show, 0)):
        if value is not None and value < least:
            raise AlignError(f"{flag}={value}: must be at least {least}")
    if args.out:  # before the model loads: never over a file (a run's metrics.jsonl, the data itself)
        if os.path.exists(args.out):
            raise AlignError(f"--out {args.out!r}: already exists; give a new file (align eval never writes over one)")
        parent = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(parent):
            raise AlignError(f"--out {args.out!r}: its directory {parent!r} does not exist; create it first")
    result = evaluate(args.model, args.data, args.reward, max_new_tokens=args.max_new_tokens, chat=args.chat,
                      limit=args.limit, dtype=args.dtype)
    for i in range(min(args.show, len(result.rows))):
        print(f"### {result.rows[i]['prompt']!r} -> {result.completions[i]!r}  "
              f"rewards {[round(v, 3) for v in result.scores[i].tolist()]}")
    if args.out:
        result.save(args.out)
        print(f"rows with completions and rewards written to {args.out}")
    print(f"{len(result.rows)} prompts from {args.data}, greedy, max {args.max_new_tokens} new tokens")
    for name, mean in result.means.items():
        print(f"{name}: {mean:.4f}")


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
    sub.choices["train"].add_argument("--overwrite", action="store_true",
                                      help="if output_dir holds a previous run, move it aside to "
                                           "OUTPUT_DIR.old-<time> first (it is never deleted)")
    sub.choices["validate"].add_argument("--overwrite", action="store_true",
                                         help="check output_dir as `align train --overwrite` would")
    cmd = sub.add_parser("serve-rollouts", help="sample a recipe's rollouts in a process of its own (on GPUs of its "
                                                "own) for trainers with sampling.engine: server")
    cmd.add_argument("recipe", help="the recipe the trainer runs (its model and sampling settings)")
    cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    cmd.add_argument("--engine", default=None, help="the engine to sample with (default: the recipe's "
                                                    "<algorithm>.sampling.server.engine, vllm)")
    cmd.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; the server has "
                                                         "no authentication: expose it on trusted networks only)")
    cmd.add_argument("--port", type=int, default=8000, help="port (0: any free one, printed at start)")
    cmd.set_defaults(fn=_serve_rollouts)

    for name, fn, text in [("label", _label, "AI feedback: sample K completions per prompt, judge every pair under a "
                                              "constitution (both orders), write preference pairs for dpo/reward"),
                           ("revise", _revise, "Constitutional AI's supervised stage: answers critiqued and revised "
                                               "by the model itself under sampled principles, written as SFT rows")]:
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("config", help=f"a {name} config YAML (task: {name}), e.g. recipes/feedback/{name}_tiny.yaml")
        cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config key, e.g. --set sampling.num_samples=8 (repeatable)")
        cmd.add_argument("--overwrite", action="store_true", help="move an earlier output file aside "
                                                                  "(to <file>.old-<time>) instead of refusing")
        cmd.set_defaults(fn=fn)

    cmd = sub.add_parser("build", help="build a built-in model Align trains itself (builtin:tiny-llama-arith) "
                                       "into the model cache, once")
    cmd.add_argument("names", nargs="+", metavar="NAME", help="builtin:<name>")
    cmd.set_defaults(fn=_build)

    cmd = sub.add_parser("export", help="a plain transformers model directory from a run's LoRA/QLoRA output "
                                        "(merged) or from any checkpoint of a run")
    cmd.add_argument("run_dir", help="an output dir holding an adapter, or a checkpoint "
                                     "(OUTPUT_DIR/checkpoints/step-NNNNNN)")
    cmd.add_argument("out_dir", help="a new (or empty) directory for the merged model")
    cmd.set_defaults(fn=_export)

    cmd = sub.add_parser("plot", help="draw PNG training curves from a run's metrics.jsonl")
    cmd.add_argument("run_dir", help="an output dir holding metrics.jsonl (or the file itself)")
    cmd.add_argument("--out", default=None, metavar="DIR", help="where the PNGs go (default RUN_DIR/plots)")
    cmd.set_defaults(fn=_plot)

    def model_args(cmd: argparse.ArgumentParser) -> None:
        cmd.add_argument("model", help="a run's output dir (full weights or LoRA adapter), a model dir, "
                                       "a hub id or builtin:<name>")
        cmd.add_argument("--max-new-tokens", type=int, default=64)
        cmd.add_argument("--chat", action="store_true", help="wrap string prompts as a user message "
                                                             "in the chat template")
        cmd.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])

    cmd = sub.add_parser("generate", help="sample completions from a trained model")
    model_args(cmd)
    cmd.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    cmd.add_argument("--file", help="a jsonl file of {\"prompt\": ...} rows")
    cmd.add_argument("--temperature", type=float, default=0.0, help="0 (the default) decodes greedily")
    cmd.add_argument("--top-p", type=float, default=1.0)
    cmd.add_argument("--n", type=int, default=1, help="samples per prompt (needs a temperature above 0)")
    cmd.add_argument("--seed", type=int, default=0)
    cmd.set_defaults(fn=_generate)

    cmd = sub.add_parser("eval", help="score a model's greedy completions of a dataset's prompts with rewards")
    model_args(cmd)
    cmd.add_argument("--data", required=True, help="jsonl/json/parquet/csv (or a hub id) with a `prompt` column; "
                                                   "other columns (e.g. answer) go to the rewards")
    cmd.add_argument("--reward", action="append", required=True, metavar="SPEC",
                     help="exact_answer, path/to/file.py:fn, module:fn or a reward-model dir (repeatable)")
    cmd.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows")
    cmd.add_argument("--show", type=int, default=3, help="print the first N completions (default 3)")
    cmd.add_argument("--out", default=None, metavar="FILE.jsonl", help="write every row with its completion "
                                                                       "and rewards")
    cmd.set_defaults(fn=_eval)

    cmd = sub.add_parser("quickstart", help="offline demo: SFT -> RM -> PPO, SFT -> DPO, SFT -> GRPO on a tiny "
                                            "model, then a report (run from the repository root)")
    cmd.add_argument("--recipes", default="recipes/quickstart", help="the stage recipes (default recipes/quickstart)")
    cmd.add_argument("--fresh", action="store_true", help="retrain the pre-training and SFT stages even if their outputs exist")
    cmd.add_argument("--seeds", type=int, default=1, metavar="N",
                     help="run the pipeline with train.seed 0..N-1 (seed k>0 under runs/quickstart/seed<k>/) and report "
                          "each number's mean and spread")
    cmd.set_defaults(fn=_quickstart)
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


def release_processes() -> None:
    """This process's end in a launch (torchrun, accelerate launch) whose command returned: wait for
    the others, then destroy the process group, as torch asks before exit (NCCL warns otherwise).
    Nothing without a group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from accelerate import PartialState

        PartialState().wait_for_everyone()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """The `align` command. Run as the program (argv None), it releases a launch's process group
    once the command returns (`release_processes`); a caller passing argv, which may run several
    commands in one process, keeps it."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    try:
        code = args.fn(args) or 0
    except AlignError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if argv is None:
        release_processes()
    return code


if __name__ == "__main__":
    sys.exit(main())
