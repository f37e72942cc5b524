"""One launch at a time per run directory.

A second launch into a directory whose run is still going (the same command in another terminal, a
sweep re-submitted while its jobs run) resumed from the first one's checkpoints while they were being
pruned, or trained alongside it, both saving the same steps and exporting into the same ``model/``.
Rank 0 holds an exclusive ``flock`` on ``<run dir>/.run.lock`` for the job's life, taken before the job
changes anything there; the kernel drops it when the process ends, however it ends (a SIGKILL, a
preempted node), so a requeued job is never refused by the attempt it replaces. A single launch takes
it earlier, from a Hydra callback (:func:`hold_early` on rank 0, :func:`in_use` on the others), before
Hydra writes ``.hydra/`` and opens the job log there, so a refused one leaves the running run's record
as it was, also when two launches start at the same instant; the job then keeps the lock it holds. A
sweep's jobs write theirs before they reach the lock (the sweep report skips a refused attempt's
lines). A filesystem without locks (some Lustre mounts) runs unguarded, with a warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Optional

from pipeline.engine.checkpoint import CheckpointError
from pipeline.engine.distributed import broadcast_object, is_main_process, ranks_per_node

log = logging.getLogger(__name__)

LOCK_FILE = ".run.lock"


class RunDirInUseError(CheckpointError):
    """Another launch is running in this run directory."""


def _acquire(run_dir: Path) -> tuple[Optional[IO[str]], Optional[str]]:
    """(the held lock file, None), or (None, why this launch may not run here). Any other failure (no
    locks on this filesystem, a lock file this user cannot open) leaves the run unguarded, as before,
    with a warning: never an exception here, which would leave the other ranks waiting in the broadcast."""
    f = None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        f = open(run_dir / LOCK_FILE, "a+")
        _lock_exclusive(f)
    except BlockingIOError:
        problem = _refusal(run_dir, f)
        f.close()
        return None, problem
    except OSError as e:
        if f is not None:
            f.close()
        log.warning("run directory %s: cannot lock it (%s): a second launch into it would not be refused", run_dir,
                    e.strerror or type(e).__name__)
        return None, None
    try:  # who holds it, for the refusal's message; the launch, for this launch's other ranks (in_use)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                f"{_LAUNCH_MARK}{launch_id()}\n")
        f.flush()
        os.fsync(f.fileno())  # to the server now: ranks on other nodes read it (NFS caches a write until close)
    except OSError:  # a full disk: held all the same, the holder unnamed
        pass
    return f, None


def _lock_exclusive(f: IO[str], tries: int = 5, wait_s: float = 0.1) -> None:
    """``flock(LOCK_EX | LOCK_NB)`` a few times over half a second: another launch's look (:func:`in_use`)
    holds the lock shared for an instant, and is no reason to refuse. Raises BlockingIOError when held."""
    for attempt in range(tries):
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if attempt == tries - 1:
                raise
            time.sleep(wait_s)


_LAUNCH_MARK = "; launch "


def launch_id() -> str:
    """What every rank of this launch shares and no other launch running now does: SLURM's job step;
    else, on one node, the launcher process whose children the ranks are (torchrun's agent, DeepSpeed's
    launch.py) on this host — not the rendezvous address: DeepSpeed's launcher gives every launch
    port 29500 and binds nothing before the ranks start; across nodes, that address and torchrun's
    rendezvous id (the port is bound on the first node by then)."""
    env = os.environ
    if "SLURM_JOB_ID" in env:
        return f"slurm {env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '')}"
    world = int(env.get("WORLD_SIZE", "1"))
    if ranks_per_node(world) >= world:
        return f"{socket.gethostname()} launcher pid {os.getppid()}"
    return f"{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')} {env.get('TORCHELASTIC_RUN_ID', '')}"


def _holder(lock: IO[str]) -> str:
    lock.seek(0)
    return lock.read().strip()


def _refusal(run_dir: Path, lock: IO[str]) -> str:
    holder = (_holder(lock).split(_LAUNCH_MARK)[0]
              or "holder unknown: its lock file names no one, e.g. this launch's rank 0 could not write it on a full disk")
    return f"run directory {run_dir} is in use by another launch ({holder}): wait for it to end, or use another run_name"


def in_use(run_dir: str | Path, tries: int = 20, wait_s: float = 0.1) -> Optional[str]:
    """Why a launch may not run in ``run_dir`` (another launch holds its lock), else None. Looks only:
    creates nothing, and holds nothing after it returns. A lock held by this launch's own rank 0
    (:func:`hold_early`) is no reason: it names :func:`launch_id`; one held but not (yet) naming it is
    looked at again over two seconds, the file opened anew each time (rank 0 names itself an instant
    after locking; another node sees the name once it reaches the file server)."""
    run_dir = Path(run_dir)
    ours = _LAUNCH_MARK + launch_id()
    for attempt in range(tries):
        try:
            with open(run_dir / LOCK_FILE) as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    if _holder(f).endswith(ours):
                        return None
                    if attempt == tries - 1:
                        return _refusal(run_dir, f)
                else:
                    fcntl.flock(f, fcntl.LOCK_UN)
                    return None
        except OSError:  # no lock file (a new run), or no locks on this filesystem: the job's lock decides
            return None
        time.sleep(wait_s)
    return None


# Locks rank 0 took before the job started (hold_early), by resolved run directory; None: that
# directory cannot be locked (warned already), the job runs unguarded without warning again.
_EARLY: dict[str, Optional[IO[str]]] = {}


def hold_early(run_dir: str | Path) -> Optional[str]:
    """Rank 0 of a single launch, before Hydra writes into ``run_dir``: take its lock now and keep it
    for the job (:func:`run_dir_lock` adopts it), so two launches started at the same instant cannot
    both pass a look and write their ``.hydra/`` before the job's lock refuses one. Returns why this
    launch may not run there (another launch holds it), else None. Creates ``run_dir`` (Hydra would)."""
    key = str(Path(run_dir).resolve())
    if key in _EARLY:
        return None
    held, problem = _acquire(Path(run_dir))
    if problem is None:
        _EARLY[key] = held
    return problem


@contextlib.contextmanager
def run_dir_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold ``run_dir`` for this launch (collective: rank 0 locks, or keeps the lock it took early,
    and every rank learns the outcome). Raises :class:`RunDirInUseError` on every rank when another
    launch holds it."""
    held, problem = None, None
    if is_main_process():
        key = str(Path(run_dir).resolve())
        held, problem = (_EARLY.pop(key), None) if key in _EARLY else _acquire(Path(run_dir))
    problem = broadcast_object(problem)
    if problem:
        raise RunDirInUseError(problem, every_rank=True)
    try:
        yield
    finally:
        if held is not None:
            fcntl.flock(held, fcntl.LOCK_UN)
            held.close()
