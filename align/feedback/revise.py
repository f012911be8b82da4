"""`align revise`: the supervised stage of Constitutional AI (Bai et al., 2022).

The model answers each prompt, then critiques its own answer against a principle sampled from the
constitution (by weight) and rewrites it; `rounds` > 1 repeats critique and revision on the
revision. The rows written (`sft.jsonl`) are `prompt` / `completion` (the last revision), which the
`sft` recipe reads, plus `original`, `critique`, `principle` and the prompt row's other columns.

String prompts continue as plain text:

    {prompt}{answer}\\n\\nCritique request: {principle}\\nCritique:{critique}\\n\\nRevision request: ...\\nRevision:

message-list prompts as turns of the conversation (the requests as user turns).
"""

from __future__ import annotations

import random

from align.feedback.constitution import Constitution, Principle

CRITIQUE = "Identify how the answer above falls short of this principle: {text}"
REVISION = "Rewrite the answer so that it follows the principle ({name}), keeping what was right."
RESERVED = ("prompt", "completion", "original", "critique", "principle")


def critique_prompt(prompt, answer: str, principle: Principle):
    """The prompt that asks for a critique of `answer` (a string, or messages for a message prompt)."""
    request = CRITIQUE.format(text=principle.text, name=principle.name)
    if isinstance(prompt, list):
        return prompt + [{"role": "assistant", "content": answer.strip()}, {"role": "user", "content": request}]
    return f"{prompt}{answer}\n\nCritique request: {request}\nCritique:"


def revision_prompt(prompt, answer: str, principle: Principle, critique: str):
    """The prompt that asks for the revision, after the critique."""
    asked = critique_prompt(prompt, answer, principle)
    request = REVISION.format(text=principle.text, name=principle.name)
    if isinstance(prompt, list):
        return asked + [{"role": "assistant", "content": critique.strip()}, {"role": "user", "content": request}]
    return f"{asked}{critique}\n\nRevision request: {request}\nRevision:"


def sample_principles(constitution: Constitution, n: int, seed: int) -> list[Principle]:
    """n principles drawn by weight, with their own seeded generator."""
    rng = random.Random(seed)
    return rng.choices(constitution.principles, weights=[p.weight for p in constitution.principles], k=n)


def revise(sample, rows: list[dict], constitution: Constitution, rounds: int = 1, seed: int = 0) -> tuple[list[dict], dict]:
    """SFT rows from critique-and-revise; `sample(prompts) -> texts` is the model (one completion each)."""
    prompts = [r["prompt"] for r in rows]
    original = sample(prompts)
    answers, critiques, used = list(original), [""] * len(rows), [None] * len(rows)
    for r in range(rounds):
        principles = sample_principles(constitution, len(rows), seed + r)
        critiques = sample([critique_prompt(p, a, q) for p, a, q in zip(prompts, answers, principles)])
        answers = sample([revision_prompt(p, a, q, c) for p, a, q, c in zip(prompts, answers, principles, critiques)])
        used = principles
    out, empty = [], 0
    for row, first, answer, critique, principle in zip(rows, original, answers, critiques, used):
        if not answer.strip():
            empty += 1
            continue
        completion = answer if isinstance(row["prompt"], list) or answer[:1].isspace() else " " + answer
        kept = {k: v for k, v in row.items() if k not in RESERVED}
        out.append({**kept, "prompt": row["prompt"], "completion": completion, "original": first,
                    "critique": critique.strip(), "principle": principle.name})
    stats = {"prompts": len(rows), "rows_written": len(out), "empty_revisions": empty,
             "changed": sum(r["completion"].strip() != r["original"].strip() for r in out)}
    return out, stats


def run(config, overwrite: bool = False) -> dict:
    """The whole `align revise` task: write OUTPUT_DIR/sft.jsonl (+ config.yaml, stats.json)."""
    from align.feedback import output
    from align.feedback.config import save_config
    from align.feedback.constitution import load_constitution
    from align.feedback.policy import Sampler, load_prompt_rows

    target = output.prepare(config.output_dir, "sft.jsonl", overwrite, "revise")
    rows = load_prompt_rows(config.data)
    constitution = load_constitution(config.constitution, "constitution")
    sampler = Sampler.load(config.model, config.sampling)
    out, stats = revise(lambda prompts: [g[0] for g in sampler.sample(prompts, 1)], rows, constitution,
                        config.rounds, config.sampling.seed)
    output.write_jsonl(out, target)
    save_config(config, target.parent / "config.yaml")
    output.write_json(stats, target.parent / "stats.json")
    return {**stats, "path": str(target)}
