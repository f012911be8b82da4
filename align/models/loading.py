"""Load a causal LM and its tokenizer from a hub id, a local directory or `builtin:<name>`.

The adapter goes on here (`align.models.lora`); QLoRA's base loads in 4-bit NF4 through
bitsandbytes. A directory saved by Align with a peft adapter loads as its base with the adapter
merged in, so a later stage (DPO after SFT) starts from the trained weights.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          BitsAndBytesConfig, PreTrainedTokenizerBase)

from align.config import AdapterConfig, ModelConfig
from align.errors import AlignError
from align.models import tiny, varlen
from align.models.kinds import architecture_name, inspect_checkpoint, read_config
from align.models.lora import apply_adapter, peft_quietly
from align.models.recompute import checkpoint_some_layers, enable_activation_checkpointing
from align.models.reference_cache import files_hash, json_hash

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    """`auto` is bfloat16 on a GPU that supports it and float32 elsewhere."""
    if name != "auto":
        return DTYPES[name]
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


def _adapter_base(path: str) -> str | None:
    """The base model of an Align/peft adapter directory, or None if `path` is not one."""
    settings = read_config(path, "adapter_config.json", "model.name_or_path")
    return None if settings is None else tiny.resolve(settings["base_model_name_or_path"])


def _model_root(path: str) -> str:
    """The full model at the root of a chain of adapter directories (`path` itself if it is none): its
    config is the architecture's."""
    while (base := _adapter_base(path)) is not None:
        path = base
    return path


def load_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    path = tiny.resolve(config.tokenizer or config.name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=config.revision,
                                                  trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as error:
        raise AlignError(f"model.tokenizer: cannot load a tokenizer from {path!r}: {error}") from None
    if config.chat_template:
        template, template_file = config.chat_template, os.path.expanduser(config.chat_template)
        if os.path.isfile(template_file):
            with open(template_file) as f:
                template = f.read()
        elif "{" not in template:  # a template's text has {{ }} or {% %}: this is a path, to no file
            raise AlignError(f"model.chat_template: no file {template!r} (a path is relative to the directory "
                             f"you run from, {os.getcwd()}; a template's own text holds {{% ... %}} tags)")
        tokenizer.chat_template = template
    if config.tokenizer:
        check_same_vocabulary(tokenizer, config)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise AlignError(f"the tokenizer of {path!r} has neither a pad nor an eos token; "
                             "add one to the tokenizer (tokenizer.add_special_tokens) and save it")
        log.warning("tokenizer has no pad token; using its eos token %r for padding", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "vocab.txt")
"""Files that hold a tokenizer's vocabulary (or a sentencepiece `*.model`); a tokenizer_config.json
alone makes transformers build a default vocabulary, nothing to compare with."""


def check_same_vocabulary(tokenizer, config: ModelConfig) -> None:
    """AlignError if `tokenizer` (model.tokenizer's) reads a token of the model's own tokenizer (the
    one saved with model.name_or_path) as another id, or lacks it: the model would read other text
    than it learnt, with no error. Tokens added to either may differ (a tokenizer with tokens added,
    renamed reserved tokens). Nothing to check where the model has no vocabulary of its own on this
    machine (a hub id is not fetched for it), or one that does not load (a reason to give another)."""
    own_path = tiny.resolve(config.name_or_path, for_config=True)
    given_path = tiny.resolve(config.tokenizer, for_config=True)
    if not os.path.isdir(own_path) or os.path.realpath(own_path) == os.path.realpath(given_path):
        return
    if not any(name in VOCABULARY_FILES or name.endswith(".model") for name in os.listdir(own_path)):
        return
    try:
        own = AutoTokenizer.from_pretrained(own_path, trust_remote_code=config.trust_remote_code)
    except Exception:  # noqa: BLE001 (tokenizers raises bare Exceptions on files it cannot read)
        return
    given, added = tokenizer.get_vocab(), set(own.get_added_vocab())
    differ = [(token, i) for token, i in own.get_vocab().items() if token not in added and given.get(token) != i]
    if differ:
        token, i = min(differ, key=lambda pair: pair[1])
        here = "lacks" if given.get(token) is None else f"reads as id {given[token]}"
        raise AlignError(f"model.tokenizer: {config.tokenizer!r} is not the vocabulary of the model's own tokenizer "
                         f"({config.name_or_path!r}): {len(differ)} of its {len(own)} tokens differ, e.g. {token!r}, "
                         f"id {i} in the model's, which this tokenizer {here}; the model would read other text than "
                         "it learnt. Give the model's own tokenizer, or one that only adds tokens to it")


def check_vocabulary(model, tokenizer, key: str = "model.tokenizer") -> None:
    """AlignError naming `key` if `tokenizer` has ids the model has no embedding for (a tokenizer of
    another model, or tokens added without resizing the embeddings): on a CPU an IndexError in the
    forward, on a GPU a device-side assert."""
    rows = model.get_input_embeddings().num_embeddings
    if tokenizer is not None and len(tokenizer) > rows:  # (None: a policy built without one, in Python)
        raise AlignError(f"{key}: the tokenizer has {len(tokenizer)} tokens, more than the model's {rows} embedding "
                         f"rows (ids from {rows} on have none); give the model's own tokenizer, or resize the model's "
                         "embeddings to the tokenizer (model.resize_token_embeddings) and save it")


def local_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase | None:
    """`load_tokenizer(config)` where the tokenizer is on this machine (a built-in or a local
    directory: nothing is downloaded, no weights load, a random-weight built-in is built once), else
    None. A built-in Align trains itself has its base's tokenizer, read from the base where it is
    not built yet."""
    name = config.tokenizer or config.name_or_path
    if not (name.startswith(tiny.PREFIX) or os.path.isdir(os.path.expanduser(name))):
        return None
    return load_tokenizer(config.model_copy(update={"tokenizer": tiny.resolve(name, for_config=True)}))


def load_model(config: ModelConfig, adapter: AdapterConfig, head: str = "causal_lm"):
    """The trainable model: plain, LoRA or QLoRA as `adapter.kind` says.

    head: `causal_lm` (the lm-head) or `score` (a one-scalar sequence-classification head, for
    reward and value models; it is trained in full precision also under QLoRA).
    """
    path = tiny.resolve(config.name_or_path)
    dtype = resolve_dtype(config.dtype)
    base = _adapter_base(path)
    quantize = adapter.kind == "qlora"
    kwargs = dict(dtype=dtype, attn_implementation=config.attn_implementation, revision=config.revision,
                  trust_remote_code=config.trust_remote_code)
    auto_class = AutoModelForCausalLM
    if head == "score":
        check_has_score_head(path, config)
        auto_class = AutoModelForSequenceClassification
        kwargs["num_labels"] = 1
    else:
        check_not_a_reward_model(config)
    if quantize:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype, llm_int8_skip_modules=["score", "lm_head"])
        kwargs["device_map"] = {"": _device()}
    try:
        if base is not None:
            model = _load_merged(path, base, kwargs, quantize, auto_class)
            model.name_or_path = os.path.abspath(path)  # what an adapter trained on it names as its base
        else:
            model = _pretrained(auto_class, path, **kwargs)
    except (OSError, ValueError) as error:
        raise AlignError(f"model.name_or_path: cannot load {config.name_or_path!r}: {error}") from None
    if quantize:
        keep_4bit_forward_exact(model)
    if _device() in varlen.KERNEL_DEVICES:
        varlen.use_varlen(model)  # packed rows through the varlen kernel; SDPA otherwise
    model.config.use_cache = False
    if model.config.pad_token_id is None:  # sequence classification reads the last non-pad token
        model.config.pad_token_id = load_tokenizer(config).pad_token_id
    checkpointing = config.checkpoint_mode if config.gradient_checkpointing else None
    if checkpointing:
        enable_activation_checkpointing(model, checkpointing)
    model = apply_adapter(model, adapter, checkpointing, "SEQ_CLS" if head == "score" else "CAUSAL_LM")
    if config.gradient_checkpointing and config.checkpointed_layers < 1:  # (after QLoRA's preparation, which enables all)
        checkpoint_some_layers(model, config.checkpointed_layers)
    return model


def check_not_a_reward_model(config: ModelConfig, key: str = "model.name_or_path") -> None:
    """AlignError if a local `config.name_or_path` holds a reward model (a ...ForSequenceClassification
    or its SEQ_CLS adapter) where a causal LM is wanted: it has no lm-head. Reads only configs."""
    path = tiny.resolve(config.name_or_path, for_config=True)
    checkpoint = inspect_checkpoint(path, key) if os.path.isdir(path) else None
    if checkpoint is not None and checkpoint.is_reward_model:
        raise AlignError(f"{key}: {config.name_or_path!r} holds a reward model ({checkpoint.what}), not a causal LM: "
                         "it has no lm-head to generate or train with. Give a policy's run (e.g. an SFT run) or a "
                         "base model")


def _pretrained(auto_class, path: str | Path, **kwargs):
    """`auto_class.from_pretrained(path, **kwargs)`, refusing a checkpoint that lacks weights the model
    needs (transformers initializes them at random and only prints a report): a causal LM loaded from
    a reward model's directory (no lm-head), or a model missing layers. Only a new classification head
    may be missing: a reward model or critic started from a causal LM."""
    model, info = auto_class.from_pretrained(path, output_loading_info=True, **kwargs)
    new_head_allowed = auto_class is AutoModelForSequenceClassification
    backbone = model.base_model_prefix + "."
    missing = sorted(k for k in info["missing_keys"] if not new_head_allowed or k.startswith(backbone))
    if missing:
        held = architecture_name(getattr(model.config, "architectures", None))
        raise AlignError(f"model.name_or_path: {tiny.portable(str(path))!r} holds {held}, which lacks {len(missing)} "
                         f"weight(s) a {type(model).__name__} needs ({', '.join(missing[:3])}"
                         f"{', ...' if len(missing) > 3 else ''}): they would start random. Give a checkpoint of "
                         "this kind of model (e.g. an SFT run, not a reward model's, for a policy)")
    return model


def check_has_score_head(path: str, config: ModelConfig) -> None:
    """Reward and value models are transformers' sequence-classification models; refuse a family
    that has none (e.g. Cohere, Granite) before loading anything."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    try:
        model_type = AutoConfig.from_pretrained(_model_root(path), revision=config.revision,
                                                trust_remote_code=config.trust_remote_code).model_type
    except (OSError, ValueError):
        return  # from_pretrained reports it
    if model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES and not config.trust_remote_code:
        raise AlignError(f"model type {model_type!r} has no sequence-classification model in transformers, which "
                         "Align uses for reward models and PPO's separate critic; for PPO use ppo.critic: shared "
                         "(a value head on the policy), for a reward model pick a family that has one")


def _load_merged(adapter_dir: str, base: str, kwargs: dict, quantize: bool, auto_class=AutoModelForCausalLM):
    """Load an adapter directory as its base with the adapter merged in.

    4-bit: the merged model is saved once in full precision and loaded quantized from there, a
    directory of the cache keyed by the content of the adapter and of the base (`_merged_dir`): a
    stage re-run into the same adapter directory gets merged anew, and nothing is written into it.
    """
    full_kwargs = {k: v for k, v in kwargs.items() if k not in ("quantization_config", "device_map")}
    if not quantize:
        return _merge(adapter_dir, base, full_kwargs, auto_class)
    merged_dir = _merged_dir(adapter_dir, base, full_kwargs, auto_class)
    if not merged_dir.is_dir():
        _save_atomically(_merge(adapter_dir, base, full_kwargs, auto_class), merged_dir)
        log.info("QLoRA: %s merged into its base %s, saved in full precision for 4-bit loading in %s",
                 adapter_dir, base, merged_dir)
    return _pretrained(auto_class, merged_dir, **kwargs)


def _full_model(auto_class, path: str, full_kwargs: dict):
    """The model in `path` in full precision: a model's directory or hub id, or an adapter directory merged
    into its base, which may be an adapter directory itself (a LoRA run started from another's)."""
    base = _adapter_base(path)
    return _pretrained(auto_class, path, **full_kwargs) if base is None else _merge(path, base, full_kwargs, auto_class)


def _merge(adapter_dir: str, base: str, full_kwargs: dict, auto_class):
    from peft import PeftModel

    with peft_quietly():
        model = _full_model(auto_class, base, full_kwargs)
        try:
            return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
        except RuntimeError as error:
            mismatches = re.findall(r"size mismatch for (?:base_model\.model\.)?(\S+?)(?:\.default)?(\.weight)?: copying "
                                    r"a param with shape torch.Size\((\[.*?\])\) from checkpoint, the shape in current "
                                    r"model is torch.Size\((\[.*?\])\)", str(error))
            if not mismatches:
                raise
            name, suffix, theirs, ours = mismatches[0]
            raise AlignError(f"model.name_or_path: the adapter in {adapter_dir!r} was not trained on the base its "
                             f"adapter_config.json names ({tiny.portable(base)}): {len(mismatches)} of its weights "
                             f"have other shapes, e.g. {name}{suffix} is {theirs} in the adapter and {ours} in the "
                             "base; set base_model_name_or_path in adapter_config.json to the model it was trained "
                             "from") from None


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
MODEL_FILES = ("*.safetensors", "*.bin", "*.json", "*.py")  # weights, configs, remote code


def _merged_dir(adapter_dir: str, base: str, full_kwargs: dict, auto_class) -> Path:
    """`<cache>/merged/<key>`: the key hashes the adapter's files, the base model's files (down a chain
    of adapters) and how the base is loaded (class, dtype, revision...), so any change to them names
    another directory."""
    key = json_hash({"adapter": files_hash(adapter_dir, ADAPTER_FILES), "base": _files_key(base, full_kwargs),
                     "class": auto_class.__name__, "kwargs": full_kwargs})
    return tiny.cache_dir() / "merged" / key


def _files_key(path: str, full_kwargs: dict):
    """A hash of the files a model's weights come from: a model's, or an adapter's and its base's."""
    base = _adapter_base(path)
    if base is None:
        return files_hash(_model_files_dir(path, full_kwargs.get("revision")), MODEL_FILES)
    return {"adapter": files_hash(path, ADAPTER_FILES), "base": _files_key(base, full_kwargs)}


def _model_files_dir(name_or_path: str, revision: str | None) -> str:
    """The local directory of a model's files: `name_or_path` itself, or its hub snapshot."""
    if os.path.isdir(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download

    return snapshot_download(name_or_path, revision=revision, allow_patterns=list(MODEL_FILES))


def _save_atomically(model, target: Path) -> None:
    """save_pretrained into a temp directory beside `target`, fsynced, then renamed to it (a
    concurrent writer of the same key either wins or finds `target` there)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name[:16]}-"))
    model.save_pretrained(staging)
    for file in staging.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    try:
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)


def keep_4bit_forward_exact(model) -> None:
    """Keep every bitsandbytes 4-bit layer on its dequantize-then-matmul path.

    On a CPU with AVX512-BF16, the first forward of a `Linear4bit` in eval mode without gradients
    (generation, evaluation) repacks its weight in place for a bf16 inference kernel, and every
    later forward uses that kernel, training ones included: it rounds to bf16 and has no backward,
    so the gradients of everything below the layer (the LoRA weights of earlier layers) come out
    wrong, silently. The layer's own switch for that kernel is turned off.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def model_skeleton(config: ModelConfig, head: str = "causal_lm"):
    """The model's modules on the meta device, built from its config alone (no weights are read, nothing
    is downloaded); None if the config is not on this machine (a hub model not in the cache)."""
    from transformers import AutoConfig

    path = tiny.resolve(config.name_or_path, for_config=True)
    try:
        model_config = AutoConfig.from_pretrained(_model_root(path), revision=config.revision,
                                                  trust_remote_code=config.trust_remote_code, local_files_only=True)
    except (OSError, ValueError):
        return None
    auto_class = AutoModelForCausalLM
    if head == "score":
        auto_class, model_config.num_labels = AutoModelForSequenceClassification, 1
    with torch.device("meta"):
        return auto_class.from_config(model_config, trust_remote_code=config.trust_remote_code)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
