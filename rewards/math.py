"""Math answer rewards: extract the final answer from a completion and compare it with the row's
`answer` column."""

from __future__ import annotations

import math
import re

NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+"
_NUMBER = re.compile(NUMBER)
_HASHES = re.compile(r"####\s*(.+)")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*(.+?)(?:\.\s|\.$|\n|$)", re.IGNORECASE)
_LEADING_NUMBER = re.compile(rf"\$?\s*({NUMBER})")
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}")


def _boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), balancing nested braces."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i].strip()
        i += 1
    return None  # unbalanced: the completion was cut off inside the box


def extract_answer(text: str) -> str | None:
    """The final answer in `text`, or None if there is none. Looked for in this order (last one wins
    within a form): `\\boxed{...}` (nested braces allowed), `#### 42`, "The answer is 42" / "Answer: 42"
    (the number if one starts the phrase, else the phrase up to the end of the sentence), and
    finally the last number in the text."""
    boxed = _boxed(text)
    if boxed is not None:
        return boxed
    for regex in (_HASHES, _ANSWER_IS):
        matches = regex.findall(text)
        if matches:
            phrase = matches[-1].strip().strip("*").strip()
            number = _LEADING_NUMBER.match(phrase)
            return number.group(1) if number else phrase
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize_answer(text: str) -> str:
    """Lower-case, drop `$`, `\\text{}`, thousands separators, spaces and a trailing period."""
    text = str(text).strip().lower().replace("−", "-")
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    text = text.replace("$", "").replace("\\!", "").replace("\\,", "")
    return re.sub(r"\s+", " ", text).strip().rstrip(".").strip()


def parse_number(text: str) -> float | None:
    """A float from "42", "-2", "3.50", "1,000", "$5", "50%" (= 50), "1/2", "\\frac{1}{2}"; else None."""
    text = normalize_answer(text).replace(" ", "").rstrip("%")
    text = _FRAC.sub(r"(\1)/(\2)", text).replace("(", "").replace(")", "")
    try:
        if "/" in text:
            numerator, denominator = text.split("/")
            return float(numerator) / float(denominator)
        value = float(text)
    except (ValueError, ZeroDivisionError):
        return None
    return value if math.isfinite(value) else None


def _gold(answer) -> str | None:
    """The dataset's answer, with the final answer taken out of a worked solution (GSM8K `####`,
    MATH `\\boxed{}`)."""
    if answer is None:
        return None
    answer = str(answer)
    return extract_answer(answer) if ("\\boxed" in answer or "####" in answer) else answer


def exact_answer(completions: list[str], answer: list, **_) -> list[float | None]:
    """1.0 if the completion's extracted answer equals the row's `answer` after `normalize_answer`
    (string comparison: "3.5" != "3.50"; use numeric_answer for numbers), else 0.0; None where the
    row's answer is None."""
    out = []
    for completion, gold in zip(completions, map(_gold, answer)):
        if gold is None:
            out.append(None)
            continue
        predicted = extract_answer(completion)
        out.append(float(predicted is not None and normalize_answer(predicted) == normalize_answer(gold)))
    return out


def numeric_answer(completions: list[str], answer: list, tolerance: float = 1e-6, **_) -> list[float | None]:
    """1.0 if the completion's extracted answer is numerically within `tolerance` (relative, or absolute
    near zero) of the row's `answer`, else 0.0 (also when the completion has no parsable number).
    None where the row's answer is None or not a number."""
    out = []
    for completion, gold in zip(completions, map(_gold, answer)):
        target = parse_number(gold) if gold is not None else None
        if target is None:
            out.append(None)
            continue
        predicted = extract_answer(completion)
        value = parse_number(predicted) if predicted is not None else None
        if value is None and predicted is not None:  # "42 apples": the number inside the phrase
            numbers = _NUMBER.findall(predicted)
            value = parse_number(numbers[-1]) if numbers else None
        close = value is not None and math.isclose(value, target, rel_tol=tolerance, abs_tol=tolerance)
        out.append(float(close))
    return out
