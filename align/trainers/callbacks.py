"""Callbacks: what happens around the loop without being the loop (progress bar, metrics file)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

from tqdm.auto import tqdm

from align.config import flat_keys
from align.errors import AlignError


log = logging.getLogger(__name__)


class Callback:
    """Override any of these; `trainer` is the running Trainer, `record` a flat dict of floats.
    Under several processes every process calls them with the same record; write files only where
    `trainer.accelerator.is_main_process`."""

    def on_train_begin(self, trainer) -> None: ...

    def on_log(self, trainer, record: dict) -> None: ...

    def on_samples(self, trainer, samples: list[dict]) -> None:
        """An evaluation's greedy samples ({"prompt", "completion", ...}, as samples.jsonl holds them);
        main process only."""

    def on_train_end(self, trainer) -> None:
        """Training finished, or a signal stopped it after its checkpoint."""


def own_lines(path: Path, run_id: str | None, before_step: int) -> list[str]:
    """The lines of a run's JSONL file (metrics.jsonl, samples.jsonl) that a resumed run keeps: its
    own run's records from steps before `before_step`; lines a kill left unreadable (a truncated
    last line) are dropped with a warning."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s: dropping an unreadable line (a run killed while writing it): %.80s", path, line)
            continue
        if record.get("run_id") == run_id and record.get("step", 0) < before_step:
            kept.append(line)
    return kept


class MetricsFile(Callback):
    """Appends every record, tagged with the run id, to OUTPUT_DIR/metrics.jsonl: a new run starts
    the file afresh; a resumed one keeps its own records up to its checkpoint and drops those past
    it, and lines a kill left unreadable (a truncated last line)."""

    def on_train_begin(self, trainer) -> None:
        self.path = Path(trainer.recipe.output_dir) / "metrics.jsonl"
        self.enabled = trainer.accelerator.is_main_process
        if self.enabled and self.path.exists():
            kept = own_lines(self.path, trainer.run_id, trainer.step + 1) if trainer.step > 0 else []
            try:
                self.path.write_text("".join(line + "\n" for line in kept))
            except OSError as error:
                raise AlignError(f"could not write {self.path} ({error.strerror or error}); free some space "
                                 "(or fix its permissions) and run again") from None

    def on_log(self, trainer, record: dict) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps({**record, "run_id": trainer.run_id}) + "\n")
        except OSError as error:  # (a full disk: the weights matter more than the log; the saves say so)
            log.error("could not write step %s's record to %s (%s); training goes on", record.get("step"),
                      self.path, error.strerror or error)


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

        try:
            plot_metrics(trainer.output_dir)
        except OSError as error:  # (a full disk, after the weights are saved)
            log.error("could not draw the plots in %s (%s); draw them later with `align plot %s`",
                      trainer.output_dir / "plots", error.strerror or error, trainer.output_dir)


class Trackers(Callback):
    """Sends every logged record (its numbers; the dict MetricsFile writes) to experiment trackers
    through accelerate's tracker classes (`accelerate.tracking`), on the main process: the recipe,
    flattened, as the run's configuration, then `log(values, step=record["step"])`, and `finish()`
    at the end. Logging dir OUTPUT_DIR/trackers; the run is named after the run id (TensorBoard:
    trackers/<run id>; wandb/trackio: project = output_dir's name, run name = run id; mlflow:
    experiment = output_dir's name, run = run id). A resumed run continues its own TensorBoard
    directory (events past the checkpoint purged) and its wandb run.

    Nothing is imported until training begins; a tracker whose package is missing is an AlignError
    here, when the trainer is built."""

    PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
                "trackio": ("trackio",)}
    """report_to name -> the importable packages that serve it (the first is the one to pip install)."""

    def __init__(self, names: list[str]):
        self.names = list(dict.fromkeys(names))
        for name in self.names:
            if name not in self.PACKAGES:
                raise AlignError(f"train.report_to: unknown tracker {name!r}; choose from {sorted(self.PACKAGES)}")
            if not any(importlib.util.find_spec(package) for package in self.PACKAGES[name]):
                raise AlignError(f"train.report_to: {name} needs the {self.PACKAGES[name][0]!r} package, which "
                                 f"is not installed: pip install {self.PACKAGES[name][0]}")
        self.trackers: list = []

    def on_train_begin(self, trainer) -> None:
        self.finish()
        if not trainer.accelerator.is_main_process:
            return
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        directory = Path(trainer.output_dir) / "trackers"
        directory.mkdir(parents=True, exist_ok=True)
        project, run = Path(trainer.output_dir).resolve().name, str(trainer.run_id or "run")
        # the types every tracker's store_init_configuration takes: lists and None as text
        config = {key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
                  for key, value in flat_keys(trainer.recipe.model_dump(mode="json")).items()}
        for name in self.names:
            tracker = LOGGER_TYPE_TO_CLASS[name](**self.options(name, trainer, directory, project, run))
            tracker.start()
            tracker.store_init_configuration(config)
            self.trackers.append(tracker)

    @staticmethod
    def options(name: str, trainer, directory: Path, project: str, run: str) -> dict:
        """The tracker class's constructor arguments."""
        if name == "tensorboard":  # a resumed run drops the events its killed part logged past the checkpoint
            return {"run_name": run, "logging_dir": str(directory),
                    **({"purge_step": trainer.step + 1} if trainer.step else {})}
        if name == "wandb":
            return {"run_name": project, "name": run, "id": run, "resume": "allow", "dir": str(directory)}
        if name == "mlflow":  # artifacts (the samples tables) in the run's directory, not in the current one
            if not os.environ.get("MLFLOW_TRACKING_URI"):
                import mlflow

                mlflow.set_tracking_uri(Trackers.local_mlflow_uri(directory))
            return {"experiment_name": project, "run_name": run,
                    "logging_dir": (directory / "mlartifacts").resolve().as_uri()}
        return {"run_name": project, "name": run}  # trackio

    @staticmethod
    def local_mlflow_uri(directory: Path) -> str:
        """mlflow's store under OUTPUT_DIR/trackers when MLFLOW_TRACKING_URI is not set: a SQLite
        database where sqlalchemy is installed (full mlflow; recent versions refuse the file store),
        else the file store (mlflow-skinny; recent versions then ask for MLFLOW_ALLOW_FILE_STORE=true)."""
        if importlib.util.find_spec("sqlalchemy") is not None:
            return f"sqlite:///{(directory / 'mlflow.db').resolve()}"
        return (directory / "mlruns").resolve().as_uri()

    def on_log(self, trainer, record: dict) -> None:
        if not self.trackers:
            return
        values = {k: v for k, v in record.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in self.trackers:
            tracker.log(values, step=int(record["step"]))

    def on_samples(self, trainer, samples: list[dict]) -> None:
        """The samples as a table at this step: a markdown table in TensorBoard's text tab, a wandb or
        trackio Table, an mlflow table artifact (samples/step_<step>.json)."""
        if not self.trackers:
            return
        columns = list(dict.fromkeys(key for sample in samples for key in sample))
        rows = [[value if isinstance(value, (str, int, float)) or value is None else json.dumps(value)
                 for value in (sample.get(key) for key in columns)] for sample in samples]
        step = trainer.step
        for name, tracker in zip(self.names, self.trackers):
            if name == "tensorboard":
                def cell(value) -> str:
                    return str(value).replace("|", "\\|").replace("\n", "<br>")

                markdown = "\n".join(["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
                                      + ["| " + " | ".join(map(cell, row)) + " |" for row in rows])
                tracker.writer.add_text("eval/samples", markdown, global_step=step)
            elif name == "wandb":
                tracker.log_table("eval/samples", columns=columns, data=rows, step=step)
            elif name == "mlflow":
                import mlflow

                mlflow.log_table({key: [row[i] for row in rows] for i, key in enumerate(columns)},
                                 artifact_file=f"samples/step_{step:06d}.json", run_id=tracker.active_run.info.run_id)
            elif name == "trackio":
                import trackio

                tracker.log({"eval/samples": trackio.Table(columns=columns, data=rows)}, step=step)

    def on_train_end(self, trainer) -> None:
        self.finish()

    def finish(self) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.finish()

