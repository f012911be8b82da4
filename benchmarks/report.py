"""From job results to rows of medians and ratios, and a markdown table.

Agreement of the final losses: the held-out loss of Align's and TRL's final models must differ by
at most TOLERANCE[variant] of the loss decrease both achieved from the initial model,
    |L_align - L_trl| <= tol * (L_initial - (L_align + L_trl) / 2),
and that decrease must be real (at least MIN_LEARNED of L_initial); otherwise the row is VOID.
Relative to the decrease, not to the loss, because that is what training changes: two runs that
both learned nothing would agree to many digits on the initial loss.
"""

from __future__ import annotations

import statistics

TOLERANCE = {"default": 0.02, "padding_free": 0.02, "packing": 0.10}
"""Same micro-batches as Align (default, padding_free): 2% of the decrease. TRL's packing builds
other batches (best-fit-decreasing rows) and a slightly different number of steps: 10%."""
MIN_LEARNED = 0.02


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get("ok") and r.get(key) is not None]
    return statistics.median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def agreement(initial: float | None, align: float | None, trl: float | None, variant: str) -> dict:
    if None in (initial, align, trl):
        return {"agree": False, "why": "missing loss"}
    learned = initial - (align + trl) / 2
    gap = abs(align - trl)
    tol = TOLERANCE.get(variant, TOLERANCE["default"])
    if learned < MIN_LEARNED * abs(initial):
        return {"agree": False, "gap_of_decrease": None, "tolerance": tol, "why": "no learning to compare"}
    share = gap / learned
    return {"agree": share <= tol, "gap_of_decrease": share, "tolerance": tol,
            "why": "" if share <= tol else f"losses differ by {share:.1%} of the decrease (tolerance {tol:.0%})"}


WORK_TOLERANCE = 0.02
"""Online RL: completion tokens sampled by the two sides may differ by this share (EOS is rare)."""


def work_agreement(align: list[dict], trl: list[dict]) -> dict:
    """Online RL sides train on their own samples, so no held-out loss can agree; the comparison
    holds when they did the same work: the same optimizer steps and completions, and completion
    tokens within WORK_TOLERANCE."""
    def work(runs: list[dict], key: str) -> float | None:
        values = [r["work"][key] for r in runs if r.get("ok") and r.get("work")]
        return statistics.median(values) if values else None

    steps = (_median(align, "steps"), _median(trl, "steps"))
    completions = (work(align, "completions"), work(trl, "completions"))
    tokens = (work(align, "completion_tokens"), work(trl, "completion_tokens"))
    if None in steps + completions + tokens:
        return {"agree": False, "why": "missing work counts"}
    gap = abs(tokens[0] - tokens[1]) / max(tokens)
    why = []
    if steps[0] != steps[1]:
        why.append(f"steps {steps[0]} vs {steps[1]}")
    if completions[0] != completions[1]:
        why.append(f"completions {completions[0]} vs {completions[1]}")
    if gap > WORK_TOLERANCE:
        why.append(f"completion tokens differ by {gap:.1%} (tolerance {WORK_TOLERANCE:.0%})")
    return {"agree": not why, "tokens_gap": gap, "why": "; ".join(why)}


def summarize(case: str, module, results: list[dict], variants: list[str] | None = None) -> list[dict]:
    """One row per baseline variant of `case` (a module of benchmarks/cases): medians over repeats,
    ratios Align/baseline, floor overheads. Tokens are the case's trained tokens per epoch, or for
    online RL (COMPARE = "work") each side's sampled completion tokens."""
    def runs(side: str, variant: str = "default") -> list[dict]:
        return [r for r in results if r["spec"]["case"] == case and r["spec"]["side"] == side
                and r["spec"]["variant"] == variant]

    def sampled(runs: list[dict]) -> float | None:
        values = [r["work"]["completion_tokens"] for r in runs if r.get("ok") and r.get("work")]
        return statistics.median(values) if values else None

    online = getattr(module, "COMPARE", "loss") == "work"
    align, floor = runs("align"), runs("floor")
    tokens = sampled(align) if online else _median(floor, "tokens")
    initial = _median(floor, "initial_loss")
    a_s, f_s = _median(align, "seconds"), _median(floor, "seconds")
    rows = []
    for variant in variants or module.VARIANTS:
        trl = runs("trl", variant)
        t_s = _median(trl, "seconds")
        t_tokens = sampled(trl) if online else tokens
        a_loss, t_loss = _median(align, "heldout_loss"), _median(trl, "heldout_loss")
        failed = [r["error"] for r in align + trl + floor if not r.get("ok")]
        rows.append({
            "case": case, "trl_variant": variant, "baseline": f"{getattr(module, 'BASELINE', 'TRL')} {variant}",
            "repeats": min(len(align), len(trl)), "tokens_per_epoch": tokens, "online": online,
            "trl_tokens_per_epoch": t_tokens,
            "align_s": a_s, "trl_s": t_s, "floor_s": f_s, "time_ratio": _ratio(a_s, t_s),
            "align_tokens_per_s": _ratio(tokens, a_s), "trl_tokens_per_s": _ratio(t_tokens, t_s),
            "tokens_per_s_ratio": _ratio(_ratio(tokens, a_s), _ratio(t_tokens, t_s)),
            "cpu_time_ratio": _ratio(_median(align, "cpu_seconds"), _median(trl, "cpu_seconds")),
            "align_peak_mb": _mb(_median(align, "peak_bytes")), "trl_peak_mb": _mb(_median(trl, "peak_bytes")),
            "memory_ratio": _ratio(_median(align, "peak_bytes"), _median(trl, "peak_bytes")),
            "memory_growth_ratio": _ratio(_median(align, "growth_bytes"), _median(trl, "growth_bytes")),
            "align_over_floor": _ratio(a_s, f_s) - 1 if _ratio(a_s, f_s) else None,
            "trl_over_floor": _ratio(t_s, f_s) - 1 if _ratio(t_s, f_s) else None,
            "align_steps": _median(align, "steps"), "trl_steps": _median(trl, "steps"),
            "initial_loss": initial, "align_loss": a_loss, "trl_loss": t_loss,
            **(work_agreement(align, trl) if online else agreement(initial, a_loss, t_loss, variant)),
            "failed": failed,
            "align_first_step_s": _median(align, "first_step_s"), "trl_first_step_s": _median(trl, "first_step_s"),
            "floor_first_step_s": _median(floor, "first_step_s"),
            "align_step_s": _median(align, "steady_step_s"), "trl_step_s": _median(trl, "steady_step_s"),
            "floor_step_s": _median(floor, "steady_step_s"),
            "step_ratio": _ratio(_median(align, "steady_step_s"), _median(trl, "steady_step_s")),
            "align_held_mb": _mb(_median(align, "held_between_steps_bytes")),
            "trl_held_mb": _mb(_median(trl, "held_between_steps_bytes")),
            "align_peak_step": _median(align, "peak_step"), "trl_peak_step": _median(trl, "peak_step"),
            "align_largest_batch_tokens": _median(align, "largest_batch_tokens"),
            "trl_largest_batch_tokens": _median(trl, "largest_batch_tokens"),
            "align_log": _first_log(align), "trl_log": _first_log(trl),
            **mfu(module, tokens, a_s, t_s, align + trl),
        })
        rows[-1]["align_steady_mfu"] = steady_mfu(rows[-1], "align")
        rows[-1]["trl_steady_mfu"] = steady_mfu(rows[-1], "trl")
    return rows


def _first_log(runs: list[dict]) -> list[dict]:
    """The first successful run's logged steps ([{"step", "loss", "grad_norm"}]; empty where none)."""
    return next((r.get("train_log") or [] for r in runs if r.get("ok")), [])


def _log_text(log: list[dict], shown: int = 4) -> str:
    return ", ".join(f"{e['step']}: {_fmt(e['loss'], '.4f')} / {_fmt(e['grad_norm'], '.3g')}" for e in log[:shown])


def mfu(module, tokens: float | None, align_s: float | None, trl_s: float | None, runs: list[dict]) -> dict:
    """Model FLOP utilization of full-parameter SFT: 6 x N x tokens / time / peak bf16 FLOP/s, with N
    the parameters in matrix multiplies (`benchmarks.assets.matmul_parameters`) and the peak from
    the device name (`assets.PEAK_BF16_FLOPS`, or $ALIGN_PEAK_FLOPS). Attention's own FLOPs are not
    counted. None where it does not apply: other algorithms, a CPU, an unknown device. (For LoRA or
    QLoRA the 6N rule does not hold: frozen weights need no weight gradients; tokens/s is the
    number to compare there.)"""
    ok = [r for r in runs if r.get("ok")]
    peak = ok[0].get("peak_flops") if ok else None
    params = ok[0].get("matmul_params") if ok else None
    if getattr(module, "ALGORITHM", "") != "sft" or not (peak and params and tokens):
        return {"align_mfu": None, "trl_mfu": None}
    flops = 6 * params * tokens
    return {"align_mfu": flops / align_s / peak if align_s else None,
            "trl_mfu": flops / trl_s / peak if trl_s else None, "matmul_params": params, "peak_flops": peak}


def steady_mfu(row: dict, side: str) -> float | None:
    """MFU of one steady step (`mfu` of the epoch's mean tokens per step over the median step after
    the first): the first step's one-off costs (kernel selection, allocator growth) left out."""
    tokens, steps, step_s = row["tokens_per_epoch"], row[f"{side}_steps"], row[f"{side}_step_s"]
    if row.get("align_mfu") is None or not (tokens and steps and step_s):
        return None
    return 6 * row["matmul_params"] * tokens / steps / step_s / row["peak_flops"]


def _mb(value: float | None) -> float | None:
    return value / 2**20 if value is not None else None


def _fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _outcome(r: dict) -> str:
    if r["online"]:
        return f"{_fmt(r['tokens_per_epoch'], '.0f')} / {_fmt(r['trl_tokens_per_epoch'], '.0f')} tokens"
    return f"{_fmt(r['initial_loss'], '.3f')} → {_fmt(r['align_loss'], '.4f')} / {_fmt(r['trl_loss'], '.4f')}"


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| case | baseline B | time A/B | tok/s A/B | peak mem A/B | mem growth A/B | Align s | B s | floor s "
             "| Align over floor | B over floor | Align tok/s | peak MB A / B | loss init → A / B (online: sampled tokens) | |",
             "|" + "---|" * 15]
    for r in rows:
        status = "FAILED" if r["failed"] else ("ok" if r["agree"] else "VOID")
        lines.append(
            f"| {r['case']} | {r['baseline']} | {_fmt(r['time_ratio'])} | {_fmt(r['tokens_per_s_ratio'])} "
            f"| {_fmt(r['memory_ratio'])} | {_fmt(r['memory_growth_ratio'])} | {_fmt(r['align_s'])} | {_fmt(r['trl_s'])} | {_fmt(r['floor_s'])} "
            f"| {_fmt(r['align_over_floor'], '+.0%')} | {_fmt(r['trl_over_floor'], '+.0%')} "
            f"| {_fmt(r['align_tokens_per_s'], '.0f')} | {_fmt(r['align_peak_mb'], '.0f')} / "
            f"{_fmt(r['trl_peak_mb'], '.0f')} | {_outcome(r)} | {status} |")
    lines += ["", "A: Align; B: the baseline (TRL's trainer, or for ppo Align's own GRPO). Ratios are A/B of medians "
              "over repeats (time and memory: lower is better for Align; tok/s: higher). Peak memory counts the "
              "process (imports and the loaded model included, ~0.5 GB on both sides); mem growth is the peak "
              "minus the memory at the start of training, what training itself adds. Over floor: trainer time / "
              "bare forward+backward+AdamW loop time - 1. VOID: the held-out losses (online RL: the amount of work) "
              "disagree, see `why` in the JSON; FAILED: a job raised."]
    for r in rows:
        if r.get("align_mfu") is not None:
            lines.append(f"- {r['case']} vs {r['baseline']}: MFU Align {_fmt(r['align_mfu'], '.1%')}, "
                         f"{r['baseline']} {_fmt(r['trl_mfu'], '.1%')} (6 x {r['matmul_params'] / 1e6:.0f}M params x "
                         f"tokens / time / {r['peak_flops'] / 1e12:.0f} TFLOP/s bf16 peak); a steady step: "
                         f"Align {_fmt(r['align_steady_mfu'], '.1%')}, B {_fmt(r['trl_steady_mfu'], '.1%')}")
    for r in rows:
        if r.get("align_step_s") is not None:
            lines.append(f"- {r['case']} vs {r['baseline']}: steady step (median after the first) Align "
                         f"{_fmt(r['align_step_s'], '.3f')} s, B {_fmt(r['trl_step_s'], '.3f')} s, floor "
                         f"{_fmt(r['floor_step_s'], '.3f')} s (A/B {_fmt(r['step_ratio'])}); first step (setup "
                         f"in the region included) {_fmt(r['align_first_step_s'])} / {_fmt(r['trl_first_step_s'])} / "
                         f"{_fmt(r['floor_first_step_s'])} s")
    for r in rows:
        if r.get("align_held_mb") is not None:
            lines.append(f"- {r['case']} vs {r['baseline']}: memory held between steps Align "
                         f"{_fmt(r['align_held_mb'], '.0f')} MB, B {_fmt(r['trl_held_mb'], '.0f')} MB; peak reached in "
                         f"step {_fmt(r['align_peak_step'], '.0f')} / {_fmt(r['trl_peak_step'], '.0f')}")
    for r in rows:
        if r.get("align_largest_batch_tokens") and r.get("trl_largest_batch_tokens"):
            lines.append(f"- {r['case']} vs {r['baseline']}: largest micro-batch Align "
                         f"{_fmt(r['align_largest_batch_tokens'], '.0f')} tokens, B "
                         f"{_fmt(r['trl_largest_batch_tokens'], '.0f')} (padding included; activation memory grows with it)")
    for r in rows:
        if len(r.get("align_log") or []) > 1 and len(r.get("trl_log") or []) > 1:
            lines.append(f"- {r['case']} vs {r['baseline']}: logged steps (step: loss / grad norm before clipping) "
                         f"Align {_log_text(r['align_log'])}; B {_log_text(r['trl_log'])}")
    for r in rows:
        if r["failed"] or not r["agree"]:
            lines.append(f"- {r['case']} vs {r['baseline']}: " + ("; ".join(r["failed"]) or r["why"]))
    return "\n".join(lines)
