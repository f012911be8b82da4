"""A judge model as a GRPO/PPO reward (`fn: judge`), read from its label probabilities, never from
sampled text (see `align.feedback.judge`).

    rewards:
      - fn: judge
        kwargs: {model: "builtin:tiny-llama", constitution: recipes/constitutions/helpful_honest.md,
                 form: score, device: auto}

form `score`: the expected score sum_j P(label_j) * value_j under each principle, averaged with the
constitution's weights (1..5 with the default labels). form `pairwise`: P(completion better than the
row's reference answer, column `reference_column`), asked in both orders and averaged, in [0, 1];
None for a row without a reference. The judge is loaded once per process and settings, on `device`.
"""

from __future__ import annotations

JUDGE_KEYS = ("model", "constitution", "form", "device", "dtype", "batch_size", "labels", "score_labels",
              "score_values", "cache_prefix", "templates")


def judge_config(key: str = "judge reward kwargs", **kwargs):
    """The JudgeConfig of the reward's kwargs (AlignError naming `key` and each bad setting)."""
    from pydantic import ValidationError

    from align.errors import AlignError
    from align.feedback.config import JudgeConfig

    try:
        return JudgeConfig(**{k: v for k, v in kwargs.items() if k in JUDGE_KEYS and v is not None})
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
                             for e in error.errors())
        raise AlignError(f"{key}: {problems}") from None


def judge(prompts: list, completions: list[str], model: str, constitution: str, form: str = "score",
          reference_column: str = "reference", device: str = "auto", dtype: str = "auto", batch_size: int = 16,
          labels: list[str] | None = None, score_labels: list[str] | None = None,
          score_values: list[float] | None = None, cache_prefix: bool = True, templates: dict | None = None,
          **columns) -> list[float | None]:
    from align.errors import AlignError
    from align.feedback.judge import load_judge

    config = judge_config(model=model, constitution=constitution, form=form, device=device, dtype=dtype,
                          batch_size=batch_size, labels=labels, score_labels=score_labels, score_values=score_values,
                          cache_prefix=cache_prefix, templates=templates)
    scorer = load_judge(config)
    if form == "score":
        return scorer.combine(scorer.score(prompts, completions)).tolist()
    if reference_column not in columns:
        raise AlignError(f"judge reward (form pairwise): no column {reference_column!r} in the data (columns: "
                         f"{sorted(columns)}); set kwargs.reference_column to the column of reference answers")
    references = columns[reference_column]
    rows = [i for i, r in enumerate(references) if r is not None]
    out: list[float | None] = [None] * len(completions)
    if rows:
        first, second = scorer.compare_both([prompts[i] for i in rows], [completions[i] for i in rows],
                                            [str(references[i]) for i in rows])
        for i, value in zip(rows, scorer.combine((first + second) / 2).tolist()):
            out[i] = value
    return out


def check(key: str = "judge reward kwargs", **kwargs) -> str:
    """The settings checked without loading the judge (AlignError naming `key`), and a note on its labels."""
    from align.feedback.judge import check_labels_offline

    config = judge_config(key, **{k: v for k, v in kwargs.items() if k in JUDGE_KEYS})
    return "judge labels ok" if check_labels_offline(config) else "judge labels checked when the judge loads"


judge.check = check
"""`align validate` calls `fn.check(key=..., **kwargs)` on a reward that has one and prints the note it returns."""
