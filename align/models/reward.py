"""Reward models: a causal LM backbone with a one-scalar head, trained by `RewardTrainer`, and
`load_reward_model(path)`, a scorer for PPO and GRPO."""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from align.config import AdapterConfig, ModelConfig
from align.data.formats import prompt_completion_ids
from align.data.groups import last_other
from align.errors import AlignError
from align.models import sharding, zero
from align.models.layouts import PACKED_ROWS
from align.models.loading import check_vocabulary, load_model, load_tokenizer
from align.models.packed import decoder_hidden
from align.models.policy import Trainable, causal_lm
from align.rewards.loading import check_reward_model_dir
from align.rollout.sampling import eos_token_ids

log = logging.getLogger(__name__)


class ScalarHeadModel(nn.Module):
    """Wraps a sequence-classification model: forward returns the score at chosen token positions."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, last_index: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cu_seq_lens: torch.Tensor | None = None,
                max_seq_len: int | None = None, **_) -> torch.Tensor:
        """input_ids, position_ids: [R, L] packed rows; last_index: [S] indices into the flattened
        [R * L] rows -> scores [S] (float32); cu_seq_lens, max_seq_len: `align.models.varlen.segments`."""
        lm = causal_lm(self.model)
        hidden = decoder_hidden(lm, input_ids, position_ids, attention_mask, cu_seq_lens, max_seq_len)
        return lm.score(hidden.flatten(0, 1)[last_index]).squeeze(-1).float()


class RewardModel(Trainable):
    def __init__(self, model: nn.Module, tokenizer):
        check_vocabulary(model, tokenizer)
        self.probe_layouts(model)
        self.module = ScalarHeadModel(model)
        self.tokenizer = tokenizer

    @classmethod
    def from_config(cls, model: ModelConfig, adapter: AdapterConfig) -> "RewardModel":
        return cls(load_model(model, adapter, head="score"), load_tokenizer(model))

    def scores(self, batch: dict) -> torch.Tensor:
        return self.module(**batch)

    @property
    def pad_token_id(self) -> int | None:
        """The model's pad token: transformers reads a sequence's score at its last other token."""
        return causal_lm(self.model).config.pad_token_id


class RewardScorer:
    """`scorer(prompts, completions, completion_ids=None) -> list[float]`: a trained reward model as a
    reward function.

    Prompts are strings or message lists, as in the data the model was trained on. completion_ids,
    when given, are the sampled ids (the policy shares the reward model's tokenizer): a completion
    whose ids do not end in an EOS id (it hit max_new_tokens, or a stop string ended it) is scored on
    those ids as sampled, with no EOS appended, so it is not scored as a finished answer. The EOS
    ids are the policy's (`match_policy`: its generation config's too), else its tokenizer's EOS and
    the chat template's end of turn (`eos_token_ids`).

    sharded: the model is sharded over the processes (`load_reward_model(shard=True)`): every process
    calls the scorer at the same points (the trainers do), and each call runs as many forwards on
    every process (a process with fewer rows pads with one-token forwards), each a collective.
    """

    def __init__(self, reward_model: RewardModel, batch_size: int = 16, sharded: bool = False):
        self.packs_rows = PACKED_ROWS not in reward_model.inexact_layouts
        if not self.packs_rows:
            log.warning("%s; the reward model scores each completion in a row of its own (slower)",
                        reward_model.inexact_layouts[PACKED_ROWS])
        self.reward_model, self.sharded = reward_model, sharded
        self.eos_ids = set(eos_token_ids(reward_model.tokenizer, None))  # until match_policy gives the policy's
        self.batch_size = batch_size if self.packs_rows else 1
        self.__name__ = "reward_model"

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]] | None = None,
                 **_) -> list[float]:
        out = []
        sampled = completion_ids or [None] * len(completions)
        starts = range(0, len(prompts), self.batch_size)
        pad = self.reward_model.pad_token_id  # (scores read at the last token other than it, as transformers does)
        most = self.most_forwards(len(starts)) if self.sharded else len(starts)  # before any forward: they
        with self.reward_model.eval_mode():                                      # are collectives too
            for start in starts:
                ids, positions, last = [], [], []
                for row in range(start, min(start + self.batch_size, len(prompts))):
                    p, c = self.input_ids(prompts[row], completions[row], sampled[row], row)
                    last.append(len(ids) + (len(p + c) - 1 if pad is None else last_other(p + c, pad)))
                    ids += p + c
                    positions += list(range(len(p) + len(c)))
                out += self.forward(ids, positions, last).tolist()
            for _ in range(most - len(starts)):  # as many forwards as the process with the most rows
                self.forward([self.reward_model.tokenizer.eos_token_id or 0], [0], [0])
        return out

    def match_policy(self, tokenizer, eos_ids: list[int], label: str) -> None:
        """AlignError naming `label` unless the policy's `tokenizer` is the reward model's (vocabulary and
        end-of-sequence token): the scorer reads the policy's sampled ids as its own tokens. Then a
        sampled completion ending in one of `eos_ids`, the ids that end the policy's completions
        (`eos_token_ids`), counts as finished."""
        own = self.reward_model.tokenizer
        if tokenizer.get_vocab() != own.get_vocab() or tokenizer.eos_token_id != own.eos_token_id:
            differs = "vocabulary" if tokenizer.get_vocab() != own.get_vocab() else (
                f"end-of-sequence token ({own.eos_token!r}, the policy's {tokenizer.eos_token!r})")
            raise AlignError(f"{label}: the reward model's tokenizer has another {differs} than the policy's; it "
                             "reads the policy's sampled tokens, so train it on the policy's tokenizer")
        self.eos_ids = set(eos_ids)

    def forward(self, ids: list[int], positions: list[int], last: list[int]) -> torch.Tensor:
        """[len(last)] scores of one packed row: `ids` with their `positions`, scored at `last`."""
        module = self.reward_model.module
        device = next(module.parameters()).device
        batch = {"input_ids": torch.tensor([ids], device=device), "position_ids": torch.tensor([positions], device=device),
                 "last_index": torch.tensor(last, device=device)}
        if not self.packs_rows:  # one sequence: the padding mask (no padding) takes the model's own masks
            batch["attention_mask"] = torch.ones(1, len(ids), dtype=torch.long, device=device)
        try:
            return self.reward_model.scores(batch)
        finally:
            if self.sharded:
                sharding.reshard_frozen(module)

    def most_forwards(self, mine: int) -> int:
        """The most forwards any process runs in this call (a collective)."""
        most = torch.tensor(mine, device=next(self.reward_model.module.parameters()).device)
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        return int(most)

    def input_ids(self, prompt, completion, sampled: list[int] | None, row: int) -> tuple[list[int], list[int]]:
        """(prompt ids, completion ids) as the reward model reads them: the completion re-tokenized
        with EOS (or the chat template's end of turn) appended, as in training, unless its sampled
        ids are given and do not end in an EOS id; then those ids as they are."""
        tokenizer = self.reward_model.tokenizer
        if isinstance(prompt, list) and isinstance(completion, str):  # a chat: the reply as a turn
            completion = [{"role": "assistant", "content": completion}]
        p, c = prompt_completion_ids(tokenizer, prompt, completion, row, "reward model input")
        unfinished = sampled is not None and not (sampled and sampled[-1] in self.eos_ids)
        return p, list(sampled) if unfinished else c


def load_reward_model(path: str, dtype: str = "auto", batch_size: int = 16, device: str | None = None,
                      shard: bool = False) -> RewardScorer:
    """A reward model saved by Align (full weights or an adapter) as a callable scorer, on `device`
    (e.g. cpu, cuda:1; default: the GPU when there is one, the process's own in a multi-GPU launch).
    shard: under several processes, shard it over them like the policy (each holds 1/N of its weights;
    every process must then score in step, see RewardScorer): with FSDP2 (`sharding.shard`), or under
    a DeepSpeed ZeRO-3 launch partitioned by an engine without optimizer (`zero.start_frozen`)."""
    path = os.path.expanduser(path)
    check_reward_model_dir(path, f"reward model {path!r}")
    config = ModelConfig(name_or_path=path, dtype=dtype)
    model = RewardModel.from_config(config, AdapterConfig(kind="none"))
    model.module.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sharded = shard and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    if sharded and zero.launched():
        frozen = zero.frozen_engine_config()
        if not zero.partitions_weights(frozen):
            raise AlignError(f"reward model {path}: kwargs shard: true under DeepSpeed ZeRO-2, which does not "
                             "partition weights; launch ZeRO-3 (recipes/accelerate/zero3.yaml) or drop shard")
        model.module = zero.start_frozen(model.module, f"reward model {path}", reads_head=False, config=frozen)
    elif sharded:
        sharding.shard(model.module)
        params = list(model.module.parameters())
        log.info("reward model %s is sharded over %d processes: this one holds %d of %d weights", path,
                 torch.distributed.get_world_size(), sum(sharding.local_shard(p).numel() for p in params),
                 sum(p.numel() for p in params))
    return RewardScorer(model, batch_size, sharded)
