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


def prompt_completion_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question, answer = arithmetic_question(rng)
        rows.append({"prompt": f"Question: {question}\nAnswer:", "completion": " " + solution(question, answer),
                     "answer": str(answer)})
    return rows


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """Pairs preferring a worked, correct answer over a hedged, wrong one (a style SFT never saw)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question, answer = arithmetic_question(rng)
        wrong = answer + rng.choice([-3, -2, -1, 1, 2, 3])
        rows.append({"prompt": f"Question: {question}\nAnswer:", "chosen": " " + solution(question, answer),
                     "rejected": f" Hmm, maybe {wrong}? I am not sure."})
    return rows


def corpus() -> list[str]:
    """Texts the built-in tokenizer is trained on: the task's vocabulary plus plain English."""
    texts = [json.dumps(row) for row in chat_rows(400, seed=123)]
    texts += [row["prompt"] + row["completion"] for row in prompt_completion_rows(400, seed=321)]
    texts += ["The quick brown fox jumps over the lazy dog. Short answers are better than long ones.",
              "Hello! How can I help you today? Please think step by step and be concise."]
    return texts


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main(out_dir: str) -> None:
    out = Path(out_dir)
    write_jsonl(chat_rows(256, seed=1), out / "arith_chat_train.jsonl")
    write_jsonl(chat_rows(32, seed=2), out / "arith_chat_eval.jsonl")
    write_jsonl(prompt_completion_rows(256, seed=3), out / "arith_pc_train.jsonl")
    write_jsonl(preference_rows(256, seed=4), out / "arith_pref_train.jsonl")
    write_jsonl(preference_rows(64, seed=5), out / "arith_pref_eval.jsonl")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "recipes/data")
