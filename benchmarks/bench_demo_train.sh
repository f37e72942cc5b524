#!/usr/bin/env bash
# The demo's training jobs (asu_kl, grad_diff, npo on 2 CPU ranks, +exp=tofu_tiny, evaluation off)
# under an older commit and under this checkout, alternating old/new ROUNDS times so a change of the
# host's load falls on both; prints each job's training-loop seconds and writes
# benchmarks/results/bench_demo_train_cpu.json.
#   bash benchmarks/bench_demo_train.sh 14fb46a 2     # the commit before the one-pass step, 2 rounds
set -euo pipefail
OLD=${1:?usage: bench_demo_train.sh OLD_COMMIT [ROUNDS]}
ROUNDS=${2:-2}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/bench_demo_train.XXXXXX)
trap 'git -C "$ROOT" worktree remove --force "$WORK/old" >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
git -C "$ROOT" worktree add -q --detach "$WORK/old" "$OLD"
ln -s "$ROOT/.venv" "$WORK/old/.venv"
ln -s "$ROOT/.cache" "$WORK/old/.cache"  # the same embedded benchmark (built once)
run() {  # tree tag
  (cd "$1" && timeout 900 .venv/bin/deepspeed --num_gpus 2 --master_port $((29400 + RANDOM % 300)) \
     launchers/demo_runs.py --methods asu_kl,grad_diff,npo --references "" --demo-name "$2" -- \
     +exp=tofu_tiny output_dir="$WORK/runs" eval.enabled=false > "$WORK/$2.log" 2>&1)
}
for i in $(seq 1 "$ROUNDS"); do run "$WORK/old" "old$i"; run "$ROOT" "new$i"; done
"$ROOT/.venv/bin/python" - "$WORK/runs" "$ROUNDS" "$OLD" "$ROOT/benchmarks" <<'PY'
import json, statistics, sys
sys.path.insert(0, sys.argv[4])
from common import device_info, print_table, write_json
runs, rounds, old = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def loop(tag, m):  # the old code's loop time is train_loop_seconds (its train_seconds counted loading too)
    d = json.load(open(f"{runs}/{tag}/{m}/results.json"))
    return d.get("train_loop_seconds") or d["train_seconds"]
res, rows = {}, []
for m in ("asu_kl", "grad_diff", "npo"):
    o = [loop(f"old{i}", m) for i in range(1, rounds + 1)]
    n = [loop(f"new{i}", m) for i in range(1, rounds + 1)]
    res[m] = {"old_s": o, "new_s": n, "new_over_old_median": statistics.median(n) / statistics.median(o)}
    rows.append([m, " / ".join(f"{x:.1f}" for x in o), " / ".join(f"{x:.1f}" for x in n),
                 f"{res[m]['new_over_old_median']:.2f}"])
print_table(["method", f"old ({old}) loop s", "new loop s", "new / old (median)"], rows)
write_json("bench_demo_train", {"env": device_info("cpu"), "config": {
    "old_commit": old, "rounds": rounds, "jobs": "launchers/demo_runs.py asu_kl,grad_diff,npo, 2 CPU ranks, "
    "+exp=tofu_tiny, eval.enabled=false, 50 steps each"}, "results": res})
PY
