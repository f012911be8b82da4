"""GPU checks that are not races against TRL (run by benchmarks/gpu.sh after the benchmarks):

1. **No host sync in a training step**: one optimizer step of SFT, DPO and GRPO's training part (the
   rollout excluded), outside a log step, under `torch.cuda.set_sync_debug_mode("error")`: any
   operation that makes the host wait for the GPU raises. (The CPU proxy, run in CI, is
   tests/test_host_syncs.py.)
2. **QLoRA memory**: peak GPU memory and tokens/s of QLoRA SFT on a preset as users run it: 4-bit
   NF4 base, bf16 compute and autocast, gradient checkpointing, paged 8-bit AdamW.
3. **Varlen attention**: packed rows (up to 4096 tokens) through the varlen kernel against the
   block-diagonal-mask SDPA path: the kernel ran, and log-probs and gradients agree to bf16 noise.
4. **Selective checkpointing** (`model.checkpoint_mode`): peak memory and time of an SFT step of
   packed rows without checkpointing, with full and with selective; selective runs no matmul or
   attention kernel twice, and its gradients equal the plain ones to bf16 noise.
5. **Compiled layers** (`model.compile`): SFT steps of packed rows with eager and compiled decoder
   layers: two compiling steps, then a step of other lengths timed; the gradients agree to bf16
   noise, no frame was left eager (dynamo's recompile limit) and none compiled in the timed step.
6. **Load-time probes on real widths**: the layout probe's and the prefix_shared engine's measured
   errors (`align.models.layouts.layout_errors`, `PrefixSharedEngine.probe_error`) on the presets
   in bf16 weights and under bf16 autocast, against the tolerances they are judged by: a margin
   too thin would refuse a layout or the engine on a model that runs them exactly.
7. **CUDA-graph decoding** (`align.rollout.static_decoder`): the graph was captured, its steps'
   log-probs equal the eager loop's on the same fed tokens (fp32), and a GRPO-sized rollout
   (8 prompts x 8 samples x 256 tokens) is timed both ways.

    python -m benchmarks.gpu_checks --model 0.5b --qlora-model 1.5b
    python -m benchmarks.gpu_checks --smoke      # CPU, tiny model: the same code, no sync mode, AdamW

Prints one line per check and writes them as JSON to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
import traceback
from pathlib import Path

import torch

from benchmarks import assets


def recipe(algorithm: str, model_dir: str, train_path: str, out: Path, cuda: bool, **sections) -> dict:
    raw = {"algorithm": algorithm, "output_dir": str(out / algorithm),
           "model": {"name_or_path": model_dir, "dtype": "bfloat16" if cuda else "float32"},
           "data": {"train": {"path": train_path}, "max_length": 1024},
           "train": {"lr": 1e-5, "max_steps": 4, "batch_size": 8, "mixed_precision": "bf16" if cuda else "no",
                     "log_every": 1000, "progress": False, "plots": False}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


def sync_check(name: str, raw: dict, cuda: bool) -> dict:
    """Step 0 as warm-up (lazy CUDA initialisation may sync), then step 1 under sync-debug "error"."""
    from align.config import recipe_from_dict
    from align.trainers import TRAINERS

    trainer = TRAINERS[raw["algorithm"]].from_recipe(recipe_from_dict(raw))
    trainer.train_step(trainer.micro_batches(0))
    batches = trainer.micro_batches(1)  # collated (and, for GRPO, sampled) outside the check
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.train_step(batches)
        result = {"check": f"no host sync: {name}", "ok": True}
    except RuntimeError as error:
        where = [f"{Path(f.filename).name}:{f.lineno} {f.line}" for f in traceback.extract_tb(error.__traceback__)
                 if "/align/" in f.filename]  # the line of Align that waited on the GPU
        result = {"check": f"no host sync: {name}", "ok": False, "error": str(error).splitlines()[0], "where": where[-3:]}
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    if not cuda:
        result["note"] = "no CUDA: the step ran without sync-debug mode (CPU proxy: tests/test_host_syncs.py)"
    return result


def qlora_memory(model_dir: str, train_path: str, out: Path, cuda: bool, steps: int) -> dict:
    from align.config import recipe_from_dict
    from align.trainers import SFTTrainer

    raw = recipe("sft", model_dir, train_path, out, cuda, adapter={"kind": "qlora", "r": 16, "alpha": 32},
                 model={"gradient_checkpointing": True},
                 train={"max_steps": steps, "batch_size": 16, "optimizer": "paged_adamw_8bit" if cuda else "adamw"})
    trainer = SFTTrainer.from_recipe(recipe_from_dict(raw))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start, tokens = time.perf_counter(), 0
    for step in range(steps):
        record = trainer.train_step(trainer.micro_batches(step))
        tokens += record["num_tokens"]
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return {"check": "QLoRA SFT memory", "ok": True, "peak_gib": peak, "tokens_per_s": tokens / seconds,
            "steps": steps, "settings": "nf4 base, bf16 compute, gradient checkpointing, "
                                         + ("paged 8-bit AdamW" if cuda else "AdamW (CPU)")}


def varlen_check(model_dir: str, train_path: str, out: Path, cuda: bool) -> dict:
    """One packed batch of SFT, its log-probs and their gradient, with the examples' boundaries
    (the varlen kernel) and without (SDPA with the block-diagonal mask), under bf16 autocast."""
    from align.config import recipe_from_dict
    from align.models import varlen
    from align.ops.logprobs import IGNORE_INDEX
    from align.trainers import SFTTrainer

    raw = recipe("sft", model_dir, train_path, out, cuda, data={"pack_length": 4096},
                 model={"dtype": "float32"})
    trainer = SFTTrainer.from_recipe(recipe_from_dict(raw))
    policy = trainer.policy
    batch = trainer._to_device(trainer.collate([trainer.train_data[i] for i in range(32)]))
    kernel = {"switched": policy.model.config._attn_implementation == varlen.NAME,
              "boundaries": "cu_seq_lens" in batch, "rows": list(batch["input_ids"].shape)}
    runs = []
    kernel_runs = varlen._kernel_runs
    varlen._kernel_runs = lambda *args: runs.append(kernel_runs(*args)) or runs[-1]  # a spy: did it run?
    try:
        outputs = {}
        for name, inputs in (("varlen", batch), ("mask", {k: v for k, v in batch.items()
                                                          if k not in ("cu_seq_lens", "max_seq_len")})):
            policy.module.zero_grad(set_to_none=True)
            with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
                logps = policy.logprobs(inputs)
            logps[batch["labels"] != IGNORE_INDEX].sum().backward()
            grads = torch.cat([p.grad.flatten().float() for p in policy.trainable_parameters() if p.grad is not None])
            outputs[name] = (logps.detach()[batch["labels"] != IGNORE_INDEX].float(), grads)
    finally:
        varlen._kernel_runs = kernel_runs
    (a, ga), (b, gb) = outputs["varlen"], outputs["mask"]
    diff = (a - b).abs()
    cosine = float(torch.nn.functional.cosine_similarity(ga, gb, dim=0))
    kernel["ran"] = any(runs)
    result = {"check": "varlen attention", **kernel, "logp_max_abs_diff": float(diff.max()),
              "logp_mean_abs_diff": float(diff.mean()), "grad_cosine": cosine,
              "grad_norm_ratio": float(ga.norm() / gb.norm())}
    result["ok"] = bool(diff.mean() < 2e-2 and diff.max() < 0.25 and cosine > 0.999) and (
        not cuda or (kernel["switched"] and kernel["boundaries"] and kernel["ran"]))
    if not cuda:
        result["note"] = "no CUDA: both sides ran SDPA with the mask (the kernel needs CUDA)"
    return result


def packed_sft_trainer(model_dir: str, train_path: str, out: Path, cuda: bool, **model):
    """An SFT trainer whose step 0 is 16 chats in packed rows of up to 4096 tokens (on CUDA one row,
    through the varlen kernel: `Trainer.one_row`), fp32 weights under bf16 autocast, with the `model`
    keys given: what the recompute and compile checks step through."""
    from align.config import recipe_from_dict
    from align.trainers import SFTTrainer

    raw = recipe("sft", model_dir, train_path, out, cuda, data={"pack_length": 4096},
                 model={"dtype": "float32", **model}, train={"batch_size": 16})
    return SFTTrainer.from_recipe(recipe_from_dict(raw))


def flat_grads(trainer) -> torch.Tensor:
    """The trainable parameters' gradients, one float64 vector on the CPU."""
    return torch.cat([p.grad.flatten().double().cpu() for p in trainer.policy.trainable_parameters()])


def recompute_check(model_dir: str, train_path: str, out: Path, cuda: bool) -> dict:
    """One SFT micro-batch step of packed rows (the varlen kernel on CUDA; fp32 weights, bf16
    autocast) with no, full and selective activation checkpointing (`model.checkpoint_mode`): the
    memory the step adds at its peak and its time, after a warm-up step that counts the ops;
    selective must run no matmul or attention kernel more often than no checkpointing does (and
    full more), and give its gradients to bf16 noise."""
    import gc

    from align.models.recompute import OpCounts

    runs = {}
    for mode in ("none", "full", "selective"):
        checkpointing = {} if mode == "none" else {"gradient_checkpointing": True, "checkpoint_mode": mode}
        trainer = packed_sft_trainer(model_dir, train_path, out, cuda, **checkpointing)
        batches = trainer.micro_batches(0)
        with OpCounts() as ops:
            trainer.accumulate_gradients(batches)
        grads = flat_grads(trainer)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if cuda else 0
        start = time.perf_counter()
        trainer.accumulate_gradients(batches)
        if cuda:
            torch.cuda.synchronize()
        runs[mode] = {"seconds": time.perf_counter() - start, "grads": grads,
                      "step_peak_gib": (torch.cuda.max_memory_allocated() - before) / 2**30 if cuda else None,
                      "matmuls": ops.matmuls(), "attention_kernels": ops.attention(),
                      "varlen_kernels": ops.all["torch_attn::_varlen_attn"]}
        del trainer, batches
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    plain, full, selective = runs["none"], runs["full"], runs["selective"]
    cosine = float(torch.nn.functional.cosine_similarity(selective["grads"], plain["grads"], dim=0))
    keys = ("seconds", "step_peak_gib", "matmuls", "attention_kernels", "varlen_kernels")
    result = {"check": "selective checkpointing", "grad_cosine": cosine,
              **{f"{mode}_{key}": run[key] for mode, run in runs.items() for key in keys}}
    result["ok"] = (cosine > 0.999 and selective["matmuls"] == plain["matmuls"] < full["matmuls"]
                    and 0 < selective["attention_kernels"] == plain["attention_kernels"] < full["attention_kernels"]
                    and (not cuda or plain["varlen_kernels"] > 0))
    return result


def compile_check(model_dir: str, train_path: str, out: Path, cuda: bool) -> dict:
    """SFT micro-batch steps of packed rows (`packed_sft_trainer`) with eager decoder layers, compiled
    ones (`model.compile`), and compiled ones with every layer selectively checkpointed
    (`checkpoint_mode: selective`, its recomputed elementwise ops fused into the backward): steps 0
    and 1 compile (the second for lengths that vary) and warm the eager run's kernels up; step 2's
    other lengths are timed, with the memory the step adds at its peak, and the compiled runs'
    gradients must agree with the eager ones to bf16 noise. The frames dynamo compiled in each
    step are reported: none may be compiled in the timed step (lengths are dynamic by then; a
    compilation there would be timed as the step) nor left eager (past its recompile limit)."""
    import gc

    from torch._dynamo.utils import counters

    variants = {"eager": {}, "compiled": {"compile": True},
                "compiled_selective": {"compile": True, "gradient_checkpointing": True, "checkpoint_mode": "selective"}}
    runs = {}
    for name, model in variants.items():
        trainer = packed_sft_trainer(model_dir, train_path, out, cuda, **model)
        seconds, frames = [], []
        for step in (0, 1, 2):
            batches = trainer.micro_batches(step)
            trainer.policy.module.zero_grad(set_to_none=True)
            before = dict(counters["frames"])
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            allocated = torch.cuda.memory_allocated() if cuda else 0
            start = time.perf_counter()
            trainer.accumulate_gradients(batches)
            if cuda:
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
            frames.append({key: counters["frames"][key] - before.get(key, 0) for key in ("total", "ok")})
        runs[name] = {"first_s": seconds[0], "seconds": seconds[2], "grads": flat_grads(trainer), "frames": frames,
                      "step_peak_gib": (torch.cuda.max_memory_allocated() - allocated) / 2**30 if cuda else None}
        del trainer, batches
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    eager = runs["eager"]
    result = {"check": "compiled layers", "eager_s": eager["seconds"], "eager_step_peak_gib": eager["step_peak_gib"]}
    ok = True
    for name in ("compiled", "compiled_selective"):
        run = runs[name]
        cosine = float(torch.nn.functional.cosine_similarity(run["grads"], eager["grads"], dim=0))
        left_eager = sum(f["total"] - f["ok"] for f in run["frames"])
        result.update({f"{name}_grad_cosine": cosine, f"{name}_s": run["seconds"],
                       f"{name}_speedup": eager["seconds"] / run["seconds"], f"{name}_step_peak_gib": run["step_peak_gib"],
                       f"{name}_compiling_step_s": run["first_s"], f"{name}_frames_compiled": [f["ok"] for f in run["frames"]],
                       f"{name}_frames_left_eager": left_eager})
        ok = ok and cosine > 0.999 and left_eager == 0 and run["frames"][0]["ok"] > 0 and run["frames"][2]["total"] == 0
    result["ok"] = ok
    return result


def probes_check(model_dirs: dict[str, str], cuda: bool) -> dict:
    """The load-time probes' errors on each preset's model: bf16 weights, and fp32 weights under bf16
    autocast (how Align computes with `model.dtype: float32` on a GPU); ok when every one is within
    its tolerance (on the CPU the models compute in fp32 throughout, without autocast)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.models.head import compute_dtype
    from align.models.layouts import layout_errors, layout_tolerance
    from align.rollout import PrefixSharedEngine
    from align.rollout.prefix_shared import sampling_tolerance

    device = torch.device("cuda" if cuda else "cpu")
    rows, ok = [], True
    for preset, model_dir in model_dirs.items():
        for weights, autocast in (("bfloat16", False), ("float32", True)) if cuda else (("float32", False),):
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, weights),
                                                         attn_implementation="sdpa").to(device).eval()
            context = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
            with context:
                dtype = compute_dtype(model)
                layouts = layout_errors(model)
                engine = PrefixSharedEngine(model, AutoTokenizer.from_pretrained(model_dir), static=False, check=False)
                engine_error = engine.probe_error()
            row = {"preset": preset, "weights": weights, "autocast": autocast, "computes_in": str(dtype),
                   **{layout: error for layout, error in layouts.items()}, "layout_tolerance": layout_tolerance(dtype),
                   "engine_total_variation": engine_error, "engine_tolerance": sampling_tolerance(dtype)}
            ok = ok and all(isinstance(e, float) and e <= row["layout_tolerance"] for e in layouts.values()) \
                and engine_error <= row["engine_tolerance"]
            rows.append(row)
            del model, engine
    return {"check": "load-time probes", "ok": bool(ok), "models": rows}


def graphs_check(model_dir: str, prompts_path: str, cuda: bool, max_new_tokens: int) -> dict:
    """The static decoder (a CUDA graph per rollout on CUDA) against the eager loop: a teacher-forced
    walk feeding both the eager loop's greedy tokens, log-probs compared at every step, on the fp32
    model (as the benchmark's sampler runs it) and on a QLoRA policy (needs bitsandbytes); then a
    seeded rollout of the fp32 model timed each way."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.rollout import PrefixSharedEngine, SamplingParams
    from benchmarks.common import load_rows

    device = torch.device("cuda" if cuda else "cpu")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer(row["prompt"])["input_ids"] for row in load_rows(prompts_path)[:8]]
    result = {"check": "CUDA-graph decoding", **_teacher_forced(model, tokenizer, prompts, device, max_new_tokens)}
    result["ok"] = bool(result["logp_max_abs_diff"] < 1e-3 and (result["captured"] or not cuda))
    try:
        import bitsandbytes  # noqa: F401
        from align.config import AdapterConfig, ModelConfig
        from align.models import Policy

        policy = Policy.from_config(ModelConfig(name_or_path=model_dir, dtype="bfloat16"),
                                    AdapterConfig(kind="qlora", r=16, alpha=32, dropout=0.0))
        qlora = _teacher_forced(policy.model, tokenizer, prompts, device, 32)
        result["qlora"] = qlora
        result["ok"] = result["ok"] and bool(qlora["logp_max_abs_diff"] < 5e-2 and (qlora["captured"] or not cuda))
        del policy
    except ImportError:
        result["qlora"] = "bitsandbytes not installed"
    seconds = {}
    params = SamplingParams(max_new_tokens=max_new_tokens, seed=0, stop_token_ids=[])
    for name, engine in (("eager", PrefixSharedEngine(model, tokenizer, static=False)),
                         ("graphs", PrefixSharedEngine(model, tokenizer))):
        engine.generate(prompts[:2], SamplingParams(max_new_tokens=8, seed=0), 2)  # warm-up
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        rollout = engine.generate(prompts, params, 8)
        if cuda:
            torch.cuda.synchronize()
        seconds[name] = time.perf_counter() - start
    result.update(rows=len(rollout), tokens=sum(map(len, rollout.completion_ids)), eager_s=seconds["eager"],
                  graphs_s=seconds["graphs"], speedup=seconds["eager"] / seconds["graphs"])
    if not cuda:
        result["note"] = "no CUDA: the static decoder ran eagerly (no graph), and the timed engines both ran the eager loop"
    return result


def _teacher_forced(model, tokenizer, prompts: list[list[int]], device: torch.device, steps: int) -> dict:
    """Feed the eager loop's greedy tokens to it and to a static decoder (8 samples per prompt):
    {"logp_max_abs_diff": the largest log-prob difference over the steps, "captured": a graph was}."""
    from align.rollout import PrefixSharedEngine
    from align.rollout.sampling import inference
    from align.rollout.static_decoder import StaticDecoder

    eager, worst = PrefixSharedEngine(model, tokenizer, static=False), 0.0
    with inference(model):
        live, logits = eager.prefill(prompts, 8, steps, device)
        twin, static_logits = eager.prefill(prompts, 8, steps, device)
        decoder = StaticDecoder(model, twin.cache, twin.mask[:, :twin.width], twin.positions, steps,
                                graphs=device.type == "cuda")
        rows = torch.arange(len(live.rows), device=device)
        for _ in range(min(steps, 64) - 1):
            a, b = torch.log_softmax(logits.float(), -1), torch.log_softmax(static_logits.float(), -1)
            worst = max(worst, float((a - b).abs().max()))
            tokens = a.argmax(-1)
            live.push(tokens)
            logits, static_logits = eager.decode(live), decoder.step(rows, tokens)
    return {"logp_max_abs_diff": worst, "captured": decoder.graph is not None}


def run_checks(work: Path, args, cuda: bool, preset: str, qlora_preset: str) -> list[dict]:
    """The checks --only names, each printed as it ends; data and runs under `work`."""
    sft = assets.write_jsonl(assets.sft_rows(64, seed=0), work / "sft.jsonl")
    pairs = assets.write_jsonl(assets.long_prompt_preference_rows(32, seed=1, context_lines=(3, 6)), work / "dpo.jsonl")
    prompts = assets.write_jsonl([{"prompt": r["prompt"], "answer": r["chosen"]}
                                  for r in assets.long_prompt_preference_rows(16, seed=2, context_lines=(1, 2))],
                                 work / "prompts.jsonl")
    lm = str(assets.model_dirs(preset, kinds=("lm",))["lm"])
    cases = {
        "sft": recipe("sft", lm, sft, work, cuda),
        "dpo": recipe("dpo", lm, pairs, work, cuda, adapter={"kind": "lora", "r": 16, "alpha": 32}),
        "grpo": recipe("grpo", lm, prompts, work, cuda, adapter={"kind": "lora", "r": 16, "alpha": 32},
                       train={"batch_size": 16},
                       grpo={"group_size": 8, "beta": 0.04, "sampling": {"max_new_tokens": 32},
                             "rewards": [{"fn": "exact_answer"}]}),
    }
    checks = {key: (f"no host sync: {key}", lambda key=key, raw=raw: sync_check(key, raw, cuda))
              for key, raw in cases.items()}
    checks["qlora"] = ("QLoRA SFT memory", lambda: qlora_memory(str(assets.model_dirs(qlora_preset, kinds=("lm",))["lm"]),
                                                                 sft, work, cuda, args.qlora_steps if cuda else 2))
    checks["varlen"] = ("varlen attention", lambda: varlen_check(lm, sft, work, cuda))
    checks["recompute"] = ("selective checkpointing", lambda: recompute_check(lm, sft, work, cuda))
    checks["compile"] = ("compiled layers", lambda: compile_check(lm, sft, work, cuda))
    probe_presets = [preset] + ([qlora_preset] if qlora_preset != preset else [])
    checks["probes"] = ("load-time probes", lambda: probes_check(
        {p: str(assets.model_dirs(p, kinds=("lm",))["lm"]) for p in probe_presets}, cuda))
    checks["graphs"] = ("CUDA-graph decoding", lambda: graphs_check(lm, prompts, cuda, 256 if cuda else 8))
    only = {key.strip() for key in args.only.split(",")}
    results = []
    for name, check in (checks[key] for key in checks if key in only):  # one failing check leaves the others
        try:
            result = check()
        except Exception as error:  # noqa: BLE001  (reported, and the exit status says so)
            result = {"check": name, "ok": False, "error": f"{type(error).__name__}: {error}"}
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="0.5b", help="preset for the sync checks")
    parser.add_argument("--qlora-model", default="1.5b", help="preset for the QLoRA memory check")
    parser.add_argument("--qlora-steps", type=int, default=5)
    parser.add_argument("--only", default="sft,dpo,grpo,qlora,varlen,probes,graphs",
                        help="comma-separated checks to run (recompute, compile: only when named, to keep gpu.sh's "
                             "default subset under 8 minutes)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, tiny data")
    parser.add_argument("--out", default="benchmarks/results/gpu_checks.json")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    preset, qlora_preset = ("tiny", "tiny") if args.smoke else (args.model, args.qlora_model)
    with tempfile.TemporaryDirectory(prefix="align-gpu-checks-") as tmp:  # the data and runs, deleted after
        results = run_checks(Path(tmp), args, cuda, preset, qlora_preset)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    raise SystemExit(0 if all(r["ok"] for r in main()) else 1)
