"""Built-in reward functions that recipes name by registry name (`exact_answer`) or `module:func`.

Every reward follows Align's contract (see `align.rewards`): `f(prompts, completions, completion_ids,
**columns) -> list[float | None]`, one value per completion, `None` where it does not apply.
"""

from .code import code_tests, extract_code
from .format import format_regex, format_tags
from .length import length_penalty, overlong_penalty
from .math import exact_answer, extract_answer, numeric_answer, parse_number

__all__ = ["code_tests", "exact_answer", "extract_answer", "extract_code", "format_regex", "format_tags", "length_penalty", "numeric_answer",
           "overlong_penalty", "parse_number"]
