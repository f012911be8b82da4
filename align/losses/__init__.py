"""Pure loss functions: tensors in, tensors out."""

from align.losses.policy_gradient import (LOSS_NORMS, aggregate_loss, clipped_policy_loss, group_advantages,
                                          grpo_loss, k3_kl, masked_mean)
from align.losses.ppo import gae, missing_eos_penalty, ppo_policy_loss, ppo_value_loss, token_level_rewards, whiten
from align.losses.preference import DPO_LOSSES, bradley_terry_loss, dpo_loss, preference_metrics, rpo_sft_loss
