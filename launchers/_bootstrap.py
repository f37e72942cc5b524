"""Shared launcher preamble: make the repo importable, strip launcher args, set the environment."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path


def _interrupted_while_starting(signum, frame) -> None:  # noqa: ARG001
    """Ctrl-C while the launcher imports its libraries (torch, hydra: seconds): one line and exit
    130, not a KeyboardInterrupt traceback from deep inside an import. Nothing has been written yet."""
    print(f"interrupted (Ctrl-C, rank {os.environ.get('RANK', '0')}): stopped while starting; nothing was written",
          file=sys.stderr, flush=True)
    os._exit(130)


signal.signal(signal.SIGINT, _interrupted_while_starting)  # until run_main / launch take over

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from pipeline.config_base import ConfigError  # noqa: E402
from pipeline.engine.distributed import setup_environment, strip_launcher_args  # noqa: E402

sys.argv = strip_launcher_args(sys.argv)
try:
    setup_environment()
except ConfigError as exc:  # e.g. more ranks on a node than GPUs: every rank alike, one line, exit 2
    from pipeline.errors import exit_with

    exit_with(exc, str(exc), every_rank=True)

CONFIG_PATH = os.path.join(REPO, "conf")


def run_main(fn) -> None:
    """Run ``fn`` and turn the pipeline's known errors into one clear line and exit code 2, and a
    Ctrl-C that stops at once (outside training, or pressed twice) into one line and exit code 130.
    In a sweep run by this process (Hydra's local launcher, one rank) a job's error is reported and
    the next job runs; :func:`launch` exits with 2 at the end. In a submitit job of several ranks, a
    failure every rank may not share ends the job (:func:`_end_the_step`). The line also goes to the
    job's log file, where the sweep report looks for failures."""
    from pipeline.engine.trainer import outside_training_stops
    from pipeline.errors import (
        USER_ERRORS,
        SweepJobFailed,
        error_line,
        exit_interrupted,
        exit_with,
        on_every_rank,
    )
    from pipeline.eval.sweep import ATTEMPT_STARTED

    global _TASK_STARTED
    _TASK_STARTED = True
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here Ctrl-C is handled below
    # the job log gathers every attempt (Hydra appends): the sweep report reads failures after this line only
    _log_to_files(ATTEMPT_STARTED, logging.INFO)
    try:
        with outside_training_stops():  # a scheduler's signal: one line and exit 124 (training checkpoints first)
            fn()
    except USER_ERRORS as exc:
        line = error_line(exc, str(exc))
        ends_the_step = bool(os.environ.get("SUBMITIT_EXECUTOR")) and _job_ranks() > 1 and not on_every_rank(exc)
        if not (ends_the_step and _peer_failed_first()):
            _log_to_files(line)
        if _IN_LAUNCH and _local_sweep():
            print(line, file=sys.stderr, flush=True)
            from hydra.core.hydra_config import HydraConfig

            _FAILED_JOBS.append(HydraConfig.get().runtime.output_dir)
            return
        if os.environ.get("SUBMITIT_EXECUTOR"):
            print(line, file=sys.stderr, flush=True)
            if not ends_the_step:
                # a submitit job: exiting would leave submitit no result, and the launcher would wait on SLURM's
                # accounting for the job's state (forever where accounting is off); Hydra records this instead
                raise SweepJobFailed(line) from None
            _end_the_step(line, 2)  # maybe this rank's alone
        from pipeline.launch_record import undo_if_untouched

        undone = undo_if_untouched()  # refused before its run began: Hydra's record as it was
        if undone:
            _log_to_files(f"refused before the run began: {undone}", logging.INFO)
        exit_with(exc, str(exc))
    except KeyboardInterrupt:
        exit_interrupted()
    except Exception as exc:
        if not (os.environ.get("SUBMITIT_EXECUTOR") and _job_ranks() > 1):
            raise
        import traceback

        trace = traceback.format_exc()
        print(trace, file=sys.stderr, end="", flush=True)
        if not _peer_failed_first():  # the sweep report's failure, as a user error's: one line
            from pipeline.messages import first_line

            _log_to_files(error_line(exc, first_line(exc)))
        _end_the_step(trace, 1)


def _peer_failed_first() -> bool:
    """Whether another rank of this submitit job ended it already (:func:`_end_the_step` wrote its error
    as this task's result too): this rank's error is its consequence (gloo's "Connection reset by peer"
    in the next collective), kept out of the job log, where the sweep report reads the cause."""
    import time

    try:
        import submitit

        own = submitit.JobEnvironment().paths.result_pickle
    except Exception:  # noqa: BLE001  (not a submitit task after all: nothing recorded)
        return False
    for _ in range(10):  # a peer on another node: its write may take a moment to show on a shared filesystem
        if own.exists():
            return True
        time.sleep(0.2)
    return False


def _end_the_step(error: str, code: int) -> None:
    """A rank of a submitit job of several ranks failed, maybe alone (an out-of-memory error, its own
    checkpoint shard): end the job now. Returning the error to Hydra (which records it as the job's
    outcome) exited 0 and left the other ranks waiting in their next collective for
    deepspeed.timeout_minutes (60). Instead: ``error`` goes into every task's submitit result that has
    none yet (the launcher reads task 0's first; with no result it waits on SLURM's accounting, forever
    where there is none), then this process exits with ``code``, and srun ends the other ranks
    (SLURM_KILL_BAD_EXIT=1, conf/hydra/launcher/slurm.yaml). ``os._exit``: nothing left running (a
    library's thread) may keep the process, and the job, alive."""
    try:
        import submitit
        from submitit.core import utils as submitit_utils

        job = submitit.JobEnvironment()
        tasks = [job.global_rank] + [t for t in range(job.num_tasks) if t != job.global_rank]  # its own first
        paths = [submitit_utils.JobPaths(os.environ["SUBMITIT_FOLDER"], job.job_id, t).result_pickle for t in tasks]
    except Exception as exc:  # noqa: BLE001  (the exit below still ends the step)
        print(f"(the failure could not be recorded for submitit: {exc})", file=sys.stderr)
        paths = []
    for path in paths:
        _record_failure(path, error)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()  # the job log's last lines
    os._exit(code)


def _record_failure(path: Path, error: str) -> None:
    """``("error", error)`` as the submitit result ``path`` unless one is there: written to a temporary
    file of this process's own (two ranks failing at once would race on submitit's fixed ``.save_tmp``)
    and linked into place, which never replaces another rank's."""
    import tempfile

    from submitit.core import utils as submitit_utils

    tmp = None
    try:
        if path.exists():
            return
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        os.close(fd)
        submitit_utils.cloudpickle_dump(("error", error), tmp)
        os.link(tmp, path)
    except FileExistsError:  # another rank's came first
        pass
    except Exception as exc:  # noqa: BLE001  (the exit still ends the step; the launcher then waits on SLURM)
        print(f"(the failure could not be recorded for submitit in {path}: {exc})", file=sys.stderr)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _job_ranks() -> int:
    """Ranks of this SLURM job (one per task, as pipeline.engine.distributed sets them up)."""
    try:
        return int(os.environ.get("SLURM_NTASKS", "1"))
    except ValueError:
        return 1


_TASK_STARTED = False
_IN_LAUNCH = False  # launch() runs Hydra in this process (not a submitit job process)
_FAILED_JOBS: list[str] = []  # run directories of this process's sweep jobs that stopped with a user error


def _local_sweep() -> bool:
    """A ``-m`` sweep whose jobs run one after another in this single-rank process."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
            and os.environ.get("WORLD_SIZE", "1") == "1")


def _log_to_files(line: str, level: int = logging.ERROR) -> None:
    """``line`` into the job's log file(s) only (stderr already gets it once, or needs it not)."""
    record = logging.LogRecord("pipeline", level, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _sbatch_refusal(exc: Exception) -> str | None:
    """sbatch's first error line when ``exc`` is submitit's report that sbatch refused the sweep's
    submission (it exited non-zero: a partition, account or limit the cluster refuses, no controller),
    else None. (sbatch exiting 0 without a job id submitit can read may have queued the array: not a
    refusal.)"""
    import subprocess

    cause = exc.__cause__
    if isinstance(cause, subprocess.CalledProcessError) and cause.cmd and os.path.basename(str(cause.cmd[0])) == "sbatch":
        lines = [ln.strip() for ln in str(cause.stderr or "").splitlines() if ln.strip()]
        line = next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else "")
        return line[:200] or f"sbatch exit code {cause.returncode}"
    return None


def _exit_slurm_sweep_failed(exc: Exception) -> None:
    """A job of a submitit sweep failed: it stopped with a user error (Hydra raises the first one
    once every job has ended), or ended without a result (the launcher raises at the first one it
    waits for, with submitit's traceback, while the others go on). Each failed job's own error
    line from the sweep directory, then one line, exit code 2."""
    from pipeline.errors import SweepJobFailed
    from pipeline.eval.sweep import gather
    from pipeline.hydra_callbacks import LAUNCHED_SWEEP

    refusal = _sbatch_refusal(exc)
    if refusal is not None:  # the sweep is one job array: nothing was queued (sbatch's own lines are above)
        from pipeline.launch_record import undo_refused_submission

        undone = undo_refused_submission()
        print(f"error (SweepError, rank 0): SLURM sweep into {LAUNCHED_SWEEP}: sbatch refused the submission "
              f"({refusal}): no job was submitted" + (f" ({undone})" if undone else "") +
              "; the same command submits the sweep once that is fixed", file=sys.stderr, flush=True)
        sys.exit(2)
    # this sweep's jobs only: a sweep directory may hold an earlier sweep's points too
    failed = [p for p in gather(LAUNCHED_SWEEP) if p.status == "failed" and p.job is not None] if LAUNCHED_SWEEP else []
    for p in failed:
        print(f"  sweep {p.name}: {p.note}", file=sys.stderr)
    what = (f"{len(failed)} job(s) failed ({', '.join(p.name for p in failed)}; above)" if failed
            else f"a job failed ({str(exc).strip().splitlines()[0][:160]})")
    others = ("every job has ended" if isinstance(exc, SweepJobFailed)
              else "jobs still queued or running go on (squeue); once they end")
    print(f"error (SweepError, rank 0): SLURM sweep into {LAUNCHED_SWEEP}: {what}; {others}: python "
          f"launchers/report.py {LAUNCHED_SWEEP}", file=sys.stderr, flush=True)
    sys.exit(2)


def _raised_by_hydra(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside Hydra's own code (its innermost frame is in the hydra package)."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f"{os.sep}hydra{os.sep}" in tb.tb_frame.f_code.co_filename


def _hydra_setup_error(exc: BaseException) -> bool:
    """Whether ``exc`` came from Hydra setting up the job (its run directory, ``.hydra/``, the job
    log): raised through Hydra's code and none of ours (our callbacks re-raise what they do not
    expect, to keep its traceback)."""
    files, tb = [], exc.__traceback__
    while tb is not None:
        files.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    ours = os.path.join(REPO, "pipeline") + os.sep
    return any(f"{os.sep}hydra{os.sep}" in f for f in files) and not any(f.startswith(ours) for f in files)


@contextlib.contextmanager
def ranks_leave() -> Iterator[None]:
    """Around a launcher's work: a process of a launch of several ranks then ends without the
    interpreter's teardown (pipeline.engine.distributed): together and with exit 0 when the work
    returns, alone with its code when it exits (a refusal's 2, a preemption's 124, a Ctrl-C's 130).
    With one rank, or no process group, it ends as Python does. (The errors :func:`launch` reports
    come before any process group: its own handlers' exits need none of this.)"""
    from pipeline.engine.distributed import leave_alone, leave_together

    try:
        yield
    except SystemExit as exc:
        leave_alone(exc.code)
        raise
    leave_together()


def launch(main) -> None:
    """Run a ``@hydra.main`` entry point. A config that does not compose (an unknown group option or
    key, a value of the wrong type, a malformed override) is bad input like any other: one line
    and exit code 2, where Hydra would print a block of text and exit 1. With HYDRA_FULL_ERROR set
    by the user, Hydra's own report (with the traceback) is kept. A rank of several ends as
    :func:`ranks_leave` says."""
    from pipeline.errors import exit_with
    from pipeline.hydra_errors import COMPOSE_ERRORS, compose_error_line

    global _IN_LAUNCH
    signal.signal(signal.SIGINT, signal.default_int_handler)  # imports done: Hydra and run_main handle Ctrl-C
    user_full_error = bool(os.environ.get("HYDRA_FULL_ERROR"))
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing and exiting 1
    _IN_LAUNCH = True
    try:
        with ranks_leave():
            main()
            if _FAILED_JOBS:
                print(f"error (SweepError, rank 0): {len(_FAILED_JOBS)} sweep job(s) stopped with an error (above; "
                      f"the others ran): {', '.join(_FAILED_JOBS)}", file=sys.stderr, flush=True)
                sys.exit(2)
    except COMPOSE_ERRORS as exc:
        if user_full_error or _TASK_STARTED:  # raised by the job itself: a bug, keep the traceback
            raise
        exit_with(exc, compose_error_line(exc), every_rank=True)
    except ValueError as exc:
        # Hydra's own command-line checks (e.g. "-m ... --cfg job": "Only one of --run, --multirun,
        # --cfg, ... can be specified") raise a plain ValueError before any job starts
        cause = exc.__cause__ or exc.__context__
        if not (user_full_error or _TASK_STARTED) and isinstance(cause, OSError) and _hydra_setup_error(exc):
            # logging.config's "Unable to configure handler 'file'": the run directory's job log cannot
            # be opened (a directory the user cannot write to, another user's run)
            exit_with(cause, f"cannot open the run's log file: {cause}")
        if user_full_error or _TASK_STARTED or not _raised_by_hydra(exc):
            raise
        from pipeline.messages import first_line

        exit_with(exc, first_line(exc), every_rank=True)
    except OSError as exc:
        if user_full_error or _TASK_STARTED or not _hydra_setup_error(exc):
            raise
        # before the job starts: Hydra creating the run directory or writing its .hydra/ record
        exit_with(exc, f"cannot set up the run directory: {exc}")
    except Exception as exc:
        from pipeline.errors import SweepJobFailed

        if user_full_error or not (isinstance(exc, SweepJobFailed) or type(exc).__module__.startswith("submitit")):
            raise
        _exit_slurm_sweep_failed(exc)
    finally:
        if not user_full_error:  # not passed on as if the user had asked for it
            os.environ.pop("HYDRA_FULL_ERROR", None)
