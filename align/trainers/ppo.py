"""PPO with a critic: one completion per prompt, the score at the last token minus a KL penalty
to the reference on every token, GAE advantages, and several clipped epochs over mini-batches of
each rollout."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
import torch
from torch.nn.utils.rnn import pad_sequence

from align.data.groups import sequence_tokens
from align.losses.policy_gradient import masked_mean
from align.losses.ppo import gae, missing_eos_penalty, ppo_policy_loss, ppo_value_loss, token_level_rewards, whiten
from align.models.critic import ActorCriticPolicy
from align.models.loading import load_model, load_tokenizer
from align.models.policy import separate_model_config
from align.rollout import Rollout
from align.config import RewardFunctionConfig, SamplingConfig, Section
from align.trainers.base import register_trainer
from align.trainers.online import OnlineTrainer


class PPOConfig(Section):
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    rewards: list[RewardFunctionConfig] = Field(default_factory=list)
    """Reward functions and/or reward-model directories (weighted sum = the score)."""
    kl_coef: float = Field(0.05, ge=0.0)
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    lam: float = Field(0.95, ge=0.0, le=1.0)
    clip_range: float = Field(0.2, gt=0.0)
    clip_range_value: float = Field(0.2, gt=0.0)
    vf_coef: float = Field(0.1, ge=0.0)
    ppo_epochs: int = Field(4, ge=1)
    num_mini_batches: int = Field(1, ge=1)
    """Each rollout (batch_size * grad_accum * num_mini_batches completions) is split into this many
    optimizer steps per PPO epoch."""
    whiten_advantages: bool = True
    missing_eos_penalty: float | None = Field(None, ge=0.0)
    """Subtract this from the score of completions that did not end with EOS."""
    critic: Literal["shared", "separate"] = "separate"
    """shared: a value head on the policy backbone; separate: a value model (same base, own adapter)."""
    value_model: str | None = None
    """Start the separate critic from this model (e.g. the reward model dir); default: the policy's model."""
    reference: Literal["auto", "adapter_disabled", "frozen_copy"] = "auto"

    @model_validator(mode="after")
    def _check_critic(self) -> "PPOConfig":
        if self.critic == "shared" and self.value_model:
            raise ValueError(f"value_model: {self.value_model!r} starts a separate critic, but critic is shared (a value "
                             "head on the policy); drop value_model, or set critic: separate")
        if self.kl_coef == 0 and self.reference != "auto":
            raise ValueError(f"reference: {self.reference}: kl_coef is 0, so there is no KL penalty and no reference "
                             "model; set kl_coef or remove reference")
        return self


@register_trainer("ppo", PPOConfig)
class PPOTrainer(OnlineTrainer):

    @property
    def mini_batches(self) -> int:
        return self.rl.num_mini_batches

    @property
    def steps_per_round(self) -> int:
        return self.rl.ppo_epochs * self.rl.num_mini_batches

    @classmethod
    def build_policy(cls, recipe) -> ActorCriticPolicy:
        cfg = recipe.ppo
        tokenizer = load_tokenizer(recipe.model)
        value_model = None
        if cfg.critic == "separate":
            value_config = recipe.model if not cfg.value_model else separate_model_config(
                recipe.model, cfg.value_model, tokenizer, "ppo.value_model", "reads the policy's tokens (the critic)")
            value_model = load_model(value_config, recipe.adapter, head="score")
        reference = cfg.reference if cfg.kl_coef > 0 else "none"
        return ActorCriticPolicy(load_model(recipe.model, recipe.adapter), tokenizer, reference, value_model)

    # ---- experience -----------------------------------------------------------------------------
    def build_groups(self, rows: list[dict], rollout: Rollout, scores: torch.Tensor) -> list[dict]:
        """One group per completion with its score [1]. The missing-EOS penalty goes to every
        completion whose last token is not an EOS id (`eos_ids`: max_new_tokens, a stop string or a
        stop id ended it), as TRL's PPO penalises completions that do not contain EOS. A completion
        that no reward function scored (NaN) has no group to take a baseline from: it is left out of
        the loss (trained False), with a stand-in score 0 that keeps the rollout's maths finite."""
        if self.rl.missing_eos_penalty is not None:
            eos = set(self.eos_ids)
            has_eos = torch.tensor([completion[-1:] != [] and completion[-1] in eos
                                    for completion in rollout.completion_ids])
            scores = missing_eos_penalty(scores, has_eos, self.rl.missing_eos_penalty)
        scored = ~scores.isnan()
        return [{"prompt_ids": row["prompt_ids"], "completions": [completion], "trained": [bool(scored[i])],
                 "scores": scores[i:i + 1].nan_to_num(nan=0.0).float()}
                for i, (row, completion) in enumerate(zip(rows, rollout.completion_ids))]

    def annotate(self, groups: list[dict]) -> dict[str, float]:
        """Old log-probs and values (one forward), reference log-probs, then per-token rewards,
        GAE advantages (whitened) and returns for the whole rollout."""
        temperature = self.logprob_temperature

        def old(batch):
            logps, values, _ = self.policy.logprobs_and_values(batch, temperature)
            return {"old_logps": logps, "old_values": values}

        self.forward_groups(groups, old)
        if self.rl.kl_coef > 0:
            self.forward_groups(groups, lambda b: {"ref_logps": self.policy.reference_logprobs(b, temperature)})
        padded = {key: pad_sequence([g[key][0] for g in groups], batch_first=True)
                  for key in ("old_logps", "old_values") + (("ref_logps",) if self.rl.kl_coef > 0 else ())}
        lengths = torch.tensor([len(g["completions"][0]) for g in groups])
        mask = (torch.arange(int(lengths.max()))[None] < lengths[:, None]).float()
        scores = torch.cat([g["scores"] for g in groups])
        ref = padded.get("ref_logps", padded["old_logps"])
        rewards = token_level_rewards(scores, padded["old_logps"], ref, mask, self.rl.kl_coef)
        advantages, returns = gae(rewards, padded["old_values"], mask, self.rl.gamma, self.rl.lam)
        trained = torch.tensor([g["trained"][0] for g in groups])  # False: no reward function scored it
        if self.rl.whiten_advantages:
            advantages = whiten(advantages, mask * trained[:, None] if trained.any() else mask)
        for i, group in enumerate(groups):
            n = int(lengths[i])
            group["advantages"], group["returns"] = [advantages[i, :n]], [returns[i, :n]]
            group.pop("ref_logps", None)
            group.pop("scores")
        kl = ((padded["old_logps"] - ref) * mask).sum(-1)
        metrics = {"kl": kl.mean().item(), "non_score_reward": (-self.rl.kl_coef * kl).mean().item(),
                   "values/mean": masked_mean(padded["old_values"], mask).item()}
        if trained.any():
            metrics["score"] = scores[trained].mean().item()
        return metrics

    def step_groups(self, groups: list[dict], round_: int, index: int) -> list[dict]:
        """Mini-batch `index % M` of PPO epoch `index // M`, reshuffled every epoch."""
        epoch, mini = divmod(index, self.rl.num_mini_batches)
        order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(
            self.cfg.seed * 1_000_003 + round_ * 1_009 + epoch))
        size = -(-len(groups) // self.rl.num_mini_batches)
        return [groups[int(i)] for i in order[mini * size:(mini + 1) * size]]

    # ---- loss -----------------------------------------------------------------------------------
    def count_items(self, batch: dict) -> float:
        return float(batch["mask"].sum())

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Clipped policy loss + vf_coef x clipped value loss, weighted by this micro-batch's share of
        the step's tokens; metrics as detached 0-dim tensors (read at log steps)."""
        mask = batch["mask"]
        packed_logps, packed_values, entropy = self.policy.logprobs_and_values(batch, self.logprob_temperature,
                                                                               return_entropy=True)
        logps, values = (sequence_tokens(x, batch["sequence_ids"], *mask.shape) for x in (packed_logps, packed_values))
        policy_loss, metrics = ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], mask, self.rl.clip_range)
        value_loss, value_clipfrac = ppo_value_loss(values, batch["old_values"], batch["returns"], mask,
                                                    self.rl.clip_range_value)
        loss = (policy_loss + self.rl.vf_coef * value_loss) * mask.sum() / batch["num_items"]
        metrics.update({"policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(),
                        "value_clipfrac": value_clipfrac,
                        "entropy": masked_mean(sequence_tokens(entropy, batch["sequence_ids"], *mask.shape), mask)})
        return loss, metrics

