"""GRPO: G samples per prompt, group-normalized rewards as advantages, a clipped policy update
with an optional k3 KL to the reference, and the loss normalizations of its variants
(grpo, bnpo, Dr. GRPO, DAPO) and GSPO's sequence-level ratio."""

from __future__ import annotations

import functools
import logging
from typing import Annotated, Literal

from pydantic import Field, model_validator
import torch
from torch.nn.utils.rnn import pad_sequence

from align.config import RewardFunctionConfig, SamplingConfig, Section, registered
from align.data.groups import packed_tokens, sequence_tokens
from align.errors import AlignError
from align.losses.advantages import RolloutScores, token_kl
from align.losses.policy_gradient import grpo_loss, k3_token_weights, masked_mean, on_policy_token_weights
from align.models import Policy
from align.ops.logprobs import TokenWeights
from align.registry import ADVANTAGE_ESTIMATORS, LOSS_NORMS
from align.rollout import Rollout
from align.trainers.base import register_trainer
from align.trainers.online import OnlineTrainer, check_divisible

log = logging.getLogger(__name__)


@functools.cache
def _warn_once(message: str) -> None:
    """A recipe is checked more than once while a trainer is built: say each thing once per process."""
    log.warning(message)


_ClipRange = Annotated[float, Field(gt=0)]


class GRPOConfig(Section):
    group_size: int = Field(8, ge=2)
    """Completions sampled per prompt (G); train.batch_size counts completions and must be a multiple."""
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    rewards: list[RewardFunctionConfig] = Field(default_factory=list)
    advantage: registered("ADVANTAGE_ESTIMATORS") = "grpo"
    """How rewards become advantages: grpo (group-normalized, see scale_rewards), rloo (leave-one-out
    baseline, TRL's RLOO), reinforce_pp (REINFORCE++: per-token return-to-go, whitened over the
    round), or a plug-in (`module:Name`)."""
    normalize_advantages: bool = False
    """rloo: also (A - mean) / (std + 1e-4) over the round's scored completions (TRL's RLOO option)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """grpo advantage = (r - group mean) / std of the group / of the batch / not divided (Dr. GRPO)."""
    beta: float = Field(0.0, ge=0.0)
    """Weight of the KL to the reference; 0 loads no reference model."""
    kl_in: Literal["loss", "reward"] = "loss"
    """Where the KL enters: loss (GRPO's k3 term, per token), or reward (beta x each completion's
    summed k1 KL subtracted from its reward before the advantage estimator, as RLOO does)."""
    epsilon: _ClipRange | tuple[_ClipRange, _ClipRange] = 0.2
    """Clip range: one value, or [epsilon_low, epsilon_high] (DAPO's clip-higher)."""
    loss_norm: registered("LOSS_NORMS") = "dapo"
    """How token losses are averaged (`align.losses.policy_gradient`): grpo, bnpo, dr_grpo, dapo."""
    importance: Literal["token", "sequence"] = "token"
    """sequence: GSPO's sequence-level importance ratio."""
    num_iterations: int = Field(1, ge=1)
    """Optimizer passes over each rollout; old log-probs are kept from the rollout."""
    mask_truncated: bool = False
    """Leave completions that hit max_new_tokens out of the loss."""
    reference: Literal["auto", "adapter_disabled", "frozen_copy"] = "auto"
    shared_prompt: bool = True
    """Training forward runs each prompt once for its G completions (4D attention mask)."""

    @model_validator(mode="after")
    def _check_kl_settings(self) -> "GRPOConfig":
        """A reference strategy with beta 0 (no KL term, no reference model loaded) would be ignored."""
        if self.beta == 0 and self.reference != "auto":
            raise ValueError(f"reference: {self.reference}: beta is 0, so there is no KL term and no reference model; "
                             "set beta (e.g. 0.04) or remove reference")
        return self


@register_trainer("grpo", GRPOConfig)
class GRPOTrainer(OnlineTrainer):

    @property
    def group_size(self) -> int:
        return self.rl.group_size

    @property
    def steps_per_round(self) -> int:
        return self.rl.num_iterations

    @property
    def epsilon(self) -> tuple[float, float]:
        eps = self.rl.epsilon
        return (eps, eps) if isinstance(eps, (int, float)) else tuple(eps)

    @property
    def shared_prompt(self) -> bool:
        return self.rl.shared_prompt and super().shared_prompt

    @classmethod
    def check_recipe(cls, recipe) -> None:
        check_divisible(recipe.train.batch_size, recipe.grpo.group_size, "grpo.group_size")
        if recipe.train.micro_batch_tokens is not None and LOSS_NORMS.get(recipe.grpo.loss_norm).per_micro_batch:
            raise AlignError(f"grpo.loss_norm: {recipe.grpo.loss_norm} averages over each micro-batch's own tokens, so "
                             "train.micro_batch_tokens, which regroups a step's micro-batches, would change the update: "
                             "drop train.micro_batch_tokens, or use grpo.loss_norm: dapo (the token mean of the whole step)")
        if recipe.grpo.importance == "sequence" and recipe.grpo.loss_norm != "grpo":  # as TRL 1.16 warns
            _warn_once(f"grpo.importance: sequence (GSPO) with grpo.loss_norm: {recipe.grpo.loss_norm} sums per-token "
                       "terms, which weights each sequence by its completion length instead of optimizing GSPO's "
                       "per-sequence objective; to reproduce the GSPO paper's setup, set grpo.loss_norm: grpo")
        if recipe.grpo.normalize_advantages and recipe.grpo.advantage in ("grpo", "reinforce_pp"):
            raise AlignError(f"grpo.normalize_advantages applies to grpo.advantage: rloo only (TRL's RLOO option); "
                             f"the {recipe.grpo.advantage} estimator normalizes by itself (grpo: see grpo.scale_rewards) "
                             "and would ignore it: remove it")
        if recipe.grpo.advantage != "grpo" and recipe.grpo.scale_rewards != "group":
            _warn_once(f"grpo.scale_rewards: {recipe.grpo.scale_rewards} applies to grpo.advantage: grpo only; the "
                       f"{recipe.grpo.advantage} estimator ignores it")

    @classmethod
    def build_policy(cls, recipe) -> Policy:
        reference = recipe.grpo.reference if recipe.grpo.beta > 0 else "none"
        return Policy.from_config(recipe.model, recipe.adapter, reference=reference)

    # ---- experience -----------------------------------------------------------------------------
    @property
    def kl_in_loss(self) -> bool:
        return self.rl.beta > 0 and self.rl.kl_in == "loss"

    @property
    def kl_in_reward(self) -> bool:
        return self.rl.beta > 0 and self.rl.kl_in == "reward"

    def build_groups(self, rows: list[dict], rollout: Rollout, scores: torch.Tensor) -> list[dict]:
        g = self.group_size
        trained = [f or not self.rl.mask_truncated for f in rollout.finished]
        return [{"prompt_ids": rows[i]["prompt_ids"], "completions": rollout.completion_ids[i * g:(i + 1) * g],
                 "trained": trained[i * g:(i + 1) * g], "rewards": scores[i * g:(i + 1) * g].float()}
                for i in range(len(rows))]

    def annotate(self, groups: list[dict]) -> dict[str, float]:
        """Old log-probs when the rollout is reused (num_iterations > 1) or the KL enters the reward:
        with one pass the policy that sampled is the policy being trained, so the ratio's
        denominator is logp.detach(). Reference log-probs when beta > 0. Then the advantages, by the
        registered estimator `grpo.advantage`."""
        temperature = self.logprob_temperature
        if self.rl.num_iterations > 1 or self.kl_in_reward:
            self.forward_groups(groups, lambda b: {"old_logps": self.policy.logprobs(b, temperature)})
        if self.rl.beta > 0:
            self.forward_groups(groups, lambda b: {"ref_logps": self.policy.reference_logprobs(b, temperature)})
        scores = self.rollout_scores(groups)
        advantages = ADVANTAGE_ESTIMATORS.get(self.rl.advantage).fn(scores, self.rl).float()
        metrics = {}
        if self.kl_in_reward:
            metrics["kl_penalty"] = token_kl(scores).sum(-1).mean().item()
        start = 0
        for group in groups:
            lengths = [len(c) for c in group["completions"]]
            mine = advantages[start:start + len(lengths)]
            start += len(lengths)
            group["advantages"] = mine if mine.dim() == 1 else [a[:n] for a, n in zip(mine, lengths)]
            if not self.rl.num_iterations > 1:
                group.pop("old_logps", None)  # only the estimator needed them
            if not self.kl_in_loss:
                group.pop("ref_logps", None)
        return metrics

    def rollout_scores(self, groups: list[dict]) -> RolloutScores:
        """The round's rewards, mask of the trained completions' tokens and (when computed) log-probs,
        as [N*G] / [N*G, T]."""
        lengths = torch.tensor([len(c) for g in groups for c in g["completions"]])
        trained = torch.tensor([t for g in groups for t in g["trained"]])  # mask_truncated: no KL, as TRL
        mask = ((torch.arange(int(lengths.max()))[None] < lengths[:, None]) & trained[:, None]).float()

        def padded(name: str) -> torch.Tensor | None:
            if name not in groups[0]:
                return None
            return pad_sequence([t for g in groups for t in g[name]], batch_first=True)

        return RolloutScores(torch.cat([g["rewards"] for g in groups]), self.group_size, mask, padded("old_logps"),
                             padded("ref_logps"))

    # ---- loss -----------------------------------------------------------------------------------
    def count_items(self, batch: dict) -> float:
        """What the loss norm averages over: the step's completion tokens (dapo) or completions."""
        unit = LOSS_NORMS.get(self.rl.loss_norm).unit
        return float(batch["mask"].sum()) if unit == "tokens" else float(batch["mask"].shape[0])

    @property
    def linear_in_logprobs(self) -> bool:
        """One pass over each rollout, token-level ratios: every ratio is exactly 1 (the policy that
        sampled is the one trained), so the loss's gradient is that of a weighted sum of the token
        log-probs whose weights are known before the forward, or with the KL term (beta > 0) depend
        only on each token's own log-prob (`token_weights`). A subclass that overrides `surrogate`
        trains by the plain path, unless it overrides `token_weights` too (with beta > 0, the
        built-in `token_weights` only)."""
        own_weights = type(self).token_weights is not GRPOTrainer.token_weights
        if type(self).surrogate is not GRPOTrainer.surrogate and not own_weights:
            return False
        if own_weights and self.kl_in_loss:
            return False
        return self.rl.num_iterations == 1 and self.rl.importance == "token"

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`surrogate` of the policy's log-probs; by the fused path (`linear_loss`) when it is linear
        in them (tests/test_grpo.py checks both paths agree). Metrics are detached 0-dim tensors."""
        mask = batch["mask"]
        per_sequence = lambda packed: self.surrogate(sequence_tokens(packed, batch["sequence_ids"], *mask.shape), batch)
        if self.linear_in_logprobs:
            weights = self.token_weights(batch)
            to_packed = lambda t: packed_tokens(t, batch["sequence_ids"])
            weights = weights.map(to_packed) if isinstance(weights, TokenWeights) else to_packed(weights)
            loss, metrics, entropy = self.linear_loss(batch, per_sequence, weights, self.logprob_temperature,
                                                      return_entropy=True)
        else:
            packed, entropy = self.policy.logprobs(batch, self.logprob_temperature, return_entropy=True)
            loss, metrics = per_sequence(packed)
        metrics["entropy"] = masked_mean(sequence_tokens(entropy, batch["sequence_ids"], *mask.shape), mask).detach()
        return loss, metrics

    def token_weights(self, batch: dict) -> torch.Tensor | TokenWeights:
        """d surrogate / d logps [S, T] on-policy (all ratios 1): -advantage x the norm's token weight;
        with beta > 0 plus the KL term's, beta w (1 - exp(ref - logp)), as `TokenWeights`. Scaled like
        `surrogate` by this micro-batch's share of the step."""
        mask, norm, max_length, num_items = batch["mask"], self.rl.loss_norm, self.rl.sampling.max_new_tokens, batch["num_items"]
        weights = on_policy_token_weights(batch["advantages"], mask, norm, max_length, num_items)
        if not self.kl_in_loss:
            return weights
        constant, exp_coefficient = k3_token_weights(mask, self.rl.beta, norm, max_length, num_items)
        return TokenWeights(weights + constant, exp_coefficient, batch["ref_logps"])

    def surrogate(self, logps: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The GRPO loss of per-sequence token log-probs [S, T], weighted by this micro-batch's share
        of the optimizer step."""
        eps_low, eps_high = self.epsilon
        return grpo_loss(logps, batch.get("old_logps"), batch.get("ref_logps"), batch["advantages"], batch["mask"],
                         beta=self.rl.beta if self.kl_in_loss else 0.0, eps_low=eps_low, eps_high=eps_high,
                         norm=self.rl.loss_norm, importance=self.rl.importance,
                         max_completion_length=self.rl.sampling.max_new_tokens, num_items=batch["num_items"])
