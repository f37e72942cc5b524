"""Benchmark: one training step under ZeRO-3, an older commit's code vs this checkout, alternating.

Each side runs its OWN ``benchmarks/bench_step.py`` (so its own pipeline code): the old commit in
a detached git worktree (``.venv`` and ``.cache`` symlinked), this checkout in place; the same
shape (``--scale``, 2 ranks, 1 thread, the same batch / seq / warm-up / timed steps), one launch
per side per round, for ``--rounds`` rounds, the order alternating (old, new), (new, old), ... so a
change of the shared host's load falls on both sides. Per variant the table gives the step time
(median over rounds of each launch's median step; the median of each round's new / old; and the
fastest timed step of rank 0 over all rounds), the ZeRO-3 all-gather volume of one steady step
(rank 0) and the peak memory per rank (growth of the RSS high-water mark during the variant's block, and the block's peak RSS), each
old / new / new over old; written to ``benchmarks/results/bench_step_vs_commit_<device>.json``
(``..._134m_<device>.json`` with ``--scale 0.1b``; arguments other than their defaults add
``_<arg>-<value>`` to the name, ``common.out_name``; ``--out DIR`` writes it into DIR).

Timing method: both sides must time their variants the same way. The old script times each variant
in its own block of steps when it predates side-by-side timing (no ``"interleave"`` in its
source: 14fb46a) or runs a single variant; this checkout's bench_step.py is then run with
``--timing blocks`` too, else both time side by side. The timing method each launch reports
(``config.interleave``) is compared with the rest of the config after every round: a difference
stops the script with one line (exit 2).

Every weight partitioned on both sides: this checkout's bench_step sets
``stage3_param_persistence_threshold=0`` itself; the old script (14fb46a) has no flag for it and
used the pipeline's default (1e4, norm weights whole), so its ranks get
``deepspeed.param_persistence_threshold=0`` the way a config override would set it: a
``sitecustomize`` (on the ranks' PYTHONPATH) swaps in a ``DeepSpeedConfig`` whose default is 0.
The same sitecustomize, on both sides, wraps ``deepspeed.initialize`` to record each engine's ZeRO
stage, persistence threshold and partition statistics (the side's own
``pipeline.engine.sharding.partition_stats``) and fails the launch if any parameter is whole; those
records go into the JSON. The script also stops when the two sides report a different parameter
count or config (shape, batch, seq, steps, warm-up, top-k, threads, ranks).

Variants: those both scripts run (old: grad_diff, asu_live_naive, asu_live_fused, asu_cached).
``npo`` and ``asu_kl_live_fused`` exist only in the new script (the old one would build any other
name as ASU-GD), so they run on the new side only, after the shared ones, and are reported as
"old: not supported".

    .venv/bin/python benchmarks/bench_step_vs_commit.py --old 14fb46a --rounds 3           # 7 M, ~15 min
    .venv/bin/python benchmarks/bench_step_vs_commit.py --old 14fb46a --rounds 1 --scale 0.1b \\
        --variants grad_diff asu_live_fused asu_cached                                         # 134 M
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    OneLineParser,
    device_info,
    fmt,
    int_at_least,
    non_negative_int,
    out_name,
    positive_int,
    print_table,
    write_json,
)

DEFAULT_OLD = "14fb46a"  # the commit before the one-pass step
OLD_VARIANTS = ("grad_diff", "asu_live_naive", "asu_live_fused", "asu_cached")  # git show 14fb46a:benchmarks/bench_step.py
NEW_ONLY = ("npo", "asu_kl_live_fused")
# bench_step's own defaults per scale (the same in both versions), passed explicitly to both sides
DEFAULTS = {"small": dict(batch=2, seq=128, steps=4, warmup=2), "big": dict(batch=1, seq=64, steps=2, warmup=1)}
SAME_CONFIG = ("size", "batch", "seq", "steps", "warmup", "topk", "threads", "offload_optimizer", "attention",
               "ranks", "model", "params")

# Loaded into every bench_step process through PYTHONPATH; acts only in its ranks ("--worker").
SITECUSTOMIZE = '''
import os, sys
if os.environ.get("BENCH_VS_COMMIT_RECORD") and "--worker" in sys.argv:
    import json
    if os.environ.get("BENCH_VS_COMMIT_PERSISTENCE0") == "1":
        # the old bench_step has no flag for it: deepspeed.param_persistence_threshold=0, as an override would
        import dataclasses
        import pipeline.config as _pc

        @dataclasses.dataclass
        class DeepSpeedConfig(_pc.DeepSpeedConfig):
            param_persistence_threshold: int = 0

        _pc.DeepSpeedConfig = DeepSpeedConfig
    import deepspeed
    from pipeline.engine.sharding import partition_stats

    _initialize = deepspeed.initialize

    def _recorded(*args, **kwargs):
        out = _initialize(*args, **kwargs)
        z = (kwargs.get("config") or {}).get("zero_optimization", {})
        s = partition_stats(out[0].module)
        rec = {"zero_stage": z.get("stage"), "persistence_threshold": z.get("stage3_param_persistence_threshold"),
               "params": s["params"], "partitioned": s["partitioned"], "whole": s["whole"][:5],
               "local_elements": s["local_elements"], "full_elements": s["full_elements"]}
        path = os.path.join(os.environ["BENCH_VS_COMMIT_RECORD"], "rank%s.jsonl" % os.environ.get("RANK", "0"))
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\\n")
        if s["whole"]:
            raise RuntimeError("bench_step_vs_commit: %d of %d parameters not partitioned (e.g. %s)"
                               % (len(s["whole"]), s["params"], s["whole"][0]))
        return out

    deepspeed.initialize = _recorded
'''


def run_side(tree: Path, tag: str, variants: list[str], args: argparse.Namespace, shape: dict, work: Path,
             old: bool, timing_flag: list[str]) -> dict:
    """One launch of ``tree``'s bench_step.py; returns its JSON plus the engines' partition records.
    ``timing_flag``: ``--timing ...`` for a bench_step.py that has the flag, else empty."""
    rec = work / "records" / tag
    rec.mkdir(parents=True)
    # --out <tag>.json: both versions write <tag>_<device>.json next to it (the old one: the stem up to
    # its last '_'; this one: a path ending in .json names the file), on whichever device they ran
    out = work / f"{tag}.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=str(work / "shim"), BENCH_VS_COMMIT_RECORD=str(rec),
               BENCH_VS_COMMIT_PERSISTENCE0="1" if old else "0")
    cmd = [str(tree / ".venv/bin/python"), "benchmarks/bench_step.py", "--scale", args.scale, "--ranks",
           str(args.ranks), "--threads", str(args.threads), "--batch", str(shape["batch"]), "--seq", str(shape["seq"]),
           "--steps", str(shape["steps"]), "--warmup", str(shape["warmup"]), "--topk", str(args.topk),
           "--variants", *variants, *timing_flag, "--out", str(out)]
    for attempt in (1, 2):  # bench_step picks its rendezvous port from its pid: retry once on a clash
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=args.timeout)
        (work / f"{tag}.log").write_text(proc.stdout + proc.stderr)
        written = sorted(work.glob(f"{tag}_*.json"))
        if proc.returncode == 0 and len(written) == 1:
            out = written[0]
            break
        sys.stderr.write(proc.stderr[-3000:])
        if attempt == 2 or "not partitioned" in proc.stderr:
            raise SystemExit(f"{tag}: bench_step failed (rc {proc.returncode}), log {work / f'{tag}.log'}")
        for f in rec.iterdir():
            f.unlink()
    print(f"  {tag}: {time.perf_counter() - t:.0f}s", flush=True)
    data = json.loads(out.read_text())
    data["engines"] = {f.stem: [json.loads(x) for x in f.read_text().splitlines()] for f in sorted(rec.iterdir())}
    return data


def _timing(config: dict) -> str:
    """How a launch timed its variants (bench_step's ``config.interleave``; absent in scripts from before
    side-by-side timing, which timed each variant in its own block)."""
    return "interleaved" if config.get("interleave") else "blocks"


def _check_same(old: dict, new: dict) -> None:
    """Stop (one line, exit 2) unless both launches measured the same thing the same way, every
    weight partitioned under ZeRO-3."""
    a, b = old["config"], new["config"]
    diff = {k: (a.get(k), b.get(k)) for k in SAME_CONFIG if a.get(k) != b.get(k)}
    if _timing(a) != _timing(b):  # new/old ratios of different timing methods would compare the methods
        diff["timing"] = (_timing(a), _timing(b))
    if diff:
        print(f"error: old and new did not measure the same thing (old, new): {diff}", file=sys.stderr)
        raise SystemExit(2)
    for side in (old, new):
        for rank, engines in side["engines"].items():
            for e in engines:
                if e["zero_stage"] != 3 or e["persistence_threshold"] != 0 or e["partitioned"] != e["params"]:
                    raise SystemExit(f"not every weight partitioned under ZeRO-3 ({rank}): {e}")


def _peak(r: dict, key: str) -> float | None:
    vals = [x for x in r[key] if x is not None]
    return max(vals) if vals else None


def _summary(v: str, olds: list[dict], news: list[dict]) -> dict:
    def per_round(runs, f):
        return [f(d["results"][v]) for d in runs] if runs and v in runs[0]["results"] else None

    def med(x):
        return statistics.median(x) if x else None

    def ratio(n, o):
        return n / o if n is not None and o else None

    out: dict = {}
    for side, runs in (("old", olds), ("new", news)):
        ms = per_round(runs, lambda r: r["step_ms"])
        out[side] = None if ms is None else {
            "step_ms_per_round": ms,
            "step_ms_all_rank0_per_round": per_round(runs, lambda r: r["step_ms_all_rank0"]),
            "step_ms_median": med(ms),
            "step_ms_min": min(min(x) for x in per_round(runs, lambda r: r["step_ms_all_rank0"])),
            "all_gather_mib_per_round": per_round(runs, lambda r: r["all_gather_mib_per_step_rank0"]),
            "all_gather_calls_per_round": per_round(runs, lambda r: r["all_gather_calls_rank0"]),
            "reduce_scatter_mib_per_round": per_round(runs, lambda r: r["reduce_scatter_mib_per_step_rank0"]),
            "step_peak_mib_max_rank_per_round": per_round(runs, lambda r: _peak(r, "step_peak_mib_per_rank")),
            "block_peak_rss_mib_max_rank_per_round": per_round(runs, lambda r: _peak(r, "block_peak_rss_mib_per_rank")),
        }
        if out[side] is not None:
            for k in ("all_gather_mib", "step_peak_mib_max_rank", "block_peak_rss_mib_max_rank"):
                out[side][k + "_median"] = med([x for x in out[side][k + "_per_round"] if x is not None])
    o, n = out["old"], out["new"]
    if o is None:
        out["old"] = "not supported by the old bench_step.py (it builds every name but grad_diff as ASU-GD)"
    if o and n:
        out["new_over_old"] = {
            "step_median": ratio(n["step_ms_median"], o["step_ms_median"]),
            "step_min": ratio(n["step_ms_min"], o["step_ms_min"]),
            "step_paired_rounds": [b / a for a, b in zip(o["step_ms_per_round"], n["step_ms_per_round"])],
            # each round's new over the same round's old (adjacent launches): robust to slow load changes
            "step_paired_median": med([b / a for a, b in zip(o["step_ms_per_round"], n["step_ms_per_round"])]),
            "all_gather": ratio(n["all_gather_mib_median"], o["all_gather_mib_median"]),
            "step_peak_mib": ratio(n["step_peak_mib_max_rank_median"], o["step_peak_mib_max_rank_median"]),
            "block_peak_rss_mib": ratio(n["block_peak_rss_mib_max_rank_median"], o["block_peak_rss_mib_max_rank_median"]),
        }
    return out


def _git(*args: str) -> subprocess.CompletedProcess:
    """``git -C <this checkout> args...``, output captured (the caller checks the return code)."""
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)


def main() -> None:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", default=DEFAULT_OLD, help="the older commit (default: the one before the one-pass step)")
    ap.add_argument("--rounds", type=positive_int, default=3)
    ap.add_argument("--scale", choices=("small", "0.1b"), default="small", help="small = 7 M, 0.1b = 134 M")
    ap.add_argument("--variants", nargs="+", default=None, choices=OLD_VARIANTS + NEW_ONLY, metavar="VARIANT",
                    help=f"default: {' '.join(OLD_VARIANTS + NEW_ONLY)} ({' '.join(NEW_ONLY)}: new side only)")
    ap.add_argument("--ranks", type=int_at_least(2), default=2,
                    help="ranks per launch (>= 2: with one rank ZeRO-3 has nothing to partition, which the check refuses)")
    ap.add_argument("--threads", type=positive_int, default=1)
    ap.add_argument("--batch", type=positive_int, default=None)
    ap.add_argument("--seq", type=positive_int, default=None)
    ap.add_argument("--steps", type=positive_int, default=None)
    ap.add_argument("--warmup", type=non_negative_int, default=None)
    ap.add_argument("--topk", type=non_negative_int, default=100)
    ap.add_argument("--timeout", type=positive_int, default=3600, help="seconds per launch")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, raw JSONs)")
    ap.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results)")
    args = ap.parse_args()
    variants = args.variants or list(OLD_VARIANTS + NEW_ONLY)
    old_variants = [v for v in variants if v in OLD_VARIANTS]
    if not old_variants:
        ap.error(f"--variants: at least one the old script runs ({' '.join(OLD_VARIANTS)})")
    new_variants = old_variants + [v for v in variants if v not in OLD_VARIANTS]  # shared blocks first, same order
    d = DEFAULTS["small" if args.scale == "small" else "big"]
    shape = {k: getattr(args, k) if getattr(args, k) is not None else d[k] for k in d}
    sha = _git("rev-parse", "--verify", f"{args.old}^{{commit}}")
    if sha.returncode != 0:
        ap.error(f"--old {args.old}: not a commit of {ROOT}")
    old_sha = sha.stdout.strip()
    new_sha = _git("rev-parse", "HEAD").stdout.strip()
    dirty = bool(_git("status", "--porcelain", "--", "pipeline", "kernels", "benchmarks/bench_step.py",
                      "benchmarks/common.py").stdout.strip())
    # the timing method both sides use: side by side only where the old script does it too
    old_src = _git("show", f"{old_sha}:benchmarks/bench_step.py").stdout
    timing = "interleaved" if '"interleave"' in old_src and len(old_variants) > 1 else "blocks"
    old_flag = ["--timing", timing] if '"--timing"' in old_src else []
    name = out_name("bench_step_vs_commit" + ("" if args.scale == "small" else "_134m"),
                    {"old": old_sha[:9], "rounds": args.rounds, "variants": variants, **shape, "topk": args.topk,
                     "ranks": args.ranks, "threads": args.threads},
                    {"old": _git("rev-parse", "--verify", f"{DEFAULT_OLD}^{{commit}}").stdout.strip()[:9],
                     "rounds": 3, "variants": list(OLD_VARIANTS + NEW_ONLY), **d, "topk": 100, "ranks": 2,
                     "threads": 1})
    work = Path(tempfile.mkdtemp(prefix="bench_step_vs_commit-"))
    tree = work / "old"
    ok = False
    try:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(tree), old_sha], check=True)
        for link in (".venv", ".cache"):  # the same interpreter and packages, the same cache
            (tree / link).symlink_to((ROOT / link).resolve())
        (work / "shim").mkdir()
        (work / "shim" / "sitecustomize.py").write_text(SITECUSTOMIZE)
        print(f"old {old_sha[:9]} vs new {new_sha[:9]}{' (+ uncommitted changes)' if dirty else ''}: "
              f"{args.rounds} rounds, --scale {args.scale}, {shape}, variants timed {timing}", flush=True)
        olds, news, order = [], [], []
        for i in range(1, args.rounds + 1):
            sides = [("old", tree, old_variants, olds, old_flag), ("new", ROOT, new_variants, news, ["--timing", timing])]
            for side, t, vs, acc, flag in sides if i % 2 else sides[::-1]:
                order.append(f"{side}{i}")
                acc.append(run_side(t, f"{side}{i}", vs, args, shape, work, old=side == "old", timing_flag=flag))
            _check_same(olds[-1], news[-1])
        ok = True
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"logs and raw JSONs kept in {work}", file=sys.stderr)
    results = {v: _summary(v, olds, news) for v in variants}
    rows = []
    for v, s in results.items():
        o, n, r = s["old"] if isinstance(s["old"], dict) else None, s["new"], s.get("new_over_old", {})

        def g(x, k, spec=".1f"):
            return fmt(x[k], spec) if x else "n/a"

        rows.append([v, g(o, "step_ms_median"), g(n, "step_ms_median"), fmt(r.get("step_median"), ".2f"),
                     fmt(r.get("step_paired_median"), ".2f"),
                     g(o, "step_ms_min"), g(n, "step_ms_min"), fmt(r.get("step_min"), ".2f"),
                     g(o, "all_gather_mib_median"), g(n, "all_gather_mib_median"), fmt(r.get("all_gather"), ".2f"),
                     g(o, "step_peak_mib_max_rank_median"), g(n, "step_peak_mib_max_rank_median"),
                     g(o, "block_peak_rss_mib_max_rank_median", ".0f"), g(n, "block_peak_rss_mib_max_rank_median", ".0f")])
    cfg = news[0]["config"]
    print(f"\nold = {old_sha[:9]}, new = {new_sha[:9]}; each side its own bench_step.py; ZeRO-3, {args.ranks} ranks x "
          f"{args.threads} thread, every weight partitioned; {cfg['params'] / 1e6:.1f}M params; per rank "
          f"{shape['batch']}+{shape['batch']} rows x {shape['seq']} tokens; {shape['warmup']} warm-up + "
          f"{shape['steps']} timed steps per variant per launch, timed {timing} on both sides; {args.rounds} rounds "
          f"({', '.join(order)}); n/a = the old script cannot run it")
    print_table(["variant", "old ms (median)", "new ms", "new/old", "new/old (paired)", "old ms (min)", "new ms (min)", "new/old (min)",
                 "old AG MiB/step", "new AG MiB", "new/old AG", "old step peak MiB/rank", "new step peak MiB/rank",
                 "old block RSS MiB/rank", "new block RSS MiB/rank"], rows)
    write_json(name, {
        "env": device_info(news[0]["env"]["device"]),  # where the launches ran (cpu, or cuda)
        "config": {"old_commit": old_sha, "new_commit": new_sha, "new_uncommitted_changes": dirty,
                   "timing": timing,
                   "rounds": args.rounds, "order": order, "scale": args.scale, **shape, "topk": args.topk,
                   "ranks": args.ranks, "threads": args.threads, "model": cfg["model"], "params": cfg["params"],
                   "old_variants": old_variants, "new_variants": new_variants,
                   "old_config": olds[0]["config"], "new_config": cfg,
                   "engines_old_round1": olds[0]["engines"], "engines_new_round1": news[0]["engines"]},
        "results": results,
        "notes": [
            "each side ran its own benchmarks/bench_step.py (old: a detached worktree of old_commit with this "
            ".venv/.cache), one launch per side per round, the order alternating per round.",
            "step ms = max over ranks of the rank's median timed step in that launch; median over rounds; min = the "
            "fastest timed step of rank 0 over all rounds (the shared host's load only ever adds time); paired = "
            "median over rounds of new / old of the same round (adjacent launches).",
            "all-gather MiB = output bytes of every DeepSpeed all_gather* on rank 0 in the last timed step "
            "(student and reference engines); step peak = growth of the RSS high-water mark during the variant's "
            "block over its start (max over ranks); block RSS = the block's peak RSS (engines included).",
            "both sides: ZeRO-3, stage3_param_persistence_threshold=0, every parameter partitioned, checked per "
            "engine and rank (engines_*); the old side's threshold set through a sitecustomize that replaces "
            "pipeline.config.DeepSpeedConfig's default (its bench_step.py has no flag for it).",
            "npo / asu_kl_live_fused: new side only (run after the shared variants in the same launch).",
            "timing: how both sides timed their variants within a launch (interleaved = side by side in rotated "
            "rounds; blocks = each variant's steps in its own block, as the old script does).",
        ],
    }, args.out)


if __name__ == "__main__":
    main()
