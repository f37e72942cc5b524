"""The run directory's lock between a launch's ranks and other launches (pipeline.engine.run_lock).
The launches themselves: tests/faults/test_training_faults.py (a held directory, two at the same instant)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

from pipeline.engine import run_lock

ROOT = Path(__file__).resolve().parents[1]


def _single_node(monkeypatch, port="29500"):
    for k in ("SLURM_JOB_ID", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_SIZE", "2")  # what DeepSpeed's launch.py sets
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", port)


def test_two_deepspeed_launches_on_one_host_have_different_launch_ids(monkeypatch):
    """DeepSpeed's launcher gives every launch MASTER_PORT=29500: the id was that address, so the
    ranks of a second launch took the first one's lock for their own rank 0's and went on."""
    _single_node(monkeypatch)
    assert run_lock.launch_id() == f"{socket.gethostname()} launcher pid {os.getppid()}"
    code = "from pipeline.engine.run_lock import launch_id; print(launch_id())"
    other = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                           capture_output=True, text=True, check=True).stdout.strip()
    assert other == f"{socket.gethostname()} launcher pid {os.getpid()}" != run_lock.launch_id()
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert run_lock.launch_id() == "slurm 77.0"


def test_other_ranks_pass_their_own_rank_0s_lock_and_stop_at_another_launchs(monkeypatch, tmp_path):
    _single_node(monkeypatch)
    run = tmp_path / "run"
    assert run_lock.hold_early(run) is None  # rank 0 of this launch, from the Hydra callback
    try:
        assert run_lock.in_use(run, tries=2, wait_s=0) is None  # another rank of it
        monkeypatch.setenv("SLURM_JOB_ID", "78")  # a rank of another launch
        problem = run_lock.in_use(run, tries=2, wait_s=0)
        assert problem is not None and problem.startswith(f"run directory {run} is in use by another launch (pid "
                                                          f"{os.getpid()} on {socket.gethostname()}, since ")
        assert "launcher pid" not in problem  # the launch id is for the ranks, not the message
        monkeypatch.delenv("SLURM_JOB_ID")
        with run_lock.run_dir_lock(run):  # the job keeps the lock its callback took (a new one would clash)
            assert str(run.resolve()) not in run_lock._EARLY
        assert run_lock.in_use(run, tries=1, wait_s=0) is None  # released at the job's end
    finally:
        held = run_lock._EARLY.pop(str(run.resolve()), None)
        if held is not None:
            held.close()
