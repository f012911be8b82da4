"""Bradley-Terry reward modeling on preference pairs (shared prompt, one scalar per sequence)."""

from __future__ import annotations

from pydantic import Field
import torch

from align.data.preference import pack_pairs
from align.losses.preference import bradley_terry_loss
from align.models.reward import RewardModel
from align.config import Section
from align.trainers.base import register_trainer
from align.trainers.dpo import PreferenceTrainer


class RewardConfig(Section):
    center_coef: float = Field(0.0, ge=0.0)
    """Weight of the reward-centering term mean((r_chosen + r_rejected)^2)."""
    shared_prompt: bool = True


@register_trainer("reward", RewardConfig)
class RewardTrainer(PreferenceTrainer):

    @property
    def shared_prompt(self) -> bool:
        return self.recipe.reward.shared_prompt and super().shared_prompt

    @classmethod
    def build_policy(cls, recipe) -> RewardModel:
        return RewardModel.from_config(recipe.model, recipe.adapter)

    build_exported_policy = build_policy  # (a reward model holds nothing besides what it exports)

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Pairs packed as DPO's; each score read where the model's own forward() reads it (its last
        token that is not the pad token: `pack_groups`' score_skip_id)."""
        return pack_pairs(examples, shared_prompt=self.shared_prompt, packed=self.packs_rows,
                          score_skip_id=self.policy.pad_token_id)

    def sample_prompt_ids(self) -> list[list[int]]:
        """None: a reward model scores text, it does not write any (no eval samples)."""
        return []

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Bradley-Terry loss of this micro-batch's pairs (a share of the step's); metrics as 0-dim
        tensors (read at log steps)."""
        rewards = self.policy.scores(batch)
        chosen, rejected = rewards[0::2], rewards[1::2]
        pairs = len(chosen)
        loss = bradley_terry_loss(chosen, rejected, batch["margin"], self.recipe.reward.center_coef)
        with torch.no_grad():
            metrics = {"accuracy": (chosen > rejected).float().mean(), "margin": (chosen - rejected).mean(),
                       "reward/mean": rewards.mean(), "reward/min": rewards.min(), "reward/max": rewards.max()}
        return loss * pairs / batch["num_items"], metrics
