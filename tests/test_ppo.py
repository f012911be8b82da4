"""PPO: learns on the toy arithmetic task with either critic, and its rounds are well formed."""

import pytest
import torch

from align.toy import prompt_rows
from align.trainers import PPOTrainer

pytestmark = pytest.mark.usefixtures("arith_builtin")  # builtin:tiny-llama-arith, trained once


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


def _gae_by_hand(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """A_t = sum_k (gamma * lam)^k delta_{t+k}, delta_t = r_t + gamma * V_{t+1} - V_t, V after the end = 0."""
    deltas = [r + gamma * (values[t + 1] if t + 1 < len(values) else 0.0) - v
              for t, (r, v) in enumerate(zip(rewards, values))]
    return [sum((gamma * lam) ** k * d for k, d in enumerate(deltas[t:])) for t in range(len(deltas))]


def test_experience_has_kl_shaped_rewards_and_gae_returns(ppo_recipe):
    """annotate() on a rollout, against the per-token rewards and GAE written out from the stored
    old log-probs, values and the reference log-probs: score at the last token, -kl_coef * (logp -
    ref_logp) on every token."""
    kl_coef, gamma, lam = 0.5, 0.9, 0.8
    trainer = PPOTrainer.from_recipe(ppo_recipe(ppo={"whiten_advantages": False, "gamma": gamma, "lam": lam,
                                                     "kl_coef": kl_coef}))
    with torch.no_grad():  # move the policy off the reference so the KL penalty is not zero
        for p in trainer.policy.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(p.numel())))
    rows = trainer.round_rows(0)[:4]
    rollout, values = trainer.sample_and_score(rows, 0)
    groups = trainer.build_groups(rows, rollout, trainer.rewards.combine(values))
    scores = [g["scores"].item() for g in groups]
    reference = [dict(g) for g in groups]
    trainer.forward_groups(reference, lambda b: {"ref_logps": trainer.policy.reference_logprobs(b, 1.0)})
    metrics = trainer.annotate(groups)
    kls = []
    for group, ref, score in zip(groups, reference, scores):
        logps, ref_logps, old_values = group["old_logps"][0].tolist(), ref["ref_logps"][0].tolist(), \
            group["old_values"][0].tolist()
        kl = [a - b for a, b in zip(logps, ref_logps)]
        rewards = [-kl_coef * k for k in kl]
        rewards[-1] += score
        advantages = _gae_by_hand(rewards, old_values, gamma, lam)
        torch.testing.assert_close(group["advantages"][0], torch.tensor(advantages), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(group["returns"][0], torch.tensor([a + v for a, v in zip(advantages, old_values)]),
                                   atol=1e-5, rtol=1e-5)
        kls.append(sum(kl))
    assert min(abs(k) for k in kls) > 1e-3  # the KL term does shape these returns
    assert metrics["kl"] == pytest.approx(sum(kls) / 4, rel=1e-5)
    assert metrics["non_score_reward"] == pytest.approx(-kl_coef * sum(kls) / 4, rel=1e-5)
    assert metrics["score"] == pytest.approx(sum(scores) / 4)


def _rollout(trainer, rows, completions: list[list[int]]):
    from align.rollout import Rollout
    from align.rollout.sampling import SamplingParams, StopRule

    stop = StopRule(trainer.policy.tokenizer, SamplingParams(stop=["."]), trainer.eos_ids)
    return Rollout([r["prompt_ids"] for r in rows], completions, [stop(c) for c in completions], 1)


def test_missing_eos_penalty_spares_only_completions_that_end_in_eos(ppo_recipe):
    # TRL's PPO penalises a completion that does not contain the EOS token; a stop string is no EOS
    trainer = PPOTrainer.from_recipe(ppo_recipe(ppo={"missing_eos_penalty": 2.0}))
    tokenizer, rows = trainer.policy.tokenizer, trainer.round_rows(0)[:3]
    text = tokenizer(" The answer is 19.", add_special_tokens=False)["input_ids"]
    rollout = _rollout(trainer, rows, [text + [tokenizer.eos_token_id], text, text[:-1]])
    assert rollout.finished == [True, True, False]  # EOS, the stop string ".", max_new_tokens
    groups = trainer.build_groups(rows, rollout, torch.tensor([1.0, 1.0, 1.0]))
    assert [g["scores"].item() for g in groups] == [1.0, -1.0, -1.0]


def test_missing_eos_penalty_spares_a_completion_ending_in_the_generation_config_s_eos(ppo_recipe):
    # an instruct model ends its turn with an EOS id of its generation config (Llama 3's <|eot_id|>):
    # sampling stops there, and the completion is finished, not missing its EOS
    trainer = PPOTrainer.from_recipe(ppo_recipe(ppo={"missing_eos_penalty": 2.0}))
    tokenizer, rows = trainer.policy.tokenizer, trainer.round_rows(0)[:2]
    end_of_turn = tokenizer.convert_tokens_to_ids("<|pad|>")
    trainer.policy.model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    assert trainer.eos_ids == [tokenizer.eos_token_id, end_of_turn]
    text = tokenizer(" The answer is 19", add_special_tokens=False)["input_ids"]
    groups = trainer.build_groups(rows, _rollout(trainer, rows, [text + [end_of_turn], text]), torch.tensor([1.0, 1.0]))
    assert [g["scores"].item() for g in groups] == [1.0, -1.0]


def test_completion_without_any_reward_is_left_out_of_the_loss(ppo_recipe):
    # PPO has no group to take a baseline from: a completion that no reward function scored is not
    # trained at all (not toward a score of 0); its stand-in score 0 keeps the rollout maths finite
    trainer = PPOTrainer.from_recipe(ppo_recipe())
    tokenizer, rows = trainer.policy.tokenizer, trainer.round_rows(0)[:3]
    text = tokenizer(" The answer is 19.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    groups = trainer.build_groups(rows, _rollout(trainer, rows, [text] * 3), torch.tensor([1.0, float("nan"), 0.5]))
    assert [g["trained"] for g in groups] == [[True], [False], [True]]
    assert [g["scores"].item() for g in groups] == [1.0, 0.0, 0.5]
    mask = trainer.collate(groups)["mask"]
    assert mask[1].sum() == 0 and mask[0].sum() == mask[2].sum() == len(text)


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
