"""SFT on long chats packed into long rows: the MFU case (issue 13: MFU >= 35% on the 1.5b preset
with packed 8k-token rows).

Chats of 1..60 question/answer turns (~30 to ~1.7k tokens, ~0.8k on average, under the tiny model's
tokenizer; ~1k on average and up to max_length under the Qwen2 presets', see assets.py; the preset's
`context_lines` bounds the turns), `batch_size` of them per micro-batch, packed by Align into rows
of up to `pack_length` tokens (9 chats fill about one 8k row under the tiny tokenizer, one and a
runt under the Qwen2 presets'); on CUDA into one row per micro-batch, where the varlen kernel keeps
the chats apart (`align.models.varlen`, `Trainer.one_row`): attention costs what each chat needs,
not what a long row with a block-diagonal mask would. TRL variants as in `sft` (its
`packing` rows hold batch_size x the mean chat: ~9.2k tokens on `1.5b`; transformers derives their per-chat
mask from the position ids). Everything but the data is the `sft` case's.
"""

from __future__ import annotations

from align.toy import chat_rows
from benchmarks.cases.sft import align, floor, heldout, initial_model, tokens, trl  # noqa: F401

VARIANTS = ("default", "packing", "padding_free")
ALGORITHM = "sft"
MODEL = "lm"


def data(n_train: int, n_eval: int, context_lines: tuple[int, int] = (1, 60)) -> tuple[list[dict], list[dict]]:
    turns = context_lines[1]
    return chat_rows(n_train, seed=15, max_turns=turns), chat_rows(n_eval, seed=16, max_turns=turns)


__all__ = ["VARIANTS", "ALGORITHM", "MODEL", "data", "tokens", "initial_model", "align", "trl", "floor", "heldout"]
