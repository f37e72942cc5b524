"""How the ranks of a launch that finished leave (pipeline.engine.distributed.leave_together): the
launchers' normal end; here a rank script on 2 ranks, one of which does not come."""

import os
import sys

import pytest

from tests.helpers import launch

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("late", [False, True])
def test_ranks_leave_together_and_do_not_wait_long_for_one_that_does_not_come(tmp_path, late):
    p = launch.run([str(tmp_path), str(int(late))], ranks=2, script="tests/test_leave_together.py", timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(f.name for f in tmp_path.iterdir()) == (["exit_handler_0"] if late else
                                                          ["exit_handler_0", "exit_handler_1"])
    assert ("note: not every rank reached the end of the launch" in p.stderr) == late, p.stderr[-3000:]


def test_a_rank_that_stops_with_a_code_keeps_it_and_runs_its_exit_handlers(tmp_path):
    """leave_alone: a refusal's 2, a preemption's 124 (the code train.sbatch requeues on) without the
    teardown, which could abort it (-6) or, slow on a busy host, outlast SLURM's KillWait."""
    p = launch.run([str(tmp_path), "stop"], ranks=2, script="tests/test_leave_together.py", timeout=300)
    assert p.returncode != 0 and "exitcode  : 124" in p.stderr, p.stderr[-3000:]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["exit_handler_0", "exit_handler_1"]


if __name__ == "__main__":  # one rank of the tests above
    import atexit
    from pathlib import Path

    import torch.distributed as dist

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pipeline.engine.distributed import leave_alone, leave_together

    dist.init_process_group("gloo")
    rank, out, late = dist.get_rank(), Path(sys.argv[1]), sys.argv[2] == "1"
    atexit.register(lambda: (out / f"exit_handler_{rank}").touch())  # what a normal exit would run
    dist.barrier()
    if sys.argv[2] == "stop":
        leave_alone(124)
        raise AssertionError("leave_alone returned")
    if late and rank == 1:
        os._exit(0)  # gone after the last collective, without its exit handlers
    leave_together(wait_s=3)
    raise AssertionError("leave_together returned")
