"""Sandboxed code executions per second through the `code_tests` reward (bwrap, `align.sandbox`).

    python -m benchmarks.sandbox_throughput                 # workers = the CPUs this process may use
    python -m benchmarks.sandbox_throughput --workers 2 --n 256

Two batches of completions, one test each (one execution per completion): a trivial passing solution,
and a mixed batch (a pass, a wrong answer, an exception, a stdin/stdout pass, a 0.3 s sleep; the sleep
shows how a slow test holds a worker). A CPU-bound batch measures the machine, not the sandbox: the
fixed cost per execution is bwrap's namespaces plus a Python start (~30 ms of one core here).
"""

from __future__ import annotations

import argparse
import time

from align_rewards.code import _sandbox, code_tests
from align.sandbox import Limits

PASS = "```python\ndef add(a, b):\n    return a + b\n```"
MIXED = [
    (PASS, "assert add(2, 3) == 5", None),
    ("```python\ndef add(a, b):\n    return a - b\n```", "assert add(2, 3) == 5", None),
    ("```python\ndef add(a, b):\n    raise ValueError\n```", "assert add(2, 3) == 5", None),
    ("```python\nprint(sum(map(int, input().split())))\n```", None, [{"input": "2 3", "output": "5"}]),
    ("```python\nimport time\ntime.sleep(0.3)\ndef add(a, b):\n    return a + b\n```", "assert add(2, 3) == 5", None),
]


def measure(completions, tests, test_cases, workers) -> tuple[float, list]:
    start = time.perf_counter()
    rewards = code_tests(completions, tests=tests, test_cases=test_cases, timeout_s=5.0, workers=workers)
    return len(completions) / (time.perf_counter() - start), rewards


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200, help="completions per batch")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    sandbox = _sandbox(Limits(timeout_s=5.0), "/usr/bin/python3", args.workers)
    print(f"sandbox set up and self-checked in {time.perf_counter() - start:.2f} s; workers={sandbox.workers}")
    rate, rewards = measure([PASS] * args.n, [["assert add(2, 3) == 5"]] * args.n, None, args.workers)
    assert rewards == [1.0] * args.n, rewards
    print(f"trivial passing solution: {rate:.1f} executions/s ({args.n} executions)")
    rows = [MIXED[i % len(MIXED)] for i in range(args.n)]
    rate, rewards = measure([r[0] for r in rows], [[r[1]] if r[1] else None for r in rows],
                            [r[2] for r in rows], args.workers)
    assert rewards == [[1.0, 0.0, 0.0, 1.0, 1.0][i % len(MIXED)] for i in range(args.n)], rewards
    print(f"mixed batch (pass/fail/error/stdin/0.3 s sleep): {rate:.1f} executions/s ({args.n} executions)")


if __name__ == "__main__":
    main()
