"""The benchmark's model, tokenizer and data, built offline once and shared by Align and TRL.

Model: a Llama-shaped model with a realistic 32k vocabulary (hidden 256, 4 layers, 4 heads,
intermediate 688: ~19.5M parameters, 84% of them in the embedding and lm-head), so lm-head and
log-softmax costs weigh what they weigh in a real model. The tokenizer is Align's built-in tiny
byte-level BPE (512 tokens, ChatML template with generation markers); its ids all fall below
32000, so the model's 32k vocabulary covers them (rows above 512 are simply never looked up as
inputs, but every log-softmax runs over all 32000 logits, as in a real model).

Two directories are written under the cache: `lm/` (a causal LM, for SFT and DPO) and `rm/` (the
same backbone as a sequence classifier with its one-scalar head initialized once, so both
frameworks start from the very same reward model).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch

from align.toy import arithmetic_question, chat_rows, solution

MODEL = dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=4)
VERSION = 1  # bump when the model or tokenizer build changes


def cache_root() -> Path:
    return Path(os.environ.get("ALIGN_BENCH_CACHE", Path(__file__).parent / ".cache"))


def model_dirs() -> dict[str, Path]:
    """{"lm": dir, "rm": dir}, built on first use (atomically, so concurrent builders are safe)."""
    target = cache_root() / f"model-v{VERSION}"
    if not (target / "rm" / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".model-"))
        _build(staging)
        try:
            staging.rename(target)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    return {"lm": target / "lm", "rm": target / "rm"}


def _build(out: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from align.models.tiny import SPECS, build_tokenizer
    from align.toy import corpus

    tokenizer = build_tokenizer(corpus(), SPECS["tiny-llama"][0])
    config = LlamaConfig(**MODEL, max_position_embeddings=4096, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(config)
    lm.generation_config.pad_token_id = tokenizer.pad_token_id
    lm.save_pretrained(out / "lm")
    tokenizer.save_pretrained(out / "lm")
    rm_config = LlamaConfig(**config.to_dict())
    rm_config.num_labels = 1
    torch.manual_seed(1)
    rm = LlamaForSequenceClassification(rm_config)
    rm.model.load_state_dict(lm.model.state_dict())  # same backbone, fresh scalar head
    rm.save_pretrained(out / "rm")
    tokenizer.save_pretrained(out / "rm")


# ---- data ---------------------------------------------------------------------------------------
def sft_rows(n: int, seed: int) -> list[dict]:
    """Chats of 1..6 question/answer turns: lengths vary ~4x, as real chat data does."""
    return chat_rows(n, seed=seed, max_turns=6)


def long_prompt_preference_rows(n: int, seed: int, context_lines: tuple[int, int] = (12, 28)) -> list[dict]:
    """Preference pairs whose prompt carries a few hundred tokens of context (worked examples)
    before the question; chosen is a correct worked answer, rejected a hedged wrong one."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        lines = []
        for _ in range(rng.randint(*context_lines)):
            q, a = arithmetic_question(rng)
            lines.append(solution(q, a))
        question, answer = arithmetic_question(rng)
        wrong = answer + rng.choice([-3, -2, -1, 1, 2, 3])
        prompt = "Worked examples:\n" + "\n".join(lines) + f"\nQuestion: {question}\nAnswer:"
        rows.append({"prompt": prompt, "chosen": " " + solution(question, answer),
                     "rejected": f" Hmm, maybe {wrong}? I am not sure."})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)
