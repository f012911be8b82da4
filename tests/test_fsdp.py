"""Sharded training (train.sharding: fsdp, torch's FSDP2): two CPU processes (`torchrun`, gloo)
train exactly as one process whose batch holds both processes' examples: SFT (full fine-tuning,
LoRA and QLoRA, activation checkpointing, an eval split), the reward model, DPO (with its reference log-prob
cache), KTO, GRPO, PPO (a separate critic sharded with the policy) and distillation; what fsdp
does not do yet is refused before a model loads."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.config import recipe_from_dict
from align.toy import chat_rows, preference_rows, prompt_rows
from align.registry import TRAINERS
from align.trainers import SFTTrainer
from tests.conftest import deep_update, rollout_server
from tests.test_distributed import (LORA, assert_same_run, assert_same_scores, distill_recipe, metrics, recipe_dict,
                                    resumed_mid_round_on_one_process, run_script_on_processes, single_process,
                                    train_on_two_processes, weights)

SHARDED = {"sharding": "fsdp", "batch_size": 2, "grad_accum": 2}


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Every recipe in one `torchrun --nproc_per_node 2` launch. 21 chats (pairs), 8 a step: the last
    step's 5 give one process two micro-batches and the other one, which gets a padding batch to
    match (every FSDP forward is a collective)."""
    root = tmp_path_factory.mktemp("fsdp")
    rows, pairs = chat_rows(21, seed=5), preference_rows(21, seed=11)
    recipes = {"full": recipe_dict(root, "full", "sft", rows, train={**SHARDED, "save_every": 2}),
               # with an eval split of 5 chats in batches of 2: 2 batches on one process, 1 + padding on the other;
               # selective activation checkpointing (full checkpointing: "checkpointed")
               "lora": recipe_dict(root, "lora", "sft", rows, chat_rows(5, seed=6), adapter=LORA,
                                   model={"gradient_checkpointing": True, "checkpoint_mode": "selective"},
                                   train={**SHARDED, "eval_every": 2}),
               "checkpointed": recipe_dict(root, "checkpointed", "sft", rows, model={"gradient_checkpointing": True},
                                           train=SHARDED),
               # the shards in CPU memory (a no-op move on a CPU, but torch's CPUOffloadPolicy path)
               "offload": recipe_dict(root, "offload", "sft", rows, train={**SHARDED, "fsdp_offload": True}),
               "reward": recipe_dict(root, "reward", "reward", pairs, train=SHARDED),
               # full fine-tuning: the reference is a frozen copy on each process (reference cache built in shares)
               "dpo": recipe_dict(root, "dpo", "dpo", pairs, preference_rows(5, seed=12),
                                  train={**SHARDED, "lr": 5e-4, "eval_every": 2}),
               # KTO on the pairs unpaired (42 rows, 8 a step): the KL reference point's forwards padded too
               "kto": recipe_dict(root, "kto", "kto", pairs, preference_rows(5, seed=12),
                                  train={**SHARDED, "lr": 5e-4, "eval_every": 2}),
               # LoRA with a frozen-copy reference (the adapter-disabled one is refused under fsdp)
               "dpo-lora": recipe_dict(root, "dpo-lora", "dpo", pairs, adapter=LORA, train=SHARDED,
                                       dpo={"reference": "frozen_copy", "precompute_reference": False}),
               # full fine-tuning, the frozen-copy reference sharded like the policy (no precomputed cache)
               "dpo-reference-sharded": recipe_dict(root, "dpo-reference-sharded", "dpo", pairs,
                                                    train={**SHARDED, "lr": 5e-4, "fsdp_reference": "sharded"},
                                                    dpo={"precompute_reference": False}),
               # the same, its log-probs precomputed (the cache built in even shares by the sharded reference)
               "dpo-precompute-sharded": recipe_dict(root, "dpo-precompute-sharded", "dpo", pairs,
                                                     preference_rows(5, seed=12),
                                                     train={**SHARDED, "lr": 5e-4, "eval_every": 2,
                                                            "fsdp_reference": "sharded"}),
               "kto-reference-sharded": recipe_dict(root, "kto-reference-sharded", "kto", pairs,
                                                    preference_rows(5, seed=12),
                                                    train={**SHARDED, "lr": 5e-4, "eval_every": 2,
                                                           "fsdp_reference": "sharded"},
                                                    kto={"precompute_reference": False}),
               # QLoRA: the 4-bit base whole on each process (left out of the shards), the rest sharded
               "qlora": recipe_dict(root, "qlora", "sft", rows, adapter={**LORA, "kind": "qlora"}, train=SHARDED)}
    # GRPO, full fine-tuning with a KL reference (frozen copy): 2 prompts of 4 completions a round,
    # each process samples its own from an unsharded copy synced from the shards; 2 passes a round
    online = {"sharding": "fsdp", "max_steps": 4, "save_every": 1, "keep_checkpoints": 4, "lr": 1e-3}
    digits = [{"fn": f"{root / 'digits.py'}:digits"}]
    recipes["grpo"] = recipe_dict(root, "grpo", "grpo", prompt_rows(8, seed=21), train={**online, "batch_size": 4},
                                  grpo={"group_size": 4, "num_iterations": 2, "beta": 0.05, "loss_norm": "dapo",
                                        "sampling": {"max_new_tokens": 12}, "rewards": digits})
    recipes["grpo-reference-sharded"] = deep_update(json.loads(json.dumps(recipes["grpo"])), {
        "output_dir": str(root / "grpo-reference-sharded"), "train": {"fsdp_reference": "sharded"}})
    (root / "digits.py").write_text("def digits(completions, **_):\n"  # varies between random completions
                                    "    return [float(sum(c.isdigit() for c in text)) for text in completions]\n")
    # PPO, full fine-tuning, a separate critic (sharded with the policy in one root) and a KL reference:
    # 8 prompts a round, 2 epochs x 2 mini-batches (4 steps a round)
    recipes["ppo"] = recipe_dict(root, "ppo", "ppo", prompt_rows(16, seed=31), train={**online, "batch_size": 2},
                                 ppo={"ppo_epochs": 2, "num_mini_batches": 2, "kl_coef": 0.05, "critic": "separate",
                                      "sampling": {"max_new_tokens": 10}, "rewards": digits})
    # distillation from a perturbed copy of the student, greedy sampling (the same completions on one
    # process or two), 4 prompts a step
    recipes["distill"] = distill_recipe(root, "distill", train={"sharding": "fsdp"})
    # the same with the teacher sharded like the student (its lm-head gathered by its root's forward)
    recipes["distill-teacher-sharded"] = distill_recipe(root, "distill-teacher-sharded",
                                                        train={"sharding": "fsdp", "fsdp_reference": "sharded"})
    # GRPO scored by a reward model (random weights: rewards that vary), whole on each process or
    # sharded like the policy; 9 prompts, 2 a round, 5 rounds: the last has one prompt, so one process
    # scores nothing and pads the sharded model's forwards; an eval split of 5 prompts, evaluated at the end
    from align.config import AdapterConfig, ModelConfig
    from align.models.reward import RewardModel

    RewardModel.from_config(ModelConfig(name_or_path="builtin:tiny-llama", dtype="float32"), AdapterConfig()).save(
        root / "rm")
    for name, kwargs in (("grpo-rm", {}), ("grpo-rm-sharded", {"shard": True})):
        recipes[name] = recipe_dict(root, name, "grpo", prompt_rows(9, seed=23), prompt_rows(5, seed=24),
                                    train={"sharding": "fsdp", "batch_size": 4, "max_steps": 5, "lr": 1e-3},
                                    grpo={"group_size": 4, "sampling": {"max_new_tokens": 8},
                                          "rewards": [{"fn": str(root / "rm"), "kwargs": {"batch_size": 3, **kwargs}}]})
    # GRPO again, its rollouts from a server: no sampling copy, the main process sends the weights
    # gathered from the shards
    recipes["grpo-server"] = deep_update(json.loads(json.dumps(recipes["grpo"])), {
        "output_dir": str(root / "grpo-server"),
        "grpo": {"sampling": {"engine": "server", "server": {"transport": "collective"}}}})
    recipes["full-resumed"] = {**recipes["full"], "output_dir": str(root / "full-resumed"),
                               "train": {**recipes["full"]["train"],
                                         "resume_from": str(root / "full" / "checkpoints" / "step-000002")}}
    with rollout_server(recipes["grpo"], root / "serve.yaml", "--engine", "prefix_shared") as url:
        recipes["grpo-server"]["grpo"]["sampling"]["server"]["url"] = url
        train_on_two_processes(root, recipes)
    # the two processes' step-2 checkpoint resumed on four (the same 8 chats a step): each reads its
    # rows of the shards from the two writers' files
    (root / "four").mkdir()
    recipes["full-resumed-4"] = deep_update(json.loads(json.dumps(recipes["full-resumed"])), {
        "output_dir": str(root / "four" / "full-resumed"), "train": {"batch_size": 1}})
    train_on_two_processes(root / "four", {"full-resumed-4": recipes["full-resumed-4"]},
                           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4"])
    return recipes


@pytest.mark.parametrize("name", ["full", "lora", "checkpointed", "offload", "reward", "dpo", "kto", "dpo-lora",
                                  "dpo-reference-sharded", "dpo-precompute-sharded", "kto-reference-sharded",
                                  "qlora"])
def test_fsdp_on_two_processes_equals_one_process_with_their_joint_batch(launched, name):
    """Loss, gradient norm and items at every step within 1e-5 relative; the final weights, gathered
    from the shards into a plain transformers/peft directory, within 1e-4 (AdamW, see assert_same_run)."""
    recipe = launched[name]
    single = single_process(recipe, batch_size=4)  # sharding: fsdp on one process trains unsharded
    TRAINERS.get(recipe["algorithm"]).from_recipe(recipe_from_dict(single)).fit()
    assert_same_run(recipe["output_dir"], single["output_dir"], keys=("loss", "grad_norm", "num_items", "eval/loss"))
    if "eval" in recipe["data"]:  # evaluated every 2 steps and at the end, greedy samples written once (main process)
        steps = sorted({r["step"] for r in metrics(recipe["output_dir"])})
        assert [r["step"] for r in metrics(recipe["output_dir"]) if "eval/loss" in r] == \
            [s for s in steps if s % 2 == 0 or s == steps[-1]]
        sharded, one = ([json.loads(line) for line in Path(d, "samples.jsonl").read_text().splitlines()]
                        for d in (recipe["output_dir"], single["output_dir"]))
        assert [(r["step"], r["prompt"]) for r in sharded] == [(r["step"], r["prompt"]) for r in one] and one
        assert all(r["completion"] for r in sharded)  # (greedy text itself may flip on a near-tie: weights differ ~1e-6)


def test_a_sharded_run_resumes_from_its_checkpoint_on_two_processes_on_four_and_on_one(launched, tmp_path):
    """Each process writes its own rows of the shards (nothing is gathered), the optimizer's state
    keyed by parameter name: resumed on two processes, on four (sharded, each reading its rows) or on
    one (read whole), step 3 and the final weights equal the straight run's."""
    from align.trainers.checkpoint import StoredRows, load_checkpoint, rows_file

    straight = launched["full"]["output_dir"]
    checkpoint = Path(straight) / "checkpoints" / "step-000002"
    assert sorted(p.name for p in checkpoint.glob("rows-*")) == [rows_file(0, 2), rows_file(1, 2)]
    _, objects = load_checkpoint(checkpoint, lazy=True)
    assert objects["model"] and all(isinstance(t, StoredRows) for t in objects["model"].values())
    assert all(isinstance(t, StoredRows) for entry in objects["optimizer"]["state"].values()
               for key, t in entry.items() if key != "step")
    one = {**single_process(launched["full"], batch_size=2, grad_accum=4, resume_from=str(checkpoint)),
           "output_dir": str(tmp_path / "one")}
    SFTTrainer.from_recipe(recipe_from_dict(one)).fit()
    for resumed in (launched["full-resumed"]["output_dir"], launched["full-resumed-4"]["output_dir"],
                    one["output_dir"]):
        (got,) = metrics(resumed)
        want = metrics(straight)[-1]
        assert got["step"] == want["step"] == 3
        for key in ("loss", "grad_norm", "num_items"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (resumed, key)
        for name, tensor in weights(straight).items():
            torch.testing.assert_close(weights(resumed)[name], tensor, atol=1e-4, rtol=0, msg=name)


@pytest.mark.parametrize("change,refused", [    ({"algorithm": "dpo", "adapter": LORA}, r"fsdp cannot run with dpo.reference adapter_disabled .* set it to frozen_copy"),
    ({"algorithm": "ppo", "adapter": LORA, "ppo": {"kl_coef": 0.05, "rewards": [{"fn": "exact_answer"}]}},
     r"fsdp cannot run with ppo.reference adapter_disabled"),
    ({"train": {"sharding": "none", "fsdp_offload": True}}, "train.fsdp_offload .* needs train.sharding: fsdp"),
    ({"train": {"sharding": "none", "fsdp_reference": "sharded"}}, "fsdp_reference: sharded .* needs train.sharding: fsdp"),
])
def test_what_fsdp_does_not_do_yet_is_refused_by_the_recipe(tmp_path, change, refused):
    rows = preference_rows(4, seed=1) if change.get("algorithm") == "dpo" else chat_rows(4, seed=1)
    recipe = recipe_dict(tmp_path, "run", "sft", rows, train={"sharding": "fsdp"})
    for key, value in change.items():
        if isinstance(value, dict):
            recipe[key] = {**recipe.get(key, {}), **value}
        else:
            recipe[key] = value
    with pytest.raises(Exception, match=refused):
        recipe_from_dict(recipe)


def test_an_accelerate_launch_with_the_ready_fsdp_config_shards_with_align_s_fsdp2(tmp_path):
    """`accelerate launch --config_file recipes/accelerate/fsdp.yaml` (on a CPU accelerate itself would
    fall back to DDP): Align shards with its own FSDP2, each process writing its rows into the
    checkpoint, and the run equals one process on the joint batch."""
    from align.trainers.checkpoint import rows_file
    from tests.test_distributed import REPO

    recipe = recipe_dict(tmp_path, "launched", "sft", chat_rows(16, seed=5), train={**SHARDED, "max_steps": 2,
                                                                                    "save_every": 2})
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "recipes/accelerate/fsdp.yaml"), "--num_processes", "2"]
    train_on_two_processes(tmp_path, {"launched": recipe}, launcher)
    rows = sorted(p.name for p in Path(recipe["output_dir"], "checkpoints", "step-000002").glob("rows-*"))
    assert rows == [rows_file(0, 2), rows_file(1, 2)]  # written by each process
    single = single_process(recipe, batch_size=4)
    TRAINERS.get("sft").from_recipe(recipe_from_dict(single)).fit()
    assert_same_run(recipe["output_dir"], single["output_dir"], keys=("loss", "grad_norm", "num_items"))


@pytest.mark.parametrize("launch,recipe,refused", [
    ({}, {"train": {"sharding": "none"}}, "train.sharding is none: set it to fsdp"),
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, {}, "mixed_precision is bf16: Align's train.mixed_precision owns"),
    ({"FSDP_OFFLOAD_PARAMS": "true"}, {}, "fsdp_offload_params is true and train.fsdp_offload false"),
    ({"FSDP_ACTIVATION_CHECKPOINTING": "true"}, {}, "set model.gradient_checkpointing: true"),
    ({"FSDP_VERSION": "1", "FSDP_RESHARD_AFTER_FORWARD": "SHARD_GRAD_OP"}, {}, "fsdp_reshard_after_forward is shard_grad_op"),
    ({"FSDP_RESHARD_AFTER_FORWARD": "false"}, {}, "fsdp_reshard_after_forward is false"),
])
def test_an_accelerate_fsdp_launch_that_disagrees_with_the_recipe_is_refused(tmp_path, monkeypatch, launch, recipe,
                                                                           refused):
    from align.errors import AlignError
    from align.models import sharding

    base = {"ACCELERATE_USE_FSDP": "true", "ACCELERATE_MIXED_PRECISION": "no", "FSDP_OFFLOAD_PARAMS": "false",
            "FSDP_ACTIVATION_CHECKPOINTING": "false", "FSDP_RESHARD_AFTER_FORWARD": "true",
            "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}
    for name, value in {**base, **launch}.items():
        monkeypatch.setenv(name, value)
    good = recipe_from_dict(recipe_dict(tmp_path, "run", "sft", chat_rows(4, seed=1), train={"sharding": "fsdp"}))
    bad = recipe_from_dict(deep_update(recipe_dict(tmp_path, "run", "sft", chat_rows(4, seed=1),
                                                   train={"sharding": "fsdp"}), recipe))
    with pytest.raises(AlignError, match=f"accelerate launched with an FSDP config: .*{refused}"):
        sharding.check_accelerate_launch(bad.train, bad.model)
    if launch:  # the launch's own setting is the odd one out: the recipe alone is fine with the others
        return
    for name, value in base.items():
        monkeypatch.setenv(name, value)
    sharding.check_accelerate_launch(good.train, good.model)
    assert os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false"  # Align loads every model whole everywhere


def test_an_unsharded_checkpoint_is_refused_under_fsdp_naming_the_fix(tmp_path):
    """A DDP/one-process checkpoint numbers its optimizer state by position, which FSDP cannot map."""
    from align.errors import AlignError
    from align.trainers.checkpoint import load_checkpoint

    recipe = recipe_dict(tmp_path, "run", "sft", chat_rows(8, seed=1), train={"max_steps": 1, "batch_size": 4})
    trainer = SFTTrainer.from_recipe(recipe_from_dict(recipe))
    trainer.fit()
    _, objects = load_checkpoint(trainer.save_checkpoint())
    trainer.sharded = True  # as under torchrun with train.sharding: fsdp
    with pytest.raises(AlignError, match="written without train.sharding: fsdp .* resume it with sharding: none"):
        trainer.restore_state(objects)


def test_grpo_under_fsdp_sampling_from_a_rollout_server_equals_sampling_in_process(launched):
    """The same rollouts (the server samples each process's prompts with its seed from the weights the
    main process gathered and sent), so the same run as with the sampling copies."""
    assert_same_run(launched["grpo-server"]["output_dir"], launched["grpo"]["output_dir"],
                    keys=("loss", "grad_norm", "kl", "reward"))


def test_a_sharded_reward_model_scores_as_the_whole_one(launched):
    """A reward model with kwargs shard: true holds half its weights on each process and scores in
    step with the other process (padding forwards where it has fewer completions, or none, as in the
    last round): the same rewards, so the same run, step for step, and the same evaluation."""
    log = Path(launched["grpo-rm"]["output_dir"]).parent.joinpath("launch.log").read_text()
    held = re.findall(r"reward model \S+ is sharded over 2 processes: this one holds (\d+) of (\d+) weights", log)
    assert len(held) == 2 and all(0 < 2 * int(mine) <= int(total) + 4096 for mine, total in held), held
    assert_same_scores(launched["grpo-rm"]["output_dir"], launched["grpo-rm-sharded"]["output_dir"])


def test_a_sharded_reference_holds_half_its_weights_on_each_process(launched):
    """train.fsdp_reference: sharded (DPO above, GRPO below, each equal to one process): each
    process says how much of the reference it holds."""
    log = Path(launched["dpo"]["output_dir"]).parent.joinpath("launch.log").read_text()
    held = re.findall(r"the frozen (reference|teacher) is sharded over 2 processes: this one holds (\d+) of (\d+) "
                      "weights", log)
    assert sorted(name for name, _, _ in held) == ["reference"] * 8 + ["teacher"] * 2  # five runs, two processes each
    assert all(0 < 2 * int(mine) <= int(total) + 4096 for _, mine, total in held), held
    # GRPO with its KL reference sharded is the run with it whole, step for step (the same seeds; a
    # one-process resume would reuse the checkpoint's reference log-probs, so this is the KL's check)
    whole, sharded = metrics(launched["grpo"]["output_dir"]), metrics(launched["grpo-reference-sharded"]["output_dir"])
    assert [r["step"] for r in sharded] == [1, 2, 3, 4] and abs(sharded[0]["kl"]) < 1e-6 < sharded[-1]["kl"]
    for a, b in zip(whole, sharded):
        for key in ("loss", "kl", "grad_norm", "reward"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)


@pytest.mark.parametrize("name", ["grpo", "grpo-reference-sharded"])
def test_grpo_under_fsdp_equals_one_process_on_the_same_experience(launched, name):
    """Each process samples its own prompts (from its unsharded copy of the policy, synced from the
    shards before each round), so, as for DDP in test_distributed, one process resumes from the
    sharded run's step-1 checkpoint, mid-round (the same weights, the whole round's experience): the
    round's second pass must agree; the next round samples on the updated weights."""
    from align.trainers.checkpoint import load_checkpoint

    recipe = launched[name]
    single = resumed_mid_round_on_one_process(recipe, 8, batch_size=8, max_steps=2)
    (got,), want = metrics(single["output_dir"]), metrics(recipe["output_dir"])
    assert got["step"] == 2 and [r["step"] for r in want] == [1, 2, 3, 4]  # two rounds, the second sampled after a sync
    for key in ("loss", "grad_norm", "kl", "reward"):
        assert got[key] == pytest.approx(want[1][key], rel=1e-5, abs=1e-6), key
    sharded, one = (load_checkpoint(Path(d, "checkpoints", "step-000002"))[1]["model"]
                    for d in (recipe["output_dir"], single["output_dir"]))
    assert sharded.keys() == one.keys() and sharded
    for name, tensor in sharded.items():
        torch.testing.assert_close(one[name], tensor, atol=1e-4, rtol=0, msg=name)


COPY_CHECK = """
import copy, os, sys
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from align.models import sharding
from align.models.policy import TokenLogprobModel

dist.init_process_group("gloo")
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
sampler = copy.deepcopy(model)
root = sharding.shard(TokenLogprobModel(model))
with torch.no_grad():  # each process moves its own shards: the copy must end up with every one of them
    for p in root.parameters():
        p.to_local().add_(torch.randn_like(p.to_local()) + dist.get_rank())
sharding.copy_weights(root, sampler)
whole = {k.removeprefix("model."): sharding.whole(v) for k, v in root.state_dict().items()}
own = sampler.state_dict()
assert whole.keys() <= own.keys() and whole
for name, tensor in whole.items():
    torch.testing.assert_close(own[name], tensor, atol=0, rtol=0, msg=name)


def kept_after_forward():  # (the lm-head, a layer's weight) still whole after a forward
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        root(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[2, 3, 4, -100]]))
    return [not isinstance(w, DTensor) for w in (root.model.lm_head.weight, root.model.model.layers[0].mlp.up_proj.weight)]


assert kept_after_forward() == [True, False]  # FSDP's own: the root keeps its weights, the layers reshard
with sharding.gathered(root):
    assert kept_after_forward() == [True, True]
assert kept_after_forward() == [True, False]  # gathered() restored each unit's setting

from torch.distributed.tensor import DTensor
from align.models.policy import Policy

policy = Policy(AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32), None, "frozen_copy")
policy.shard_reference(torch.device("cpu"))  # (train.fsdp_reference: sharded)
policy.reference_logprobs({"input_ids": torch.tensor([[1, 2, 3, 4]]), "labels": torch.tensor([[2, 3, 4, -100]])})
assert isinstance(policy.reference_module.model.lm_head.weight, DTensor)  # its root resharded after the forward

from align.models.reference_cache import tensors_hash  # the reference cache's key of a sharded reference:

hashes = [None, None]  # the same on every process, and it changes when one process's rows change
dist.all_gather_object(hashes, tensors_hash(policy.reference_module))
assert hashes[0] == hashes[1] and len(hashes[0]) == 64
with torch.no_grad():
    if dist.get_rank() == 1:
        policy.reference_module.model.lm_head.weight.to_local()[-1, -1] += 1
assert tensors_hash(policy.reference_module) != hashes[0]

from align.trainers.distill import DistillPolicy  # a sharded teacher (fsdp_reference: sharded for distillation)

distiller = DistillPolicy(AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32), None, "none")
teacher = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
with torch.no_grad(), torch.random.fork_rng():  # the same teacher on both processes
    torch.manual_seed(3)
    for p in teacher.parameters():
        p.add_(0.05 * torch.randn_like(p))
distiller.use_reference_model(teacher)
batch = {"input_ids": torch.tensor([[1, 2, 3, 4, 5]]), "labels": torch.tensor([[2, 3, 4, 5, -100]])}
whole_teacher = distiller.distill(batch, None, beta=1.0, temperature=1.0)
distiller.shard_reference(torch.device("cpu"))
sharded_teacher = distiller.distill(batch, None, beta=1.0, temperature=1.0)
assert isinstance(distiller.teacher.lm_head.weight, DTensor)  # its root resharded after the student's loss read it
for field in ("divergence", "teacher_logps", "student_logps"):
    torch.testing.assert_close(getattr(sharded_teacher, field), getattr(whole_teacher, field), atol=1e-6, rtol=1e-6)
assert whole_teacher.divergence[0, :4].min() > 0
print("copied", dist.get_rank(), len(whole), flush=True)
# a group left to the interpreter's exit sometimes aborted it after both processes had printed
# ("terminate called without an active exception"), and so did one destroyed here (twice in CI): no
# collective left in flight on either side, the group destroyed, then no interpreter finalization,
# where gloo's worker threads releasing their tensors can abort it (pytorch/pytorch#179291)
dist.barrier()
dist.destroy_process_group()
os._exit(0)
"""


def test_the_sampling_copy_gets_the_weights_of_every_shard(tmp_path):
    """`sharding.copy_weights`, which syncs GRPO's unsharded sampling copy before each round: after
    both processes change their own shards, each process's copy holds the whole new weights. And
    `sharding.gathered` (greedy samples) keeps every weight whole inside, then restores FSDP's own
    setting on exit (the root keeps its weights after a forward, the layers reshard). A sharded
    reference, and a sharded teacher, are resharded after use; the teacher's divergence is the
    whole teacher's."""
    assert run_script_on_processes(tmp_path, COPY_CHECK).count("copied") == 2


def test_ppo_under_fsdp_equals_one_process_on_the_same_experience(launched):
    """PPO's policy and separate critic sharded in one root, the sampler an unsharded copy of the
    policy alone: as GRPO's, one process resumes from the sharded run's step-1 checkpoint (mid-round:
    the same weights, the whole round's experience) and the round's other mini-batch steps agree;
    the final policy and critic, gathered from the shards, are saved whole."""
    recipe = launched["ppo"]
    single = resumed_mid_round_on_one_process(recipe, 8, batch_size=4)
    assert_same_run(recipe["output_dir"], single["output_dir"], keys=("loss", "grad_norm", "kl", "reward"),
                    first_step=2)
    sharded, one = (load_file(Path(d, "critic", "model.safetensors")) for d in (recipe["output_dir"], single["output_dir"]))
    assert sharded.keys() == one.keys() and "score.weight" in sharded  # the critic's whole model, its head included
    for name, tensor in sharded.items():
        torch.testing.assert_close(one[name], tensor, atol=1e-4, rtol=0, msg=f"critic {name}")


def test_distillation_under_fsdp_equals_one_process(launched):
    """The student sharded, the teacher whole on each process, greedy samples from the student's
    unsharded copy: every step's loss and gradient norm equal one process's with the joint batch."""
    recipe = launched["distill"]
    single = single_process(recipe, batch_size=4)
    TRAINERS.get("distill").from_recipe(recipe_from_dict(single)).fit()
    assert metrics(recipe["output_dir"])[0]["loss"] > 1e-3  # the teacher differs: a real divergence
    assert_same_run(recipe["output_dir"], single["output_dir"], keys=("loss", "grad_norm"))


def test_a_sharded_teacher_distills_as_the_whole_one(launched):
    """train.fsdp_reference: sharded for distillation: each process holds half the teacher, whose
    root gathers its lm-head for the student's loss and drops it after: the same run as with the
    teacher whole on each process, step for step, and the same evaluation (padded on one process)."""
    whole, sharded = (metrics(launched[name]["output_dir"]) for name in ("distill", "distill-teacher-sharded"))
    assert [r["step"] for r in sharded] == [r["step"] for r in whole] and "eval/teacher_nll" in sharded[-1]
    for a, b in zip(whole, sharded):
        for key in ("loss", "grad_norm", "teacher_nll", "eval/loss", "eval/teacher_nll"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
