"""A user's own reward function, named in a recipe as `examples/my_reward.py:careful_answer`.

A reward is a plain function: it gets the decoded `completions` plus any dataset column it names
(here `answer`) and returns one float (or None: "does not apply") per completion.
"""

from __future__ import annotations

import re

NUMBER = re.compile(r"-?\d+")


def careful_answer(completions: list[str], answer: list[str], hedge_penalty: float = 0.5) -> list[float | None]:
    """1.0 if the last number in the completion is the answer, 0.0 if it is another number, and
    -hedge_penalty for no number at all (a hedge like "Hmm, I am not sure.")."""
    scores: list[float | None] = []
    for completion, gold in zip(completions, answer):
        if gold is None:
            scores.append(None)
            continue
        numbers = NUMBER.findall(completion)
        if not numbers:
            scores.append(-hedge_penalty)
        else:
            scores.append(float(numbers[-1] == str(gold).strip()))
    return scores
