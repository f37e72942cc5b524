#!/usr/bin/env bash
# One prepared GPU check for a machine with one H100/H200 (3-4 min on an H200 without the pipeline part,
# at most GPU_CHECK_BUDGET = 540 s: a part that no longer fits is skipped and reported). It writes
# benchmarks/results/gpu_<gpu>_{kernels,pipeline,attention,kl,eval,step}.json, each naming the GPU:
#   kernels   - the Triton attention kernels compiled for real vs the fp32 reference: bf16 and fp16,
#               forward + backward, odd shapes, GQA, causal + padding, per-head tau, dual output
#   attention - tempered attention via sdpa / flash_attn / triton vs untempered SDPA / flash-attn,
#               B=4 H=32 T=4096 d=128 bf16, forward + backward
#   kl        - fused vs naive KL at V=32k and 128k: time and peak memory (bench_kl.py)
#   step      - one ASU step (live teacher, ZeRO-3, one GPU) of a random ~1B Llama, naive and fused KL: tokens/s and
#               peak memory vs the memory preflight's prediction (bench_step.py --scale 1b)
#   eval      - the evaluation model on the GPU in eval.dtype (auto = bf16, and float32) vs the CPU
#               float32 evaluation of the same rows; host memory of a 134M model's GPU load
#   pipeline  - launchers/train.py end to end on the GPU (tiny model, 3 ASU steps, export check,
#               evaluation): ZeRO stage as picked (0), ZeRO-3 with the fused KL, and GradDiff in fp16
#               with a loss scale that overflows (DeepSpeed skips those updates; the run goes on)
# Each part has its own time limit; a part that fails, times out or is skipped is reported and the
# others still run (exit code 1 then: the check is incomplete). Without a GPU it prints one line and exits 0; with a GPU but a torch
# that cannot see it, exit 1. CI never runs it.
#
#   bash benchmarks/gpu_check.sh            # PYTHON=... to choose the interpreter (default .venv/bin/python)
# On a machine with a CUDA torch but without this project's packages (and no network), carry the
# pinned wheels from benchmarks/gpu_wheels.sh (its header says how); 3-4 min on an H200. Right after
# the CUDA check, every top-level module the parts import is looked up once (GPU_CHECK_MODULES below, the
# same set gpu_wheels.sh carries plus the image's own): any missing -> one line naming them all, exit 1
# (the pipeline part's own extra modules, PIPELINE_MODULES, missing: that part alone is skipped).
# Only the gpu_*.json files written by THIS run are copied to GPU_CHECK_OUT and listed at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
# fast path (no driver, no device node): no need to start Python at all
if ! command -v nvidia-smi >/dev/null 2>&1 && ! ls /dev/nvidia0 >/dev/null 2>&1; then
  echo "no CUDA device: nothing measured"
  exit 0
fi
# a driver or device node is here, so a torch without CUDA (this project's CPU .venv, carried over) is
# a setup error: saying "nothing measured" and exiting 0 would look like a passed check
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
  echo "error: a GPU driver or device is present but $PY's torch sees no CUDA device:" \
       "$("$PY" -c 'import torch; print("torch", torch.__version__, "built for CUDA", torch.version.cuda)' 2>&1 | tail -1)" \
       "(PYTHON=python3 with a CUDA torch, and the wheels of benchmarks/gpu_wheels.sh)"
  exit 1
fi
# every top-level module the parts import (traced, see gpu_wheels.sh): one failure naming all the missing
# ones here, not the same ImportError again in every part. The pipeline part alone also needs datasets
# (+ pyarrow, pandas) and scipy: ~100 MB of wheels, more than a device call carries, so without them in
# the image that part is skipped (reported, exit 1: the check is incomplete) and the others still run.
# (The eval part imports pipeline.eval.tofu -> pipeline.eval.metrics, which imports scipy only inside
# forget_quality_ks, a pipeline-part metric; traced with PIPELINE_MODULES absent, every other part imports.)
GPU_CHECK_MODULES="torch triton numpy safetensors yaml psutil packaging tqdm requests filelock fsspec jinja2
  typing_extensions deepspeed hjson pydantic pydantic_core annotated_types typing_inspection einops msgpack
  hydra omegaconf antlr4 transformers huggingface_hub tokenizers httpx2 httpcore2 h11 truststore sniffio anyio
  idna regex dill rouge_score nltk six"
PIPELINE_MODULES="datasets pyarrow pandas dateutil xxhash multiprocess scipy"
missing_of() {  # the modules of "$@" that $PY cannot find
  "$PY" - "$@" <<'PYEOF' 2>&1
import importlib.util, sys
sys.path.insert(0, ".")
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
PYEOF
}
# shellcheck disable=SC2086
missing=$(missing_of $GPU_CHECK_MODULES)
if [ -n "$missing" ]; then
  echo "error: modules missing for gpu_check: $missing (carry the wheels of benchmarks/gpu_wheels.sh)"
  exit 1
fi
# shellcheck disable=SC2086
pipeline_missing=$(missing_of $PIPELINE_MODULES)
unset TRITON_INTERPRET  # the compiled kernels are what this checks
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
status=0
# a marker older than anything this run writes: only gpu_*.json newer than it are this run's (committed
# results of a part that is skipped or fails must not be copied or listed as if measured now)
marker=$(mktemp)
trap 'rm -f "$marker"' EXIT
fresh() { find benchmarks/results -maxdepth 1 -name 'gpu_*.json' -newer "$marker" 2>/dev/null | sort; }
# GPU_CHECK_BUDGET (s, default 540): the whole check's limit, under one device call's 600 s; a part
# whose limit no longer fits in what is left is skipped (reported). GPU_CHECK_OUT (e.g. $OUT): a
# folder the JSON results are copied into after every part, so a call stopped from outside keeps them.
budget=${GPU_CHECK_BUDGET:-540}
part() {  # part <seconds> <name> [args...]
  local limit=$1
  shift
  local left=$((budget - (SECONDS - start) - 15))
  if [ "$left" -lt "$limit" ]; then
    echo "!! gpu_check $1 skipped: ${left}s of GPU_CHECK_BUDGET=${budget}s left, its limit is ${limit}s"
    status=1
    return
  fi
  echo "== gpu_check $* (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$PY" benchmarks/gpu_check.py --device cuda "$@"
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "!! gpu_check $1 failed (rc $rc; 124 = time limit)"
    status=1
  fi
  if [ -n "${GPU_CHECK_OUT:-}" ]; then
    local f
    mkdir -p "$GPU_CHECK_OUT" && fresh | while IFS= read -r f; do cp "$f" "$GPU_CHECK_OUT"/; done
  fi
}
start=$SECONDS
# the most telling first: a budget that runs out drops the later ones
part 100 kernels
if [ -n "$pipeline_missing" ]; then
  echo "!! gpu_check pipeline skipped: this Python lacks $pipeline_missing (bash benchmarks/gpu_wheels.sh --pipeline)"
  status=1
else
  part 200 pipeline --timeout 185
fi
part 80 attention
part 100 kl --timeout 90
part 90 eval
part 180 step --timeout 170
echo "gpu_check: $((SECONDS - start)) s"
echo "written by this run:"
fresh
exit "$status"
