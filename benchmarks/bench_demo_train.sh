#!/usr/bin/env bash
# The demo's training jobs (asu_kl, grad_diff, npo on 2 CPU ranks, +exp=tofu_tiny, evaluation off)
# under an older commit and under this checkout, ROUNDS times, the order alternating per round
# (old, new), (new, old), ... so a change of the host's load falls on both sides alike; prints each
# job's training-loop seconds and writes benchmarks/results/bench_demo_train_cpu.json (OUT=DIR: into
# DIR; ROUNDS other than 2 or another OLD_COMMIT than 14fb46a adds _rounds-<N> / _old-<sha> to the
# name, so a smoke run keeps the committed file).
# A failed job stops the script with its exit code; the jobs' logs are kept (copied to a directory the
# last line names) and the failed one's tail is printed.
#   bash benchmarks/bench_demo_train.sh 14fb46a 2     # the commit before the one-pass step, 2 rounds
set -euo pipefail
usage() { echo "error (usage, bench_demo_train.sh): $*; usage: bench_demo_train.sh OLD_COMMIT [ROUNDS]" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 2 ] || usage "expected OLD_COMMIT and optionally ROUNDS, got $# arguments"
OLD=$1
ROUNDS=${2:-2}
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || usage "ROUNDS must be an integer >= 1, got '$ROUNDS'"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OLD_SHA=$(git -C "$ROOT" rev-parse --verify -q "$OLD^{commit}") || usage "OLD_COMMIT '$OLD' is not a commit of $ROOT"
WORK=$(mktemp -d /tmp/bench_demo_train.XXXXXX)
CURRENT=""  # the job running (run() sets it): the one whose log a failure shows
cleanup() {
  local rc=$?
  git -C "$ROOT" worktree remove --force "$WORK/old" >/dev/null 2>&1 || true
  # a failed run: its log would go with $WORK, so keep every log and show the failed one's end
  if [ "$rc" -ne 0 ] && compgen -G "$WORK/*.log" >/dev/null; then
    local keep
    keep=$(mktemp -d /tmp/bench_demo_train-logs.XXXXXX)
    cp -p "$WORK"/*.log "$keep"/
    if [ -n "$CURRENT" ] && [ -f "$keep/$CURRENT.log" ]; then
      echo "--- the end of $keep/$CURRENT.log:" >&2
      tail -n 30 "$keep/$CURRENT.log" >&2
    fi
    echo "bench_demo_train: failed (exit $rc); the jobs' logs are in $keep" >&2
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
git -C "$ROOT" worktree add -q --detach "$WORK/old" "$OLD_SHA"
ln -s "$ROOT/.venv" "$WORK/old/.venv"
ln -s "$ROOT/.cache" "$WORK/old/.cache"  # the same embedded benchmark (built once)
run() {  # tree tag
  CURRENT=$2
  echo "  $2" >&2
  (cd "$1" && timeout 900 .venv/bin/deepspeed --num_gpus 2 --master_port $((29400 + RANDOM % 300)) \
     launchers/demo_runs.py --methods asu_kl,grad_diff,npo --references "" --demo-name "$2" -- \
     +exp=tofu_tiny output_dir="$WORK/runs" eval.enabled=false > "$WORK/$2.log" 2>&1)
}
ORDER=()
for i in $(seq 1 "$ROUNDS"); do
  if (( i % 2 )); then sides=(old new); else sides=(new old); fi
  for side in "${sides[@]}"; do
    if [ "$side" = old ]; then run "$WORK/old" "old$i"; else run "$ROOT" "new$i"; fi
    ORDER+=("$side$i")
  done
done
CURRENT=""  # every job ran: a failure from here on is the summary's, not the last job's
"$ROOT/.venv/bin/python" - "$WORK/runs" "$ROUNDS" "$OLD_SHA" "$ROOT/benchmarks" "${OUT:-}" "${ORDER[*]}" <<'PY'
import json, statistics, sys
sys.path.insert(0, sys.argv[4])
from common import device_info, git_state, out_name, print_table, write_json
runs, rounds, old, out, order = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[5] or None, sys.argv[6].split()
def loop(tag, m):  # the old code's loop time is train_loop_seconds (its train_seconds counted loading too)
    d = json.load(open(f"{runs}/{tag}/{m}/results.json"))
    return d.get("train_loop_seconds") or d["train_seconds"]
res, rows = {}, []
for m in ("asu_kl", "grad_diff", "npo"):
    o = [loop(f"old{i}", m) for i in range(1, rounds + 1)]
    n = [loop(f"new{i}", m) for i in range(1, rounds + 1)]
    res[m] = {"old_s": o, "new_s": n, "new_over_old_median": statistics.median(n) / statistics.median(o),
              # each round's new over the same round's old (adjacent launches): robust to slow load changes
              "new_over_old_paired_median": statistics.median(b / a for a, b in zip(o, n))}
    rows.append([m, " / ".join(f"{x:.1f}" for x in o), " / ".join(f"{x:.1f}" for x in n),
                 f"{res[m]['new_over_old_median']:.2f}", f"{res[m]['new_over_old_paired_median']:.2f}"])
print_table(["method", f"old ({old[:9]}) loop s", "new loop s", "new / old (medians)", "new / old (paired)"], rows)
new = git_state()
# the old commit in the name too: a run against another commit keeps the committed file
write_json(out_name("bench_demo_train", {"rounds": rounds, "old": old[:9]}, {"rounds": 2, "old": "14fb46ac2"}), {"env": device_info("cpu"), "config": {
    "old_commit": old, "new_commit": new["git_commit"], "new_uncommitted_changes": new["git_dirty"],
    "rounds": rounds, "order": order,
    "jobs": "launchers/demo_runs.py asu_kl,grad_diff,npo, 2 CPU ranks, +exp=tofu_tiny, eval.enabled=false, "
    "50 steps each"}, "results": res}, out)
PY
