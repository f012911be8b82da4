"""One module per case. A case module defines:

    VARIANTS        the TRL configurations it compares against (the first is TRL's default)
    ALGORITHM       Align's algorithm name;  MODEL: "lm" (causal LM) or "rm" (reward model)
    data(n_train, n_eval)            -> (train rows, eval rows), written to jsonl by the runner
    tokens(spec, tokenizer)          -> trained tokens of one epoch, counted once for every side
    initial_model(spec)              -> the starting model, as transformers loads it
    align(spec) / trl(spec)          -> Prepared: setup done, `train()` is the timed epoch
    floor(spec, model, tokenizer)    -> Prepared: the bare forward+backward+AdamW loop
    heldout(spec, model, tokenizer)  -> the held-out loss, the same function for every side (None: none)

Optional: BASELINE (what `trl` runs: "TRL" unless said otherwise), COMPARE = "work" (online RL:
the sides must sample the same work instead of reaching the same held-out loss); a case without
`floor` or `tokens` has no floor row.
"""

from benchmarks.cases import dpo, grpo, ppo, rm, sft, sft_long, sft_short

CASES = {"sft": sft, "sft_short": sft_short, "sft_long": sft_long, "rm": rm, "dpo": dpo, "grpo": grpo, "ppo": ppo, "grpo_kl": grpo}
"""`grpo_kl` is the `grpo` case with its own preset: beta > 0 (a KL reference on both sides) and short prompts."""
