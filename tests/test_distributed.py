"""Data parallelism: two CPU processes (`torchrun`, gloo) train exactly as one process whose batch
holds both processes' examples. One launch runs every recipe through `align train`; the
single-process runs happen here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from align.config import recipe_from_dict
from align.models.tiny import cache_dir, resolve
from align.toy import chat_rows, preference_rows, prompt_rows
from align.trainers import DPOTrainer, SFTTrainer
from align.trainers.checkpoint import load_checkpoint
from tests.conftest import deep_update, rollout_server, write_jsonl

REPO = Path(__file__).resolve().parents[1]
WORKER = """
import sys
from align.cli import main, release_processes

for recipe in sys.argv[1:]:
    if main(["train", recipe]) != 0:
        sys.exit(1)
# main(argv) keeps the process group for the next recipe; left to the interpreter's exit, its teardown
# could abort one process after every run was done ("terminate called without an active exception")
release_processes()
"""
LORA = {"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.0}
TRAIN = {"lr": 3e-3, "schedule": "constant", "log_every": 1, "progress": False, "plots": False, "seed": 0}


def recipe_dict(root: Path, name: str, algorithm: str, rows, eval_rows=None, **sections) -> dict:
    """A tiny-llama recipe writing to root/name; `train.batch_size` is per process."""
    data = {"train": {"path": write_jsonl(root / f"{name}-train.jsonl", rows)}, "max_length": 128}
    if eval_rows is not None:
        data["eval"] = {"path": write_jsonl(root / f"{name}-eval.jsonl", eval_rows)}
    recipe = {"algorithm": algorithm, "output_dir": str(root / name), "data": data, "train": dict(TRAIN),
              "model": {"name_or_path": "builtin:tiny-llama", "dtype": "float32"}}
    return deep_update(recipe, sections)


def single_process(recipe: dict, batch_size: int, **train) -> dict:
    """The same recipe for one process holding both processes' examples, in its own output dir."""
    out = {**recipe, "output_dir": recipe["output_dir"] + "-single"}
    return deep_update(json.loads(json.dumps(out)), {"train": {"batch_size": batch_size, **train}})


def distill_recipe(root: Path, name: str, **sections) -> dict:
    """Distillation of tiny-llama from a perturbed copy of itself (written to root/teacher once),
    greedy samples (the same completions on one process or two), 4 prompts a step, 13 prompts in 4
    steps: the last has one prompt, so one process samples none; an eval split of 5 prompts in
    batches of 2 (two forwards on one process, one on the other: padded)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = root / "teacher"
    if not teacher.is_dir():
        model = AutoModelForCausalLM.from_pretrained(resolve("builtin:tiny-llama"), dtype=torch.float32)
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(3)
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(teacher)
        AutoTokenizer.from_pretrained(resolve("builtin:tiny-llama")).save_pretrained(teacher)
    recipe = recipe_dict(root, name, "distill", prompt_rows(13, seed=41), prompt_rows(5, seed=42),
                         train={"batch_size": 2, "max_steps": 4, "lr": 1e-3},
                         distill={"teacher_model": str(teacher), "sampling": {"max_new_tokens": 10, "temperature": 0.0}})
    return deep_update(recipe, sections)


def assert_same_scores(whole_dir: str, sharded_dir: str) -> None:
    """The GRPO runs scored by a reward model whole on each process and sharded (the recipes of
    test_fsdp and test_zero: 5 steps, evaluated at the end, rewards that vary) agree step for step,
    and in evaluation."""
    whole, sharded = metrics(whole_dir), metrics(sharded_dir)
    assert [r["step"] for r in sharded] == [1, 2, 3, 4, 5, 5] and "eval/reward" in sharded[-1]
    assert len({round(r["reward"], 6) for r in whole if "reward" in r}) > 1  # the rewards vary
    for a, b in zip(whole, sharded):
        for key in ("loss", "grad_norm", "reward", "eval/reward"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)


def run_script_on_processes(directory: Path, script: str, processes: int = 2) -> str:
    """`script` (Python source, given tiny-llama's directory as its argument) under `torchrun
    --nproc_per_node processes` (CPU, gloo); its output, after checking it exited cleanly."""
    (directory / "check.py").write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             str(processes), str(directory / "check.py"), resolve("builtin:tiny-llama")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


def resumed_mid_round_on_one_process(recipe: dict, completions: int, batch_size: int, **train) -> dict:
    """The one-process run of an online `recipe` resumed from its multi-process run's step-1
    checkpoint, mid-round: the same weights and the same whole-round experience (`completions` in
    all, gathered from every process). Sampling differs between one process and several (each
    samples its own prompts), so this is how their updates are compared. Returns the recipe it ran."""
    from align.registry import TRAINERS

    checkpoint = Path(recipe["output_dir"], "checkpoints", "step-000001")
    groups = load_checkpoint(checkpoint)[1]["experience"]["groups"]
    assert sum(len(g["completions"]) for g in groups) == completions
    assert all(len(g["completions"]) == recipe[recipe["algorithm"]].get("group_size", 1) for g in groups)
    assert metrics(recipe["output_dir"])[0]["grad_norm"] > 0.01  # the rewards vary: a real gradient
    single = single_process(recipe, batch_size, resume_from=str(checkpoint), **train)
    TRAINERS.get(recipe["algorithm"]).from_recipe(recipe_from_dict(single)).fit()
    return single


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


def weights(run_dir) -> dict[str, torch.Tensor]:
    run_dir = Path(run_dir)
    name = "adapter_model.safetensors" if (run_dir / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(run_dir / name)


def assert_same_run(got_dir, want_dir, keys=("loss", "grad_norm"), first_step=1):
    """The same metrics at every step from `first_step` on (to float rounding) and the same final
    weights. Weights get 1e-4: AdamW divides by sqrt(v), so an element whose gradient is ~0 turns
    the rounding differences of another summation order into visible ones (a few in 10^5 elements
    differ by more than 1e-6)."""
    got, want = [r for r in metrics(got_dir) if r["step"] >= first_step], metrics(want_dir)
    assert [r["step"] for r in got] == [r["step"] for r in want] and want
    for g, w in zip(got, want):
        for key in keys:
            if key in w:
                assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-6), (key, g, w)
    got, want = weights(got_dir), weights(want_dir)
    assert got.keys() == want.keys() and got
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-4, rtol=0, msg=name)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Runs every recipe once under `torchrun --nproc_per_node 2` (CPU, gloo), with its own cache."""
    root = tmp_path_factory.mktemp("distributed")
    digits = {"fn": f"{root / 'digits.py'}:digits"}  # a reward that varies between random completions
    recipes = {
        # 21 rows, 8 a step (2 per micro-batch x 2 accumulation x 2 processes): the last step's 5 rows
        # give one process two micro-batches and the other one
        "sft": recipe_dict(root, "sft", "sft", chat_rows(21, seed=5),
                           train={"batch_size": 2, "grad_accum": 2, "save_every": 2}),
        # 9 pairs, 4 a step: the last step's one pair leaves the second process a padding batch
        "dpo": recipe_dict(root, "dpo", "dpo", preference_rows(9, seed=11), preference_rows(7, seed=12),
                           adapter=LORA, train={"batch_size": 2, "lr": 5e-3}),
        # 2 prompts of 4 completions a round (a group per process), 2 optimizer steps on each round
        "grpo": recipe_dict(root, "grpo", "grpo", prompt_rows(8, seed=21), adapter=LORA,
                            train={"batch_size": 4, "max_steps": 2, "save_every": 1, "lr": 1e-2},
                            grpo={"group_size": 4, "num_iterations": 2, "beta": 0.05, "loss_norm": "dapo",
                                  "sampling": {"max_new_tokens": 12}, "rewards": [digits]}),
        # 8 prompts a round, 2 epochs x 2 mini-batches of 4 (2 per process, drawn from both processes' samples)
        "ppo": recipe_dict(root, "ppo", "ppo", prompt_rows(16, seed=31), adapter=LORA,
                           train={"batch_size": 2, "max_steps": 4, "save_every": 1, "keep_checkpoints": 4, "lr": 1e-2},
                           ppo={"ppo_epochs": 2, "num_mini_batches": 2, "kl_coef": 0.05, "critic": "shared",
                                "sampling": {"max_new_tokens": 10}, "rewards": [digits]}),
    }
    recipes["sft-resumed"] = {**recipes["sft"], "output_dir": str(root / "sft-resumed"),
                              "train": {**recipes["sft"]["train"], "resume_from": str(root / "sft/checkpoints/step-000002")}}
    (root / "digits.py").write_text("def digits(completions, **_):\n"
                                    "    return [float(sum(c.isdigit() for c in text)) for text in completions]\n")
    # GRPO again with its rollouts from a server (prefix_shared, as the run above samples in-process)
    with rollout_server(recipes["grpo"], root / "serve.yaml", "--engine", "prefix_shared") as url:
        recipes["grpo-server"] = deep_update(json.loads(json.dumps(recipes["grpo"])), {
            "output_dir": str(root / "grpo-server"),
            "grpo": {"sampling": {"engine": "server", "server": {"url": url, "transport": "collective"}}}})
        return train_on_two_processes(root, recipes)


def train_on_two_processes(root: Path, recipes: dict[str, dict], launcher: list[str] | None = None) -> dict[str, dict]:
    """`align train` of each recipe in turn, in one `torchrun --nproc_per_node 2` launch (CPU, gloo)
    with its own cache (the processes' reference log-probs are checked against this process's);
    launcher: another launch command instead (e.g. accelerate launch's, or torchrun's for more processes)."""
    paths = []
    for name, recipe in recipes.items():
        paths.append(root / f"{name}.yaml")
        paths[-1].write_text(yaml.safe_dump(recipe))
    (root / "worker.py").write_text(WORKER)
    cache = root / "cache"
    shutil.copytree(Path(resolve("builtin:tiny-llama")).parent, cache / "builtin")
    env = {**os.environ, "ALIGN_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    launcher = launcher or [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run([*launcher, str(root / "worker.py"), *map(str, paths)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert result.stdout.count("done:") == len(recipes)  # the main process alone reports
    assert "broadcast_buffers" not in result.stderr  # (torch 2.13's deprecation, which a user cannot act on)
    (root / "launch.log").write_text(result.stdout + result.stderr)
    return recipes


def test_sft_on_two_processes_equals_one_process_with_their_joint_batch(launched):
    recipe = launched["sft"]
    SFTTrainer.from_recipe(recipe_from_dict(single_process(recipe, batch_size=4))).fit()
    assert [r["step"] for r in metrics(recipe["output_dir"])] == [1, 2, 3]  # written once, by the main process
    assert_same_run(recipe["output_dir"], recipe["output_dir"] + "-single", keys=("loss", "grad_norm", "num_items"))


def test_a_two_process_run_resumes_from_its_checkpoint(launched):
    resumed, straight = launched["sft-resumed"]["output_dir"], launched["sft"]["output_dir"]
    assert [r["step"] for r in metrics(resumed)] == [3]
    for name, tensor in weights(straight).items():
        torch.testing.assert_close(weights(resumed)[name], tensor, atol=1e-6, rtol=0, msg=name)


def test_a_two_process_checkpoint_resumes_on_one_process_with_the_same_results(launched):
    """DDP 2 -> 1: the same examples per optimizer step (grad_accum doubled), the same step 3 and
    final weights as the two-process run."""
    recipe = launched["sft"]
    checkpoint = str(Path(recipe["output_dir"]) / "checkpoints" / "step-000002")
    one = {**single_process(recipe, batch_size=2, grad_accum=4, resume_from=checkpoint),
           "output_dir": recipe["output_dir"] + "-one"}
    SFTTrainer.from_recipe(recipe_from_dict(one)).fit()
    (got,) = metrics(one["output_dir"])
    want = metrics(recipe["output_dir"])[-1]
    assert got["step"] == want["step"] == 3
    for key in ("loss", "grad_norm", "num_items"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    for name, tensor in weights(recipe["output_dir"]).items():
        torch.testing.assert_close(weights(one["output_dir"])[name], tensor, atol=1e-4, rtol=0, msg=name)


def test_dpo_on_two_processes_equals_one_process_and_shares_the_reference_cache(launched):
    recipe = launched["dpo"]
    DPOTrainer.from_recipe(recipe_from_dict(single_process(recipe, batch_size=4))).fit()
    assert_same_run(recipe["output_dir"], recipe["output_dir"] + "-single",
                    keys=("loss", "grad_norm", "rewards/margin", "eval/loss", "eval/rewards/accuracy"))
    # reference log-probs computed in shares by the two processes, written once, equal ours
    ours = {p.name: load_file(p)["logps"] for p in (cache_dir() / "reference").glob("*.safetensors")}
    theirs = list((Path(recipe["output_dir"]).parent / "cache" / "reference").glob("*.safetensors"))
    assert len(theirs) == 2 and not list(theirs[0].parent.glob("*.tmp"))  # train and eval splits
    for path in theirs:
        torch.testing.assert_close(load_file(path)["logps"], ours[path.name], atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_online_steps_on_two_processes_equal_one_process_on_the_same_experience(launched, algorithm):
    """Sampling differs between one and two processes (each process samples its own prompts), so
    the one-process run resumes from the two-process checkpoint after step 1, mid-round: the same
    weights and the same whole-round experience (gathered from both processes). The rest of the
    round (GRPO: its second pass; PPO: mini-batches drawn across both processes' samples) must agree."""
    recipe = launched[algorithm]
    single = resumed_mid_round_on_one_process(recipe, 8, batch_size=2 * recipe["train"]["batch_size"])
    assert_same_run(recipe["output_dir"], single["output_dir"], keys=("loss", "grad_norm", "kl", "reward"),
                    first_step=2)


def test_two_processes_sampling_from_one_rollout_server_equal_sampling_in_process(launched):
    """Each process asks the server for its own prompts' completions (its own seed); the main process
    alone sends the weights, through a gloo group, before each round: the same run as in-process."""
    assert_same_run(launched["grpo-server"]["output_dir"], launched["grpo"]["output_dir"],
                    keys=("loss", "grad_norm", "kl", "reward"))


MAIN_FIRST = """
import json, os, sys, time
from pathlib import Path
from accelerate import PartialState
from align.trainers import SFTTrainer

here, build = Path(__file__).parent, SFTTrainer.build_dataset.__func__


def timed(cls, *args):
    start = time.time()
    data = build(cls, *args)
    rank = PartialState().process_index
    if rank == 0:
        time.sleep(2)  # the other process, were it not held back, would start tokenizing meanwhile
    files = [f["filename"] for f in data.cache_files]
    times = {"start": start, "end": time.time(), "cache": [(f, os.stat(f).st_ino, os.stat(f).st_mtime_ns) for f in files]}
    (here / f"rank{rank}.json").write_text(json.dumps(times))
    return data


SFTTrainer.build_dataset = classmethod(timed)
SFTTrainer.from_recipe(str(here / "sft.yaml"))
"""


def test_the_main_process_tokenizes_first_and_the_other_reads_its_cache(tmp_path):
    recipe = {"algorithm": "sft", "output_dir": str(tmp_path / "run"),
              "model": {"name_or_path": "builtin:tiny-llama"},
              "data": {"train": {"path": write_jsonl(tmp_path / "train.jsonl", chat_rows(200, seed=8))}}}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(recipe))
    run_script_on_processes(tmp_path, MAIN_FIRST)
    main, other = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert other["start"] >= main["end"]
    assert other["cache"] == main["cache"] and main["cache"]  # the very file the main process wrote, read


RAISES_FIRST = """
from align.distributed import main_processes_first
from align.trainers.processes import process_accelerator

state = process_accelerator(timeout_s=60)
try:
    with main_processes_first():
        if state.is_main_process:
            raise ValueError("bad data")
        print("the other process ran the block", flush=True)
except ValueError:
    print("the main process raised", flush=True)
"""


def test_an_error_on_the_main_process_first_does_not_hold_the_others(tmp_path):
    output = run_script_on_processes(tmp_path, RAISES_FIRST)
    assert "the main process raised" in output and "the other process ran the block" in output


RUN_AS_THE_PROGRAM = """
import atexit
import sys

import torch.distributed as dist

from align.cli import main

atexit.register(lambda: print("group at exit:", dist.is_initialized(), flush=True))
sys.argv = ["align", "train", RECIPE]  # main() then reads its arguments as the installed command does
sys.exit(main())
"""


def test_align_train_run_as_the_program_releases_the_process_group(tmp_path):
    """`align train` as the program waits for the other processes and destroys the process group
    once its command returns, as torch asks before exit (NCCL warns otherwise); `main(argv)`, which
    a script may call several times in one process (the launch above), keeps it."""
    recipe = recipe_dict(tmp_path, "cli", "sft", chat_rows(8, seed=5), train={"batch_size": 2, "max_steps": 1})
    (tmp_path / "cli.yaml").write_text(yaml.safe_dump(recipe))
    out = run_script_on_processes(tmp_path, RUN_AS_THE_PROGRAM.replace("RECIPE", repr(str(tmp_path / "cli.yaml"))))
    assert out.count("group at exit: False") == 2 and out.count("done:") == 1, out
