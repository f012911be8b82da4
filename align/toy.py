"""A tiny arithmetic task with checkable answers, used by the offline quickstart and the tests.

`python -m align.toy recipes/data` writes the shipped jsonl files; the generator is seeded, so the
files are the same on every machine.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SYSTEM = "You are a careful calculator. Answer with the result."


def arithmetic_question(rng: random.Random) -> tuple[str, int]:
    """One question and its integer answer, e.g. ("What is 12 + 7?", 19)."""
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    op = rng.choice("+-")
    return f"What is {a} {op} {b}?", a + b if op == "+" else a - b


def solution(question: str, answer: int) -> str:
    expression = question.removeprefix("What is ").removesuffix("?")
    return f"{expression} = {answer}. The answer is {answer}."


def chat_rows(n: int, seed: int = 0, max_turns: int = 2) -> list[dict]:
    """Conversations with a system turn and 1..max_turns question/answer turns."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": SYSTEM}]
        for _ in range(rng.randint(1, max_turns)):
            question, answer = arithmetic_question(rng)
            messages += [{"role": "user", "content": question},
                         {"role": "assistant", "content": solution(question, answer)}]
        rows.append({"messages": messages})
    return rows


HEDGE = "Hmm, I am not sure."
"""The careless style: no work, no answer."""


def prompt_completion_rows(n: int, seed: int = 0, hedged: float = 0.0) -> list[dict]:
    """Question/solution rows; a fraction `hedged` of them answer in the careless, wrong style
    instead (like real SFT data of mixed quality, which preference training and RL then fix)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question, answer = arithmetic_question(rng)
        completion = HEDGE if hedged and rng.random() < hedged else solution(question, answer)
        rows.append({"prompt": f"Question: {question}\nAnswer:", "completion": " " + completion,
                     "answer": str(answer)})
    return rows


def text_rows(n: int, seed: int = 0, facts: int = 4) -> list[dict]:
    """Plain-text pre-training rows: a few arithmetic facts each ("12 + 7 = 19."), no questions
    and no answer format (that is what SFT then teaches)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        lines = []
        for _ in range(facts):
            question, answer = arithmetic_question(rng)
            lines.append(f"{question.removeprefix('What is ').removesuffix('?')} = {answer}.")
        rows.append({"text": " ".join(lines)})
    return rows


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """Pairs preferring a worked, correct answer over the hedged non-answer."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question, answer = arithmetic_question(rng)
        rows.append({"prompt": f"Question: {question}\nAnswer:", "chosen": " " + solution(question, answer),
                     "rejected": " " + HEDGE})
    return rows


def corpus() -> list[str]:
    """Texts the built-in tokenizer is trained on: the task's vocabulary plus plain English."""
    texts = [json.dumps(row) for row in chat_rows(400, seed=123)]
    texts += [row["prompt"] + row["completion"] for row in prompt_completion_rows(400, seed=321)]
    texts += ["The quick brown fox jumps over the lazy dog. Short answers are better than long ones.",
              "Hello! How can I help you today? Please think step by step and be concise."]
    return texts


def prompt_rows(n: int, seed: int = 0) -> list[dict]:
    """Prompt-only rows for GRPO/PPO: the question and its checkable `answer`."""
    return [{"prompt": row["prompt"], "answer": row["answer"]} for row in prompt_completion_rows(n, seed)]


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main(out_dir: str) -> None:
    out = Path(out_dir)
    write_jsonl(text_rows(3000, seed=10), out / "arith_text_train.jsonl")
    write_jsonl(text_rows(64, seed=11), out / "arith_text_eval.jsonl")
    write_jsonl(chat_rows(256, seed=1), out / "arith_chat_train.jsonl")
    write_jsonl(chat_rows(32, seed=2), out / "arith_chat_eval.jsonl")
    write_jsonl(prompt_completion_rows(256, seed=3), out / "arith_pc_train.jsonl")
    write_jsonl(preference_rows(256, seed=4), out / "arith_pref_train.jsonl")
    write_jsonl(preference_rows(64, seed=5), out / "arith_pref_eval.jsonl")
    write_jsonl(prompt_completion_rows(4800, seed=8, hedged=0.6), out / "arith_sft_mixed_train.jsonl")
    write_jsonl(prompt_completion_rows(64, seed=9, hedged=0.6), out / "arith_sft_mixed_eval.jsonl")
    write_jsonl(prompt_rows(512, seed=6), out / "arith_prompts_train.jsonl")
    write_jsonl(prompt_rows(64, seed=7), out / "arith_prompts_eval.jsonl")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "recipes/data")
