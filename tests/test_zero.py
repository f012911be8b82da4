"""DeepSpeed ZeRO stages 2 and 3 through accelerate's launch (`recipes/accelerate/zero{2,3,3_offload}.yaml`),
on two CPU processes (DeepSpeed's CPU accelerator, gloo): every run equals one process on the joint
batch (GRPO and PPO: on the same experience), a ZeRO checkpoint resumes under ZeRO and on one process without DeepSpeed, and what ZeRO
does not run is refused. Skipped where DeepSpeed is not installed (it is a dev dependency)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytest.importorskip("deepspeed")

from align.config import TrainConfig, recipe_from_dict  # noqa: E402
from align.errors import AlignError  # noqa: E402
from align.models import zero  # noqa: E402
from align.registry import TRAINERS  # noqa: E402
from align.toy import chat_rows, preference_rows, prompt_rows  # noqa: E402
from align.trainers import SFTTrainer  # noqa: E402
from tests.conftest import deep_update, rollout_server  # noqa: E402
from tests.test_distributed import (LORA, REPO, assert_same_run, assert_same_scores,  # noqa: E402
                                    distill_recipe, metrics, recipe_dict, resumed_mid_round_on_one_process,
                                    run_script_on_processes, single_process, train_on_two_processes, weights)

STEP = {"batch_size": 2, "grad_accum": 2}


def accelerate_launch(config: Path) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2"]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """One launch per stage. Stage 2 runs the ready config as it is; stage 3 the ready config with
    every weight partitioned (DeepSpeed keeps weights under 1e5 elements whole by default: all of
    tiny-llama's). 21 chats (pairs), 8 a step: the last step's 5 leave one process a padding batch."""
    root = tmp_path_factory.mktemp("zero")
    rows, pairs = chat_rows(21, seed=5), preference_rows(21, seed=11)
    stage2 = {"sft": recipe_dict(root, "z2-sft", "sft", rows, chat_rows(5, seed=6),
                                 train={**STEP, "save_every": 2, "eval_every": 2, "schedule": "linear"}),
              "dpo-lora": recipe_dict(root, "z2-dpo-lora", "dpo", pairs, adapter=LORA, train=STEP,
                                      dpo={"reference": "frozen_copy"}),
              "reward": recipe_dict(root, "z2-reward", "reward", pairs, train=STEP)}
    stage2["sft-resumed"] = {**stage2["sft"], "output_dir": str(root / "z2-sft-resumed"),
                             "train": {**stage2["sft"]["train"],
                                       "resume_from": str(root / "z2-sft" / "checkpoints" / "step-000002")}}
    stage3 = {"sft": recipe_dict(root, "z3-sft", "sft", rows, chat_rows(5, seed=6),
                                 train={**STEP, "save_every": 2, "eval_every": 2}),
              # with selective activation checkpointing (the partitions gathered again in the recomputation)
              "sft-lora": recipe_dict(root, "z3-sft-lora", "sft", rows, adapter=LORA, train=STEP,
                                      model={"gradient_checkpointing": True, "checkpoint_mode": "selective"}),
              "dpo": recipe_dict(root, "z3-dpo", "dpo", pairs, train={**STEP, "lr": 5e-4}),
              "kto": recipe_dict(root, "z3-kto", "kto", pairs, adapter=LORA, train={**STEP, "lr": 5e-4},
                                 kto={"reference": "frozen_copy"})}
    stage3["sft-resumed"] = {**stage3["sft"], "output_dir": str(root / "z3-sft-resumed"),
                             "train": {**stage3["sft"]["train"],
                                       "resume_from": str(root / "z3-sft" / "checkpoints" / "step-000002")}}
    # GRPO (full fine-tuning, a frozen-copy KL reference): 2 prompts of 4 completions a round, each
    # process samples its own (stage 2 from the trained model, whose weights it holds whole; stage 3
    # from an unpartitioned copy synced before each round); 2 passes a round
    online = {"max_steps": 4, "save_every": 1, "keep_checkpoints": 4, "lr": 1e-3}
    digits = [{"fn": f"{root / 'digits.py'}:digits"}]
    (root / "digits.py").write_text("def digits(completions, **_):\n"
                                    "    return [float(sum(c.isdigit() for c in text)) for text in completions]\n")
    for stage, group in ((2, stage2), (3, stage3)):
        group["grpo"] = recipe_dict(root, f"z{stage}-grpo", "grpo", prompt_rows(8, seed=21),
                                    train={**online, "batch_size": 4},
                                    grpo={"group_size": 4, "num_iterations": 2, "beta": 0.05, "loss_norm": "dapo",
                                          "sampling": {"max_new_tokens": 12}, "rewards": digits})
    # GRPO under stage 3 with its rollouts from a server: no sampling copy, every weight gathered
    # for the main process to send before each round (safetensors over HTTP)
    stage3["grpo-server"] = deep_update(json.loads(json.dumps(stage3["grpo"])), {
        "output_dir": str(root / "z3-grpo-server"),
        "grpo": {"sampling": {"engine": "server", "server": {"transport": "http"}}}})
    # GRPO under stage 3 scored by a reward model (random weights: rewards that vary), whole on each
    # process or partitioned like the policy; 9 prompts, 2 a round, 5 rounds: in the last one process
    # scores nothing and pads the partitioned model's forwards; an eval split of 5 prompts at the end
    from align.config import AdapterConfig, ModelConfig
    from align.models.reward import RewardModel

    RewardModel.from_config(ModelConfig(name_or_path="builtin:tiny-llama", dtype="float32"), AdapterConfig()).save(
        root / "rm")
    for name, kwargs in (("grpo-rm", {}), ("grpo-rm-sharded", {"shard": True})):
        stage3[name] = recipe_dict(root, f"z3-{name}", "grpo", prompt_rows(9, seed=23), prompt_rows(5, seed=24),
                                   train={"batch_size": 4, "max_steps": 5, "lr": 1e-3},
                                   grpo={"group_size": 4, "sampling": {"max_new_tokens": 8},
                                         "rewards": [{"fn": str(root / "rm"), "kwargs": {"batch_size": 3, **kwargs}}]})
    # PPO under stage 3: the policy and a separate critic partitioned in one root, a KL reference;
    # 8 prompts a round, 2 epochs x 2 mini-batches
    stage3["ppo"] = recipe_dict(root, "z3-ppo", "ppo", prompt_rows(16, seed=31), train={**online, "batch_size": 2},
                                ppo={"ppo_epochs": 2, "num_mini_batches": 2, "kl_coef": 0.05, "critic": "separate",
                                     "sampling": {"max_new_tokens": 10}, "rewards": digits})
    # distillation under stage 3: the student partitioned, sampling from its copy; the teacher partitioned too
    stage3["distill"] = distill_recipe(root, "z3-distill")
    # ZeRO-Offload with the ready config (stage 3, weights and optimizer state in CPU memory, torch's
    # AdamW stepping there): SFT with its resume, and GRPO sampling from its copy
    offload = {"sft": recipe_dict(root, "z3o-sft", "sft", rows, chat_rows(5, seed=6),
                                  train={**STEP, "save_every": 2, "eval_every": 2})}
    offload["sft-resumed"] = {**offload["sft"], "output_dir": str(root / "z3o-sft-resumed"),
                              "train": {**offload["sft"]["train"],
                                        "resume_from": str(root / "z3o-sft" / "checkpoints" / "step-000002")}}
    offload["grpo"] = {**stage3["grpo"], "output_dir": str(root / "z3o-grpo")}
    # stage 2 with the optimizer offloaded (weights whole on each process): SFT with its resume
    offload2 = {"sft": recipe_dict(root, "z2o-sft", "sft", rows, train={**STEP, "save_every": 2})}
    offload2["sft-resumed"] = {**offload2["sft"], "output_dir": str(root / "z2o-sft-resumed"),
                               "train": {**offload2["sft"]["train"],
                                         "resume_from": str(root / "z2o-sft" / "checkpoints" / "step-000002")}}
    config = json.loads((REPO / "recipes/accelerate/ds_zero2.json").read_text())
    config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    (root / "ds_zero2_offload.json").write_text(json.dumps(config))
    launch = yaml.safe_load((REPO / "recipes/accelerate/zero2.yaml").read_text())
    launch["deepspeed_config"]["deepspeed_config_file"] = str(root / "ds_zero2_offload.json")
    (root / "zero2_offload.yaml").write_text(yaml.safe_dump(launch))
    for name, ready in (("zero3", "ds_zero3.json"), ("zero3_offload", "ds_zero3_offload.json")):
        config = json.loads((REPO / "recipes/accelerate" / ready).read_text())
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        (root / ready).write_text(json.dumps(config))
        launch = yaml.safe_load((REPO / f"recipes/accelerate/{name}.yaml").read_text())
        launch["deepspeed_config"]["deepspeed_config_file"] = str(root / ready)
        (root / f"{name}.yaml").write_text(yaml.safe_dump(launch))
    for group in ("z2", "z3", "z3o", "z2o"):
        (root / group).mkdir()
    train_on_two_processes(root / "z2", stage2, accelerate_launch(REPO / "recipes/accelerate/zero2.yaml"))
    with rollout_server(stage3["grpo"], root / "serve.yaml", "--engine", "prefix_shared") as url:
        stage3["grpo-server"]["grpo"]["sampling"]["server"]["url"] = url
        train_on_two_processes(root / "z3", stage3, accelerate_launch(root / "zero3.yaml"))
    train_on_two_processes(root / "z3o", offload, accelerate_launch(root / "zero3_offload.yaml"))
    train_on_two_processes(root / "z2o", offload2, accelerate_launch(root / "zero2_offload.yaml"))
    for group, recipes in (("z3", stage3), ("z3o", offload)):
        log = (root / group / "launch.log").read_text()
        partitioned = re.findall(r"ZeRO-3: (\d+) of (\d+) weights partitioned", log)
        assert len(partitioned) == len(recipes) and all(a == b for a, b in partitioned), partitioned
        # the frozen references and teachers too (DPO, KTO, GRPO twice, PPO, distillation; GRPO offloaded)
        references = re.findall(r"ZeRO-3: (\d+) of (\d+) weights of the frozen (?:reference|teacher) partitioned",
                                log)
        assert len(references) == {"z3": 6, "z3o": 1}[group] and all(a == b for a, b in references), references
    return {2: stage2, 3: stage3, "offload": offload, "offload2": offload2}


@pytest.mark.parametrize("stage,name", [(2, "sft"), (2, "dpo-lora"), (2, "reward"), (3, "sft"), (3, "sft-lora"),
                                        (3, "dpo"), (3, "kto"), ("offload", "sft"), ("offload2", "sft")])
def test_zero_on_two_processes_equals_one_process_with_their_joint_batch(launched, stage, name):
    """Loss, gradient norm and items at every step within 1e-5 relative (eval loss too); the final
    weights, gathered from the partitions into a plain transformers/peft directory, within 1e-4."""
    recipe = launched[stage][name]
    single = single_process(recipe, batch_size=4)
    TRAINERS.get(recipe["algorithm"]).from_recipe(recipe_from_dict(single)).fit()
    assert_same_run(recipe["output_dir"], single["output_dir"], keys=("loss", "grad_norm", "num_items", "eval/loss",
                                                                       "lr", "rewards/margin"))
    if "eval" in recipe["data"]:  # samples made on every process (stage 3: each layer's forward gathers)
        shown = Path(recipe["output_dir"], "samples.jsonl").read_text().splitlines()
        assert shown and all(json.loads(line)["completion"] for line in shown)


@pytest.mark.parametrize("stage", [2, 3, "offload", "offload2"])
def test_a_zero_checkpoint_resumes_under_zero_and_on_one_process(launched, stage, tmp_path):
    """The checkpoint is Align's own (safetensors + JSON, no pickle): the weights and AdamW state
    gathered from the partitions, named as under fsdp. Resumed under ZeRO (the state put back into
    the partitions) or on one process without DeepSpeed, step 3 and the final weights equal the
    straight run's."""
    straight = launched[stage]["sft"]["output_dir"]
    checkpoint = Path(straight) / "checkpoints" / "step-000002"
    assert not list(checkpoint.glob("*.pt")) and not list(checkpoint.glob("*.bin"))
    one = {**single_process(launched[stage]["sft"], batch_size=2, grad_accum=4, resume_from=str(checkpoint)),
           "output_dir": str(tmp_path / "one")}
    SFTTrainer.from_recipe(recipe_from_dict(one)).fit()
    for resumed in (launched[stage]["sft-resumed"]["output_dir"], one["output_dir"]):
        got = [r for r in metrics(resumed) if "loss" in r]
        want = [r for r in metrics(straight) if "loss" in r][-1]
        assert [r["step"] for r in got] == [3] == [want["step"]]
        for key in ("loss", "grad_norm", "num_items"):
            assert got[0][key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (resumed, key)
        for name, tensor in weights(straight).items():
            torch.testing.assert_close(weights(resumed)[name], tensor, atol=1e-4, rtol=0, msg=name)


@pytest.mark.parametrize("stage", [2, 3, "offload"])
def test_grpo_under_zero_equals_one_process_on_the_same_experience(launched, stage):
    """Each process samples its own prompts, so, as under DDP and fsdp, one process resumes from the
    ZeRO run's step-1 checkpoint, mid-round (the same weights, the whole round's experience): the
    round's second pass agrees."""
    recipe = launched[stage]["grpo"]
    single = resumed_mid_round_on_one_process(recipe, 8, batch_size=8, max_steps=2)
    (got,), want = metrics(single["output_dir"]), metrics(recipe["output_dir"])
    assert got["step"] == 2 and [r["step"] for r in want] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "kl", "reward"):
        assert got[key] == pytest.approx(want[1][key], rel=1e-5, abs=1e-6), key


def test_grpo_under_zero3_samples_from_a_copy_synced_with_the_partitions(launched):
    """Stage 3 samples from an unpartitioned copy of the policy, synced from the partitions before
    each round; stage 2 from the trained model itself. The same seeds, so the same run at every step,
    the second round sampled after the first round's updates (a stale copy would sample otherwise)."""
    two, three = (metrics(launched[stage]["grpo"]["output_dir"]) for stage in (2, 3))
    assert [r["step"] for r in three] == [1, 2, 3, 4] and abs(three[0]["kl"]) < 1e-6 < three[-1]["kl"]
    for a, b in zip(two, three):
        for key in ("loss", "kl", "grad_norm", "reward"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)


def test_grpo_under_zero3_sampling_from_a_rollout_server_equals_sampling_in_process(launched):
    """The server samples each process's prompts with its seed from the weights the main process
    gathered from the partitions and sent: the same rollouts as from the synced copies, so the same run."""
    assert_same_run(launched[3]["grpo-server"]["output_dir"], launched[3]["grpo"]["output_dir"],
                    keys=("loss", "grad_norm", "kl", "reward"))


PARTITIONED_REFERENCE_CHECK = """
import sys
import torch
import torch.distributed as dist
import deepspeed
from transformers import AutoModelForCausalLM
from align.models import zero
from align.models.policy import TokenLogprobModel
from align.models.reference_cache import tensors_hash
from align.config import TrainConfig

deepspeed.init_distributed(dist_backend="gloo")
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
batch = {"input_ids": torch.tensor([[1, 2, 3, 4, 5]]), "labels": torch.tensor([[2, 3, 4, 5, -100]])}
with torch.no_grad():
    want = TokenLogprobModel(model)(**batch)
whole_hash = tensors_hash(TokenLogprobModel(model))
config = zero.engine_config({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}},
                            TrainConfig(batch_size=1), world_size=dist.get_world_size())
reference = zero.start_frozen(TokenLogprobModel(model), "reference", reads_head=True, config=config)
assert all(p.numel() == 0 for p in reference.module.parameters())  # partitioned: nothing whole here
with torch.no_grad():
    got = reference(**batch)
torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
hashes = [None] * dist.get_world_size()  # (3 processes: the last one's partitions end in padding, not hashed)
dist.all_gather_object(hashes, tensors_hash(reference))
assert len(set(hashes)) == 1 and hashes[0] != whole_hash and len(hashes[0]) == 64
assert tensors_hash(reference) == hashes[0]  # the padding's uninitialised bytes are left out
with torch.no_grad():
    if dist.get_rank() == 1:
        next(reference.module.parameters()).ds_tensor.view(-1)[0] += 1
assert tensors_hash(reference) != hashes[0]
import gc, weakref
alive = weakref.ref(next(reference.module.parameters()))
zero.release_frozen(reference)  # as after DPO's precompute: the partitions are freed
del reference, model
gc.collect()
assert alive() is None
print("hashed", dist.get_rank())
dist.destroy_process_group()
"""


def test_a_partitioned_reference_computes_and_hashes_as_the_whole_one(tmp_path):
    """Under stage 3 a frozen reference (or teacher) is partitioned like the policy
    (`zero.start_frozen`): its log-probs are the whole model's, and its reference-cache key
    (`tensors_hash`) hashes what each process holds: the same on every process, and changed by a
    change in one process's partition (a key blind to the partitions would give wrong cache hits).
    Three processes, so that partitions end in padding. Released, its partitions are freed."""
    assert run_script_on_processes(tmp_path, PARTITIONED_REFERENCE_CHECK, 3).count("hashed") == 3


def test_a_partitioned_reward_model_scores_as_the_whole_one(launched):
    """A reward model with kwargs shard: true under ZeRO-3 is partitioned like the policy and scores
    in step on every process (padding forwards where one has fewer completions, or none, as in the
    last round): the same rewards as the whole one, so the same run, and the same evaluation."""
    log = (Path(launched[3]["grpo-rm"]["output_dir"]).parent / "z3" / "launch.log").read_text()
    held = re.findall(r"ZeRO-3: (\d+) of (\d+) weights of the frozen reward model \S+ partitioned", log)
    assert len(held) == 1 and held[0][0] == held[0][1], held  # logged by the main process
    assert_same_scores(launched[3]["grpo-rm"]["output_dir"], launched[3]["grpo-rm-sharded"]["output_dir"])


def test_ppo_under_zero3_equals_one_process_on_the_same_experience(launched):
    """PPO's policy and separate critic partitioned in one root, the sampler an unpartitioned copy
    of the policy alone: one process resumes from the step-1 checkpoint (mid-round) and the round's
    other mini-batch steps agree; the final critic is saved whole."""
    recipe = launched[3]["ppo"]
    single = resumed_mid_round_on_one_process(recipe, 8, batch_size=4)
    assert_same_run(recipe["output_dir"], single["output_dir"], keys=("loss", "grad_norm", "kl", "reward"),
                    first_step=2)
    partitioned, one = (load_file(Path(d, "critic", "model.safetensors")) for d in (recipe["output_dir"],
                                                                                    single["output_dir"]))
    assert partitioned.keys() == one.keys() and "score.weight" in partitioned
    for name, tensor in partitioned.items():
        torch.testing.assert_close(one[name], tensor, atol=1e-4, rtol=0, msg=f"critic {name}")


def test_distillation_under_zero3_equals_one_process(launched):
    """The student and the teacher partitioned (the teacher's head gathered for the student's
    forward, which reads it), greedy samples from the student's copy: every step equals one process's."""
    recipe = launched[3]["distill"]
    single = single_process(recipe, batch_size=4)
    TRAINERS.get("distill").from_recipe(recipe_from_dict(single)).fit()
    assert metrics(recipe["output_dir"])[0]["loss"] > 1e-3  # the teacher differs: a real divergence
    assert_same_run(recipe["output_dir"], single["output_dir"], keys=("loss", "grad_norm"))


def test_the_engine_config_takes_the_recipes_settings_and_refuses_what_align_owns():
    train = TrainConfig(batch_size=4, grad_accum=3, max_grad_norm=0.5)
    ready = json.loads((REPO / "recipes/accelerate/ds_zero2.json").read_text())
    config = zero.engine_config(ready, train, world_size=2)
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["gradient_clipping"], config["train_batch_size"]) == (4, 3, 0.5, 24)
    assert config["zero_optimization"] == ready["zero_optimization"]
    refused = [({"gradient_accumulation_steps": 2}, "sets gradient_accumulation_steps: 2, the recipe's "
                                                   "train.grad_accum is 3"),
               ({"bf16": {"enabled": True}}, "enables bf16: Align's train.mixed_precision owns precision"),
               ({"zero_optimization": {"stage": 1}}, "stage 1: Align runs stages 2 and 3"),
               ({"optimizer": {"type": "AdamW"}}, "an 'optimizer' section"),
               ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}, "not to NVMe"),
               ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "offload_param needs stage 3"),
               ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
                 "zero_force_ds_cpu_optimizer": True}, "Align steps torch's AdamW on the offloaded partitions"),
               ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "ratio": 0.5}}},
                "offload_optimizer.ratio: a partial offload"),
               ({"train_batch_size": 16}, "sets train_batch_size: 16")]
    for change, message in refused:
        with pytest.raises(AlignError, match=message):
            zero.engine_config({**ready, **change}, train, world_size=2)
    with pytest.raises(AlignError, match="zero3_init_flag: true is not supported"):
        zero.engine_config(ready, train, world_size=2, zero3_init=True)
    offload = zero.engine_config(json.loads((REPO / "recipes/accelerate/ds_zero3_offload.json").read_text()), train,
                                 world_size=2)  # the ready ZeRO-Offload config: torch's AdamW on the CPU partitions
    assert offload["zero_force_ds_cpu_optimizer"] is False and "zero_force_ds_cpu_optimizer" not in config
    assert "zero_force_ds_cpu_optimizer" not in zero.engine_config(  # a null section: no offload
        {**ready, "zero_optimization": {"stage": 2, "offload_optimizer": None}}, train, world_size=2)


@pytest.mark.parametrize("change,message", [
    ({"algorithm": "grpo", "grpo": {"rewards": [{"fn": "exact_answer"}], "sampling": {"engine": "vllm"}}},
     "grpo.sampling.engine vllm"),
    ({"algorithm": "grpo", "train": {"sharding": "fsdp"}, "grpo": {"rewards": [{"fn": "exact_answer"}]}},
     r"train.sharding: fsdp \(one sharding at a time"),
    ({"adapter": {**LORA, "kind": "qlora"}}, "adapter.kind qlora"),
    ({"train": {"optimizer": "adamw_8bit"}}, "train.optimizer adamw_8bit"),
    ({"algorithm": "dpo", "adapter": LORA}, "dpo.reference adapter_disabled"),
])
def test_what_zero_does_not_run_is_refused(tmp_path, change, message):
    rows = preference_rows(4, seed=1) if change.get("algorithm") == "dpo" else chat_rows(4, seed=1)
    recipe = recipe_from_dict({**recipe_dict(tmp_path, "run", "sft", rows), **change})
    with pytest.raises(AlignError, match=f"a DeepSpeed launch cannot run .*{message}"):
        zero.check(recipe.algorithm, recipe)
