"""Align vs TRL, side by side: `python -m benchmarks.run [--smoke] [--cases sft,rm,dpo] [--repeats 3]`.

For every case and repeat, each side (Align, every TRL variant, the bare floor loop) runs once in
its own fresh process, in alternating order (reversed on odd repeats, so slow drift of a shared
machine hits both). Writes results/<date>-<machine>.json (every job) and .md (the table), and
prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import report
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
}
SMOKE = {
    "sft": dict(n_train=12, n_eval=6, batch_size=4),
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


def prepare_case(name: str, settings: dict, work: Path) -> dict:
    """Write the case's data once; return the Spec fields every job of the case shares."""
    case = CASES[name]
    extra = {"context_lines": settings["context_lines"]} if "context_lines" in settings else {}
    train, evaluation = case.data(settings["n_train"], settings["n_eval"], **extra)
    return dict(case=name, model_dir=str(model_dirs()[case.MODEL]),
                train_path=write_jsonl(train, work / name / "train.jsonl"),
                eval_path=write_jsonl(evaluation, work / name / "eval.jsonl"),
                **{k: v for k, v in settings.items() if k not in DATA_KEYS})


def sides(name: str) -> list[tuple[str, str]]:
    case = CASES[name]
    floor = [("floor", "default")] if hasattr(case, "floor") else []
    return [("align", "default")] + [("trl", v) for v in case.VARIANTS] + floor


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
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every case's number of training rows")
    parser.add_argument("--set", action="append", default=[], metavar="CASE.KEY=VALUE",
                        help="override a preset, e.g. --set sft.batch_size=32 --set dpo.lr=5e-6")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="results directory")
    parser.add_argument("--tag", default="", help="appended to the results file name")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per job")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per job (0: all cores); 1 keeps a shared machine's noise down")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (data, job outputs)")
    args = parser.parse_args(argv)
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    repeats = 1 if args.smoke else args.repeats

    cache_root().mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=cache_root()))
    model_dirs()  # build the model once, before any job
    settings = {name: {**PRESETS[name], **(SMOKE[name] if args.smoke else {})} for name in names}
    for item in args.set:
        key, _, value = item.partition("=")
        name, _, field = key.partition(".")
        if name not in settings or field not in settings[name]:
            parser.error(f"--set {item!r}: expected CASE.KEY=VALUE with KEY one of {sorted(PRESETS['sft'])}")
        settings[name][field] = type(settings[name][field])(value)
    shared = {}
    for name in names:
        settings[name]["n_train"] = max(1, round(settings[name]["n_train"] * args.scale))
        shared[name] = prepare_case(name, settings[name], work)

    results = []
    for repeat in range(repeats):
        for name in names:
            order = sides(name) if repeat % 2 == 0 else sides(name)[::-1]
            for side, variant in order:
                run_dir = work / f"{name}-{side}-{variant}-r{repeat}"
                spec = Spec(side=side, variant=variant, run_dir=str(run_dir), threads=args.threads, **shared[name])
                result = run_job(spec, args.timeout)
                results.append(result)
                status = f"{result['seconds']:.2f}s" if result.get("ok") else "FAILED: " + result["error"][:300]
                print(f"[{repeat + 1}/{repeats}] {name:4s} {side:5s} {variant:12s} {status}", flush=True)

    rows = [row for name in names for row in report.summarize(name, CASES[name], results)]
    stamp = datetime.date.today().isoformat()
    machine = machine_name()
    stem = f"{stamp}-{machine}" + ("-smoke" if args.smoke else "") + (f"-{args.tag}" if args.tag else "")
    header = (f"## Align vs TRL: {machine}, {stamp}" + (" (smoke)" if args.smoke else "")
              + f"\n\n{repeats} repeat(s); cases: {', '.join(names)}; scale {args.scale}; "
              f"threads per job: {args.threads or 'all'}")
    table = report.markdown(rows, header)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine, "date": stamp, "smoke": args.smoke, "repeats": repeats, "scale": args.scale,
               "settings": settings,
               "tolerance": report.TOLERANCE, "python": sys.version.split()[0], "versions": _versions(),
               "rows": rows, "jobs": results}
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1, default=str))
    (out / f"{stem}.md").write_text(table + "\n")
    print("\n" + table)
    print(f"\nwrote {out / stem}.json and .md")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return payload


def _versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "transformers", "trl", "accelerate", "align")}


if __name__ == "__main__":
    main()
