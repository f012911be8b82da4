"""SFT on many short chats: one-turn chats of ~17 tokens, 64 per optimizer step (issue 13's hidden task).

Packing a whole micro-batch into one row used to make attention quadratic in the batch's tokens
(one ~1,100-token row with a block-diagonal mask instead of 64 rows of ~17). Align now packs
best-fit decreasing into rows no longer than the batch's longest chat, so it never does more
attention work than padding. Align: its default (packing). TRL: its default (right padding)
and `padding_free` (the whole batch as one row, what Align did before).
Everything else (tokenization, TRL setup, the floor, the held-out loss) is the `sft` case's.
"""

from __future__ import annotations

from benchmarks.assets import short_chat_rows
from benchmarks.cases import sft
from benchmarks.cases.sft import align, floor, heldout, initial_model, tokens, trl  # noqa: F401

VARIANTS = ("default", "padding_free")
ALGORITHM = "sft"
MODEL = "lm"
CPU_MODEL = "builtin:tiny-llama"
"""With `--model tiny`, this case trains Align's built-in tiny Llama (512-token vocabulary, hidden 64,
2 layers: ~0.1M parameters), the "tiny Llama" of the reported task, where attention weighs what it
weighs for short rows; the 32k-vocabulary benchmark model would bury it under the lm-head."""


def data(n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    return short_chat_rows(n_train, seed=13), short_chat_rows(n_eval, seed=14)


__all__ = ["VARIANTS", "ALGORITHM", "MODEL", "CPU_MODEL", "data", "tokens", "initial_model", "align", "trl", "floor", "heldout",
           "sft"]
