"""The benchmark harness runs end to end (smoke mode) and Align and TRL train the same thing.

No timing is asserted: this machine's numbers mean nothing. What is checked: every job (Align,
each baseline variant, the floor loop; SFT, reward model, DPO, GRPO, PPO) runs in its own
process, the JSON and the markdown table are written, both sides take the same number of
optimizer steps, the held-out losses of Align's and TRL's final models agree (within
benchmarks.report.TOLERANCE of the loss decrease) after both actually learned, and the online RL
sides sampled the same work.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("trl")


def test_smoke_run_agrees_with_trl(tmp_path, tmp_path_factory, monkeypatch):
    from benchmarks import run
    from benchmarks.cases import CASES

    monkeypatch.setenv("ALIGN_BENCH_CACHE", str(tmp_path_factory.mktemp("bench-cache")))
    payload = run.main(["--smoke", "--jobs", "2", "--out", str(tmp_path / "results")])

    written = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert len(written) == 2 and written[0].endswith("-smoke.json") and written[1].endswith("-smoke.md")
    table = (tmp_path / "results" / written[1]).read_text()
    assert "| sft | TRL packing |" in table and "| dpo | TRL default |" in table and "| ppo | Align GRPO |" in table
    assert json.loads((tmp_path / "results" / written[0]).read_text())["rows"] == json.loads(json.dumps(payload["rows"]))

    failed = [(j["spec"]["case"], j["spec"]["side"], j["spec"]["variant"], j["error"]) for j in payload["jobs"]
              if not j["ok"]]
    assert not failed
    rows = {(r["case"], r["trl_variant"]): r for r in payload["rows"]}
    assert set(rows) == {(name, v) for name, case in CASES.items() for v in case.VARIANTS}
    for key, row in rows.items():
        assert row["agree"], (key, row["why"], row["initial_loss"], row["align_loss"], row["trl_loss"])
        assert row["tokens_per_epoch"] > 0 and row["align_peak_mb"] > 0
        if row["online"]:  # GRPO / PPO: the same work (steps, completions, tokens), no common held-out loss
            assert row["align_steps"] == row["trl_steps"] and row["tokens_gap"] <= 0.02, key
        else:
            assert row["align_loss"] < row["initial_loss"] and row["floor_s"] > 0
            assert row["align_largest_batch_tokens"] > 0 and row["trl_largest_batch_tokens"] > 0, key
        if key[1] != "packing":  # TRL's packing builds its own rows, so its step count may differ
            assert row["align_steps"] == row["trl_steps"], key


def test_gpu_script_runs_end_to_end_in_smoke_mode(tmp_path, tmp_path_factory):
    """benchmarks/gpu.sh --smoke on the CPU: the stack check, the model build, one sft row against
    TRL's default (Align under a token budget per micro-batch: TRL packing's row; both sides logging
    every step and under bf16 autocast, as on a GPU: `--set`) and every check (the same script a
    fresh GPU machine runs, minus the wheels)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parent.parent
    env = {**os.environ, "PYTHON": sys.executable, "ALIGN_BENCH_CACHE": str(tmp_path_factory.mktemp("gpu-sh-cache"))}
    proc = subprocess.run(["bash", str(root / "benchmarks" / "gpu.sh"), "--smoke", "--out", str(tmp_path / "out"),
                           "--only-checks", "sft,dpo,grpo,qlora,varlen,recompute,compile,probes,graphs",
                           "--set", "sft.micro_batch_tokens=trl_row", "--set", "sft.log_every=1",
                           "--set", "sft.precision=bf16"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (table,) = (tmp_path / "out").glob("*-smoke.md")
    text = table.read_text()
    assert "| sft | TRL default |" in text and "| FAILED |" not in text and "| ok |" in text, text
    (result,) = (tmp_path / "out").glob("*-smoke.json")
    align_job = next(j for j in json.loads(result.read_text())["jobs"] if j["spec"]["side"] == "align")
    assert align_job["spec"]["micro_batch_tokens"] == "trl_row"
    assert align_job["tokenizer_class"] == "TokenizersBackend"  # the tiny (Llama) model keeps the built tokenizer
    payload = json.loads(result.read_text())
    (row,) = payload["rows"]
    assert [e["step"] for e in row["align_log"]] == [e["step"] for e in row["trl_log"]] == [1, 2, 3]
    assert row["align_log"][0]["loss"] == pytest.approx(row["trl_log"][0]["loss"], rel=1e-4)  # the same first batch
    assert "logged steps (step: loss / grad norm before clipping) Align 1: " in text
    assert len(payload["tokenizers"]["sft"]) == 16 and payload["versions"]["tokenizers"] != "not installed"
    checks = json.loads((tmp_path / "out" / "gpu_checks.json").read_text())
    assert [c["check"] for c in checks] == ["no host sync: sft", "no host sync: dpo", "no host sync: grpo",
                                            "QLoRA SFT memory", "varlen attention", "selective checkpointing",
                                            "compiled layers", "load-time probes", "CUDA-graph decoding"]
    assert all(c["ok"] for c in checks), checks


PREPARED_IN_BF16 = r"""
import functools
import types

import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM
from benchmarks.evaluate import plain

torch.manual_seed(0)
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
model, fresh = LlamaForCausalLM(config), LlamaForCausalLM(config)
fresh.load_state_dict(model.state_dict())
ids = torch.randint(0, 64, (2, 16))
model = Accelerator(cpu=True, mixed_precision="bf16").prepare(model)  # what TRL's bf16=True does
with torch.no_grad():
    expected, wrapped = fresh(ids).logits, model(ids).logits
    assert not torch.equal(wrapped, expected)  # run under bf16 autocast
    assert torch.equal(plain(model)(ids).logits, expected)
assert "forward" not in model.__dict__
wrapped = type(model).forward


@functools.wraps(wrapped)
def fused(self, *args, fused_lm_head=False, **kwargs):  # as TRL's SFT trainer wraps it
    return wrapped(self, *args, **kwargs)


model.forward = types.MethodType(fused, model)
model = Accelerator(cpu=True, mixed_precision="bf16").prepare(model)
assert torch.equal(plain(model)(ids).logits, expected) and "forward" not in model.__dict__
model.forward = lambda *args, **kwargs: None
try:
    plain(model)
except ValueError as error:
    print("refused:", error)
"""


def test_held_out_passes_evaluate_a_trl_model_without_its_bf16_autocast_wrapper(tmp_path):
    """accelerate's mixed precision leaves a prepared model's forward under bf16 autocast after
    training: `plain` restores the class's forward (the GPU's 0.5b SFT and reward-model rows were VOID
    because TRL's final model was evaluated in bf16 and Align's in fp32), and refuses any other
    replaced forward."""
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-c", PREPARED_IN_BF16], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused: LlamaForCausalLM's forward is replaced on the instance" in proc.stdout


def test_version_lookup_tolerates_a_package_without_metadata(monkeypatch):
    """`pip install --target` leaves no dist-info: the harness falls back to `__version__`."""
    import importlib.metadata

    from benchmarks import run

    real = importlib.metadata.version

    def version(name):
        if name == "align":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    import align

    assert run._versions()["align"] == align.__version__


@pytest.mark.parametrize("steps_run", [5, 2])
def test_the_profile_records_steady_steps_marked_by_the_step_clock(tmp_path, steps_run):
    """`--profile`: the step clock steps the profiler, whose window skips the first step and records
    the next steady ones; a run shorter than the window says that nothing was recorded. The clock
    times every step."""
    import torch

    from benchmarks import steps
    from benchmarks.worker import PROFILED_STEPS, profiled

    path = tmp_path / "profile.txt"
    with profiled(str(path), "toy") as profiler:
        clock = steps.StepClock(profiler)
        steps.install(clock)
        try:
            for _ in range(steps_run):
                torch.randn(64, 64).matmul(torch.randn(64, 64))
                steps.step_done()
        finally:
            steps.install(None)
    assert len(clock.step_seconds()) == steps_run
    text = path.read_text()
    if steps_run > PROFILED_STEPS["wait"] + PROFILED_STEPS["warmup"]:
        assert "==== toy: up to 2 steady steps" in text and "aten::mm" in text
    else:
        assert "==== toy: fewer steps than the profiler's window" in text and "aten::mm" not in text


def test_memory_marks_tell_what_is_held_between_steps_from_the_steps_peak():
    """On a GPU each step end reads (allocated, peak so far): the most held at a step's end (weights,
    gradients, optimizer state, caches) and the step in which the region's peak was reached."""
    from benchmarks.steps import memory_summary

    marks = [(10, 10), (50, 90), (60, 120), (55, 120)]  # the region's start, then three step ends
    assert memory_summary(marks) == {"held_between_steps_bytes": 60, "peak_step": 2}
    assert memory_summary([(10, 10)]) == {} and memory_summary([]) == {}  # no step (or a CPU: no marks)
