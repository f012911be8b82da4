"""Load a causal LM and its tokenizer from a hub id, a local directory or `builtin:<name>`.

Adapters are applied here too: LoRA through peft, QLoRA as LoRA over a 4-bit NF4 base loaded by
bitsandbytes. A directory saved by Align with a peft adapter loads as its base with the adapter
merged in, so a later stage (DPO after SFT) starts from the trained weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          BitsAndBytesConfig, PreTrainedTokenizerBase)

from align.config import AdapterConfig, ModelConfig
from align.errors import AlignError
from align.models import tiny, varlen
from align.models.recompute import checkpoint_kwargs, checkpoint_some_layers, enable_activation_checkpointing
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
    config_file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_file):
        return None
    with open(config_file) as f:
        return tiny.resolve(json.load(f)["base_model_name_or_path"])


def load_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    path = tiny.resolve(config.tokenizer or config.name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=config.revision,
                                                  trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as error:
        raise AlignError(f"model.tokenizer: cannot load a tokenizer from {path!r}: {error}") from None
    if config.chat_template:
        template = config.chat_template
        if os.path.isfile(template):
            with open(template) as f:
                template = f.read()
        tokenizer.chat_template = template
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise AlignError(f"the tokenizer of {path!r} has neither a pad nor an eos token; "
                             "add one to the tokenizer (tokenizer.add_special_tokens) and save it")
        log.warning("tokenizer has no pad token; using its eos token %r for padding", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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
    if quantize:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype, llm_int8_skip_modules=["score", "lm_head"])
        kwargs["device_map"] = {"": _device()}
    try:
        if base is not None:
            model = _load_merged(path, base, kwargs, quantize, auto_class)
        else:
            model = auto_class.from_pretrained(path, **kwargs)
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


def check_has_score_head(path: str, config: ModelConfig) -> None:
    """Reward and value models are transformers' sequence-classification models; refuse a family
    that has none (e.g. Cohere, Granite) before loading anything."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    try:
        model_type = AutoConfig.from_pretrained(_adapter_base(path) or path, revision=config.revision,
                                                trust_remote_code=config.trust_remote_code).model_type
    except (OSError, ValueError):
        return  # from_pretrained reports it
    if model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES and not config.trust_remote_code:
        raise AlignError(f"model type {model_type!r} has no sequence-classification model in transformers, which "
                         "Align uses for reward models and PPO's separate critic; for PPO use ppo.critic: shared "
                         "(a value head on the policy), for a reward model pick a family that has one")


@contextlib.contextmanager
def _peft_quietly():
    """peft asks transformers' deprecated `is_gradient_checkpointing`, a FutureWarning on every
    adapter a user can do nothing about; it is silenced around peft's calls only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


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
    return auto_class.from_pretrained(merged_dir, **kwargs)


def _merge(adapter_dir: str, base: str, full_kwargs: dict, auto_class):
    from peft import PeftModel

    with _peft_quietly():
        model = auto_class.from_pretrained(base, **full_kwargs)
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
    """`<cache>/merged/<key>`: the key hashes the adapter's files, the base model's files and how
    the base is loaded (class, dtype, revision...), so any change to them names another directory."""
    key = json_hash({"adapter": files_hash(adapter_dir, ADAPTER_FILES),
                     "base": files_hash(_model_files_dir(base, full_kwargs.get("revision")), MODEL_FILES),
                     "class": auto_class.__name__, "kwargs": full_kwargs})
    return tiny.cache_dir() / "merged" / key


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


def apply_adapter(model, adapter: AdapterConfig, checkpointing: str | None = None, task_type: str = "CAUSAL_LM"):
    """`model` with `adapter` applied; `checkpointing`: the activation checkpointing mode the model has
    (None: off), which QLoRA's preparation switches on again."""
    if adapter.kind == "none":
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    lora = LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                      target_modules=adapter.target_modules, modules_to_save=adapter.modules_to_save,
                      task_type=task_type)
    check_adapter(model, adapter, task_type)
    with _peft_quietly():
        if adapter.kind == "qlora":
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=checkpointing is not None,
                gradient_checkpointing_kwargs=checkpoint_kwargs(checkpointing or "full"))
        try:
            model = get_peft_model(model, lora)
        except ValueError as error:
            raise AlignError(f"adapter.target_modules: {error}") from None
    return model


def model_skeleton(config: ModelConfig, head: str = "causal_lm"):
    """The model's modules on the meta device, built from its config alone (no weights are read, nothing
    is downloaded); None if the config is not on this machine (a hub model not in the cache)."""
    from transformers import AutoConfig

    path = tiny.resolve(config.name_or_path, for_config=True)
    try:
        model_config = AutoConfig.from_pretrained(_adapter_base(path) or path, revision=config.revision,
                                                  trust_remote_code=config.trust_remote_code, local_files_only=True)
    except (OSError, ValueError):
        return None
    auto_class = AutoModelForCausalLM
    if head == "score":
        auto_class, model_config.num_labels = AutoModelForSequenceClassification, 1
    with torch.device("meta"):
        return auto_class.from_config(model_config, trust_remote_code=config.trust_remote_code)


def check_adapter(model, adapter: AdapterConfig, task_type: str = "CAUSAL_LM") -> None:
    """AlignError for what peft would take silently or fail on obscurely: a `target_modules` name the
    model does not have (peft ignores one when another name matches), a `modules_to_save` name a
    causal LM does not have, a LoRA on the lm-head, or an `r` above the smaller width of a targeted layer.

    `model` may be the loaded model or its `model_skeleton`."""
    if adapter.kind == "none":
        return
    modules = dict(model.named_modules())
    widths = {name: _width(module) for name, module in modules.items() if _width(module)}
    linear = sorted({name.rsplit(".", 1)[-1] for name in widths})
    for target in adapter.target_modules if isinstance(adapter.target_modules, list) else []:
        if not any(_matches(name, [target]) for name in modules):
            raise AlignError(f"adapter.target_modules: the model has no module {target!r}; its linear modules "
                             f"are {linear} (or use all-linear)")
    saved = adapter.modules_to_save or []
    for target in saved if task_type == "CAUSAL_LM" else []:
        # a score model may lack one: PPO's critic takes the policy's settings, [lm_head] included
        if not any(name.endswith(target) for name in modules):
            raise AlignError(f"adapter.modules_to_save: the model has no module {target!r}; its linear modules "
                             f"are {linear}")
    head = model.get_output_embeddings() if task_type == "CAUSAL_LM" else getattr(model, "score", None)
    targets = adapter.target_modules
    if targets == "all-linear":  # as peft reads it: every linear layer but the output head
        targets = [name for name in widths if modules[name] is not head]
    targeted = [name for name in modules if _matches(name, targets)
                and not any(name.endswith(s) for s in saved)]
    if not targeted:
        raise AlignError(f"adapter.target_modules: {targets!r} matches no module of the model; its linear "
                         f"modules are {linear}")
    if task_type == "CAUSAL_LM" and any(modules[name] is head for name in targeted):
        raise AlignError("adapter.target_modules: a LoRA on the lm-head is not supported: Align computes log-probs "
                         "from the head's weight in chunks, which would bypass it; leave the head out of "
                         "target_modules, or train it fully with adapter.modules_to_save: [lm_head]")
    narrowest = min((name for name in targeted if name in widths), key=lambda n: min(widths[n]), default=None)
    if narrowest and adapter.r > min(widths[narrowest]):
        (n_in, n_out), most = widths[narrowest], min(widths[narrowest])
        raise AlignError(f"adapter.r: {adapter.r} is larger than the width of {narrowest} ({n_in} in, {n_out} out); "
                         f"a LoRA rank above {most} adds nothing: set adapter.r to at most {most}")


def _matches(name: str, targets: str | list[str]) -> bool:
    """peft's rule: a string is a regex for the full module name, a list entry a name or a name's tail."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _width(module) -> tuple[int, int] | None:
    """(in, out) of a linear layer (also a 4-bit one, or GPT-2's Conv1D), else None."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        return tuple(module.weight.shape)
    return None


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
