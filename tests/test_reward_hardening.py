"""Reward functions are user code: time limits, exits, shapes and magnitudes are errors that name the function."""

import _thread
import asyncio
import signal
import sys
import threading
import time

import numpy as np
import pytest
import torch

from align.config import RewardFunctionConfig
from align.errors import AlignError
from align.rewards import RewardFunctions
from align.toy import prompt_rows
from align.trainers import GRPOTrainer
from rewards.math import exact_answer

KEYS = ["grpo.rewards[0]", "grpo.rewards[1]"]


def batch(n=2):
    """(prompts, completions, completion_ids, columns) with n rows."""
    return [f"q{i}" for i in range(n)], [f"The answer is {i}." for i in range(n)], [[1, 2]] * n, {"answer": ["1"] * n}


def call(fn, **kwargs):
    """Call [exact_answer, fn] on a batch of two, as grpo.rewards[0] and [1]."""
    rewards = RewardFunctions([exact_answer, fn], keys=KEYS, **kwargs)
    try:
        return rewards(*batch())
    finally:
        rewards.close()


# ------------------------------------------------------------------------------------------- timeouts

def hangs(completions, **_):
    time.sleep(30)


async def hangs_async(completions, **_):
    await asyncio.sleep(30)


@pytest.mark.parametrize("fn", [hangs, hangs_async])
def test_a_call_past_its_timeout_names_the_function_and_the_key(fn):
    start = time.perf_counter()
    with pytest.raises(AlignError) as error:
        call(fn, timeouts=0.2)
    assert time.perf_counter() - start < 1.0
    assert str(error.value).startswith(f"reward function {fn.__name__!r} (grpo.rewards[1]) took longer than 0.2 s "
                                       "on a batch of 2 completions"), str(error.value)
    assert "grpo.rewards[1].timeout_s" in str(error.value)
    if fn is hangs:  # still sleeping, in a daemon thread: it does not keep the process alive at exit
        workers = [t for t in threading.enumerate() if t.name == "align-reward"]
        assert workers and all(t.daemon for t in workers)


def test_timeouts_per_function_from_the_recipe_and_none_for_no_limit(tmp_path):
    slow = tmp_path / "slow.py"
    slow.write_text("import time\n\ndef slow(completions, **_):\n    time.sleep(0.3)\n"
                    "    return [1.0] * len(completions)\n")
    assert call(exact_answer, timeouts=None)[:, 1].tolist() == [0.0, 1.0]
    start = time.perf_counter()
    rewards = RewardFunctions.from_config([RewardFunctionConfig(fn="exact_answer"),
                                           RewardFunctionConfig(fn=f"{slow}:slow", timeout_s=0.1)])
    with pytest.raises(AlignError, match=r"'slow.slow' \(grpo.rewards\[1\]\) took longer than 0.1 s.*"
                                         r"grpo.rewards\[1\].timeout_s \(null: no limit\)"):
        rewards(*batch())
    assert time.perf_counter() - start < 1.0
    assert RewardFunctions([rewards.functions[1]], timeouts=[None])(*batch()).tolist() == [[1.0], [1.0]]
    with pytest.raises(AlignError, match=r"raise the limit with RewardFunctions\(timeouts=...\)"):
        RewardFunctions([hangs], timeouts=0.1)(*batch())


# ------------------------------------------------------------------------------------------- exits

def exits(completions, **_):
    sys.exit(0)


async def exits_async(completions, **_):
    sys.exit(0)


def interrupts(completions, **_):
    raise KeyboardInterrupt


@pytest.mark.parametrize("fn, what", [(exits, "called sys.exit(0) / raised SystemExit"),
                                      (exits_async, "called sys.exit(0) / raised SystemExit"),
                                      (interrupts, "raised KeyboardInterrupt")])
def test_an_exit_inside_a_reward_is_an_error_naming_it(fn, what):
    with pytest.raises(AlignError) as error:
        call(fn)
    assert str(error.value) == (f"reward function {fn.__name__!r} (grpo.rewards[1]) {what}; a reward must return "
                                "scores (one float or None per completion), not end the run")


def test_a_ctrl_c_outside_the_reward_still_interrupts():
    def user_presses_ctrl_c(completions, **_):  # the reward returns; the interrupt is the main thread's
        _thread.interrupt_main()
        return [1.0] * len(completions)

    # Python's own Ctrl-C handler: a process a shell starts in the background without job control
    # inherits SIGINT ignored, and interrupt_main then does nothing
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            call(user_presses_ctrl_c)
            time.sleep(2)  # the interrupt reaches the main thread asynchronously: it may land just after call returns
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)  # (None: a C handler)
    with pytest.raises(AlignError, match="raised KeyboardInterrupt"):
        call(interrupts)


# ------------------------------------------------------------------------------------------- values

@pytest.mark.parametrize("value, shape", [(torch.ones(2, 1), "Tensor of shape [2, 1]"),
                                          (torch.ones(2, 2), "Tensor of shape [2, 2]"),
                                          (np.ones((2, 1)), "ndarray of shape [2, 1]"),
                                          ([[1.0], [0.0]], "list of shape [2, 1]"),
                                          ([torch.ones(1), torch.ones(1)], "list of shape [2, 1]")])
def test_a_2d_result_is_refused_with_its_shape(value, shape):
    with pytest.raises(AlignError) as error:
        call(lambda completions, **_: value)
    assert f"(grpo.rewards[1]) returned a {shape}; a reward function returns one number per completion: a flat " \
           "list (or 1-D tensor) of 2 floats or None, e.g. scores.squeeze(-1).tolist()" in str(error.value)


def test_a_value_above_max_abs_names_the_row_and_the_key():
    def huge(completions, **_):
        return [1.0, -2e6]

    with pytest.raises(AlignError) as error:
        call(huge)
    assert str(error.value) == ("reward function 'huge' (grpo.rewards[1]) returned -2e+06, more than max_abs=1e+06 in "
                                "absolute value\n  at row 1 of the batch\n  prompt: 'q1'\n  completion: "
                                "'The answer is 1.'\nScale the reward down, or raise the bound with "
                                "grpo.rewards[1].max_abs")
    assert call(huge, max_abs=[1.0, 1e7])[:, 1].tolist() == [1.0, -2e6]
    with pytest.raises(AlignError, match=r"(?s)returned 1, more than max_abs=0.5 .*at row 0.*"
                                         r"RewardFunctions\(max_abs=...\)"):
        RewardFunctions([huge], max_abs=0.5)(*batch())
    rewards = RewardFunctions.from_config([RewardFunctionConfig(fn="exact_answer", max_abs=0.5)])
    with pytest.raises(AlignError, match=r"(?s)returned 1, more than max_abs=0.5.*grpo.rewards\[0\].max_abs"):
        rewards(["q"], ["The answer is 1."], [[1]], {"answer": ["1"]})


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -float("inf")])
def test_a_weight_that_is_not_finite_is_refused(weight):
    with pytest.raises(AlignError, match=rf"grpo.rewards\[1\]: weight {weight} is not a finite number"):
        RewardFunctions([exact_answer, exact_answer], weights=[1.0, weight], keys=KEYS)


# ------------------------------------------------------------------------------------------- end to end

def test_grpo_run_with_a_reward_calling_sys_exit_raises(make_recipe, tmp_path):
    quits = tmp_path / "quits.py"  # passes the dry run (2 completions), exits on the first training batch
    quits.write_text("import sys\n\ndef quits(completions, **_):\n    if len(completions) > 2:\n        sys.exit(0)\n"
                     "    return [0.0] * len(completions)\n")
    recipe = make_recipe(algorithm="grpo", rows=prompt_rows(8, seed=21), data={"max_length": 64},
                         train={"batch_size": 8, "max_steps": 1},
                         grpo={"group_size": 4, "sampling": {"max_new_tokens": 4},
                               "rewards": [{"fn": "exact_answer"}, {"fn": f"{quits}:quits"}]})
    trainer = GRPOTrainer.from_recipe(recipe)
    with pytest.raises(AlignError) as error:
        trainer.fit()
    assert str(error.value).startswith("reward function 'quits.quits' (grpo.rewards[1]) called sys.exit(0)")
