#!/usr/bin/env bash
# One shot on a fresh GPU machine with no internet: install the wheels handed to it, check the
# stack, build the model presets offline, run the GPU benchmarks, leave the tables in --out.
#
#   bash benchmarks/gpu.sh --wheels /path/to/wheels      # default subset, ~8 minutes on one H100
#   bash benchmarks/gpu.sh --wheels DIR --all            # every case, 3 repeats (much longer)
#   bash benchmarks/gpu.sh --smoke                       # CPU, tiny model: proves the script end to end
#
# Default subset: one repeat of SFT, DPO and GRPO against TRL's default on the 0.5b preset (Qwen2.5-0.5B
# shape, 151k vocabulary, random init), with the GPU workloads of benchmarks/run.py GPU_PRESETS
# (SFT ~14k tokens per optimizer step; DPO 8 pairs of ~1k tokens; GRPO 64 completions of 256 tokens).
#
# Flags:
#   --wheels DIR    pip install every wheel in DIR into a folder of its own (ALIGN_GPU_SITE, default
#                   /tmp/align-gpu-site) put first on PYTHONPATH: no index, no dependency resolution.
#                   Align runs from this checkout (the harness tolerates a package without metadata).
#                   Without it nothing is installed.
#   --all           every case (sft, sft_short, rm, dpo, grpo, ppo, grpo_kl), every TRL variant, 3 repeats
#   --cases LIST    comma-separated cases (default sft,dpo,grpo)
#   --model NAME    tiny | 0.5b | 0.5b-32k | 1.5b (default 0.5b; --smoke: tiny)
#   --repeats N     default 1 (--all: 3)
#   --variants LIST TRL variants (default: default; --all: every one)
#   --out DIR       results directory (default benchmarks/results)
#   --timeout S     seconds per job (default 300)
#   --smoke         CPU smoke mode: tiny model, tiny data, the sft case against TRL's default
#   --no-check      skip the CUDA check (e.g. to run the GPU workloads on a CPU: slow)
#   --no-checks     skip benchmarks/gpu_checks.py (a step with no host sync under sync-debug "error" for
#                   SFT/DPO/GRPO; QLoRA SFT peak memory on the 1.5b preset: needs the bitsandbytes wheel)
#   --only-checks L some of those checks: comma-separated from sft,dpo,grpo,qlora,varlen,recompute,compile,probes,graphs
#   --profile       also profile every job (benchmarks.run --profile: <out>/<stem>-profile.txt; not for timings)
#   --set C.K=V     passed on to benchmarks.run (repeatable), e.g. --set grpo.checkpointed_layers=0.5
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
PYTHON="${PYTHON:-python3}"
wheels="" all=0 smoke=0 check=1 checks=1 only_checks="" profile=0 cases="" model="" repeats="" variants="" out="" timeout=300
sets=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --wheels) wheels="$2"; shift 2 ;;
    --all) all=1; shift ;;
    --smoke) smoke=1; shift ;;
    --no-check) check=0; shift ;;
    --no-checks) checks=0; shift ;;
    --only-checks) only_checks="$2"; shift 2 ;;
    --profile) profile=1; shift ;;
    --set) sets+=(--set "$2"); shift 2 ;;
    --cases) cases="$2"; shift 2 ;;
    --model) model="$2"; shift 2 ;;
    --repeats) repeats="$2"; shift 2 ;;
    --variants) variants="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --timeout) timeout="$2"; shift 2 ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown flag $1 (see --help)" >&2; exit 2 ;;
  esac
done
start=$(date +%s)
step() { echo "== [$(( $(date +%s) - start ))s] $*"; }

# ---- 1. install -----------------------------------------------------------------------------------
# Wheels go into their own folder ahead of the machine's packages, without dependency resolution: a GPU
# image's pins (fsspec, huggingface-hub) need not match what pip would pick, and there is no index to
# resolve from. Align itself runs from this checkout (PYTHONPATH below).
site="${ALIGN_GPU_SITE:-/tmp/align-gpu-site}"
if [[ -n "$wheels" ]]; then
  step "installing the wheels in $wheels into $site"
  shopt -s nullglob
  files=("$wheels"/*.whl)
  shopt -u nullglob
  if [[ ${#files[@]} -gt 0 ]]; then
    "$PYTHON" -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade --disable-pip-version-check \
      -q --target "$site" "${files[@]}"
  fi
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! "$PYTHON" -c "import align_rewards" 2>/dev/null; then  # Align not installed: its rewards/ folder by its package name
  links="${TMPDIR:-/tmp}/align-gpu-links"
  mkdir -p "$links" && ln -sfn "$here/rewards" "$links/align_rewards"
  export PYTHONPATH="$links:$PYTHONPATH"
fi

# ---- 2. check the stack ----------------------------------------------------------------------------
step "checking the stack"
cuda_check=$(( check && !smoke ))
"$PYTHON" - "$cuda_check" <<'EOF'
import importlib, sys
from importlib.metadata import PackageNotFoundError, version

def ver(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return getattr(importlib.import_module(name), "__version__", "unknown")

missing = []
for name in ("torch", "transformers", "tokenizers", "accelerate", "peft", "trl", "datasets", "pydantic", "yaml", "align"):
    try:
        importlib.import_module(name)
        print(f"  {name:13s} {ver('pyyaml' if name == 'yaml' else name)}")
    except Exception as error:  # noqa: BLE001
        missing.append(f"{name} ({type(error).__name__}: {error})")
try:
    import bitsandbytes  # noqa: F401  (QLoRA only)
    print(f"  bitsandbytes  {ver('bitsandbytes')}")
except Exception:
    print("  bitsandbytes  not installed (QLoRA cases unavailable)")
if missing:
    sys.exit("gpu.sh: missing: " + "; ".join(missing))
import torch, transformers
from packaging.version import Version
if Version(transformers.__version__) < Version("5.19"):
    sys.exit(f"gpu.sh: Align needs transformers >= 5.19, found {transformers.__version__}: hand its wheel over with --wheels")
if sys.argv[1] == "1" and not torch.cuda.is_available():
    sys.exit("gpu.sh: no CUDA device (use --smoke on a CPU, or --no-check)")
print("  device       ", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
EOF

# ---- 3. run ----------------------------------------------------------------------------------------
args=()
if [[ $smoke -eq 1 ]]; then
  args+=(--smoke --model "${model:-tiny}" --cases "${cases:-sft}" --variants "${variants:-default}")
elif [[ $all -eq 1 ]]; then
  args+=(--model "${model:-0.5b}" --repeats "${repeats:-3}")
  [[ -n "$cases" ]] && args+=(--cases "$cases")
  [[ -n "$variants" ]] && args+=(--variants "$variants")
else
  args+=(--model "${model:-0.5b}" --cases "${cases:-sft,dpo,grpo}" --repeats "${repeats:-1}"
         --variants "${variants:-default}")
fi
[[ -n "$out" ]] && args+=(--out "$out")
args+=(--timeout "$timeout")
[[ $profile -eq 1 ]] && args+=(--profile)
args+=("${sets[@]}")
step "python -m benchmarks.run ${args[*]}"
failed=0
"$PYTHON" -m benchmarks.run "${args[@]}" || failed=$?   # the checks below still run (one lease, one try)

# ---- 4. checks: no host sync in a step (sync-debug "error"), QLoRA peak memory ---------------------
if [[ $checks -eq 1 ]]; then
  check_args=(--out "${out:-benchmarks/results}/gpu_checks.json")
  [[ -n "$only_checks" ]] && check_args+=(--only "$only_checks")
  if [[ $smoke -eq 1 ]]; then check_args+=(--smoke); else check_args+=(--model "${model:-0.5b}" --qlora-model 1.5b); fi
  step "python -m benchmarks.gpu_checks ${check_args[*]}"
  "$PYTHON" -m benchmarks.gpu_checks "${check_args[@]}" || failed=$?
fi
step "done"
exit "$failed"
