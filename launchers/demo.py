"""The embedded end-to-end demo (``make demo``).

1. builds (or reuses) the synthetic benchmark and its target / retain tiny models;
2. in one launch on 2 CPU ranks under DeepSpeed ZeRO-3 (``launchers/demo_runs.py``): evaluates the
   target and the retain model (the gold standard, never trained on forget authors), then unlearns
   forget10 with ASU, GradDiff and NPO in turn;
3. with ``--all`` (``make demo-all``) or ``--extra-methods``: SimNPO, IdkDPO, ASU+IDK, RMU and ASU-LoRA as
   single-rank processes side by side (same global batch; the reference evaluations move there);
4. prints one comparison table and writes it to ``runs/demo/summary.{md,json}``.

``--methods`` picks the 2-rank rows (``asu_kl_rna`` is ASU with the RNA add-on, ``asu_kl_lora`` ASU
with a LoRA student whose frozen base is its teacher). Extra Hydra
overrides after ``--`` reach every step and every row, so they must be keys every row's config has,
e.g. ``python launchers/demo.py -- trainer.max_steps=20``; a method's own key (``method.tau=3.0``) only
with rows that all have it (``--methods asu_kl``); otherwise the demo stops before anything runs, with
one line naming the row (every row of every launch is composed and validated first). Training starts afresh on every run (``trainer.resume=never``; a Ctrl-C's stop
checkpoint is not resumed), and the previous run's ``summary.*`` / ``timings.json`` are removed first.

After the table, ``ASU checks: N/M passed`` (the acceptance checks of the ``asu_kl`` / ``asu_kl_lora``
rows, ``pipeline.eval.summary.summarise_demo``); when one fails, a line naming the failed checks and exit
code 1 (a result, not bad input: that is 2), also with overrides after ``--``, though the checks were
designed for the default settings and the line then says so.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NoReturn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.cli import OneLineParser, at_least_one, port_number  # noqa: E402  (stdlib only)
from pipeline.cli import out_dir as cli_out_dir  # noqa: E402

# ASU and the two classic baselines on 2 ranks (make demo); with --all (make demo-all) also the rest
# of the registry's TOFU-style methods, as extra rows (single-rank processes side by side, same
# global batch).
DEFAULT_METHODS = ("asu_kl", "grad_diff", "npo")
EXTRA_METHODS = ("simnpo", "idk_dpo", "asu_idk", "rmu", "asu_kl_lora")


# after a Ctrl-C, how long the children (which got the same SIGINT from the terminal and stop by
# themselves, a training job after writing a stop checkpoint) may take before they are terminated
STOP_GRACE_S = 30.0
EXIT_INTERRUPTED = 130
# the ASU checks ran and at least one failed: a result, not bad input (2) nor a crashed step
EXIT_CHECKS_FAILED = 1
# the rows the ASU checks apply to
CHECKED_ROWS = ("asu_kl", "asu_kl_lora")
# a child's one-line user error (pipeline.messages.error_line), wherever a launcher put it in the line
ERROR_LINE = re.compile(r"error \([A-Za-z_][\w.]*, rank \d+\): .*")


def run(cmds: list[list[str]], env: dict, log_paths: list[Path], echo: str | None = None) -> None:
    """Run ``cmds`` concurrently, each with its output in its log; lines containing ``echo`` are also
    printed. Once all have ended, any failure stops the demo (:func:`report_failures`) with the first
    failed command's exit code. A Ctrl-C waits for the commands to stop (then ends them), keeps their
    last log lines and exits 130 with one line."""
    t0 = time.time()
    procs = []
    for cmd, log_path in zip(cmds, log_paths):
        print(f"$ {' '.join(cmd)}", flush=True)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace")
        pump = threading.Thread(target=_pump, args=(proc, log_path, echo), daemon=True)
        pump.start()
        procs.append((proc, pump, log_path))
    try:
        for proc, _, _ in procs:
            proc.wait()
    except KeyboardInterrupt:
        interrupted(procs)
    for _, pump, _ in procs:
        pump.join()
    report_failures([(proc.returncode, log_path) for proc, _, log_path in procs if proc.returncode != 0])
    shown = [str(p.relative_to(REPO) if p.is_relative_to(REPO) else p) for p in log_paths]
    print(f"  done in {time.time() - t0:.0f}s (log: {', '.join(shown)})", flush=True)


def interrupted(procs: list[tuple[subprocess.Popen, threading.Thread, Path]]) -> NoReturn:
    """Ctrl-C: the children got the SIGINT too and stop by themselves; wait up to :data:`STOP_GRACE_S`
    for them (a second Ctrl-C: at once), terminate what still runs, let the log pumps write the
    children's last lines, then one line and exit 130."""
    deadline = time.monotonic() + STOP_GRACE_S
    try:
        for proc, _, _ in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    except KeyboardInterrupt:
        pass  # pressed again: stop waiting
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the clean-up below must not be cut short
    for proc, _, _ in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc, pump, _ in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        pump.join(timeout=10)
    logs = ", ".join(str(p) for _, _, p in procs)
    print(f"interrupted (Ctrl-C): the demo stopped; its next run trains afresh (trainer.resume=never, unless "
          f"overridden after --); log: {logs}", file=sys.stderr, flush=True)
    sys.exit(EXIT_INTERRUPTED)


def report_failures(failed: list[tuple[int, Path]]) -> None:
    """Report every failed command, then exit with the first one's code (a signal's as 128 + its
    number). A bad-input failure (exit 2) shows only the child's own error line(s) from its log;
    any other failure its log's tail and where the whole log is."""
    for code, log_path in failed:
        lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
        errors = list(dict.fromkeys(m.group(0) for m in map(ERROR_LINE.search, lines) if m)) if code == 2 else []
        if errors:  # one line per distinct error (ranks that met the same one say it once)
            print("\n".join(errors), file=sys.stderr, flush=True)
        else:
            print("\n".join(lines[-40:]), file=sys.stderr)
            print(f"step failed (exit {code}); full log: {log_path}", file=sys.stderr, flush=True)
    if failed:
        code = failed[0][0]
        sys.exit(128 - code if code < 0 else code)


def _pump(proc: subprocess.Popen, log_path: Path, echo: str | None) -> None:
    with open(log_path, "w", buffering=1) as log:  # line-buffered: the log can be followed while a step runs
        for line in proc.stdout:
            log.write(line)
            if echo and echo in line:
                print("  " + line[line.index(echo):].rstrip(), flush=True)


def child_env() -> dict:
    """The environment of every job a demo starts: offline, CPU ranks, one thread each, repo importable."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def launcher(ranks: int, port: int) -> list[str]:
    if ranks == 1:
        return [sys.executable]
    ds = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
    if ds:
        return [ds, "--num_gpus", str(ranks), "--master_port", str(port)]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(port)]


def zero_words(ranks: int, overrides: list[str]) -> str:
    """What DeepSpeed runs on ``ranks`` ranks (``deepspeed.zero_stage=auto``: ZeRO-3 on several ranks,
    stage 0 on one; an override after ``--`` wins), for the step headings."""
    from pipeline.engine.zero_stage import choose_zero_stage

    given = {k: v for k, _, v in (o.lstrip("+").partition("=") for o in overrides)}
    group = REPO / "conf" / "deepspeed" / f"{given.get('deepspeed', '')}.yaml"
    if "deepspeed" in given and group.is_file():  # -- deepspeed=zero3_offload_all: its settings, then the keys
        import yaml

        chosen = yaml.safe_load(group.read_text()) or {}
        given = {**{f"deepspeed.{k}": str(v) for k, v in chosen.items()}, **given}
    try:
        stage = choose_zero_stage(given.get("deepspeed.zero_stage", "auto"), ranks,
                                  given.get("deepspeed.offload_optimizer", "none"),
                                  given.get("deepspeed.offload_param", "none")).stage
    except ValueError:  # not a stage number: the job's own config check reports it
        return f"deepspeed.zero_stage={given['deepspeed.zero_stage']}"
    return "DeepSpeed ZeRO-3" if stage == 3 else f"DeepSpeed ZeRO stage {stage}"


def out_dir(ap: argparse.ArgumentParser, given: str) -> Path:
    """``--out`` as a directory, relative to the repository (:func:`pipeline.cli.out_dir`)."""
    return cli_out_dir(ap, given, REPO)


def clear_stale(out: Path, names: tuple[str, ...] = ("summary.md", "summary.json", "timings.json")) -> None:
    """Remove the previous run's summary files from ``out`` (and its ``logs/timings_*.json``): a run
    that fails must not leave an earlier run's table looking like its own."""
    for name in names:
        (out / name).unlink(missing_ok=True)
    for f in (out / "logs").glob("timings*.json"):
        f.unlink()


def report_checks(checks: list[dict], overrides: list[str]) -> int:
    """After the table: ``ASU checks: N/M passed`` and, when some failed, one line (stderr) naming them;
    returns the exit code (:data:`EXIT_CHECKS_FAILED` when a check failed, else 0). No checks (no checked
    row in the run): no line, 0. With ``overrides`` the failure line says the checks were designed for
    the default settings."""
    if not checks:
        return 0
    failed = [c for c in checks if not c["ok"]]
    print(f"ASU checks: {len(checks) - len(failed)}/{len(checks)} passed", flush=True)
    if not failed:
        return 0
    note = (f" (the checks were designed for the default settings; overrides given: {' '.join(overrides)})"
            if overrides else "")
    names = "; ".join(f"{c['check']} ({c['value']})" for c in failed)
    print(f"ASU check(s) failed, exit {EXIT_CHECKS_FAILED}{note}: {names}", file=sys.stderr, flush=True)
    return EXIT_CHECKS_FAILED


def main() -> int:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help="rows unlearned in the multi-rank ZeRO-3 launch (after the target/retain evaluations)")
    ap.add_argument("--extra-methods", default="",
                    help="further rows, each unlearned by a single-rank process (ZeRO stage 0) with the same "
                         "global batch, --procs of them at a time")
    ap.add_argument("--all", action="store_true",
                    help=f"add the registry's other TOFU-style methods as extra rows ({', '.join(EXTRA_METHODS)})")
    ap.add_argument("--ranks", type=at_least_one, default=2)
    ap.add_argument("--procs", type=at_least_one, default=2, help="concurrent single-rank processes for --extra-methods")
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--port", type=port_number, default=29533)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every step (after --)")
    args = ap.parse_args()

    from pipeline.demo import check_rows, without_method_keys

    methods = [m for m in args.methods.split(",") if m]
    extra = [m for m in args.extra_methods.split(",") if m]
    extra += [m for m in EXTRA_METHODS if args.all and m not in extra]
    try:  # a misspelt row fails here, before minutes of preparing
        check_rows([*methods, *extra], REPO / "conf")
    except ValueError as exc:
        ap.error(f"--methods/--extra-methods: {exc}")

    out = Path(args.out)
    root = out_dir(ap, args.out)
    common = ["+exp=tofu_tiny", f"output_dir={out.parent}", *args.overrides]
    demo = out.name
    # With two or more single-rank processes for extra rows, the two reference evaluations (the
    # target before unlearning, the retain model = gold standard) ride along with them.
    refs = "" if args.procs >= 2 and len(extra) >= 2 else "target,retain"
    extra_common = [*common, "deepspeed.zero_stage=0"]
    try:  # every row of both launches, as they will compose it: a bad override stops before anything runs
        from pipeline.demo import check_jobs, plan_jobs

        check_jobs(REPO / "conf", common, plan_jobs(methods, demo, REPO / "conf"))
        check_jobs(REPO / "conf", extra_common, plan_jobs(extra, demo, REPO / "conf", references=()))
    except ValueError as exc:  # ConfigError: one line naming the row
        from pipeline.messages import error_line

        print(error_line(exc, str(exc)), file=sys.stderr, flush=True)
        return 2

    env = child_env()
    logs = root / "logs"
    clear_stale(root)
    t0 = time.time()

    steps = 2 + bool(extra)
    print(f"== 1/{steps} benchmark and models (cached after the first run)", flush=True)
    run([[sys.executable, "launchers/prepare.py", *without_method_keys(common)]], env, [logs / "prepare.log"])

    print(f"== 2/{steps} on {args.ranks} CPU rank(s), {zero_words(args.ranks, args.overrides)}, one launch: "
          f"{'evaluate the target and retain models, then ' if refs else ''}unlearn with "
          f"{', '.join(methods) or 'nothing'}", flush=True)
    timing_files = [out / "logs" / "timings_main.json"]
    cmd = launcher(args.ranks, args.port) + ["launchers/demo_runs.py", "--methods", ",".join(methods),
                                             "--references", refs, "--demo-name", demo,
                                             "--timings", str(timing_files[0]), *common]
    run([cmd], env, [logs / "runs.log"], echo="[demo] ")

    if extra:
        # On a 2-core CPU a 2-rank ZeRO-3 step is dominated by ZeRO-3's per-module hooks and
        # collectives, not by compute: the extra rows run as single-rank processes side by side, with
        # the 2-rank run's global batch and ZeRO stage 0 (one rank has nothing to partition; the
        # update is the same), which keeps the whole demo within its 10-minute budget.
        groups = [extra[i::args.procs] for i in range(min(args.procs, len(extra)))]
        ref_of = [] if refs else ["target", "retain"]  # reference evaluation of process i, if any
        print(f"== 3/{steps} {len(groups)} single-rank process(es) side by side (global batch as above): "
              f"{'evaluate the target and retain models; ' if not refs else ''}unlearn with {', '.join(extra)}",
              flush=True)
        cmds, logs_b = [], []
        for i, group in enumerate(groups):
            timing_files.append(out / "logs" / f"timings_extra{i}.json")
            cmds.append([sys.executable, "launchers/demo_runs.py", "--methods", ",".join(group),
                         "--references", ref_of[i] if i < len(ref_of) else "",
                         "--batch-scale", str(args.ranks), "--demo-name", demo, "--timings", str(timing_files[-1]),
                         *extra_common])
            logs_b.append(logs / f"runs_extra{i}.log")
        run(cmds, env, logs_b, echo="[demo] ")

    import json

    from pipeline.eval.summary import summarise_demo
    from pipeline.io import atomic_write_json

    timings = [t for f in timing_files if (REPO / f).exists() for t in json.loads((REPO / f).read_text())]
    atomic_write_json(root / "timings.json", timings)
    text = summarise_demo(root, list(dict.fromkeys(["target", "retain", *methods, *extra])),
                          checked=CHECKED_ROWS)
    print(text)
    print(f"total {time.time() - t0:.0f}s; per-run reports: {out}/<name>/report.md", flush=True)
    checks = json.loads((root / "summary.json").read_text()).get("checks", [])
    return report_checks(checks, args.overrides)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # between steps (run() handles one during a step)
        print("interrupted (Ctrl-C): the demo stopped", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
