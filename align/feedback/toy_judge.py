"""A toy judge for the arithmetic task (`align.toy`): a tiny Llama that Align SFT-trains to answer
the judge's pairwise question ("Better response:") with the label of the correct answer.

Each training row is one question of `align.feedback.judge.Judge` in its exact text (prefix +
query), with the completion the label of the right answer; the wrong one is a hedge ("Hmm, I am
not sure."), a worked answer with a wrong result, or one whose work and result disagree, shown
first or second at random. The judge reads arithmetic only from these rows, so it starts from
builtin:tiny-llama-arith, which has learned sums already.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

from align.feedback.constitution import Constitution
from align.feedback.judge import Templates, compare_query
from align.toy import HEDGE, arithmetic_question, solution, write_jsonl

CONSTITUTION = "- **correct**: Prefer the right result.\n"
"""The toy judge's constitution (one principle); write it to a .md file to load it."""
TEMPLATES = Templates(prefix="Judge by: {principles}\n", compare="{prompt}\nA:{first}\nB:{second}\nBetter:",
                      score="{prompt}\nResponse:{response}\nScore:")
"""Short questions: the tiny tokenizer spends a token on most letters of plain English."""
LABELS = ("A", "B")
"""The tiny tokenizer splits " A" into two tokens; "A" after the cue is one."""


def wrong_answer(question: str, answer: int, rng: random.Random) -> str:
    """A plausible wrong answer: a hedge, a wrong result, or work and result that disagree."""
    expression = question.removeprefix("What is ").removesuffix("?")
    wrong = answer + rng.choice([-3, -2, -1, 1, 2, 3])
    if rng.random() < 0.5:  # the policy's most common wrong answer
        return HEDGE
    return rng.choice([f"{expression} = {wrong}. The answer is {wrong}.",
                       f"{expression} = {answer}. The answer is {wrong}.",
                       f"{expression} = {wrong}. The answer is {answer}."])


def judge_rows(n: int, constitution: Constitution, seed: int = 0) -> list[dict]:
    """n prompt/completion rows: the judge's question about a right and a wrong answer (random
    order, random principle), and the label of the right one."""
    rng = random.Random(seed)
    prefix = TEMPLATES.prefix.format(principles=constitution.render())
    rows = []
    for _ in range(n):
        question, answer = arithmetic_question(rng)
        right, wrong = " " + solution(question, answer), " " + wrong_answer(question, answer, rng)
        right_first = rng.random() < 0.5
        first, second = (right, wrong) if right_first else (wrong, right)
        k = rng.randrange(len(constitution.principles))
        query = compare_query(constitution, k, f"Question: {question}\nAnswer:", first, second, TEMPLATES.compare)
        rows.append({"prompt": prefix + query, "completion": LABELS[0] if right_first else LABELS[1]})
    return rows


def train_toy_judge(out_dir: Path, constitution: Constitution, base: str = "builtin:tiny-llama-arith",
                    steps: int = 120, batch_size: int = 16, seed: int = 0) -> None:
    """SFT `base` into a pairwise arithmetic judge in `out_dir` (Align's own SFT trainer). The loss
    sits at chance (the judge answers by position) for ~70 steps, then it learns to reject the hedge
    (held-out: 100%); telling a right sum from a wrong one takes it far longer (it stays near 50%)."""
    from align.config import recipe_from_dict
    from align.trainers.sft import SFTTrainer

    with tempfile.TemporaryDirectory() as tmp:
        write_jsonl(judge_rows(steps * batch_size, constitution, seed), Path(tmp) / "judge.jsonl")
        recipe = recipe_from_dict({
            "algorithm": "sft", "output_dir": str(out_dir), "model": {"name_or_path": base, "dtype": "float32"},
            "data": {"train": {"path": str(Path(tmp) / "judge.jsonl")}, "max_length": 128},
            "train": {"lr": 3e-3, "max_steps": steps, "batch_size": batch_size, "warmup": 0.05, "schedule": "cosine",
                      "seed": seed, "progress": False, "plots": False, "log_every": 10}})
        SFTTrainer.from_recipe(recipe).fit()


def build(out_dir: Path) -> None:
    """Build the toy judge into `out_dir` with its constitution beside it (`constitution.md`): the
    builder a `builtin:tiny-judge-arith` entry would hand to `align.models.tiny.install`. Needs
    builtin:tiny-llama-arith built first."""
    from align.feedback.constitution import load_constitution

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "constitution.md").write_text(CONSTITUTION)
        train_toy_judge(Path(out_dir), load_constitution(Path(tmp) / "constitution.md"))
    (Path(out_dir) / "constitution.md").write_text(CONSTITUTION)
