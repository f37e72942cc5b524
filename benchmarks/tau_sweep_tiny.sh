#!/usr/bin/env bash
# tau grid (2, 3, 4, 5, 6, 8) + method.tau=auto on the embedded benchmark (+exp=tofu_tiny, forget10), one
# SLURM job per point through the submitit launcher, then the sweep report (table, Pareto PNG, choice).
#
#   bash benchmarks/tau_sweep_tiny.sh            # needs a SLURM cluster (e.g. sudo .ci/slurm_setup.sh)
#   LAUNCHER=local bash benchmarks/tau_sweep_tiny.sh   # Hydra's basic launcher, one point after the other
#
# Each job is one rank with the demo's global batch (16 forget + 16 retain). On a fresh machine the
# first job builds the benchmark and its two tiny models (~4 min, once, under a file lock; the other
# jobs wait for it). Outputs: runs/sweeps/tau_sweep_tiny/tau_*/ and
# benchmarks/results/tau_sweep_tofu_tiny/{report.md,report.json,pareto.png}. RUNS=/scratch/runs puts the
# points and the target's evaluation there instead of runs/ (an output_dir= argument would move the
# points only, and the report would read runs/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || { echo "tau_sweep_tiny: $PY not found: run 'make install' first (or set PY=...)" >&2; exit 1; }
export HF_HUB_OFFLINE=1 WANDB_MODE=offline DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
LAUNCH=(hydra/launcher=slurm hydra.launcher.partition="${PARTITION:-debug}" hydra.launcher.gpus_per_node=0
        hydra.launcher.tasks_per_node=1 hydra.launcher.cpus_per_task=1 hydra.launcher.timeout_min=60)
[ "${LAUNCHER:-slurm}" = local ] && LAUNCH=()
# Arguments are extra overrides for every point (e.g. trainer.lr=1e-3 trainer.max_steps=100).
# DATA=synthetic_forget05 (or _forget01) sweeps another forget split; NAME names its runs and
# results directory (benchmarks/results/<NAME>; the default keeps the committed tau_sweep_tofu_tiny).
DATA=${DATA:-synthetic_forget10}
NAME=${NAME:-tau_sweep_tiny}
OUT=${OUT:-benchmarks/results/$([ "$NAME" = tau_sweep_tiny ] && echo tau_sweep_tofu_tiny || echo "$NAME")}
RUNS=${RUNS:-runs}
for arg in "$@"; do
  case "$arg" in output_dir=*) echo "tau_sweep_tiny: set RUNS=<dir> instead of $arg (the report reads RUNS)" >&2; exit 2;; esac
done
"$PY" launchers/train.py -m +exp=tofu_tiny data="$DATA" exp_name="$NAME" logging=none output_dir="$RUNS" \
    trainer.batch_size=16 trainer.retain_batch_size=16 method.tau=2.0,3.0,4.0,5.0,6.0,8.0,auto \
    'hydra.sweep.subdir=tau_${method.tau}' "${LAUNCH[@]}" "$@"
# the target model's results are the utility reference (0.95x rule)
"$PY" launchers/eval.py +exp=tofu_tiny data="$DATA" model.variant=target run_name="${NAME}_target" logging=none \
    output_dir="$RUNS"
"$PY" launchers/report.py "$RUNS/sweeps/$NAME" --target "$RUNS/${NAME}_target/results.json" --out "$OUT"
# the machine the sweep ran on (benchmarks/common.py's device_info), beside the report
"$PY" -c 'import json, sys; sys.path.insert(0, "benchmarks"); from common import device_info
from pipeline.io import atomic_write_json; atomic_write_json(sys.argv[1], device_info("cpu"))' "$OUT/machine.json"
