"""Training curves from a run's metrics.jsonl: one PNG per metric family (loss, lr, reward, KL,
accuracy, grad norm, entropy, completion length), step on the x axis, eval points as markers.

    align plot runs/grpo-tiny            # -> runs/grpo-tiny/plots/*.png

matplotlib is optional (`pip install 'align[plot]'`); it is imported only here, and only its
object API is used (no pyplot), so plotting never changes the caller's matplotlib backend.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from align.errors import AlignError

log = logging.getLogger(__name__)

IGNORED = {"step", "epoch"}


@dataclass(frozen=True)
class Family:
    """One PNG: the metrics that share a y axis."""

    file: str
    title: str
    ylabel: str


FAMILIES = {
    "loss": Family("loss.png", "Loss", "loss"),
    "lr": Family("lr.png", "Learning rate", "learning rate"),
    "reward": Family("reward.png", "Reward", "reward"),
    "kl": Family("kl.png", "KL to the reference", "KL"),
    "accuracy": Family("accuracy.png", "Accuracy", "accuracy"),
    "grad_norm": Family("grad_norm.png", "Gradient norm (before clipping)", "grad norm"),
    "entropy": Family("entropy.png", "Token entropy", "entropy (nats)"),
    "length": Family("completion_length.png", "Completion length", "tokens"),
}
"""Family name -> its file and labels, in the order they are written."""

REWARD_KEYS = {"reward", "score", "reward/mean", "rewards/chosen", "rewards/rejected", "rewards/margin", "margin"}
"""Reward-like keys besides the per-function `rewards/<name>/mean` (GRPO/PPO, reward model, DPO)."""


def family_of(key: str) -> str | None:
    """The family a metrics key is drawn in (`eval/` keys with their train twins), or None."""
    name = key.removeprefix("eval/")
    if key in IGNORED:
        return None
    if "accuracy" in name:
        return "accuracy"
    if name == "loss" or name.endswith("_loss"):
        return "loss"
    if name in ("lr", "grad_norm", "entropy", "kl"):
        return name
    if name == "completions/mean_length":
        return "length"
    if name in REWARD_KEYS or (name.startswith("rewards/") and name.endswith("/mean") and name != "rewards/total/mean"):
        return "reward"
    return None


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl (or of that file given directly). A truncated last line
    (a run killed while writing) is skipped; any other unreadable line is an error naming it."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise AlignError(f"no metrics file at {path}: give the output_dir of an `align train` run "
                         "(it writes metrics.jsonl there as it logs)")
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    records = []
    for n, line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if n == lines[-1][0]:
                log.warning("%s: skipping the truncated last line %d", path, n)
                continue
            raise AlignError(f"{path} line {n} is not JSON ({error}); fix or delete that line") from None
    if not records:
        raise AlignError(f"{path} holds no metrics yet: a run writes a line every train.log_every steps; "
                         "plot again once it has logged")
    return records


def series(records: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """key -> (steps, values) over the records that have it (numbers only, NaN/inf kept as gaps)."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for i, record in enumerate(records):
        step = record.get("step", i + 1)
        for key, value in record.items():
            if key not in IGNORED and isinstance(value, (int, float)) and not isinstance(value, bool):
                xs, ys = out.setdefault(key, ([], []))
                xs.append(step)
                ys.append(float(value))
    return out


def _figure():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise AlignError("plotting needs matplotlib: pip install 'align[plot]'") from None
    return Figure(figsize=(7, 4.4), dpi=120, layout="constrained")


SMOOTH_ABOVE = 20
"""Train curves with more points than this are drawn faintly, under their trailing mean."""


def rolling_mean(values: list[float], window: int) -> list[float]:
    """Mean of the last `window` values at every point (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _draw(ax, key: str, steps: list[float], values: list[float], color: str, label: str) -> None:
    """Train curves as lines (per-function rewards dashed; long noisy ones faint, under a trailing
    mean); eval points as hollow circles joined by a dotted line, in the colour of their train twin."""
    if key.startswith("eval/"):
        ax.plot(steps, values, color=color, marker="o", markersize=7, markerfacecolor="white", markeredgewidth=1.8,
                linewidth=1, linestyle=":", label=label, zorder=3)
        return
    style = dict(color=color, linestyle="--" if key.startswith("rewards/") and key.endswith("/mean") else "-")
    if len(steps) <= SMOOTH_ABOVE or key == "lr":
        ax.plot(steps, values, linewidth=1.6, marker="." if len(steps) <= 30 else None, label=label, **style)
        return
    window = max(2, len(steps) // 10)
    ax.plot(steps, values, linewidth=1, alpha=0.3, **style)
    ax.plot(steps, rolling_mean(values, window), linewidth=1.8, label=f"{label} (mean of {window} logs)", **style)


def _merge_duplicates(curves: dict[str, tuple[list[float], list[float]]]) -> dict[str, str]:
    """key -> legend label, dropping curves identical to an earlier one (e.g. `reward` and
    `rewards/exact_answer/mean` with a single reward function): the kept label names both."""
    labels: dict[str, str] = {}
    for key in sorted(curves, key=lambda k: (k.startswith("eval/"), k)):  # train first, then eval
        twin = next((k for k in labels if curves[k] == curves[key]), None)
        if twin is not None:
            labels[twin] += f" = {key.removeprefix('eval/')}"
        else:
            labels[key] = key.replace("eval/", "eval: ", 1)
    return labels


def plot_metrics(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write one PNG per metric family present in RUN_DIR/metrics.jsonl into `out_dir`
    (default RUN_DIR/plots); returns the files written, in FAMILIES order."""
    records = read_metrics(run_dir)
    run = Path(run_dir)
    run_name = (run.parent if run.is_file() else run).resolve().name
    out = Path(out_dir) if out_dir is not None else (run.parent if run.is_file() else run) / "plots"
    grouped: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for key, xy in series(records).items():
        name = family_of(key)
        if name is not None:
            grouped.setdefault(name, {})[key] = xy
    if not grouped:
        keys = sorted({k for r in records for k in r} - IGNORED)
        raise AlignError(f"{run_dir}: no plottable metrics (keys: {', '.join(keys)}); "
                         f"align plot draws {', '.join(FAMILIES)}")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in FAMILIES:
        if name in grouped:
            written.append(_plot_family(name, grouped[name], records, run_name, out))
    return written


def _plot_family(name: str, curves: dict[str, tuple[list[float], list[float]]], records: list[dict],
                 run_name: str, out: Path) -> Path:
    """One family's PNG: its curves (an eval curve in its train twin's colour), labels and legend."""
    family = FAMILIES[name]
    fig = _figure()
    ax = fig.add_subplot()
    labels = _merge_duplicates(curves)
    bases = list(dict.fromkeys(k.removeprefix("eval/") for k in labels))
    for key, label in labels.items():
        _draw(ax, key, *curves[key], color=f"C{bases.index(key.removeprefix('eval/')) % 10}", label=label)
    if name == "length":
        _length_band(ax, records)
    if name == "accuracy" and all(0 <= v <= 1 for _, values in curves.values() for v in values):
        ax.set_ylim(-0.03, 1.03)
    if name == "lr":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.set_title(f"{family.title} ({run_name})")
    ax.set_xlabel("step")
    ax.set_ylabel(family.ylabel)
    ax.grid(alpha=0.3)
    longest = max(len(label) for label in ax.get_legend_handles_labels()[1])
    fig.legend(loc="outside lower center", ncols=2 if longest <= 36 else 1, fontsize="small",
               frameon=False)  # below the axes: never over a curve
    path = out / family.file
    fig.savefig(path)
    return path


def _length_band(ax, records: list[dict]) -> None:
    """Shade min..max completion length around the mean, where the records have them."""
    rows = [(r["step"], r["completions/min_length"], r["completions/max_length"]) for r in records
            if "completions/min_length" in r and "completions/max_length" in r and "step" in r]
    if rows:
        steps, low, high = zip(*rows)
        ax.fill_between(steps, low, high, color="C0", alpha=0.15, label="completions/min..max_length")
