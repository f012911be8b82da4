"""The RLOO and REINFORCE++ advantage estimators (align/losses/rloo.py, align/losses/reinforce_pp.py):
RLOO against TRL 1.16's RLOOTrainer, both against hand-computed examples, and both training
GRPOTrainer on the toy arithmetic task."""

import json
import math

import pytest
import torch

from align.trainers.grpo import GRPOConfig
from align.losses.advantages import RolloutScores
from align.losses.reinforce_pp import reinforce_pp
from align.losses.rloo import leave_one_out_advantages, rloo
from align.registry import ADVANTAGE_ESTIMATORS
from align.toy import prompt_rows

NAN = float("nan")


def config(beta=0.0, kl_in="reward", **extra):
    return GRPOConfig(beta=beta, kl_in=kl_in, **extra)


def test_both_estimators_are_registered():
    assert ADVANTAGE_ESTIMATORS.get("rloo").fn is rloo
    assert ADVANTAGE_ESTIMATORS.get("reinforce_pp").fn is reinforce_pp


# ------------------------------------------------------------------------------ RLOO == TRL 1.16

def trl_rloo_advantages(rewards_per_func, reward_weights, old_per_token_logps, ref_per_token_logps,
                        completion_mask, num_generations, beta, normalize_advantages):
    """TRL 1.16 RLOOTrainer._generate_and_score_completions, the advantage part, copied line by line
    from .venv/lib/python3.11/site-packages/trl/trainer/rloo_trainer.py:1653-1699 (one process, so
    `gather` is the identity; no reward_clip_range). It is inline in that method, not a function of
    its own; `nanstd` is TRL's (trl/trainer/utils.py:1021)."""
    from trl.trainer.utils import nanstd

    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)  # :1653
    rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)  # :1656
    rewards[unscorable_mask] = torch.nan  # :1657
    if beta != 0.0:  # :1664-1673
        per_token_kl = old_per_token_logps - ref_per_token_logps
        kl = (per_token_kl * completion_mask).sum(-1)
        rewards = rewards - beta * kl
    grouped_rewards = rewards.view(-1, num_generations)  # :1675
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)  # :1685
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)  # :1686
    baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1)  # :1688
    baselines = baselines.view(-1)  # :1689
    advantages = rewards - baselines  # :1690
    if normalize_advantages:  # :1695-1696
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)  # :1699


def random_rollout(num_prompts=6, group_size=4, max_len=7, seed=0):
    """rewards_per_func [N*G, 2] with some None (NaN) entries: one completion unscored by both
    functions, a group with a single scored completion, a group with none; log-probs garbage past
    each completion's length."""
    g = torch.Generator().manual_seed(seed)
    n = num_prompts * group_size
    per_func = torch.randn(n, 2, generator=g)
    per_func[torch.rand(n, 2, generator=g) < 0.2] = NAN  # one function's None: the other still scores
    per_func[1] = NAN
    per_func[group_size:2 * group_size] = NAN
    per_func[group_size + 2, 0] = 0.7  # group 1: only one scored completion
    per_func[2 * group_size:3 * group_size] = NAN  # group 2: none scored
    lengths = torch.randint(1, max_len + 1, (n,), generator=g)
    mask = (torch.arange(max_len)[None] < lengths[:, None]).float()
    ref = -torch.rand(n, max_len, generator=g) * 3
    old = ref + 0.3 * torch.randn(n, max_len, generator=g)
    return per_func, torch.tensor([1.0, 0.5]), old, ref, mask


@pytest.mark.parametrize("beta, normalize", [(0.0, False), (0.05, False), (0.05, True), (0.0, True)])
def test_rloo_equals_trl(beta, normalize):
    per_func, weights, old, ref, mask = random_rollout()
    expected = trl_rloo_advantages(per_func, weights, old, ref, mask, 4, beta, normalize)
    # Align's combined reward (align.rewards.RewardFunctions.combine): the weighted sum, NaN if unscored
    rewards = (per_func * weights).nansum(1).masked_fill(per_func.isnan().all(1), NAN)
    scores = RolloutScores(rewards, 4, mask, old * mask, ref * mask)  # as annotate pads them: 0 past the end
    got = rloo(scores, config(beta, normalize_advantages=normalize))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert got[1] == 0 and (got[4:12] == 0).all()  # unscored, lone scored, and unscored group


# ------------------------------------------------------------------------- hand-computed examples
# 2 prompts x 3 completions, up to 3 tokens. Rewards: group 0 [1, 0, 2]; group 1 [3, unscored, 1].
# Completion lengths [3, 2, 1, 3, 3, 2]; per-token k1 KL d = logp - ref on the tokens (garbage past
# each completion's end must be ignored). Summed KL per completion: [2, 0, -2, 1, 5, 1].

REWARDS = torch.tensor([1.0, 0.0, 2.0, 3.0, NAN, 1.0])
LENGTHS = torch.tensor([3, 2, 1, 3, 3, 2])
MASK = (torch.arange(3)[None] < LENGTHS[:, None]).float()
D = torch.tensor([[1.0, 0.5, 0.5], [0.0, 0.0, 7.0], [-2.0, 9.0, 9.0],
                  [1.0, 0.0, 0.0], [1.0, 2.0, 2.0], [0.5, 0.5, 9.0]])
REF = torch.full((6, 3), -1.0)


def hand_scores():
    return RolloutScores(REWARDS.clone(), 3, MASK, REF + D, REF)


def test_rloo_by_hand_without_kl():
    # group 0: 1 - (0+2)/2 = 0, 0 - (1+2)/2 = -1.5, 2 - (1+0)/2 = 1.5
    # group 1: 3 - 1 = 2, unscored -> 0, 1 - 3 = -2 (the unscored one is out of the baselines: k-1 = 1)
    expected = torch.tensor([0.0, -1.5, 1.5, 2.0, 0.0, -2.0])
    torch.testing.assert_close(rloo(hand_scores(), config(0.0)), expected)
    torch.testing.assert_close(rloo(hand_scores(), config(0.5, kl_in="loss")), expected)  # KL not in the reward


def test_rloo_by_hand_with_kl_in_the_reward():
    # r - 0.5 x summed KL: [1-1, 0-0, 2+1 | 3-0.5, NaN, 1-0.5] = [0, 0, 3 | 2.5, NaN, 0.5]
    # group 0: 0 - 1.5, 0 - 1.5, 3 - 0; group 1: 2.5 - 0.5, 0, 0.5 - 2.5
    expected = torch.tensor([-1.5, -1.5, 3.0, 2.0, 0.0, -2.0])
    torch.testing.assert_close(rloo(hand_scores(), config(0.5)), expected)


def test_rloo_normalized_by_hand():
    # [0, -1.5, 1.5, 2, -, -2] over the 5 scored: mean 0, unbiased std sqrt(12.5 / 4)
    got = leave_one_out_advantages(REWARDS, 3, normalize=True)
    std = math.sqrt(12.5 / 4)
    torch.testing.assert_close(got, torch.tensor([0.0, -1.5, 1.5, 2.0, 0.0, -2.0]) / (std + 1e-4))


def test_reinforce_pp_by_hand_without_kl():
    # every token's return is its completion's reward; scored tokens: 3x1, 2x0, 1x2, 3x3, 2x1 (11):
    # mean 16/11, population variance 140/121, so the advantage of return x is (11x - 16)/sqrt(140)
    s = math.sqrt(140)
    expected = torch.tensor([[-5 / s, -5 / s, -5 / s], [-16 / s, -16 / s, 0], [6 / s, 0, 0],
                             [17 / s, 17 / s, 17 / s], [0, 0, 0], [-5 / s, -5 / s, 0]])
    got = reinforce_pp(hand_scores(), config(0.0))
    assert got.shape == (6, 3)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(reinforce_pp(hand_scores(), config(0.5, kl_in="loss")), expected)


def test_reinforce_pp_by_hand_with_kl_in_the_reward():
    # token rewards -0.5 d, plus r on the last token; returns-to-go (gamma 1):
    #   [-.5, -.25, -.25+1] -> [0, .5, .75];  [0, 0] -> [0, 0];  [1+2] -> [3]
    #   [-.5, 0, 0+3] -> [2.5, 3, 3];  (unscored: out);  [-.25, -.25+1] -> [.5, .75]
    # 11 scored tokens: sum 14, sum of squares 34.875 -> (11x - 14) / sqrt(11 * 34.875 - 14^2)
    returns = torch.tensor([[0.0, 0.5, 0.75], [0, 0, 0], [3, 0, 0], [2.5, 3, 3], [0, 0, 0], [0.5, 0.75, 0]])
    scored = MASK * torch.tensor([1, 1, 1, 1, 0, 1.0])[:, None]
    expected = (11 * returns - 14) / math.sqrt(11 * 34.875 - 14 ** 2) * scored
    got = reinforce_pp(hand_scores(), config(0.5))
    torch.testing.assert_close(got, expected)
    assert (got * scored).sum().abs() < 1e-5 and ((got ** 2 * scored).sum() / 11 - 1).abs() < 1e-5


# ------------------------------------------------------------------ end to end: GRPOTrainer with them

@pytest.fixture
def estimator_recipe(make_recipe, arith_builtin):
    def make(advantage, rows=None, train=None, **grpo):
        return make_recipe(
            algorithm="grpo", rows=rows or prompt_rows(64, seed=21), eval_rows=prompt_rows(48, seed=22),
            model={"name_or_path": arith_builtin, "dtype": "float32"},
            adapter={"kind": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
            data={"max_length": 64}, train={"batch_size": 16, "lr": 2e-3, "max_steps": 2, **(train or {})},
            grpo={"group_size": 8, "sampling": {"max_new_tokens": 32}, "rewards": [{"fn": "exact_answer"}],
                  "advantage": advantage, **grpo})
    return make


def _records(trainer) -> list[dict]:
    return [json.loads(line) for line in open(trainer.output_dir / "metrics.jsonl")]


def test_rloo_with_kl_in_the_reward_trains(estimator_recipe):
    from align.trainers import GRPOTrainer

    trainer = GRPOTrainer.from_recipe(estimator_recipe("rloo", kl_in="reward", beta=0.05))
    groups = trainer.micro_batches(0)
    assert trainer.experience["metrics"]["kl_penalty"] == 0.0  # policy == reference at step 0
    for group in trainer.experience["groups"]:  # leave-one-out advantages sum to 0 in a fully scored group
        assert group["advantages"].shape == (8,) and abs(group["advantages"].sum().item()) < 1e-4
        assert "ref_logps" not in group and "old_logps" not in group  # only the estimator needed them
    assert groups[0]["advantages"].dim() == 1
    trainer.fit()
    records = [r for r in _records(trainer) if "loss" in r]
    assert len(records) == 2 and all(math.isfinite(r["loss"]) and "kl_penalty" in r for r in records)
    assert records[1]["kl_penalty"] != 0.0  # the policy moved away from the reference


def test_reinforce_pp_per_token_advantages_reach_the_loss(estimator_recipe):
    from align.trainers import GRPOTrainer

    trainer = GRPOTrainer.from_recipe(estimator_recipe("reinforce_pp", kl_in="reward", beta=0.05))
    batch = trainer._to_device({**trainer.micro_batches(0)[0], "num_items": 100.0})
    advantages, mask = batch["advantages"], batch["mask"]
    assert advantages.shape == mask.shape and advantages.dim() == 2  # [S, T]
    assert (advantages[mask == 0] == 0).all()
    scored = torch.cat([g["rewards"] for g in trainer.experience["groups"]])
    assert not scored.isnan().any()
    tokens = torch.cat([a for g in trainer.experience["groups"] for a in g["advantages"]])
    assert abs(tokens.mean().item()) < 1e-4 and abs(tokens.std(unbiased=False).item() - 1) < 1e-3  # whitened
    # the fused (on-policy) path's token weights are -advantage x the dapo weight, token by token
    assert trainer.linear_in_logprobs
    torch.testing.assert_close(trainer.token_weights(batch), -advantages * mask / 100.0)
    trainer.fit()
    records = [r for r in _records(trainer) if "loss" in r]
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)


def test_rloo_raises_exact_answer_accuracy(estimator_recipe):
    # as tests/test_grpo.py's learning test, shorter: greedy accuracy on 48 held-out prompts
    # (measured 0.0 -> 0.25 in 8 steps; REINFORCE++ the same)
    from align.trainers import GRPOTrainer

    trainer = GRPOTrainer.from_recipe(estimator_recipe(
        "rloo", rows=prompt_rows(512, seed=23), train={"batch_size": 32, "lr": 2e-3, "max_steps": 8}))
    before = trainer.evaluate()["eval/rewards/exact_answer/mean"]
    trainer.fit()
    after = trainer.evaluate()["eval/rewards/exact_answer/mean"]
    print(f"RLOO exact-answer accuracy (greedy, 48 held-out prompts): {before:.3f} -> {after:.3f}")
    assert after >= before + 0.1, (before, after)
