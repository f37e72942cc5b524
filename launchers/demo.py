"""The embedded end-to-end demo (``make demo``).

1. builds (or reuses) the synthetic benchmark and its target / retain tiny models;
2. in one launch on 2 CPU ranks under DeepSpeed ZeRO-3 (``launchers/demo_runs.py``): evaluates the
   target and the retain model (the gold standard, never trained on forget authors), then unlearns
   forget10 with ASU, GradDiff, NPO, SimNPO, IdkDPO, ASU+IDK and RMU in turn;
3. prints one comparison table and writes it to ``runs/demo/summary.{md,json}``.

``--methods`` picks the rows (e.g. ``--methods asu_kl,grad_diff,npo``; ``asu_kl_rna`` is ASU with
the RNA add-on). Extra Hydra overrides after ``--`` reach every step, e.g.
``python launchers/demo.py -- method.tau=3.0``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# ASU, the two classic baselines, then the rest of the registry's TOFU-style methods (one row each).
DEFAULT_METHODS = ("asu_kl", "grad_diff", "npo", "simnpo", "idk_dpo", "asu_idk", "rmu")


def run(cmd: list[str], env: dict, log_path: Path, echo: str | None = None) -> None:
    """Run ``cmd`` with its output in ``log_path``; lines containing ``echo`` are also printed."""
    t0 = time.time()
    print(f"$ {' '.join(cmd)}", flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace")
        for line in proc.stdout:
            log.write(line)
            if echo and echo in line:
                print("  " + line[line.index(echo):].rstrip(), flush=True)
        proc.wait()
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-40:]
        print("\n".join(tail), file=sys.stderr)
        raise SystemExit(f"step failed (exit {proc.returncode}); full log: {log_path}")
    shown = log_path.relative_to(REPO) if log_path.is_relative_to(REPO) else log_path
    print(f"  done in {time.time() - t0:.0f}s (log: {shown})", flush=True)


def launcher(ranks: int, port: int) -> list[str]:
    if ranks == 1:
        return [sys.executable]
    ds = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
    if ds:
        return [ds, "--num_gpus", str(ranks), "--master_port", str(port)]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(port)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--port", type=int, default=29533)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every step (after --)")
    args = ap.parse_args()

    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    out = Path(args.out)
    logs = REPO / out / "logs"
    t0 = time.time()
    common = ["+exp=tofu_tiny", f"output_dir={out.parent}"]
    demo = out.name

    print("== 1/2 benchmark and models (cached after the first run)", flush=True)
    run([sys.executable, "launchers/prepare.py", *common, *args.overrides], env, logs / "prepare.log")

    methods = [m for m in args.methods.split(",") if m]
    print(f"== 2/2 on {args.ranks} CPU rank(s), DeepSpeed ZeRO-3, one launch: evaluate the target (before "
          f"unlearning) and retain (gold standard) models, then unlearn with {', '.join(methods)}", flush=True)
    cmd = launcher(args.ranks, args.port) + ["launchers/demo_runs.py", "--methods", ",".join(methods),
                                             "--demo-name", demo, "--timings", str(out / "timings.json"),
                                             *common, *args.overrides]
    run(cmd, env, logs / "runs.log", echo="[demo] ")

    from pipeline.eval.summary import summarise_demo

    text = summarise_demo(REPO / out, ["target", "retain", *methods])
    print(text)
    print(f"total {time.time() - t0:.0f}s; per-run reports: {out}/<name>/report.md", flush=True)


if __name__ == "__main__":
    main()
