"""Small Llama-shaped models and tokenizers built offline, addressed as `builtin:<name>`.

They stand in for hub models wherever the network is missing (tests, the quickstart). The first
use builds the model into a cache directory; later uses load it from there through the same
local-path loader as any real model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from align.errors import AlignError

PREFIX = "builtin:"

# ChatML with {% generation %} markers, so transformers can return assistant-token masks.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]

BUILD_VERSION = 1  # bump when the builder changes, so stale cached builds are not reused
SPECS = {
    # name: (vocab size, hidden, intermediate, layers, heads, kv heads)
    "tiny-llama": (512, 64, 128, 2, 4, 2),
    "small-llama": (1024, 128, 344, 4, 4, 2),
}


def build_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, with a ChatML chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=2048)


def build_model(name: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    vocab, hidden, intermediate, layers, heads, kv_heads = SPECS[name]
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=2048, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None)
    with torch.random.fork_rng():  # building must not disturb the caller's random state
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGN_CACHE", Path.home() / ".cache" / "align"))


TRAINED = {"tiny-llama-arith": "tiny-llama"}
"""Built-ins that Align trains itself (name -> the built-in they start from): see `align.toy.train_builtin`."""


def resolve(name_or_path: str) -> str:
    """Map `builtin:<name>` to a local directory, building it once; other values pass through."""
    if not name_or_path.startswith(PREFIX):
        return name_or_path
    name = name_or_path.removeprefix(PREFIX)
    if name not in SPECS and name not in TRAINED:
        raise AlignError(f"model.name_or_path: unknown built-in model {name!r}; choose one of "
                         + ", ".join(PREFIX + n for n in [*SPECS, *TRAINED]))
    target = cache_dir() / "builtin" / f"{name}-v{BUILD_VERSION}"
    if not (target / "config.json").exists():
        if name in TRAINED and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise AlignError(f"model.name_or_path: {name_or_path} is built by a training run of its own, once per "
                             "cache, and a launch of several processes cannot do that; build it in one process first: "
                             f"python -c \"from align.models.tiny import resolve; resolve('{name_or_path}')\"")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
        if name in TRAINED:
            from align.toy import train_builtin

            train_builtin(name, PREFIX + TRAINED[name], staging)
        else:
            from align.toy import corpus

            tokenizer = build_tokenizer(corpus(), SPECS[name][0])
            build_model(name, tokenizer).save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)  # atomic: a concurrent builder either wins or finds the target there
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def portable(path: str) -> str:
    """`builtin:<name>` for the directory a built-in was built into here (any cache rebuilds it),
    else `path` unchanged: what a saved adapter should name as its base."""
    built = Path(path)
    if built.parent == cache_dir() / "builtin" and built.name.endswith(f"-v{BUILD_VERSION}"):
        return PREFIX + built.name.removesuffix(f"-v{BUILD_VERSION}")
    return path
