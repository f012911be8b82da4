"""AI feedback: a judge model under a constitution (RLAIF, Constitutional AI).

- `constitution`: principles read from a markdown or YAML file.
- `judge`: `Judge.compare` / `Judge.score` from the judge's next-token probabilities over single-token
  labels, with the constitution prefix's keys/values computed once; `load_judge` caches per process.
- `label`: `align label`, preference pairs from K samples per prompt, judged in both orders.
- `revise`: `align revise`, critique-and-revise rows for SFT.
- `config`: the `task: label | revise` configs and `JudgeConfig`; `policy`, `output`: sampling and writing.
- `toy_judge`: a tiny arithmetic judge Align trains itself (tests, demos).

Nothing here is imported by the trainers; the `judge` reward (`rewards/judge.py`) imports it on first use.
"""
