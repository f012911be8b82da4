"""Format rewards: does the completion have the expected shape?"""

from __future__ import annotations

import re

from align.errors import AlignError


def format_tags(completions: list[str], tags: list[str] | tuple[str, ...] = ("think", "answer"), **_) -> list[float]:
    """1.0 if the completion contains `<tag>...</tag>` for every tag, in the given order, else 0.0.

    Text before, between and after the tagged blocks is allowed; a block may span lines.
    """
    tags = [tags] if isinstance(tags, str) else list(tags)
    pattern = re.compile(".*?".join(f"<{re.escape(t)}>.*?</{re.escape(t)}>" for t in tags), re.DOTALL)
    return [1.0 if pattern.search(c) else 0.0 for c in completions]


def format_regex(completions: list[str], pattern: str, fullmatch: bool = True, **_) -> list[float]:
    """1.0 if `pattern` matches the completion, else 0.0.

    The completion is stripped of surrounding whitespace and matched with `re.DOTALL` (`.` crosses
    newlines): in full (`re.fullmatch`) by default, anywhere in it (`re.search`) with fullmatch=False.
    """
    try:
        regex = re.compile(pattern, re.DOTALL)
    except re.error as error:
        raise AlignError(f"format_regex: invalid pattern {pattern!r}: {error}") from None
    match = regex.fullmatch if fullmatch else regex.search
    return [1.0 if match(c.strip()) else 0.0 for c in completions]
