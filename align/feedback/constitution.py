"""A constitution: the principles a judge applies, read from a markdown or YAML file.

Markdown: every list item (`- `, `* `, `1. `) is one principle; lines indented under an item
continue it, other lines are notes. An item may start with a bold name and a weight:

    - **correct** (weight 2): Prefer the answer whose final result is right.
    - Prefer the shorter answer when both are equally good.     # named principle_2, weight 1

YAML: a list (or a mapping with a `principles:` list) of strings or {name, text, weight} mappings.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from align.errors import AlignError

_ITEM = re.compile(r"^(?:[-*+]|\d+[.)])\s+(?P<body>.*)$")
_HEAD = re.compile(r"^\*\*(?P<name>[^*]+)\*\*\s*(?:\(\s*weight\s*:?\s*(?P<weight>[^)]*)\))?\s*:?\s*(?P<text>.*)$")


@dataclass(frozen=True)
class Principle:
    name: str
    text: str
    weight: float = 1.0


@dataclass(frozen=True)
class Constitution:
    principles: tuple[Principle, ...]
    source: str = "<constitution>"

    @property
    def weights(self) -> list[float]:
        """The principles' weights, normalized to sum to 1."""
        total = sum(p.weight for p in self.principles)
        return [p.weight / total for p in self.principles]

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.principles]

    def digest(self) -> str:
        """A content hash (cache keys)."""
        text = "\n".join(f"{p.name}\t{p.weight!r}\t{p.text}" for p in self.principles)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def render(self) -> str:
        """The numbered list the judge reads: `1. correct: Prefer ...`, one per line."""
        return "\n".join(f"{i}. {p.name}: {p.text}" for i, p in enumerate(self.principles, 1))


def _weight(value, where: str) -> float:
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise AlignError(f"{where}: weight {value!r} is not a number; write e.g. (weight 2)") from None
    if not weight > 0 or weight == float("inf"):
        raise AlignError(f"{where}: weight {value!r} must be a finite number above 0")
    return weight


def parse_markdown(text: str, source: str) -> list[Principle]:
    items: list[tuple[int, list[str]]] = []  # (line number, lines)
    for n, line in enumerate(text.splitlines(), 1):
        match = _ITEM.match(line.strip()) if line[:1] not in (" ", "\t") else None
        if match:
            items.append((n, [match["body"].strip()]))
        elif items and line[:1] in (" ", "\t") and line.strip():
            items[-1][1].append(line.strip())
    principles = []
    for i, (n, lines) in enumerate(items, 1):
        body, where = " ".join(lines), f"{source} line {n}"
        head = _HEAD.match(body)
        name, weight = f"principle_{i}", 1.0
        if head:
            name, body = head["name"].strip(), head["text"].strip()
            if head["weight"] is not None:
                weight = _weight(head["weight"].strip(), where)
        principles.append(_principle(name, body, weight, where))
    return principles


def parse_yaml(text: str, source: str) -> list[Principle]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise AlignError(f"{source}: not valid YAML: {error}") from None
    if isinstance(data, dict):
        unknown = set(data) - {"principles"}
        if unknown:
            raise AlignError(f"{source}: unknown key(s) {sorted(unknown)}; a constitution holds `principles:`")
        data = data.get("principles")
    if not isinstance(data, list):
        raise AlignError(f"{source}: a YAML constitution is a list of principles (or `principles:` holding one)")
    principles = []
    for i, item in enumerate(data, 1):
        where = f"{source} principles[{i - 1}]"
        if isinstance(item, str):
            item = {"text": item}
        if not isinstance(item, dict) or set(item) - {"name", "text", "weight"}:
            raise AlignError(f"{where}: a principle is a string or a mapping of name, text, weight; got {item!r:.80}")
        principles.append(_principle(str(item.get("name", f"principle_{i}")), str(item.get("text") or ""),
                                     _weight(item.get("weight", 1.0), where), where))
    return principles


def _principle(name: str, text: str, weight: float, where: str) -> Principle:
    if not text.strip():
        raise AlignError(f"{where}: principle {name!r} has no text; say what the judge should prefer")
    return Principle(name, text.strip(), weight)


PARSERS = {".md": parse_markdown, ".markdown": parse_markdown, ".txt": parse_markdown,
           ".yaml": parse_yaml, ".yml": parse_yaml}


def load_constitution(path: str | Path, key: str = "constitution") -> Constitution:
    """Read a constitution file (AlignError naming `key`, the file and line on any problem)."""
    path = Path(path).expanduser()
    parse = PARSERS.get(path.suffix.lower())
    if parse is None:
        raise AlignError(f"{key}: {str(path)!r} is not a constitution file; use markdown (.md) or YAML "
                         f"(.yaml), e.g. recipes/constitutions/helpful_honest.md")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AlignError(f"{key}: file not found: {str(path)!r}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise AlignError(f"{key}: cannot read {str(path)!r}: {error}") from None
    principles = parse(text, str(path))
    if not principles:
        raise AlignError(f"{key}: {str(path)!r} holds no principles; write one per list item, e.g. "
                         "`- **honest**: Prefer the answer that admits what it does not know.`")
    names = [p.name for p in principles]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise AlignError(f"{key}: {str(path)!r} names principle {repeated[0]!r} twice; give each a name of its own")
    return Constitution(tuple(principles), str(path))
