"""A user's own reward file, loaded by tests as `tests/data/my_rewards.py:<func>`."""

import asyncio


def concise(completions, **_):
    """1.0 for completions of at most 40 characters, else 0.0."""
    return [1.0 if len(c) <= 40 else 0.0 for c in completions]


async def slow_judge(prompts, completions, answer):
    """An async judge (think: an HTTP call to a grader): 1.0 if the answer appears in the completion."""
    await asyncio.sleep(0.2)
    return [float(a is not None and str(a) in c) for c, a in zip(completions, answer)]


def starts_with(completions, prefix):
    """Needs `prefix` bound through kwargs."""
    return [float(c.startswith(prefix)) for c in completions]
