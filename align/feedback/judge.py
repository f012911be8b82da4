"""A local causal LM as a judge under a constitution, read from its next-token probabilities.

The judge never samples text. Every question it is asked ends with a cue ("Better response:",
"Score:"), and its answer is the distribution of the next token over a few single-token labels
(" A"/" B", or " 1".." 5"), renormalized over those labels. One question per principle:

    [prefix: instructions + every principle, numbered]  [query: prompt, response(s), principle k, cue]

The prefix is the same for every question, so its keys and values are computed once (`cache_prefix`)
and every batch of queries attends to them. `Judge.compare` / `Judge.score` are the interface; a
judge behind an HTTP API would implement the same two methods.
"""

from __future__ import annotations

import copy
import functools
import string
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from align.errors import AlignError
from align.feedback.constitution import Constitution

PREFIX = "You are a careful judge. You compare answers to a prompt by these principles:\n{principles}\n\n"
COMPARE = ("Prompt: {prompt}\nResponse A: {first}\nResponse B: {second}\n"
           "By principle {index} ({name}), the better response (A or B) is. Better response:")
SCORE = ("Prompt: {prompt}\nResponse: {response}\n"
         "By principle {index} ({name}), rate the response ({labels}). Score:")
COMPARE_LABELS = (" A", " B")
SCORE_LABELS = (" 1", " 2", " 3", " 4", " 5")
FIELDS = {"prefix": ({"principles"}, {"principles"}),
          "compare": ({"prompt", "first", "second"}, {"prompt", "first", "second", "index", "name", "text"}),
          "score": ({"prompt", "response"}, {"prompt", "response", "index", "name", "text", "labels"})}
"""template -> (the placeholders it must have, those it may have)."""


@dataclass(frozen=True)
class Templates:
    """The judge's text. prefix: shown once before every question ({principles}: the numbered
    list); compare / score: one question about principle {index} ({name}, {text}), ending with the
    cue the label follows. Compare and score questions must start alike (the prefix's tokens are
    shared by every question)."""

    prefix: str = PREFIX
    compare: str = COMPARE
    score: str = SCORE


def check_template(name: str, template: str) -> str:
    """ValueError naming a missing or unknown {placeholder} of template `name`."""
    needed, allowed = FIELDS[name]
    try:
        used = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as error:
        raise ValueError(f"{name}: {error}; write a literal brace as {{{{ or }}}}") from None
    if used - allowed or needed - used:
        raise ValueError(f"{name}: " + "; ".join(
            [f"unknown placeholder {{{f}}}" for f in sorted(used - allowed)]
            + [f"needs {{{f}}}" for f in sorted(needed - used)]) + f" (it may use {', '.join(sorted(allowed))})")
    return template


def as_text(prompt) -> str:
    """A prompt as the judge reads it: a string as is, a message list as `role: content` lines."""
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt)
    return str(prompt)


def compare_query(constitution: Constitution, k: int, prompt, first: str, second: str, template: str = COMPARE) -> str:
    p = constitution.principles[k]
    return template.format(prompt=as_text(prompt), first=first.strip(), second=second.strip(), index=k + 1,
                           name=p.name, text=p.text)


def score_query(constitution: Constitution, k: int, prompt, response: str, labels: Sequence[str],
                template: str = SCORE) -> str:
    p = constitution.principles[k]
    return template.format(prompt=as_text(prompt), response=response.strip(), index=k + 1, name=p.name, text=p.text,
                           labels=", ".join(label.strip() for label in labels))


def label_token_ids(tokenizer, labels: Sequence[str], query: str, key: str) -> list[int]:
    """The token id of each label as the judge reads it right after `query` (a rendered question):
    `query + label` must tokenize as `query` plus exactly one token, and the labels must differ.
    Otherwise AlignError saying how the label splits and what to try."""
    base = tokenizer(query, add_special_tokens=False)["input_ids"]
    ids = []
    for label in labels:
        full = tokenizer(query + label, add_special_tokens=False)["input_ids"]
        if len(full) != len(base) + 1 or full[:len(base)] != base:
            alone = tokenizer(label, add_special_tokens=False)["input_ids"]
            pieces = tokenizer.convert_ids_to_tokens(alone)
            other = label.lstrip() if label.startswith(" ") else " " + label
            raise AlignError(f"{key}: label {label!r} is not one token after the judge's cue in this tokenizer "
                             f"(alone it is {len(alone)} token(s): {pieces}); the judge is read from one next-token "
                             f"probability per label, so pick labels that are single tokens, e.g. {other!r} "
                             "instead, or single letters/digits (\"10\" is often two tokens)")
        ids.append(full[-1])
    if len(set(ids)) != len(ids):
        raise AlignError(f"{key}: labels {list(labels)} map to the same token; give distinct labels")
    return ids


def label_values(labels: Sequence[str], values: Sequence[float] | None, key: str) -> list[float]:
    """The number each score label stands for: `values`, or the labels read as numbers."""
    if values is not None:
        if len(values) != len(labels):
            raise AlignError(f"{key}: {len(values)} values for {len(labels)} labels; give one value per label")
        return [float(v) for v in values]
    try:
        return [float(label) for label in labels]
    except ValueError:
        raise AlignError(f"{key}: labels {list(labels)} are not numbers; give `score_values` (one per label)") from None


class Judge:
    """Judges responses with `model` (a causal LM, any device) under `constitution`.

    compare(prompts, first, second) -> [N, K] P(first is better) under each of the K principles,
    score(prompts, responses) -> [N, K] expected score under each principle; both from one forward
    pass per (item, principle) over the query tokens only, `batch_size` queries at a time.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, constitution: Constitution,
                 compare_labels: Sequence[str] = COMPARE_LABELS, score_labels: Sequence[str] = SCORE_LABELS,
                 score_values: Sequence[float] | None = None, batch_size: int = 16, cache_prefix: bool = True,
                 templates: Templates = Templates(), key: str = "judge"):
        if len(compare_labels) != 2:
            raise AlignError(f"{key}.labels: need two labels (first, second), got {list(compare_labels)}")
        self.model, self.tokenizer, self.constitution = model.eval(), tokenizer, constitution
        self.compare_labels, self.score_labels = tuple(compare_labels), tuple(score_labels)
        self.score_values_arg, self.batch_size, self.cache_prefix, self.key = score_values, batch_size, cache_prefix, key
        self.templates = templates
        self.prefix_text = templates.prefix.format(principles=constitution.render())
        self.prefix_ids = self._stable_prefix()
        self._prefix_cache: DynamicCache | None = None
        self._lock = threading.Lock()  # reward functions run in worker threads

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @functools.cached_property
    def compare_ids(self) -> list[int]:
        return label_token_ids(self.tokenizer, self.compare_labels, self.compare_query(0, "x", "y", "z"),
                               f"{self.key}.labels")

    @functools.cached_property
    def score_ids(self) -> list[int]:
        query = self.score_query(0, "x", "y")
        return label_token_ids(self.tokenizer, self.score_labels, query, f"{self.key}.score_labels")

    @functools.cached_property
    def score_values(self) -> torch.Tensor:
        return torch.tensor(label_values(self.score_labels, self.score_values_arg, f"{self.key}.score_labels"))

    # --- the interface

    def compare(self, prompts: list, first: list[str], second: list[str]) -> torch.Tensor:
        """[N, K] float32 on the CPU: P(first[i] is better than second[i]) under principle k, in
        this order only (see `compare_both` for position bias)."""
        _same_length(prompts, first, second)
        K = len(self.constitution.principles)
        queries = [self.compare_query(k, p, a, b) for p, a, b in zip(prompts, first, second) for k in range(K)]
        probs = self.label_probs(queries, self.compare_ids)  # [N*K, 2]
        return probs[:, 0].reshape(len(prompts), K)

    def compare_both(self, prompts: list, a: list[str], b: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(P(a better) with a shown first, P(a better) with a shown second), each [N, K]: the judge
        asked in both orders, which removes (and reveals) its position bias."""
        forward = self.compare(prompts + prompts, a + b, b + a)
        n = len(prompts)
        return forward[:n], 1 - forward[n:]

    def score(self, prompts: list, responses: list[str]) -> torch.Tensor:
        """[N, K] float32 on the CPU: sum over labels of P(label) * value under principle k."""
        _same_length(prompts, responses)
        K = len(self.constitution.principles)
        queries = [self.score_query(k, p, r) for p, r in zip(prompts, responses) for k in range(K)]
        probs = self.label_probs(queries, self.score_ids)  # [N*K, L]
        return (probs @ self.score_values).reshape(len(prompts), K)

    def combine(self, per_principle: torch.Tensor) -> torch.Tensor:
        """[N, K] -> [N]: the principles' weighted mean (weights from the constitution)."""
        return per_principle @ torch.tensor(self.constitution.weights)

    def compare_query(self, k: int, prompt, first: str, second: str) -> str:
        """The question whether `first` is better than `second` under principle k (after the prefix)."""
        return compare_query(self.constitution, k, prompt, first, second, self.templates.compare)

    def score_query(self, k: int, prompt, response: str) -> str:
        return score_query(self.constitution, k, prompt, response, self.score_labels, self.templates.score)

    # --- the mechanics

    def _stable_prefix(self) -> list[int]:
        """The prefix's token ids that stay the same when a question follows it (a tokenizer may merge
        across the boundary, e.g. trailing newlines): the common start of the prefix tokenized alone
        and with each kind of question after it."""
        common = self.tokenizer(self.prefix_text, add_special_tokens=True)["input_ids"]
        for query in (self.compare_query(0, "x", "y", "z"), self.score_query(0, "x", "y")):
            joined = self.tokenizer(self.prefix_text + query, add_special_tokens=True)["input_ids"]
            n = 0
            while n < min(len(common), len(joined)) and common[n] == joined[n]:
                n += 1
            common = common[:n]
        return list(common)

    def text(self, query: str) -> str:
        """The full text the judge reads for `query`: prefix + query (what a judge is trained on)."""
        return self.prefix_text + query

    def encode(self, query: str) -> list[int]:
        """The token ids of `query` after the prefix: the full text tokenized as one string, less the
        shared prefix tokens (so the cached and uncached passes see exactly these ids)."""
        full = self.tokenizer(self.text(query), add_special_tokens=True)["input_ids"]
        if full[:len(self.prefix_ids)] != self.prefix_ids:
            raise AlignError(f"{self.key}: the judge's tokenizer splits the constitution prefix differently before "
                             f"this query, so its cached prefix cannot be reused: {query[:80]!r}")
        return list(full[len(self.prefix_ids):])

    def label_probs(self, queries: list[str], label_ids: list[int]) -> torch.Tensor:
        """[Q, L] float32 on the CPU: the next-token distribution after prefix + query, restricted
        to `label_ids` and renormalized over them."""
        logits = self.next_token_logits([self.encode(q) for q in queries], label_ids)  # [Q, L]
        return torch.softmax(logits, -1)

    def next_token_logits(self, queries: list[list[int]], columns: list[int]) -> torch.Tensor:
        """[Q, C] float32 on the CPU: the logits of the token after prefix + query, at the vocabulary
        ids `columns` (only those leave the device: no [Q, V] tensor is kept)."""
        out = []
        index = torch.tensor(columns, device=self.device)
        with self._lock, torch.no_grad():
            for start in range(0, len(queries), self.batch_size):
                batch = queries[start:start + self.batch_size]
                forward = self._cached if self.cache_prefix else self._uncached
                out.append(forward(batch).index_select(-1, index).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, len(columns))

    def _uncached(self, queries: list[list[int]]) -> torch.Tensor:
        """Prefix + query in one pass, left-padded: [B, V]."""
        from align.rollout.sampling import left_pad

        ids, mask = left_pad([self.prefix_ids + q for q in queries], None, self.device)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                            logits_to_keep=1, use_cache=False).logits
        return logits[:, -1]

    def _cached(self, queries: list[list[int]]) -> torch.Tensor:
        """The queries after the prefix's cached keys/values ([1, H, P, D] per layer, repeated to
        the batch): queries left-padded between prefix and query, masked, positions P, P+1, ...: [B, V]."""
        from align.rollout.sampling import left_pad, with_cache

        cache = copy.deepcopy(self.prefix_cache())
        cache.batch_repeat_interleave(len(queries))
        ids, mask = left_pad(queries, None, self.device)
        P = len(self.prefix_ids)
        full = torch.cat([mask.new_ones(len(queries), P), mask], 1)
        positions = P + (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids, attention_mask=full, position_ids=positions, logits_to_keep=1,
                            **with_cache(self.model, cache)).logits
        return logits[:, -1]

    def prefix_cache(self) -> DynamicCache:
        """The constitution prefix's keys and values, computed on first use and kept."""
        from align.rollout.sampling import with_cache

        if self._prefix_cache is None:
            cache = DynamicCache(config=self.model.config)
            ids = torch.tensor([self.prefix_ids], device=self.device)
            self.model(input_ids=ids, **with_cache(self.model, cache))
            self._prefix_cache = cache
        return self._prefix_cache


def _same_length(*lists) -> None:
    if len({len(x) for x in lists}) > 1:
        raise ValueError(f"judge inputs differ in length: {[len(x) for x in lists]}")


# ------------------------------------------------------------------------------------------ loading

_MODELS: dict[tuple, tuple] = {}
_JUDGES: dict[str, Judge] = {}
_LOADING = threading.Lock()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise AlignError(f"judge.device: {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise AlignError(f"judge.device: {device!r} but this machine has no CUDA GPU; use auto or cpu")
    return resolved


def load_judge(config) -> Judge:
    """The Judge a `JudgeConfig` describes, built once per process and config (its model once per
    model, dtype and device): a GRPO reward calls this every batch."""
    from align.config import AdapterConfig, ModelConfig
    from align.feedback.constitution import load_constitution
    from align.models.loading import load_model, load_tokenizer

    device = resolve_device(config.device)
    spec = config.model_dump_json() + str(device)
    with _LOADING:
        if spec not in _JUDGES:
            constitution = load_constitution(config.constitution, "judge.constitution")
            model_key = (config.model, config.dtype, str(device))
            if model_key not in _MODELS:
                model_config = ModelConfig(name_or_path=config.model, dtype=config.dtype)
                model = load_model(model_config, AdapterConfig(kind="none")).to(device).eval()
                model.requires_grad_(False)
                _MODELS[model_key] = (model, load_tokenizer(model_config))
            model, tokenizer = _MODELS[model_key]
            judge = Judge(model, tokenizer, constitution, config.labels, config.score_labels, config.score_values,
                          config.batch_size, config.cache_prefix, Templates(**config.templates.model_dump()))
            _ = judge.compare_ids if config.form != "score" else judge.score_ids  # refuse bad labels now
            _JUDGES[spec] = judge
        return _JUDGES[spec]


def clear_cache() -> None:
    """Forget the loaded judges and their models (tests; freeing memory)."""
    with _LOADING:
        _MODELS.clear()
        _JUDGES.clear()




def check_labels_offline(config) -> bool:
    """Check a JudgeConfig's labels are single tokens after its cue, if the judge's tokenizer can be
    read offline (a built-in or a local directory; no weights are loaded): True if checked, False
    if the tokenizer is not on this machine. AlignError if a label is not one token."""
    from align.config import ModelConfig
    from align.feedback.constitution import load_constitution
    from align.models.loading import local_tokenizer

    tokenizer = local_tokenizer(ModelConfig(name_or_path=config.model))
    if tokenizer is None:
        return False
    constitution = load_constitution(config.constitution)
    if config.form == "pairwise":
        query = compare_query(constitution, 0, "x", "y", "z", config.templates.compare)
        label_token_ids(tokenizer, config.labels, query, "judge.labels")
    else:
        query = score_query(constitution, 0, "x", "y", config.score_labels, config.templates.score)
        label_token_ids(tokenizer, config.score_labels, query, "judge.score_labels")
    return True
