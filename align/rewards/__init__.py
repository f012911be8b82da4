"""The reward contract for GRPO and PPO: loading reward functions by name, calling them, combining them.

A reward function is a plain callable

    f(prompts, completions, completion_ids, **columns) -> list[float | None]

with one value per completion. `prompts` are as in the dataset (strings, or message lists for
conversational data), `completions` are decoded strings, `completion_ids` lists of token ids, and
every dataset column of the batch comes as a keyword argument (`answer=[...]`). A function that
takes `**kwargs` gets everything; otherwise only the parameters it declares. `None` means "does not
apply to this sample" and is skipped when functions are combined with weights. `async def`
functions run concurrently on one event loop owned by `RewardFunctions`; plain ones one after
another, each in a worker thread.

Checks (AlignError naming the function, and the row where there is one): a call (one batch) may
take at most `timeout_s` seconds (recipe `grpo.rewards[i].timeout_s`, default 600, null: no limit;
a plain function cannot be stopped, its thread is left behind); a function that raises SystemExit
(calls `sys.exit`) or KeyboardInterrupt is an error, not the end of the run; the result must be
flat (one number or None per completion, not [B, 1]), finite, and at most `max_abs` (default 1e6)
in absolute value.

Recipes name a reward by registry name, `module:func`, `path/to/file.py:func` or a reward-model
directory (`align.rewards.loading`); `RewardFunctions` calls and combines them
(`align.rewards.calling`).
"""

from align.rewards.calling import RewardFunctions
from align.rewards.loading import REGISTRY, load_reward_function, register, spec_name

__all__ = ["REGISTRY", "RewardFunctions", "load_reward_function", "register", "spec_name"]
