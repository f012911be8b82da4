"""Configs of the AI-feedback tasks (`align label`, `align revise`) and of a judge.

A task config is one flat YAML file like a training recipe, told apart by its `task:` key:

    task: label                       # or revise
    output_dir: runs/label-tiny
    model: {name_or_path: "builtin:tiny-llama-arith"}
    data: {path: recipes/data/arith_prompts_train.jsonl, max_rows: 64}
    sampling: {num_samples: 4, max_new_tokens: 32, temperature: 1.0}
    judge: {model: "builtin:tiny-llama", constitution: recipes/constitutions/helpful_honest.md}
"""

from __future__ import annotations

import os
from typing import Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from align.config import (DataSource, ModelConfig, SamplingConfig, Section, apply_overrides, read_yaml_mapping,
                          format_validation_error)
from align.errors import AlignError


def check_constitution(path: str) -> str:
    """ValueError (for pydantic) unless `path` is a constitution file that parses."""
    from align.feedback.constitution import load_constitution

    try:
        load_constitution(path, "constitution")
    except AlignError as error:
        raise ValueError(str(error).removeprefix("constitution: ")) from None
    return path


class JudgeTemplates(Section):
    """The judge's text (see `align.feedback.judge.Templates`); the defaults suit an instruct model."""

    prefix: str = Field(default_factory=lambda: _default("prefix"))
    compare: str = Field(default_factory=lambda: _default("compare"))
    score: str = Field(default_factory=lambda: _default("score"))

    @field_validator("prefix", "compare", "score")
    @classmethod
    def _placeholders(cls, value: str, info) -> str:
        from align.feedback.judge import check_template

        return check_template(info.field_name, value)


def _default(name: str) -> str:
    from align.feedback.judge import Templates

    return getattr(Templates(), name)


class JudgeConfig(Section):
    """A local judge model (hub id, directory, or builtin:<name>) and the constitution it applies."""

    model: str
    constitution: str
    """A markdown or YAML file of principles (see `align.feedback.constitution`)."""
    form: Literal["pairwise", "score"] = "pairwise"
    """pairwise: compare two responses (labels A/B); score: rate one response (score_labels)."""
    labels: list[str] = Field(default_factory=lambda: [" A", " B"])
    """The two pairwise labels (first response, second), exactly as the judge reads them after the cue
    `Better response:`; each must be one token there (checked when the judge loads)."""
    score_labels: list[str] = Field(default_factory=lambda: [" 1", " 2", " 3", " 4", " 5"])
    """The score labels, read after `Score:`; each must be one token there."""
    score_values: list[float] | None = None
    """The value of each score label (default: the labels read as numbers)."""
    device: str = "auto"
    """Where the judge runs: auto (the GPU if there is one), cpu, cuda, cuda:N."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: int = Field(16, gt=0)
    """Questions per forward pass (one question per item and principle)."""
    cache_prefix: bool = True
    """Compute the instructions + constitution prefix once and reuse its keys/values."""
    templates: JudgeTemplates = Field(default_factory=JudgeTemplates)

    @field_validator("constitution")
    @classmethod
    def _readable(cls, value: str) -> str:
        return check_constitution(value)


class LabelSampling(SamplingConfig):
    num_samples: int = Field(4, ge=2)
    """Completions sampled per prompt (K); every distinct pair of them is judged."""
    seed: int = Field(0, ge=0)
    batch_size: int = Field(16, gt=0)
    """Prompts per rollout call."""


class ReviseSampling(SamplingConfig):
    temperature: float = Field(0.0, ge=0.0)
    """0: greedy answers, critiques and revisions."""
    seed: int = Field(0, ge=0)
    batch_size: int = Field(16, gt=0)


class TaskConfig(Section):
    output_dir: str
    model: ModelConfig
    """The model that answers (and, for revise, critiques and revises)."""
    data: DataSource
    """Rows with a `prompt` column (string or messages); other columns are copied to the output."""

    @field_validator("output_dir")
    @classmethod
    def _named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("empty: name a directory of its own, e.g. runs/label")
        return value

    @field_validator("data")
    @classmethod
    def _exists(cls, value: DataSource) -> DataSource:
        if value.is_local and not os.path.exists(os.path.expanduser(value.path)):
            raise ValueError(f"path: file not found: {value.path!r} (relative to {os.getcwd()})")
        return value


class LabelConfig(TaskConfig):
    task: Literal["label"]
    sampling: LabelSampling = Field(default_factory=LabelSampling)
    judge: JudgeConfig
    ties: Literal["drop", "keep"] = "drop"
    """A tie: the two orders disagree. drop: not written; keep: written with tie true and
    label_smoothing 0.5, which dpo with loss_type sigmoid reads as the pair's own flip rate (other
    losses and the reward model refuse such rows)."""

    @model_validator(mode="after")
    def _pairwise(self) -> "LabelConfig":
        if self.judge.form != "pairwise":
            raise ValueError("judge.form: label compares pairs; use form: pairwise (or drop the key)")
        return self


class ReviseConfig(TaskConfig):
    task: Literal["revise"]
    sampling: ReviseSampling = Field(default_factory=ReviseSampling)
    constitution: str
    """The principles a critique is asked about (one sampled per row, by weight)."""
    rounds: int = Field(1, ge=1)
    """Critique-and-revise rounds per answer (each under a newly sampled principle)."""

    @field_validator("constitution")
    @classmethod
    def _readable(cls, value: str) -> str:
        return check_constitution(value)


TASKS: dict[str, type[TaskConfig]] = {"label": LabelConfig, "revise": ReviseConfig}
"""`task:` value -> its config class."""


def read_yaml(path: str) -> dict:
    return read_yaml_mapping(path, "config")


def task_from_dict(raw: dict, source: str = "<dict>", want: str | None = None) -> TaskConfig:
    """Validate a task config (AlignError listing every problem, with the file and key)."""
    task = raw.get("task")
    if task not in TASKS:
        raise AlignError(f"invalid config {source}:\n  task: {'required key is missing' if task is None else repr(task)}"
                         f"; set task: {' or task: '.join(TASKS)}")
    if want is not None and task != want:
        raise AlignError(f"{source} is a `{task}` config; run it with `align {task} {source}`")
    model: type[BaseModel] = TASKS[task]
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        raise AlignError(format_validation_error(error, source, model).replace("invalid recipe", "invalid config")) from None


def load_task(path: str, overrides: list[str] | None = None, want: str | None = None) -> TaskConfig:
    """Read, override (`--set key=value`) and validate a label/revise config file."""
    return task_from_dict(apply_overrides(read_yaml(str(path)), overrides or []), str(path), want)


def is_task_file(path: str) -> bool:
    """Whether `path` is a YAML file with a top-level `task:` key (a label/revise config, not a recipe)."""
    try:
        raw = read_yaml(str(path))
    except AlignError:
        return False
    return "task" in raw and "algorithm" not in raw


def save_config(config: TaskConfig, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(config.model_dump(mode="json"), f, sort_keys=False)
