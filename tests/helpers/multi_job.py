"""Several training runs in one launch (test helper): ``python|deepspeed tests/helpers/multi_job.py JOBS.json``.

``JOBS.json`` is a list of ``[run_name, [overrides...]]``. Every rank runs the jobs in order on one
process group (as the demo does, :func:`pipeline.demo.demo_job`), which spares each job its own
interpreter start, imports and rendezvous: the 1-rank vs 2-rank equality tests of many methods fit
in two launches.
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "launchers"))

import _bootstrap  # noqa: E402  (must run first: environment + argv)


def main() -> None:
    from pathlib import Path

    from pipeline.demo import DemoJob, demo_job

    jobs = json.loads(Path(sys.argv[1]).read_text())
    demo = [DemoJob(name, "train", (*overrides, f"run_name={name}")) for name, overrides in jobs]
    with _bootstrap.ranks_leave():
        _bootstrap.run_main(lambda: demo_job(Path(_bootstrap.CONFIG_PATH), [], demo))


if __name__ == "__main__":
    main()
