"""What a single launch's Hydra record replaced in its run directory, so that a launch refused before
it wrote anything of its own puts it back.

Hydra writes ``.hydra/`` (config, overrides) and opens the job log before the job runs; the job's
own input checks (a bad data cell, two files for one split, a checkpoint this config cannot resume)
come after. Without this, such a refusal replaced a finished run's ``.hydra/config.yaml`` and
``overrides.yaml`` with the refused launch's, and left a new run directory holding only Hydra's
files and a log. Rank 0 of a single run remembers the directory in the Hydra callback
(:func:`remember`, before Hydra writes) and the launcher calls :func:`undo_if_untouched` on a refusal.
A SLURM sweep whose submission sbatch refuses is put back alike (:func:`remember_sweep`,
:func:`undo_refused_submission`): its ``multirun.yaml`` and submitit folder as they were.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pipeline.engine.run_lock import LOCK_FILE  # the callback may create it before Hydra writes
from pipeline.io import atomic_write_bytes, dirs_to_create, remove_empty_dirs

HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")


@dataclass
class _Before:
    run_dir: Path
    hydra_dir: Path
    job_log: Optional[str]  # the job log's name when it lies in run_dir
    created: list[Path]  # run_dir and the parents this launch creates, innermost first (empty: it existed)
    hydra_dir_existed: bool = True
    hydra_files: dict[str, Optional[bytes]] = field(default_factory=dict)  # None: not there before
    entries: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # the run's own files' stats


_BEFORE: Optional[_Before] = None


def _own_entries(run_dir: Path, skip: set[str]) -> dict[str, tuple[int, int, int]]:
    """(inode, mtime_ns, size) of each entry of ``run_dir`` that is the run's (not Hydra's record, the job
    log or the lock): a launch that wrote any of them (config.yaml, checkpoints/, results.json) began its run.
    Top-level entries only: every refusal that can follow a write of the run's comes after its config.yaml."""
    try:
        names = os.listdir(run_dir)
    except OSError:
        return {}
    stats = {}
    for name in names:
        if name in skip:
            continue
        try:
            st = os.stat(run_dir / name)
        except OSError:
            continue
        stats[name] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return stats


def remember(run_dir: str | Path, output_subdir: Optional[str], job_log: Optional[str]) -> None:
    """Before Hydra writes into ``run_dir``: what its record (``output_subdir``, e.g. ``.hydra``) holds
    now, which directories this launch creates, and the stats of the run's own files."""
    global _BEFORE
    if output_subdir is None:  # a dry run / another rank: Hydra writes no record
        return
    run_path = Path(os.path.abspath(run_dir))
    created = dirs_to_create(run_path)
    log_name = None
    if job_log and Path(os.path.abspath(job_log)).parent == run_path:
        log_name = Path(job_log).name
    hydra_dir = run_path / output_subdir
    before = _Before(run_path, hydra_dir, log_name, created, hydra_dir.is_dir())
    for name in HYDRA_FILES:
        try:
            before.hydra_files[name] = (hydra_dir / name).read_bytes()
        except OSError:
            before.hydra_files[name] = None
    before.entries = _own_entries(run_path, _skipped(before))
    _BEFORE = before


def _skipped(before: _Before) -> set[str]:
    top = os.path.relpath(before.hydra_dir, before.run_dir).split(os.sep)[0]
    return {top, LOCK_FILE} | ({before.job_log} if before.job_log else set())


def undo_if_untouched() -> Optional[str]:
    """After a refusal: if the launch wrote nothing of the run's own, put Hydra's record back as it was
    (a directory this launch created goes, with its log); returns what was done, for the error's log, or
    None. A launch that had begun its run (its files changed) keeps its record: it describes them."""
    global _BEFORE
    before, _BEFORE = _BEFORE, None
    if before is None or _own_entries(before.run_dir, _skipped(before)) != before.entries:
        return None
    try:
        for name, data in before.hydra_files.items():
            path = before.hydra_dir / name
            if data is not None:
                atomic_write_bytes(path, data)
            elif path.exists():
                path.unlink()
        if not before.created:
            if not before.hydra_dir_existed:
                os.rmdir(before.hydra_dir)
            return "its run directory's .hydra/ is as it was before this launch"
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # the other ranks write their error line into the
            os.rmdir(before.hydra_dir)                   # job log now or in a moment: it stays, with them
            return "no .hydra/ is left in the run directory it created"
        for name in (before.job_log, LOCK_FILE):
            if name:
                (before.run_dir / name).unlink(missing_ok=True)
    except OSError:
        return None
    # only if empty: anything else there stays, with its parents
    return "the run directory it created is removed" if remove_empty_dirs([before.hydra_dir, *before.created]) else None


# --- a SLURM sweep whose submission sbatch refused ----------------------------------------------------

SWEEP_FILE = "multirun.yaml"  # Hydra's record of the latest sweep: the sweep report lists its points


@dataclass
class _SweepBefore:
    sweep_dir: Path
    created: list[Path]  # the sweep directory and the parents this launch creates, innermost first
    multirun: Optional[bytes]  # multirun.yaml before this launch; None: not there
    # each submitit folder: its entries before this launch, and the directories making it creates
    submitit: dict[Path, tuple[set[str], list[Path]]] = field(default_factory=dict)


_SWEEP_BEFORE: Optional[_SweepBefore] = None


def remember_sweep(sweep_dir: str | Path, submitit_dirs: list[str]) -> None:
    """Before a submitit launcher writes into ``sweep_dir``: its ``multirun.yaml``, which directories
    the launch creates, and what ``submitit_dirs`` (its submission folders, ``%j`` cut off) hold."""
    global _SWEEP_BEFORE
    path = Path(os.path.abspath(sweep_dir))
    try:
        multirun: Optional[bytes] = (path / SWEEP_FILE).read_bytes()
    except OSError:
        multirun = None
    before = _SweepBefore(path, dirs_to_create(path), multirun)
    for d in submitit_dirs:
        folder = Path(os.path.abspath(d))
        try:
            entries = set(os.listdir(folder))
        except OSError:
            entries = set()
        before.submitit[folder] = (entries, dirs_to_create(folder))
    _SWEEP_BEFORE = before


def undo_refused_submission() -> Optional[str]:
    """After sbatch refused the sweep's submission (nothing queued): the sweep directory as it was, with
    the earlier sweep's ``multirun.yaml`` (the sweep report's list of points) and without the batch
    script and pickles this launch wrote; a directory it created goes. Returns what was done, or None."""
    global _SWEEP_BEFORE
    before, _SWEEP_BEFORE = _SWEEP_BEFORE, None
    if before is None:
        return None
    try:
        if before.multirun is not None:
            atomic_write_bytes(before.sweep_dir / SWEEP_FILE, before.multirun)
        else:
            (before.sweep_dir / SWEEP_FILE).unlink(missing_ok=True)
        for folder, (entries, created) in before.submitit.items():
            for name in (set(os.listdir(folder)) - entries) if folder.is_dir() else set():
                if (folder / name).is_file():  # a job's own folder (%j) would mean it was queued: kept
                    (folder / name).unlink()
            remove_empty_dirs([d for d in created if before.sweep_dir in d.parents])  # the sweep dir's: below
    except OSError:
        return None
    if before.created:
        return "the sweep directory it created is removed" if remove_empty_dirs(before.created) else None
    return "the sweep directory is as it was before this launch"
