"""PPO: learns on the toy arithmetic task with either critic, and its rounds are well formed."""

import pytest
import torch

from align.toy import prompt_rows
from align.trainers import PPOTrainer


@pytest.fixture
def ppo_recipe(make_recipe):
    def make(rows=None, **sections):
        base = dict(algorithm="ppo", rows=rows or prompt_rows(64, seed=31), eval_rows=prompt_rows(48, seed=22),
                    model={"name_or_path": "builtin:tiny-llama-arith", "dtype": "float32"},
                    adapter={"kind": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
                    data={"max_length": 64},
                    train={"batch_size": 16, "lr": 2e-3, "max_steps": 2},
                    ppo={"sampling": {"max_new_tokens": 32}, "rewards": [{"fn": "exact_answer"}],
                         "ppo_epochs": 2, "num_mini_batches": 2, "kl_coef": 0.02})
        for key, value in sections.items():
            base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
        return make_recipe(**base)
    return make


@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_ppo_raises_exact_answer_accuracy(ppo_recipe, critic):
    trainer = PPOTrainer.from_recipe(ppo_recipe(rows=prompt_rows(512, seed=33), ppo={"critic": critic},
                                                train={"batch_size": 32, "max_steps": 32}))
    before = trainer.evaluate()["eval/rewards/exact_answer/mean"]
    trainer.fit()
    after = trainer.evaluate()["eval/rewards/exact_answer/mean"]
    print(f"PPO ({critic} critic) exact-answer accuracy (greedy, 48 held-out prompts): {before:.3f} -> {after:.3f}")
    assert after >= before + 0.1, (before, after)


def test_a_round_is_epochs_times_mini_batches_over_one_rollout(ppo_recipe):
    trainer = PPOTrainer.from_recipe(ppo_recipe())
    assert trainer.steps_per_round == 4 and trainer.prompts_per_round == 32
    seen = []
    for step in range(4):
        batches = trainer.micro_batches(step)
        assert trainer.experience["round"] == 0
        seen.append(sorted(tuple(g["completions"][0]) for g in trainer.step_groups(trainer.experience["groups"], 0, step)))
        assert sum(b["mask"].shape[0] for b in batches) == 16
    assert sorted(seen[0] + seen[1]) == sorted(seen[2] + seen[3])  # each epoch covers the rollout once
    trainer.micro_batches(4)
    assert trainer.experience["round"] == 1


def test_experience_has_gae_returns_and_a_kl_penalised_reward(ppo_recipe):
    trainer = PPOTrainer.from_recipe(ppo_recipe(ppo={"whiten_advantages": False, "gamma": 1.0, "lam": 1.0}))
    trainer.micro_batches(0)
    group = trainer.experience["groups"][0]
    values, returns = group["old_values"][0], group["returns"][0]
    # with gamma = lambda = 1, advantage_t = return_t - value_t and return_0 = score - kl_coef * sum of k1 KL
    torch.testing.assert_close(group["advantages"][0], returns - values)
    assert returns.shape == values.shape == (len(group["completions"][0]),)


def test_reward_model_dir_scores_and_starts_the_critic(ppo_recipe, tmp_path):
    from align.config import AdapterConfig, ModelConfig
    from align.models.reward import RewardModel

    rm_dir = tmp_path / "rm"
    RewardModel.from_config(ModelConfig(name_or_path="builtin:tiny-llama-arith", dtype="float32"),
                            AdapterConfig()).save(rm_dir)
    trainer = PPOTrainer.from_recipe(ppo_recipe(ppo={"rewards": [{"fn": str(rm_dir)}], "value_model": str(rm_dir)}))
    critic_head = trainer.policy.module.value_model.base_model.model.score.original_module.weight
    saved = RewardModel.from_config(ModelConfig(name_or_path=str(rm_dir), dtype="float32"), AdapterConfig())
    assert torch.equal(critic_head, saved.model.score.weight)  # the critic starts as the reward model
    record = trainer.train_step(trainer.micro_batches(0))
    assert "rewards/rm/mean" in record and record["score"] != 0.0
