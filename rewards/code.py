"""Code reward: run the completion's Python against the row's tests in a sandbox (`align.sandbox`).

Columns (either or both; a row with neither gets None, "not scored"):

- `tests`: Python run after the solution in the same program, passing if it runs to its end: one
  string (one test) or a list of strings, one test each (MBPP's `test_list`, HumanEval's `test` plus
  `check(entry_point)`).
- `test_cases`: stdin/stdout cases, each run as the program with `input` on stdin, passing if it
  exits with 0 and prints `output` (compared line by line, each line stripped, trailing blank lines
  ignored). Given as a list of {"input", "output"}, as {"inputs": [...], "outputs": [...]} (APPS), as
  open-r1's `verification_info` ({"language", "test_cases": [{"input", "output", "type"}]}), or as
  JSON text of any of these. Function-call cases (a `fn_name`, or a `type` other than stdin_stdout)
  are not supported: a row with only such cases gets None.

The code is the last fenced ```python block (as open-r1's `extract_code`; ```py and ```python3 too);
a completion without one gets 0.
"""

from __future__ import annotations

import functools
import json
import re

from align.errors import AlignError
from align.sandbox import Limits, Sandbox


_FENCE = re.compile(r"```(?:python3?|py)[ \t]*\r?\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(completion) -> str | None:
    """The last closed ```python block of a completion (a string, or messages: the last one's
    content); None if there is none."""
    if isinstance(completion, list):
        completion = completion[-1]["content"] if completion else ""
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else None


def _lines(text: str) -> list[str]:
    lines = [line.strip() for line in str(text).splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def outputs_match(got: str, expected: str) -> bool:
    """Equal line by line after stripping each line and dropping trailing blank lines."""
    return _lines(got) == _lines(expected)


def _tests(value) -> list[str]:
    """A row's `tests` cell as a list of test programs (one string is one test)."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else [t for t in value if t]


def parse_test_cases(value, row: int) -> list[tuple[str, str]]:
    """(stdin, expected stdout) pairs from a row's `test_cases` cell (see the module docstring)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise AlignError(f"code_tests: row {row}: `test_cases` is text but not JSON ({error})") from None
    if isinstance(value, dict) and "test_cases" in value:  # open-r1 verification_info
        value = value["test_cases"]
    if isinstance(value, dict) and {"inputs", "outputs"} <= set(value):  # APPS input_output
        if value.get("fn_name"):
            return []
        value = [{"input": i, "output": o} for i, o in zip(value["inputs"], value["outputs"])]
    if isinstance(value, dict):
        raise AlignError(f"code_tests: row {row}: `test_cases` must be a list of {{'input', 'output'}}, APPS' "
                         f"{{'inputs', 'outputs'}} or open-r1's {{'test_cases': [...]}}, got keys {sorted(value)}")
    cases = []
    for case in value or []:
        if not isinstance(case, dict) or "input" not in case or "output" not in case:
            raise AlignError(f"code_tests: row {row}: a test case must be {{'input': ..., 'output': ...}}, "
                             f"got {str(case)[:80]!r}")
        if case.get("fn_name") or (case.get("type") or "stdin_stdout") != "stdin_stdout":
            continue
        cases.append(tuple("\n".join(v) if isinstance(v, list) else str(v) for v in (case["input"], case["output"])))
    return cases


@functools.lru_cache(maxsize=4)
def _sandbox(limits: Limits, python: str, workers: int | None) -> Sandbox:
    """One checked sandbox per setting (set up and self-checked on first use)."""
    return Sandbox(limits, python=python, workers=workers)


def code_tests(completions: list, tests: list | None = None, test_cases: list | None = None, mode: str = "fraction",
               language: str = "python", timeout_s: float = 5.0, memory_mb: int = 1024, workers: int | None = None,
               python: str = "/usr/bin/python3", **columns) -> list[float | None]:
    """The fraction of the row's tests the completion's code passes (mode="fraction"), or 1.0 only if it
    passes all of them (mode="all"); 0.0 without a code block, None for a row without tests.

    Each test is one sandboxed execution (`timeout_s` wall clock, `memory_mb`), `workers` at a time
    (default: the CPUs this process may use); `python` is the interpreter inside the sandbox.
    """
    if mode not in ("fraction", "all"):
        raise AlignError(f"code_tests: mode must be 'fraction' or 'all', got {mode!r}")
    if language != "python":
        raise AlignError(f"code_tests: language {language!r} is not supported; only 'python'")
    if tests is None and test_cases is None:
        names = sorted(c for c in columns if c not in ("prompts", "completion_ids"))
        raise AlignError("code_tests needs a `tests` column (Python run after the code, e.g. asserts) or a "
                         f"`test_cases` column (stdin/stdout cases); the batch has {', '.join(names) or 'no columns'}. "
                         "Rename yours with data.train.columns, e.g. {test_list: tests}")
    size = len(completions)
    tests, test_cases = tests or [None] * size, test_cases or [None] * size
    jobs, owners, totals, checks = [], [], [], []
    for row, (completion, asserts, io) in enumerate(zip(completions, tests, test_cases)):
        asserts, cases = _tests(asserts), parse_test_cases(io, row)
        totals.append(len(asserts) + len(cases))
        code = extract_code(completion)
        if code is None or not totals[-1]:
            continue
        for test in asserts:
            jobs.append((f"{code}\n\n{test}\n", ""))
            checks.append(lambda run: run.ok and run.finished)
        for stdin, expected in cases:
            jobs.append((code, stdin))
            checks.append(lambda run, expected=expected: run.ok and outputs_match(run.stdout, expected))
        owners += [row] * (len(asserts) + len(cases))
    passed = [0] * size
    if jobs:
        sandbox = _sandbox(Limits(timeout_s=timeout_s, memory_mb=memory_mb), python, workers)
        for row, check, run in zip(owners, checks, sandbox.map(jobs)):
            passed[row] += check(run)
    out = []
    for row, total in enumerate(totals):
        if not total:
            out.append(None)
        elif mode == "all":
            out.append(float(passed[row] == total))
        else:
            out.append(passed[row] / total)
    return out
