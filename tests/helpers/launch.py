"""Launch the real training entry point as a subprocess (1 process, or several ranks via torchrun or DeepSpeed)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A port nobody listens on now: parallel test sessions (or helpers) never share a rendezvous."""
    with socket.socket() as s:
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


def run(args: list[str], ranks: int = 1, timeout: int = 300, script: str = "launchers/train.py",
        launcher: str = "torchrun", **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(args, ranks, script, launcher), cwd=ROOT, env=env(**extra_env), capture_output=True,
                          text=True, timeout=timeout)
