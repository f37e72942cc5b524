"""Gather a sweep into one table, a forget-vs-utility Pareto plot and the best setting.

    python launchers/report.py runs/sweeps/tofu_tiny
    python launchers/report.py runs/sweeps/tofu_tiny --target runs/tofu_tiny/target/results.json
    python launchers/report.py runs/sweeps/tofu_tiny --rule "min:forget_fact_recall,model_utility>=0.9"

Writes report.md, report.json and pareto.png into the sweep directory (or --out).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import OneLineParser, out_dir  # noqa: E402
from pipeline.eval.sweep import DEFAULT_RULE, MUSE_RULE, build_report  # noqa: E402
from pipeline.messages import error_line  # noqa: E402


def main(argv=None) -> int:
    ap = OneLineParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("sweep_dir", help="a Hydra multirun directory, e.g. runs/sweeps/<exp_name>")
    ap.add_argument("--rule", default=None,
                    help="'[max:|min:|zero:]metric[,metric>=factor]' (the factor multiplies the target's value, or "
                         f"the sweep's best without --target). Default by the runs' metrics: TOFU '{DEFAULT_RULE}', "
                         f"MUSE '{MUSE_RULE}', WMDP 'wmdp-bio_accuracy,mmlu_accuracy>=0.95'")
    ap.add_argument("--target", help="results.json (or run dir) of the original/target model: utility reference")
    ap.add_argument("--x", default=None, help="forget metric on the x axis (default: forget_fact_recall if present; "
                                              "MUSE verbmem_forget; WMDP the first wmdp-* accuracy)")
    ap.add_argument("--y", default=None, help="utility metric on the y axis (default: model_utility; MUSE "
                                              "knowmem_retain; WMDP mmlu_accuracy)")
    ap.add_argument("--out", default=None, help="output directory (default: the sweep dir)")
    a = ap.parse_args(argv)
    if a.out:  # a file in its place: the usage error, not FileExistsError naming no flag
        out_dir(ap, a.out)
    try:
        rep = build_report(a.sweep_dir, a.rule, a.target, a.x, a.y, a.out)
    except (OSError, ValueError) as exc:  # one line, as the other launchers' errors (--out unwritable too)
        print(error_line(exc, str(exc)), file=sys.stderr)
        return 2
    out = a.out or a.sweep_dir
    print(rep["console"])
    c = rep["chosen"]
    n = rep["counts"]
    print(f"\n{n['ok']}/{n['total']} points completed ({n['missing']} missing, {n['failed']} failed)")
    print(f"rule {rep['rule']}: " + (f"chosen {c['name']} (tau {c['tau']})" if c["name"] else
                                  "no setting satisfies it" if c["completed"] else "no point has completed"))
    for note in c["notes"]:
        print(f"  note: {note}")
    print(f"wrote {os.path.join(out, 'report.md')}, report.json, pareto.png")
    return 0 if rep["counts"]["total"] else 2


if __name__ == "__main__":
    sys.exit(main())
