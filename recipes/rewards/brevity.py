"""An example of a user's own reward file, named in a recipe as `recipes/rewards/brevity.py:brief_and_right`."""

from align_rewards.math import extract_answer


def brief_and_right(completions: list[str], answer: list[str], max_chars: int = 40, **_) -> list[float | None]:
    """1.0 for a correct answer in at most `max_chars` characters, 0.5 if correct but longer, else 0.0;
    None (not applicable) for rows without a reference answer."""
    scores = []
    for completion, gold in zip(completions, answer):
        if gold is None:
            scores.append(None)
        elif extract_answer(completion) == str(gold).strip():
            scores.append(1.0 if len(completion.strip()) <= max_chars else 0.5)
        else:
            scores.append(0.0)
    return scores
