"""Small Llama-shaped models and tokenizers built offline, addressed as `builtin:<name>`.

They stand in for hub models wherever the network is missing (tests, the quickstart). The first
use builds a random-weight one into a cache directory; later uses load it from there through the
same local-path loader as any real model. The built-ins Align trains itself (`TRAINED`) are never
built here: a loader must not run a training. The top floor builds them first (`align build`,
`align train`, `align.toy.build_builtin`); until then `resolve` says how.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
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


TRAINED = {"tiny-llama-arith": "tiny-llama", "tiny-judge-arith": "tiny-llama-arith"}
"""Built-ins that Align trains itself (name -> the built-in they start from): see `align.toy.build_builtin`."""


def builtin_name(name_or_path: str) -> str | None:
    """`tiny-llama` for `builtin:tiny-llama` (AlignError for an unknown built-in), None for anything else."""
    if not name_or_path.startswith(PREFIX):
        return None
    name = name_or_path.removeprefix(PREFIX)
    if name not in SPECS and name not in TRAINED:
        raise AlignError(f"model.name_or_path: unknown built-in model {name!r}; choose one of "
                         + ", ".join(PREFIX + n for n in [*SPECS, *TRAINED]))
    return name


def builtin_dir(name: str) -> Path:
    return cache_dir() / "builtin" / f"{name}-v{BUILD_VERSION}"


def is_built(name: str) -> bool:
    return (builtin_dir(name) / "config.json").exists()


def install(name: str, build: Callable[[Path], None]) -> None:
    """Run `build(staging_dir)` and move the result to the built-in's directory in one rename (a
    concurrent builder either wins or finds it there; a failed build leaves nothing)."""
    target = builtin_dir(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    try:
        build(staging)
        staging.rename(target)
    except OSError:
        if not is_built(name):
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve(name_or_path: str, for_config: bool = False) -> str:
    """Map `builtin:<name>` to a local directory, building a random-weight one once; other values
    pass through (`~` expanded). A trained built-in must be built first (AlignError saying how);
    with for_config (only its config is read) an unbuilt one resolves to the built-in it is trained
    from, which has the same architecture."""
    name = builtin_name(name_or_path)
    if name is None:
        return os.path.expanduser(name_or_path)  # `~/models/x` as a shell would read it
    if name in TRAINED and not is_built(name):
        if for_config:
            return resolve(PREFIX + TRAINED[name], for_config=True)  # (it may be trained itself)
        raise AlignError(f"model.name_or_path: {name_or_path} is a model Align trains itself, and this cache "
                         f"({cache_dir()}) does not hold it yet; build it once with `align build {name_or_path}` "
                         f"(align train, quickstart and the examples do so themselves; from Python: "
                         f"align.toy.build_builtin({name!r}))")
    if not is_built(name):
        from align.toy import corpus

        def build(staging: Path) -> None:
            tokenizer = build_tokenizer(corpus(), SPECS[name][0])
            build_model(name, tokenizer).save_pretrained(staging)
            tokenizer.save_pretrained(staging)

        install(name, build)
    return str(builtin_dir(name))


def portable(path: str) -> str:
    """`builtin:<name>` for the directory a built-in was built into here (any cache rebuilds it),
    else `path` unchanged: what a saved adapter should name as its base."""
    built = Path(path)
    if built.parent == builtin_dir("x").parent and built.name.endswith(f"-v{BUILD_VERSION}"):
        return PREFIX + built.name.removesuffix(f"-v{BUILD_VERSION}")
    return path
