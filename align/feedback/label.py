"""`align label`: preference pairs from AI feedback (RLAIF).

K completions are sampled per prompt; every distinct pair of them is judged under every principle
of the constitution, in both orders (A/B and B/A). Per pair:

    p1 = sum_k w_k P_k(a better | a shown first)      p2 = sum_k w_k P_k(a better | a shown second)
    judge_prob = (p1 + p2) / 2 for the winner          tie: p1 and p2 on different sides of 1/2

and the principle that decided is the one that pushed hardest toward the winner,
argmax_k w_k * (P_k - 1/2) * direction. The rows written (`pairs.jsonl`) are what the `reward` and
`dpo` recipes read: `prompt`, `chosen`, `rejected`, plus `judge_prob`, `judge_margin` (= 2 *
judge_prob - 1), `principle`, `tie`, and the prompt row's other columns. (The judge's margin is not
named `margin`: the reward trainer reads that column as a Bradley-Terry margin.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from align.feedback.judge import Judge

log = logging.getLogger(__name__)

RESERVED = ("prompt", "chosen", "rejected", "margin", "judge_prob", "judge_margin", "principle", "tie",
            "label_smoothing")
"""Columns the output defines: a prompt row's own columns of these names are not copied."""


@dataclass
class Verdicts:
    """The judge's decision on M pairs (a, b)."""

    a_wins: torch.Tensor
    """[M] bool: a is chosen (for a tie, a has the higher mean probability)."""
    prob: torch.Tensor
    """[M] the winner's probability of being better, averaged over both orders and the principles."""
    tie: torch.Tensor
    """[M] bool: the two orders disagree (or a probability is exactly 1/2)."""
    principle: torch.Tensor
    """[M] index of the principle that decided."""


def decide(first: torch.Tensor, second: torch.Tensor, weights: list[float]) -> Verdicts:
    """first, second: [M, K] P(a better) with a shown first / second (see `Judge.compare_both`);
    weights: [K] summing to 1."""
    w = torch.tensor(weights, dtype=first.dtype)
    p1, p2 = first @ w, second @ w
    prob_a = (p1 + p2) / 2
    a_wins = prob_a >= 0.5
    direction = torch.where(a_wins, 1.0, -1.0)
    pull = w * ((first + second) / 2 - 0.5) * direction[:, None]
    return Verdicts(a_wins=a_wins, prob=torch.where(a_wins, prob_a, 1 - prob_a), tie=(p1 - 0.5) * (p2 - 0.5) <= 0,
                    principle=pull.argmax(1))


def candidate_pairs(groups: list[list[str]]) -> list[tuple[int, str, str]]:
    """(prompt index, a, b) for every pair of distinct, non-blank completions of each prompt."""
    pairs = []
    for i, group in enumerate(groups):
        distinct = list(dict.fromkeys(c for c in group if c.strip()))
        pairs += [(i, a, b) for j, a in enumerate(distinct) for b in distinct[j + 1:]]
    return pairs


def label_pairs(judge: Judge, rows: list[dict], groups: list[list[str]], ties: str = "drop") -> tuple[list[dict], dict]:
    """Preference rows from the completions `groups[i]` of `rows[i]["prompt"]`, and counts."""
    pairs = candidate_pairs(groups)
    stats = {"prompts": len(rows), "completions": sum(map(len, groups)), "pairs_judged": len(pairs)}
    if not pairs:
        return [], {**stats, "pairs_written": 0, "ties": 0}
    prompts = [rows[i]["prompt"] for i, _, _ in pairs]
    first, second = judge.compare_both(prompts, [a for _, a, _ in pairs], [b for _, _, b in pairs])
    verdicts = decide(first, second, judge.constitution.weights)
    names = judge.constitution.names
    out = []
    for m, (i, a, b) in enumerate(pairs):
        tie = bool(verdicts.tie[m])
        if tie and ties == "drop":
            continue
        chosen, rejected = (a, b) if verdicts.a_wins[m] else (b, a)
        prob = float(verdicts.prob[m])
        row = {k: v for k, v in rows[i].items() if k not in RESERVED}
        row.update(prompt=rows[i]["prompt"], chosen=chosen, rejected=rejected, judge_prob=prob,
                   judge_margin=2 * prob - 1, principle=names[int(verdicts.principle[m])], tie=tie)
        if ties == "keep":
            row["label_smoothing"] = 0.5 if tie else None  # None: the dpo recipe's own applies
        out.append(row)
    n_ties = int(verdicts.tie.sum())
    stats.update(pairs_written=len(out), ties=n_ties, orders_agree=1 - n_ties / len(pairs),
                 decided_by={n: sum(r["principle"] == n for r in out) for n in names})
    return out, stats


def run(config, overwrite: bool = False) -> dict:
    """The whole `align label` task: sample, judge, write OUTPUT_DIR/pairs.jsonl (+ config.yaml,
    stats.json). Returns the stats."""
    from align.builtins import build_builtins
    from align.feedback import output
    from align.feedback.config import save_config
    from align.feedback.judge import load_judge
    from align.feedback.policy import Sampler, load_prompt_rows

    target = output.prepare(config.output_dir, "pairs.jsonl", overwrite, "label")  # before any model loads
    rows = load_prompt_rows(config.data)
    build_builtins(config.judge.model)
    judge = load_judge(config.judge)  # label errors surface before the sampling
    sampler = Sampler.load(config.model, config.sampling)
    groups = sampler.sample([r["prompt"] for r in rows], config.sampling.num_samples)
    del sampler
    pairs, stats = label_pairs(judge, rows, groups, config.ties)
    if config.ties == "keep" and stats["ties"]:
        log.warning("ties: keep wrote %d tie pairs with label_smoothing 0.5: dpo with loss_type sigmoid trains them "
                    "as ties (conservative DPO at flip rate 0.5); other losses and the reward model refuse them",
                    stats["ties"])
    output.write_jsonl(pairs, target)
    save_config(config, target.parent / "config.yaml")
    output.write_json(stats, target.parent / "stats.json")
    return {**stats, "path": str(target)}
