"""Align vs TRL, side by side: `python -m benchmarks.run [--smoke] [--cases sft,rm,dpo] [--repeats 3] [--model 0.5b]`.

For every case and repeat, each side (Align, every TRL variant, the bare floor loop) runs once in
its own fresh process, in alternating order (reversed on odd repeats, so slow drift of a shared
machine hits both). Writes results/<date>-<machine>.json (every job) and .md (the table), and
prints the table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import report
from benchmarks.assets import PRESETS as MODEL_PRESETS
from benchmarks.assets import cache_root, model_dirs, write_jsonl
from benchmarks.cases import CASES
from benchmarks.common import Spec

# Per case: data sizes and hyper-parameters. --scale multiplies n_train (use it on a GPU).
PRESETS = {
    "sft": dict(n_train=128, n_eval=32, batch_size=8, grad_accum=1, lr=1e-3, max_length=512),
    "rm": dict(n_train=64, n_eval=32, batch_size=4, grad_accum=1, lr=1e-4, max_length=512),
    "dpo": dict(n_train=32, n_eval=32, batch_size=4, grad_accum=1, lr=1e-5, max_length=512),
    # n_train prompts, G=8 completions of 64 tokens each; batch_size counts completions (4 prompts per step)
    "grpo": dict(n_train=16, n_eval=4, batch_size=16, grad_accum=2, lr=1e-6, max_length=512, beta=0.0,
                 group_size=8, max_new_tokens=64),
    # the grpo case's prompts, each 8 times (PPO samples one completion per prompt): the same work
    "ppo": dict(n_train=16, n_eval=4, batch_size=16, grad_accum=2, lr=1e-6, max_length=512, beta=0.0,
                max_new_tokens=64),
    # many short chats (~17 tokens), 64 per optimizer step: packing must not cost more than padding
    "sft_long": dict(n_train=16, n_eval=8, batch_size=4, grad_accum=1, lr=1e-3, max_length=2048, pack_length=4096,
                     context_lines=(1, 60)),
    "sft_short": dict(n_train=64 * 100, n_eval=64, batch_size=64, grad_accum=1, lr=1e-3, max_length=512),
    # GRPO with a KL reference (beta > 0: a frozen reference forward on both sides) and short prompts
    "grpo_kl": dict(n_train=16, n_eval=4, batch_size=16, grad_accum=2, lr=1e-6, max_length=512, beta=0.04,
                    group_size=8, max_new_tokens=64, context_lines=(0, 1)),
}
GPU_PRESETS = {
    # ~14k trained tokens per optimizer step (128 chats of ~110 tokens; ~18k under the Qwen2 presets'
    # tokenizer, see assets.py), 8 steps
    "sft": dict(n_train=128 * 8, n_eval=32, batch_size=32, grad_accum=4, lr=1e-5, max_length=1024),
    "sft_short": dict(n_train=64 * 40, n_eval=64, batch_size=64, grad_accum=1, lr=1e-5, max_length=512),
    # the MFU case: ~18k tokens per optimizer step under the Qwen2 presets' tokenizer (2 micro-batches of
    # 9 chats of ~1k tokens, packed into rows of up to 8192 tokens), 8 steps; run it with --model 1.5b
    "sft_long": dict(n_train=18 * 8, n_eval=16, batch_size=9, grad_accum=2, lr=1e-5, max_length=2048,
                     pack_length=8192, context_lines=(1, 60)),
    # pairs with ~1k-token prompts, 8 per step
    "rm": dict(n_train=8 * 8, n_eval=16, batch_size=8, grad_accum=1, lr=1e-5, max_length=2048, context_lines=(60, 80)),
    "dpo": dict(n_train=8 * 8, n_eval=16, batch_size=8, grad_accum=1, lr=1e-5, max_length=2048, context_lines=(60, 80)),
    # 64 completions of 256 tokens per optimizer step (8 prompts x G=8), 4 steps
    "grpo": dict(n_train=8 * 4, n_eval=4, batch_size=32, grad_accum=2, lr=1e-6, max_length=2048, beta=0.0,
                 group_size=8, max_new_tokens=256),
    "ppo": dict(n_train=8 * 4, n_eval=4, batch_size=32, grad_accum=2, lr=1e-6, max_length=2048, beta=0.0,
                max_new_tokens=256),
    "grpo_kl": dict(n_train=8 * 4, n_eval=4, batch_size=32, grad_accum=2, lr=1e-6, max_length=2048, beta=0.04,
                    group_size=8, max_new_tokens=256, context_lines=(0, 1)),
}
"""Workloads for the GPU-sized --model presets (0.5b, 1.5b): what a GPU user trains per step."""
SMOKE = {
    "sft": dict(n_train=12, n_eval=6, batch_size=4),
    "sft_long": dict(n_train=12, n_eval=4, batch_size=4, context_lines=(1, 8)),
    "sft_short": dict(n_train=64, n_eval=8, batch_size=32),
    "grpo_kl": dict(n_train=4, n_eval=2, batch_size=8, grad_accum=1, max_new_tokens=16),
    "rm": dict(n_train=8, n_eval=6, batch_size=4, context_lines=(3, 6)),
    "dpo": dict(n_train=8, n_eval=6, batch_size=4, context_lines=(3, 6)),
    "grpo": dict(n_train=4, n_eval=2, batch_size=8, grad_accum=1, max_new_tokens=16, context_lines=(1, 3)),
    "ppo": dict(n_train=4, n_eval=2, batch_size=8, grad_accum=1, max_new_tokens=16, context_lines=(1, 3)),
}
DATA_KEYS = ("n_train", "n_eval", "context_lines")


def machine_name() -> str:
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    else:
        import os

        name = f"cpu{os.cpu_count()}-{platform.machine()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def prepare_case(name: str, settings: dict, work: Path, model: str = "tiny") -> dict:
    """Write the case's data once; return the Spec fields every job of the case shares."""
    case = CASES[name]
    extra = {"context_lines": settings["context_lines"]} if "context_lines" in settings else {}
    train, evaluation = case.data(settings["n_train"], settings["n_eval"], **extra)
    if model == "tiny" and hasattr(case, "CPU_MODEL"):  # the case's own CPU model, e.g. builtin:tiny-llama
        from align.models.tiny import resolve

        model_dir = resolve(case.CPU_MODEL)
    else:
        model_dir = str(model_dirs(model, (case.MODEL,))[case.MODEL])
    return dict(case=name, model_dir=model_dir,
                train_path=write_jsonl(train, work / name / "train.jsonl"),
                eval_path=write_jsonl(evaluation, work / name / "eval.jsonl"),
                **{k: v for k, v in settings.items() if k not in DATA_KEYS})


def variants(name: str, only: list[str] | None = None) -> list[str]:
    """The case's baseline variants, or those of them named in `only` (its first if none is named)."""
    all_ = list(CASES[name].VARIANTS)
    return all_ if not only else ([v for v in all_ if v in only] or all_[:1])


def sides(name: str, only: list[str] | None = None) -> list[tuple[str, str]]:
    case = CASES[name]
    floor = [("floor", "default")] if hasattr(case, "floor") else []
    return [("align", "default")] + [("trl", v) for v in variants(name, only)] + floor


def run_job(spec: Spec, timeout: float) -> dict:
    Path(spec.run_dir).mkdir(parents=True, exist_ok=True)
    spec_path, result_path = Path(spec.run_dir) / "spec.json", Path(spec.run_dir) / "result.json"
    spec_path.write_text(json.dumps(dataclasses.asdict(spec)))
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.worker", str(spec_path), str(result_path)],
                              capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).parent.parent)
        if result_path.exists():
            result = json.loads(result_path.read_text())
        else:
            result = {"ok": False, "error": f"worker exited {proc.returncode}: {proc.stderr[-2000:]}",
                      "spec": dataclasses.asdict(spec)}
    except subprocess.TimeoutExpired:
        result = {"ok": False, "error": f"timed out after {timeout:.0f}s", "spec": dataclasses.asdict(spec)}
    result["process_s"] = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="one repeat, tiny data: checks the harness runs")
    parser.add_argument("--model", default="tiny", choices=sorted(MODEL_PRESETS),
                        help="model preset (random init, built offline): tiny (CPU), 0.5b / 0.5b-32k / 1.5b "
                             "(Qwen2 shapes, run with the GPU workloads of GPU_PRESETS)")
    parser.add_argument("--variants", default="",
                        help="comma-separated baseline variants to run (e.g. default); a case with none of "
                             "them runs its first. Default: every variant")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every case's number of training rows")
    parser.add_argument("--set", action="append", default=[], metavar="CASE.KEY=VALUE",
                        help="override a preset, e.g. --set sft.batch_size=32 --set dpo.lr=5e-6")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="results directory")
    parser.add_argument("--tag", default="", help="appended to the results file name")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per job")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per job (0: all cores); 1 keeps a shared machine's noise down")
    parser.add_argument("--jobs", type=int, default=1,
                        help="with --smoke: run this many jobs at once, one torch thread each (a quicker check "
                             "that the harness works; the timings then mean nothing)")
    parser.add_argument("--profile", action="store_true",
                        help="also run each job under torch's profiler (slower: not for timings) and write "
                             "the top operations to <out>/<stem>-profile.txt")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (data, job outputs)")
    args = parser.parse_args(argv)
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    repeats = 1 if args.smoke else args.repeats
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.jobs > 1 and (not args.smoke or args.profile):
        parser.error("--jobs > 1 needs --smoke and no --profile: jobs that share the machine time each other's "
                     "noise, and their profiles would interleave in one file")
    threads = args.threads or (1 if args.jobs > 1 else 0)
    only = [v.strip() for v in args.variants.split(",") if v.strip()]

    cache_root().mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=cache_root()))
    model_dirs(args.model, tuple({CASES[name].MODEL for name in names if args.model != "tiny"
                                  or not hasattr(CASES[name], "CPU_MODEL")}))  # built once, before any job
    workloads = PRESETS if args.model == "tiny" else GPU_PRESETS
    settings = {name: {**workloads[name], **(SMOKE[name] if args.smoke else {})} for name in names}
    for item in args.set:
        key, _, value = item.partition("=")
        name, _, field = key.partition(".")
        defaults = {f.name: f.default for f in dataclasses.fields(Spec)  # (threads: the --threads flag)
                    if f.default is not dataclasses.MISSING and f.name != "threads"}
        if name not in settings or (field not in settings[name] and field not in defaults):
            parser.error(f"--set {item!r}: expected CASE.KEY=VALUE with KEY one of "
                         f"{sorted(set(PRESETS['sft']) | set(defaults))}")
        old = settings[name].get(field, defaults.get(field))
        old = 0 if old is None else old  # (pack_length: None by default, an int when set)
        if isinstance(old, bool):  # (bool("false") is True)
            if value.lower() not in ("true", "false"):
                parser.error(f"--set {item!r}: {field} is true or false")
            settings[name][field] = value.lower() == "true"
        else:
            settings[name][field] = tuple(int(v) for v in value.split(",")) if isinstance(old, tuple) else type(old)(value)
    for name in names:
        budget = settings[name].get("micro_batch_tokens", "")
        if budget and not (budget.isdigit() and int(budget) > 0 or budget == "trl_row" and name.startswith("sft")):
            parser.error(f"--set {name}.micro_batch_tokens={budget!r}: a positive number of tokens"
                         + (", or trl_row (TRL packing's row length)" if name.startswith("sft") else ""))
        if settings[name].get("precision", "auto") not in ("auto", "bf16", "fp32"):
            parser.error(f"--set {name}.precision={settings[name]['precision']!r}: auto, bf16 or fp32")
        if settings[name].get("checkpoint_mode", "full") != "full" and not settings[name].get("checkpointed_layers"):
            parser.error(f"--set {name}.checkpoint_mode needs --set {name}.checkpointed_layers=F (the fraction "
                         "of the layers it applies to; 1: every layer)")
    shared = {}
    for name in names:
        settings[name]["n_train"] = max(1, round(settings[name]["n_train"] * args.scale))
        shared[name] = prepare_case(name, settings[name], work, args.model)

    stamp = datetime.date.today().isoformat()
    machine = machine_name()
    model_tag = "" if args.model == "tiny" else f"-{args.model}"
    stem = (f"{stamp}-{machine}{model_tag}" + ("-smoke" if args.smoke else "") + (f"-{args.tag}" if args.tag else ""))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.profile:  # read by each worker (benchmarks.worker.profiled)
        os.environ["ALIGN_BENCH_PROFILE"] = str((out / f"{stem}-profile.txt").resolve())
    jobs = [(repeat, name, side, variant) for repeat in range(repeats) for name in names
            for side, variant in (sides(name, only) if repeat % 2 == 0 else sides(name, only)[::-1])]

    def run_one(job: tuple) -> dict:
        repeat, name, side, variant = job
        run_dir = work / f"{name}-{side}-{variant}-r{repeat}"
        result = run_job(Spec(side=side, variant=variant, run_dir=str(run_dir), threads=threads, **shared[name]),
                         args.timeout)
        status = f"{result['seconds']:.2f}s" if result.get("ok") else "FAILED: " + result["error"][:300]
        print(f"[{repeat + 1}/{repeats}] {name:4s} {side:5s} {variant:12s} {status}", flush=True)
        return result

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:  # (each job is a process)
        results = list(pool.map(run_one, jobs))

    rows = [row for name in names for row in report.summarize(name, CASES[name], results, variants(name, only))]
    header = (f"## Align vs TRL: {machine}, {stamp}" + (" (smoke)" if args.smoke else "")
              + f"\n\n{repeats} repeat(s); model {args.model}; cases: {', '.join(names)}; scale {args.scale}; "
              f"threads per job: {threads or 'all'}")
    table = report.markdown(rows, header)
    payload = {"machine": machine, "date": stamp, "smoke": args.smoke, "repeats": repeats, "scale": args.scale,
               "model": args.model,
               "settings": settings,
               "tolerance": report.TOLERANCE, "python": sys.version.split()[0], "versions": _versions(),
               "tokenizers": {name: tokenizer_fingerprint(shared[name]["model_dir"]) for name in names},
               "rows": rows, "jobs": results}
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1, default=str))
    (out / f"{stem}.md").write_text(table + "\n")
    print("\n" + table)
    print(f"\nwrote {out / stem}.json and .md")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return payload


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def tokenizer_fingerprint(model_dir: str) -> str:
    """The first 16 hex digits of a sha256 over a model directory's tokenizer files (vocabulary,
    merges, chat template; the built-in tokenizer is trained when the model is built, and a different
    digest may also be only another `tokenizers` version's serialization). Equal files tokenize alike
    only under the same tokenizer class, which transformers picks from the model's type: each job
    records the class it loaded (`tokenizer_class`)."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = Path(model_dir) / name
        if path.exists():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _versions() -> dict:
    """Installed versions; a package installed without its metadata (`pip install --target`, a
    source checkout on sys.path) falls back to its module's `__version__`, else "unknown"."""
    import importlib
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "tokenizers", "trl", "accelerate", "peft", "align"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            try:
                out[name] = str(getattr(importlib.import_module(name), "__version__", "unknown"))
            except ImportError:
                out[name] = "not installed"
    return out


if __name__ == "__main__":
    sys.exit(1 if any(not job["ok"] for job in main()["jobs"]) else 0)  # a failed job fails the run
