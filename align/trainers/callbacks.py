"""Callbacks: what happens around the loop without being the loop (progress bar, metrics file)."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

from tqdm.auto import tqdm


log = logging.getLogger(__name__)


class Callback:
    """Override any of these; `trainer` is the running Trainer, `record` a flat dict of floats.
    Under several processes every process calls them with the same record; write files only where
    `trainer.accelerator.is_main_process`."""

    def on_train_begin(self, trainer) -> None: ...

    def on_log(self, trainer, record: dict) -> None: ...

    def on_train_end(self, trainer) -> None: ...


class MetricsFile(Callback):
    """Appends every record, tagged with the run id, to OUTPUT_DIR/metrics.jsonl: a new run starts
    the file afresh; a resumed one keeps its own records up to its checkpoint and drops those past
    it, and lines a kill left unreadable (a truncated last line)."""

    def on_train_begin(self, trainer) -> None:
        self.path = Path(trainer.recipe.output_dir) / "metrics.jsonl"
        self.enabled = trainer.accelerator.is_main_process
        if self.enabled and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if trainer.step > 0 and self.kept(line, trainer)]
            self.path.write_text("".join(line + "\n" for line in kept))

    def kept(self, line: str, trainer) -> bool:
        """Whether a resumed run keeps this line: a record of its own run up to its checkpoint."""
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s: dropping an unreadable line (a run killed while writing it): %.80s", self.path, line)
            return False
        return record.get("run_id") == trainer.run_id and record.get("step", 0) <= trainer.step

    def on_log(self, trainer, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({**record, "run_id": trainer.run_id}) + "\n")


class ProgressBar(Callback):
    """A tqdm bar over optimizer steps showing loss, lr, tokens/s and the trainer's headline metrics."""

    SHOWN = ("loss", "eval/loss", "lr", "tokens_per_s", "rewards/accuracy", "reward", "kl")

    def on_train_begin(self, trainer) -> None:
        self.bar = tqdm(total=trainer.total_steps, initial=trainer.step, desc=trainer.recipe.algorithm,
                        dynamic_ncols=True, disable=not trainer.accelerator.is_main_process)
        self.shown: dict[str, str] = {}

    def on_log(self, trainer, record: dict) -> None:
        self.bar.update(trainer.step - self.bar.n)
        for key in self.SHOWN:
            if key in record:
                self.shown[key] = f"{record[key]:.3g}" if key != "tokens_per_s" else f"{record[key]:.0f}"
        self.bar.set_postfix(self.shown, refresh=True)

    def on_train_end(self, trainer) -> None:
        self.bar.close()


class Plots(Callback):
    """PNG curves of metrics.jsonl in OUTPUT_DIR/plots when training ends (see `align plot`)."""

    def on_train_end(self, trainer) -> None:
        if not trainer.accelerator.is_main_process:
            return
        if importlib.util.find_spec("matplotlib") is None:
            log.info("matplotlib is not installed: no plots (pip install 'align[plot]', then `align plot %s`)",
                     trainer.output_dir)
            return
        from align.plot import plot_metrics

        plot_metrics(trainer.output_dir)
