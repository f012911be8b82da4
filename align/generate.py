"""Generate from a trained model, and score its greedy completions with reward functions.

    align generate runs/grpo-tiny --prompt "Question: What is 2 + 3?\\nAnswer:"
    align eval runs/grpo-tiny --data recipes/data/arith_prompts_eval.jsonl --reward exact_answer

A model is an Align output dir (full weights, or a LoRA/QLoRA adapter, loaded with the adapter
merged), a local transformers model dir, a hub id, or `builtin:<name>`. Prompts are encoded as in
training (`align.data.prompts.encode_prompt`): a string with the tokenizer's BOS, a message list
through the chat template; `chat=True` wraps string prompts as one user message. Sampling runs on
the rollout engine GRPO and PPO use (`align.rollout.PrefixSharedEngine`; transformers' generate for a
model it cannot sample exactly).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch

from align.errors import AlignError


@dataclass
class LoadedModel:
    """A causal LM ready to sample from: its tokenizer and a rollout engine on it."""

    path: str
    model: torch.nn.Module
    tokenizer: object
    engine: object = field(repr=False)


def load(model_path: str, dtype: str = "auto") -> LoadedModel:
    """Load `model_path` (see the module docstring) for generation, on the GPU when there is one."""
    from align.config import ModelConfig
    from align.rollout import in_process_engine

    path = os.path.expanduser(model_path)
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f))
                                       for f in ("config.json", "adapter_config.json")):
        raise AlignError(f"{model_path!r} holds no model (no config.json or adapter_config.json): give the "
                         "output_dir of a finished `align train` run (weights are written when training ends), "
                         "a model directory, a hub id or builtin:<name>")
    if not os.path.isdir(path) and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise AlignError(f"no such model directory: {model_path!r} (relative to {os.getcwd()})")
    model, tokenizer = load_for_sampling(ModelConfig(name_or_path=model_path, dtype=dtype))
    return LoadedModel(model_path, model, tokenizer, in_process_engine(model, tokenizer))


def load_for_sampling(config) -> tuple[torch.nn.Module, object]:
    """(model, tokenizer) of a ModelConfig, to sample from: an adapter merged into its base, in eval
    mode, on the GPU when there is one; a trained built-in (`builtin:tiny-judge-arith`) is built first."""
    from align.builtins import build_builtins
    from align.config import AdapterConfig
    from align.models.loading import check_vocabulary, load_model, load_tokenizer

    build_builtins(config.name_or_path)
    model, tokenizer = load_model(config, AdapterConfig(kind="none")), load_tokenizer(config)
    check_vocabulary(model, tokenizer, "model")
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return model, tokenizer


def _loaded(model: str | LoadedModel, dtype: str) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load(model, dtype)


def encode(tokenizer, prompts: list, chat: bool = False, key: str = "prompts") -> list[list[int]]:
    """Token ids of each prompt, as training encodes them; chat=True wraps strings as a user message."""
    from align.data.prompts import encode_prompt

    if not prompts:
        raise AlignError(f"{key}: no prompts given")
    if chat and not tokenizer.chat_template:
        raise AlignError(f"{key}: chat prompts need a chat template, and this model's tokenizer has none; "
                         "drop the chat option or use a model with a chat template")
    wrapped = [[{"role": "user", "content": p}] if chat and isinstance(p, str) else p for p in prompts]
    return [encode_prompt(tokenizer, p, i, key) for i, p in enumerate(wrapped)]


def check_sampling(max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, n: int = 1,
                   cli: bool = False) -> None:
    """AlignError for a sampling setting out of range, named as the argument (cli: as the command's flag)."""
    def name(arg: str) -> str:
        return "--" + arg.replace("_", "-") if cli else arg

    for arg, value, ok, want in [
            ("max_new_tokens", max_new_tokens, max_new_tokens >= 1, "at least 1"),
            ("temperature", temperature, math.isfinite(temperature) and temperature >= 0, "0 (greedy) or more"),
            ("top_p", top_p, 0 < top_p <= 1, "above 0 and at most 1"),
            ("n", n, n >= 1, "at least 1")]:
        if not ok:
            raise AlignError(f"{name(arg)}={value}: must be {want}")
    if n > 1 and temperature == 0:
        raise AlignError(f"{name('n')}={n} samples with {name('temperature')} 0 (greedy) would be {n} identical "
                         "completions; set a temperature, e.g. 1.0")


def generate(model: str | LoadedModel, prompts: list, *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, n: int = 1, chat: bool = False, stop: list[str] | None = None,
             seed: int = 0, batch_size: int = 64, dtype: str = "auto") -> list[str]:
    """Completions of `prompts` (strings or message lists) by `model` (a path/id, or `load(...)`'s result).

    temperature 0 is greedy decoding. With n > 1 each prompt gets n samples: the result has
    len(prompts) * n strings, prompt i's at [i*n, (i+1)*n). Special tokens are stripped.
    """
    check_sampling(max_new_tokens, temperature, top_p, n)  # before the model loads
    return [text for text, _ in _complete(_loaded(model, dtype), prompts, max_new_tokens=max_new_tokens,
                                          temperature=temperature, top_p=top_p, top_k=top_k, n=n, chat=chat,
                                          stop=stop, seed=seed, batch_size=batch_size)]


def _complete(loaded: LoadedModel, prompts: list, *, max_new_tokens: int, temperature: float = 0.0,
              top_p: float = 1.0, top_k: int = 0, n: int = 1, chat: bool = False, stop: list[str] | None = None,
              seed: int = 0, batch_size: int = 64, key: str = "prompts") -> list[tuple[str, list[int]]]:
    """(text, token ids) of every completion, n per prompt, in prompt order."""
    from align.rollout import SamplingParams

    check_sampling(max_new_tokens, temperature, top_p, n)
    ids = encode(loaded.tokenizer, prompts, chat, key)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            stop=list(stop or []), seed=seed)
    out = []
    per_call = max(1, batch_size // n)
    for start in range(0, len(ids), per_call):
        params.seed = seed + start  # each chunk its own stream; the same call gives the same text
        rollout = loaded.engine.generate(ids[start:start + per_call], params, n)
        texts = loaded.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        out += list(zip(texts, rollout.completion_ids))
    return out


@dataclass
class Evaluation:
    """Greedy completions of a dataset's prompts and their rewards."""

    names: list[str]
    """One per reward function."""
    scores: torch.Tensor
    """[N, F] reward of completion i from function f; NaN where a function returned None."""
    rows: list[dict]
    completions: list[str]

    @property
    def means(self) -> dict[str, float]:
        """Mean reward per function over the rows it applies to (NaN if none), and `total` when there
        are several functions: the mean of their sum (None counting as 0) over the rows at least one
        applies to, as training's `reward` leaves out a completion no function scored."""
        out = {}
        for f, name in enumerate(self.names):
            column = self.scores[:, f]
            present = column[~column.isnan()]
            out[name] = present.mean().item() if len(present) else math.nan
        if len(self.names) > 1:
            scored = ~self.scores.isnan().all(1)
            out["total"] = torch.nansum(self.scores[scored], 1).mean().item() if scored.any() else math.nan
        return out

    def save(self, path: str | os.PathLike) -> None:
        """One jsonl line per row: its columns, `completion`, and `rewards` {name: value or null}."""
        with open(path, "w") as f:
            for row, text, values in zip(self.rows, self.completions, self.scores.tolist()):
                rewards = {n: None if math.isnan(v) else v for n, v in zip(self.names, values)}
                f.write(json.dumps({**row, "completion": text, "rewards": rewards}, default=str) + "\n")


def evaluate(model: str | LoadedModel, data: str | list[dict], rewards: list[str], *, max_new_tokens: int = 64,
             chat: bool = False, limit: int | None = None, batch_size: int = 64, dtype: str = "auto") -> Evaluation:
    """Score `model`'s greedy completions of `data`'s prompts with `rewards`.

    data: a jsonl/json/parquet/csv file or hub id, or a list of rows, with a `prompt` column (string
    or messages); every other column (e.g. `answer`) goes to the reward functions, as in GRPO.
    rewards: reward specs as in a recipe (`exact_answer`, `path/to/file.py:fn`, `module:fn`, a reward
    model dir), each with weight 1. limit: evaluate only the first `limit` rows.
    """
    from align.rewards import RewardFunctions, load_reward_function, spec_name
    from align.rollout.sampling import eos_token_ids

    check_sampling(max_new_tokens)
    if not rewards:
        raise AlignError("no reward given: name at least one, e.g. --reward exact_answer")
    functions = RewardFunctions([load_reward_function(spec) for spec in rewards],
                                names=[spec_name(spec) for spec in rewards])
    rows = _rows(data, limit)
    loaded = _loaded(model, dtype)
    functions.match_policy(loaded.tokenizer, eos_token_ids(loaded.tokenizer, loaded.model))
    done = _complete(loaded, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens, chat=chat,
                     batch_size=batch_size, key="data")
    completions = [text for text, _ in done]
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    scores = functions([r["prompt"] for r in rows], completions, [ids for _, ids in done], columns)
    functions.close()
    return Evaluation(functions.names, scores, rows, completions)


def _rows(data: str | list[dict], limit: int | None) -> list[dict]:
    if isinstance(data, str):
        from align.config import DataSource
        from align.data import load_rows

        data = list(load_rows(DataSource(path=data, max_rows=limit), key="data"))
    elif limit is not None:
        data = data[:limit]
    if not data:
        raise AlignError("data: no rows to evaluate")
    if "prompt" not in data[0]:
        raise AlignError(f"data: needs a `prompt` column (a string or a list of messages); its columns are "
                         f"{sorted(data[0])}")
    return data
