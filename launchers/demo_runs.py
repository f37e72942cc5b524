"""The demo's evaluation and training jobs in one distributed launch (called by ``launchers/demo.py``).

    deepspeed --num_gpus 2 launchers/demo_runs.py --methods asu_kl,grad_diff,npo -- +exp=tofu_tiny output_dir=runs

Every rank runs the same jobs in order (see :mod:`pipeline.demo`); run directories are
``<output_dir>/<demo name>/<job>``; ``--timings FILE`` writes how long each job took.
"""

import argparse
from pathlib import Path

import _bootstrap  # noqa: F401  (must run first: environment + argv)

from pipeline.logging import configure_console


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", required=True, help="comma-separated method names (conf/method/<name>.yaml)")
    ap.add_argument("--demo-name", default="demo", help="run directory under output_dir")
    ap.add_argument("--timings", default=None, help="write per-job seconds here (JSON, rank 0)")
    ap.add_argument("--references", default="target,retain",
                    help="reference models evaluated first (comma-separated; '' for none)")
    ap.add_argument("--batch-scale", type=int, default=1,
                    help="multiply the per-rank batch sizes (1 rank with the global batch of N ranks: N)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every job")
    args = ap.parse_args()
    configure_console()

    from pipeline.demo import demo_job, plan_jobs
    from pipeline.engine.distributed import is_main_process

    conf = Path(_bootstrap.CONFIG_PATH)
    jobs = plan_jobs([m for m in args.methods.split(",") if m], args.demo_name, conf,
                     references=tuple(v for v in args.references.split(",") if v))
    timings = []
    with _bootstrap.ranks_leave():
        _bootstrap.run_main(lambda: timings.extend(demo_job(conf, list(args.overrides), jobs, args.batch_scale)))
        if args.timings and is_main_process():
            from pipeline.io import atomic_write_json

            atomic_write_json(Path(args.timings), timings)


if __name__ == "__main__":
    main()
