"""Launch the real training entry point as a subprocess (1 process, or several ranks via torchrun or DeepSpeed)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A port nobody listens on now: parallel test sessions (or helpers) never share a rendezvous.
    Drawn below Linux's ephemeral range (32768-60999): a port the kernel handed out for the bind
    check could be handed to another worker's gloo connection before torchrun binds it."""
    import random

    for _ in range(100):
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # a crowded range: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict:
    e = dict(os.environ)
    e.update(PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), e.get("PYTHONPATH")) if p), OMP_NUM_THREADS="1",
             DS_ACCELERATOR="cpu", WANDB_MODE="offline", HF_HUB_OFFLINE="1",
             # a multi-rank ZeRO-3 test run fails unless every weight is partitioned (engine/sharding.py)
             ASU_REQUIRE_PARTITIONED="1")
    e.pop("ASU_INJECT", None)
    e.update(extra)
    return e


def _venv_tool(name: str) -> str:
    return shutil.which(name, path=str(Path(sys.executable).parent)) or name


def command(args: list[str], ranks: int = 1, script: str = "launchers/train.py", launcher: str = "torchrun") -> list[str]:
    """``script`` on ``ranks`` processes. Several ranks start with ``torchrun`` unless ``launcher="deepspeed"``:
    both are documented launchers (README), and DeepSpeed's runner + launch.py add about 3.5 s to every
    launch (two more interpreters importing deepspeed, and launch.py's 1 s polling), which the suite's
    many multi-rank launches would pay each time; the tests of the README's `deepspeed` command use it."""
    if ranks == 1:
        return [sys.executable, script, *args]
    if launcher == "deepspeed":
        return [_venv_tool("deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()), script, *args]
    if launcher != "torchrun":
        raise ValueError(f"unknown launcher {launcher!r}")
    return [_venv_tool("torchrun"), "--nproc_per_node", str(ranks), "--master_port", str(free_port()), script, *args]


def run_group(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)``, except that a
    timeout (or a Ctrl-C of the tests) ends the command's whole process group: torchrun's ranks, the
    demo's jobs. subprocess.run killed the launcher alone, and its orphans ran on, slowing every later
    test on a 2-core runner."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          **kw) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except BaseException as exc:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, err = p.communicate()
            if isinstance(exc, subprocess.TimeoutExpired):
                raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
            raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def run(args: list[str], ranks: int = 1, timeout: int = 300, script: str = "launchers/train.py",
        launcher: str = "torchrun", **extra_env: str) -> subprocess.CompletedProcess:
    return run_group(command(args, ranks, script, launcher), timeout, cwd=ROOT, env=env(**extra_env))
