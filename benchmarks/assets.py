"""The benchmark's model, tokenizer and data, built offline once and shared by Align and TRL.

Model: a Llama-shaped model with a realistic 32k vocabulary (hidden 256, 4 layers, 4 heads,
intermediate 688: ~19.5M parameters, 84% of them in the embedding and lm-head), so lm-head and
log-softmax costs weigh what they weigh in a real model. The tokenizer is Align's built-in tiny
byte-level BPE (483 tokens, trained for at most 512; ChatML template with generation markers); its ids all fall below
32000, so the model's 32k vocabulary covers them (rows above 512 are simply never looked up as
inputs, but every log-softmax runs over all 32000 logits, as in a real model). Every side loads it
with `AutoTokenizer`, which picks the class from the model's type: the Qwen2 presets get a
`Qwen2Tokenizer` built from the same vocabulary and merges but with Qwen2's pre-tokenizer (one digit
per token, and the space before a number a token of its own), so their arithmetic data has ~27% more tokens than the tiny model's (sft_long: 146,626
against 115,092).

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

PRESETS = {
    # (config class, shape): random init, built offline from the config class alone
    "tiny": ("llama", dict(MODEL, tie_word_embeddings=False)),
    # Qwen2.5-0.5B's shape (24 layers, hidden 896, GQA 14/2, tied embeddings), with a 32k or its 151k vocabulary
    "0.5b": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                           num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)),
    "0.5b-32k": ("qwen2", dict(vocab_size=32000, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                               num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)),
    # Qwen2.5-1.5B's shape (28 layers, hidden 1536, GQA 12/2, tied embeddings)
    "1.5b": ("qwen2", dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                           num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True)),
}
"""--model presets: `tiny` (the CPU default, 19.5M parameters) and GPU-sized Qwen2 shapes."""


def cache_root() -> Path:
    return Path(os.environ.get("ALIGN_BENCH_CACHE", Path(__file__).parent / ".cache"))


def model_dirs(preset: str = "tiny", kinds: tuple[str, ...] = ("lm", "rm")) -> dict[str, Path]:
    """{"lm": dir, "rm": dir} of `preset`, each built on first use (atomically, so concurrent
    builders are safe); only the `kinds` asked for are built (a 1.5B build takes a while)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose from {sorted(PRESETS)}")
    root = cache_root() / (f"model-v{VERSION}" if preset == "tiny" else f"model-{preset}-v{VERSION}")
    dirs = {"lm": root / "lm", "rm": root / "rm"}
    for kind in kinds:
        if not (dirs[kind] / "config.json").exists():
            root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{kind}-"))
            _build(staging, preset, kind)
            try:
                staging.rename(dirs[kind])
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)
    return dirs


def model_config(preset: str, tokenizer):
    from transformers import LlamaConfig, Qwen2Config

    family, shape = PRESETS[preset]
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family]
    return cls(**shape, max_position_embeddings=4096 if preset == "tiny" else 32768,
               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)


def _build(out: Path, preset: str = "tiny", kind: str = "lm") -> None:
    """The causal LM (seed 0) or the reward model (the same backbone, seed-1 scalar head), saved
    with the tokenizer. GPU presets are saved in bf16 (half the disk and time); the cases load fp32."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from align.models.tiny import SPECS, build_tokenizer
    from align.toy import corpus

    tokenizer = build_tokenizer(corpus(), SPECS["tiny-llama"][0])
    config = model_config(preset, tokenizer)
    dtype = torch.float32 if preset == "tiny" else torch.bfloat16
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config)
    lm.generation_config.pad_token_id = tokenizer.pad_token_id
    if kind == "lm":
        lm.to(dtype).save_pretrained(out)
    else:
        rm_config = type(config)(**config.to_dict())
        rm_config.num_labels = 1
        torch.manual_seed(1)
        rm = AutoModelForSequenceClassification.from_config(rm_config)
        rm.model.load_state_dict(lm.model.state_dict())  # same backbone, fresh scalar head
        rm.to(dtype).save_pretrained(out)
    tokenizer.save_pretrained(out)


def matmul_parameters(model) -> int:
    """Parameters that take part in matrix multiplies (all but the input embedding, unless it is
    tied to the lm-head): the N of MFU's 6 * N * tokens."""
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight.data_ptr() == embedding.data_ptr()
    return sum(p.numel() for p in model.parameters()) - (0 if tied else embedding.numel())


PEAK_BF16_FLOPS = {"h100": 989e12, "h200": 989e12, "h800": 989e12, "a100": 312e12, "a800": 312e12,
                   "l40s": 362e12, "l4": 121e12, "a10g": 70e12, "rtx 4090": 165e12}
"""Dense bf16 tensor-core peaks (FLOP/s, no sparsity) by device name; $ALIGN_PEAK_FLOPS overrides."""


def peak_flops() -> float | None:
    if os.environ.get("ALIGN_PEAK_FLOPS"):
        return float(os.environ["ALIGN_PEAK_FLOPS"])
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name().lower()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


# ---- data ---------------------------------------------------------------------------------------
def sft_rows(n: int, seed: int) -> list[dict]:
    """Chats of 1..6 question/answer turns: lengths vary ~4x, as real chat data does."""
    return chat_rows(n, seed=seed, max_turns=6)


def short_chat_rows(n: int, seed: int) -> list[dict]:
    """One-turn chats of ~17 tokens with the template (a question, the bare number as the answer)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question, answer = arithmetic_question(rng)
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": str(answer)}]})
    return rows


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
