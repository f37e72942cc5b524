"""Hydra callbacks: checks that must run after the config is composed but before Hydra creates the
run directory (``.hydra/``, the job log), so a bad choice leaves nothing behind. A ``-m`` sweep checks
every job's config before the first job runs (or is submitted to SLURM): a bad value in job 5 would
otherwise stop the sweep after jobs 1-4 had run."""

from __future__ import annotations

import atexit
import errno
import logging
import os
from collections.abc import Sequence
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pipeline.eval.sweep import sweep_jobs
from pipeline.io import RUN_CONFIG, dirs_to_create, remove_empty_dirs

log = logging.getLogger(__name__)


def _check(config: DictConfig, where: str = "") -> None:
    """What :func:`pipeline.inputs.check_before_loading` checks: values, attention backend, model paths."""
    from pipeline.errors import USER_ERRORS, exit_with
    from pipeline.inputs import check_before_loading

    try:
        check_before_loading(config)
    except USER_ERRORS as exc:
        exit_with(exc, f"{where}{exc}")
    except OSError as exc:  # a configured path the file system refuses (raised here, Hydra would only warn
        if exc.errno != errno.ENAMETOOLONG:  # about it and go on to its own traceback at the job's mkdir)
            raise
        from pipeline.config_base import ConfigError

        path = os.fsencode(str(exc.filename or ""))
        shown = os.fsdecode(path) if len(path) <= 300 else f"{os.fsdecode(path[:200])}...{os.fsdecode(path[-60:])}"
        exit_with(ConfigError(), f"{where}a configured path is too long for the file system: {shown!r} ({len(path)} "
                  f"bytes; a name may have 255 bytes (NAME_MAX), a path 4095 (PATH_MAX)): shorten output_dir, "
                  f"run_name or exp_name")


def _check_sweep(config: DictConfig, jobs: Sequence[Sequence[str]]) -> None:
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from pipeline.config_base import ConfigError
    from pipeline.errors import exit_with
    from pipeline.hydra_errors import COMPOSE_ERRORS, compose_error_line

    loader = GlobalHydra.instance().config_loader()
    dirs: dict[str, int] = {}
    named: list[tuple[str, str, str]] = []  # (where, sweep dir, run dir) of each job whose run dir resolves here
    seen: set[tuple] = set()  # SLURM checks made already: a warning once, lm-eval's task index (~30 s) once
    for i, job in enumerate(jobs, 1):
        where = f"sweep job {i} of {len(jobs)} ({' '.join(job)}): "
        try:
            job_config = loader.load_sweep_config(config, list(job))
        except COMPOSE_ERRORS as exc:  # a swept value of the wrong type; Hydra would only warn about it
            exit_with(exc, where + compose_error_line(exc), every_rank=True)  # here and fail later, after writing the sweep dir
        _check(job_config, where)
        run_dir = _job_dir(job_config, i - 1)
        sweep_dir = str(OmegaConf.select(job_config, "hydra.sweep.dir"))
        # the launcher's own guards, on the job's directory (a train -m with continual.requests ran plain
        # jobs; an eval -m into a training sweep replaced every point's results)
        _check_launcher_settings(job_config, where, run_dir or sweep_dir)
        _check_slurm_job(job_config, where, seen)
        if run_dir is not None and run_dir in dirs:
            # the second point would resume (or skip as finished) the first's run and report it as its own
            exit_with(ConfigError(), f"{where}the same run directory as sweep job {dirs[run_dir]} ({run_dir}): they "
                      f"differ only in keys left out of the directory name (hydra.job.config.override_dirname."
                      f"exclude_keys: data.path, model.path, cache_dir, ...); name the points, e.g. "
                      rf"hydra.sweep.subdir=job_\${{hydra.job.num}}")
        if run_dir is not None:
            dirs[run_dir] = i
            named.append((where, sweep_dir, run_dir))
    # after every job's values: a bad value is reported as before, and the name is checked last
    swept = _swept_keys(jobs)
    for where, sweep_dir, run_dir in named:
        _check_dir_name(where, sweep_dir, run_dir, swept)


def _launcher(config: DictConfig) -> tuple[Optional[DictConfig], str]:
    """The job's ``hydra.launcher`` node (None when unset) and its ``_target_`` ('' then)."""
    launcher = OmegaConf.select(config, "hydra.launcher", default=None)
    return launcher, str(launcher.get("_target_", "")) if launcher is not None else ""


def _check_slurm_job(config: DictConfig, where: str, seen: set[tuple]) -> None:
    """A dry run (refused: it would queue jobs to print plans), and what a SLURM job would meet only on
    its node, after its wait in the queue, checked before the sweep is submitted: more ranks per node
    than GPUs (``pipeline.engine.distributed`` stops every such job), an lm-eval task lm-eval does not
    know (the job's start checks it: every job would stop there). Fewer ranks than GPUs runs, with the
    other GPUs allocated and idle: warned. Task data is not looked for here: the submitting host's HF
    cache need not be the nodes'."""
    from pipeline.config_base import ConfigError
    from pipeline.errors import exit_with

    launcher, target = _launcher(config)
    if not target.endswith("SlurmLauncher"):
        return
    if OmegaConf.select(config, "trainer.dry_run", default=False):
        # it would queue one job per point (8 GPUs each by default) to print a plan into a SLURM log
        exit_with(ConfigError(), f"{where}config error at 'trainer.dry_run': a dry run under hydra/launcher=slurm "
                  f"would submit a SLURM job per sweep point to print its plan; drop hydra/launcher=slurm: the dry "
                  f"run then checks and plans every point here, on this host")
    gpus, tasks = launcher.get("gpus_per_node"), launcher.get("tasks_per_node")
    if isinstance(gpus, int) and isinstance(tasks, int) and gpus > 0:
        if tasks > gpus:
            exit_with(ConfigError(), f"{where}config error at 'hydra.launcher.tasks_per_node': {tasks} ranks per node "
                      f"on {gpus} GPUs per node (hydra.launcher.gpus_per_node): every job would stop on its node once "
                      f"it starts (two ranks on one GPU); one rank per GPU: hydra.launcher.tasks_per_node={gpus}")
        if tasks < gpus and ("idle", tasks, gpus) not in seen:
            seen.add(("idle", tasks, gpus))
            log.warning("warning: %d ranks per node on %d GPUs per node: %d GPUs of each node are allocated and idle (one "
                        "rank per GPU: hydra.launcher.tasks_per_node=%d, or fewer: hydra.launcher.gpus_per_node=%d)",
                        tasks, gpus, gpus - tasks, gpus, tasks)
    if OmegaConf.select(config, "eval.enabled", default=False) and OmegaConf.select(config, "eval.lm_eval", default=False):
        from pipeline.eval.lm_eval_bridge import LmEvalError, check_tasks

        include = OmegaConf.select(config, "eval.lm_eval_include_path", default=None) or None
        if include is not None and not isinstance(include, str):
            include = tuple(str(p) for p in include)
        key = ("lm_eval", tuple(config.eval.lm_eval_tasks), include,
               bool(OmegaConf.select(config, "eval.lm_eval_include_defaults", default=True)))
        if key in seen:
            return
        seen.add(key)
        try:
            check_tasks(list(key[1]), key[2], key[3])
        except LmEvalError as exc:
            exit_with(exc, f"{where}{exc}")


def _job_dir(job_config: DictConfig, num: int) -> Optional[str]:
    """The run directory Hydra's launcher will give this job, composed as Hydra's ``run_job`` does:
    ``os.path.join(hydra.sweep.dir, hydra.sweep.subdir)`` resolved in the job's own config (its
    ``hydra.job.override_dirname`` is the one Hydra's config loader computed for it), with
    ``hydra.job.num``/``id`` as the basic launcher sets them and the job's config as the ``${hydra:...}``
    resolver's; None when it names something only the running job knows (an interpolation that cannot
    resolve here: that sweep is not checked for shared dirs or over-long names)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    with open_dict(job_config):
        job_config.hydra.job.num = num
        job_config.hydra.job.id = num
    hydra_config = HydraConfig.instance()
    previous = hydra_config.cfg
    try:
        hydra_config.set_config(job_config)
        return os.path.join(str(OmegaConf.select(job_config, "hydra.sweep.dir")),
                            str(OmegaConf.select(job_config, "hydra.sweep.subdir")))
    except (OmegaConfBaseException, ValueError):
        return None
    finally:
        hydra_config.cfg = previous


# What Hydra itself writes into a job's directory before the job runs; the longest is its overrides file.
_HYDRA_JOB_FILE = os.path.join(".hydra", "overrides.yaml")


def _fs_limits(path: str) -> tuple[int, int]:
    """(NAME_MAX, PATH_MAX) in bytes of the file system ``path`` will be created on (its nearest
    existing ancestor's); 255 and 4096, Linux's, where it cannot say."""
    probe = path
    while probe and not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    limits = []
    for name, default in (("PC_NAME_MAX", 255), ("PC_PATH_MAX", 4096)):
        try:
            value = os.pathconf(probe or os.sep, name)
        except (OSError, ValueError):
            value = -1
        limits.append(value if value > 0 else default)
    return limits[0], limits[1]


def _swept_keys(jobs: Sequence[Sequence[str]]) -> dict[str, set[str]]:
    """The keys whose value differs between the sweep's jobs (in command-line order), with their values."""
    values: dict[str, set[str]] = {}
    for job in jobs:
        for item in job:
            key, _, value = str(item).partition("=")
            values.setdefault(key.lstrip("+~"), set()).add(value)
    return {k: v for k, v in values.items() if len(v) > 1}


def _subdir_suggestion(swept: dict[str, set[str]]) -> str:
    r"""A ``hydra.sweep.subdir`` override naming each point by the swept values only (``$`` quoted for
    the shell), e.g. ``hydra.sweep.subdir=tau_\${method.tau}``; by job number where a swept key is a
    config group (``method=...``), not a plain dotted key, or has a value with ``/`` (a path: it would nest)."""
    import re

    numbered = r"hydra.sweep.subdir=job_\${hydra.job.num}"
    if not swept or len(swept) > 3 or not all(re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", k) for k in swept):
        return numbered
    if any(k.startswith("hydra.") or any("/" in v for v in vs) for k, vs in swept.items()):
        return numbered
    name = "_".join(rf"{k.rsplit('.', 1)[1]}_\${{{k}}}" for k in swept)
    return f"hydra.sweep.subdir={name} (or {numbered})"


def _check_dir_name(where: str, sweep_dir: str, run_dir: str, swept: dict[str, set[str]]) -> None:
    """Refuse a run directory Hydra could not create: a name (one path component: a value with ``/``
    nests the directory) longer than the file system's NAME_MAX bytes, or a path (with the files Hydra
    writes in it) over PATH_MAX. Hydra's own report is ``OSError: [Errno 36] File name too long`` with
    a traceback, when the job is reached: after the jobs before it ran."""
    from pipeline.config_base import ConfigError
    from pipeline.errors import exit_with

    path = os.path.abspath(run_dir)  # hydra.runtime.output_dir, where the job writes
    name_max, path_max = _fs_limits(path)
    sweep_path = os.path.abspath(sweep_dir)
    # the leading components that are the sweep directory's (output_dir, exp_name), not the job's subdir
    in_sweep_dir = sum(1 for c in sweep_path.split(os.sep) if c) if (path + os.sep).startswith(sweep_path + os.sep) else 0
    fix_name = ("fewer or shorter overrides in the name: leave keys out of it (hydra.job.config.override_dirname."
                f"exclude_keys), put fixed settings in an exp config, or name the points, e.g. "
                f"{_subdir_suggestion(swept)}")
    for index, component in enumerate(c for c in path.split(os.sep) if c):
        size = len(os.fsencode(component))
        if size <= name_max:
            continue
        if index < in_sweep_dir:
            what, fix = "the sweep directory's name", "shorten output_dir / exp_name (hydra.sweep.dir)"
        else:
            what, fix = "its run directory's name (hydra.sweep.subdir, the job's override_dirname)", fix_name
        exit_with(ConfigError(), f"{where}{what} {component!r} is {size} bytes, over the file system's limit of "
                  f"{name_max} bytes for one name (NAME_MAX; Hydra would stop with 'OSError: File name too long'): "
                  f"{fix}")
    size = len(os.fsencode(os.path.join(path, _HYDRA_JOB_FILE)))
    if size >= path_max:
        exit_with(ConfigError(), f"{where}its run directory {path!r} is {len(os.fsencode(path))} bytes; with "
                  f"{_HYDRA_JOB_FILE} in it {size}, over the file system's limit of {path_max - 1} bytes for a "
                  f"path (PATH_MAX; Hydra would stop with 'OSError: File name too long'): a shorter sweep directory "
                  f"(output_dir, exp_name, hydra.sweep.dir), or "
                  f"{fix_name}")


def _check_launcher_settings(config: DictConfig, where: str = "", run_dir: Optional[str] = None) -> None:
    """What only the launcher decides: launchers/eval.py writes results.json, report.md and
    eval_details.json into its run directory, and one that holds a training run (run_name defaults to
    the training run's) would lose that run's results (its steps, times and training record) to the
    evaluation's; launchers/train.py ignores continual.requests. ``run_dir``: a sweep job's directory
    (default: ``hydra.run.dir``, a single run's); ``where`` prefixes the message (which sweep job)."""
    from pathlib import Path

    from pipeline.config_base import ConfigError
    from pipeline.errors import exit_with

    if config.hydra.job.get("name") == "train" and config.get("continual", {}).get("requests"):
        # read by launchers/continual.py only: the plain job would unlearn data.forget_split, silently
        exit_with(ConfigError(), f"{where}config error at 'continual.requests': {list(config.continual.requests)} is read by "
                  "launchers/continual.py (a sequence of requests); launchers/train.py unlearns data.forget_split once")
    if run_dir is None:  # a single run's directory, as set
        given = str(OmegaConf.select(config, "hydra.run.dir", default="") or "").strip()
        # empty (an unset shell variable): the run's files would land in the working directory, e.g. the repo
        if not given:
            exit_with(ConfigError(), "config error at 'hydra.run.dir': empty: name the run directory (default: "
                      "<output_dir>/<run_name>; `hydra.run.dir=.` for the working directory)")
        model_path = OmegaConf.select(config, "model.path", default=None)
        if model_path and Path(str(model_path)).expanduser().is_dir() and \
                Path(given).expanduser().resolve() == Path(str(model_path)).expanduser().resolve():
            exit_with(ConfigError(), f"config error at 'hydra.run.dir': {given} is model.path's directory: the run's "
                      f"files (results.json, checkpoints/, model/) would be mixed into the model it starts from")
    if config.hydra.job.get("name") != "eval":
        return
    run_path = Path(str(config.hydra.run.dir) if run_dir is None else run_dir)
    # config.yaml: written by training only, and kept when a failed re-run set the results aside
    trained = [n for n in ("train_history.json", "checkpoints", "finished.json", RUN_CONFIG) if (run_path / n).exists()]
    if trained and run_dir is not None:  # a sweep's job: its directory is the sweep's, not run_name's
        exit_with(ConfigError(), f"{where}{run_path} holds a training run ({trained[0]}); evaluating there would "
                  f"replace its results.json: evaluate into another sweep directory (hydra.sweep.dir=...)")
    if trained:
        exit_with(ConfigError(), f"run_name={config.run_name}: {run_path} holds a training run ({trained[0]}); "
                  f"evaluating there would replace its results.json: pass another run_name "
                  f"(e.g. run_name={config.run_name}_eval)")


LAUNCHED_SWEEP: Optional[str] = None  # the sweep directory this process launched into (for its error report)


class EarlyChecks(Callback):
    """The composed config's values, its attention backend (e.g. flash-attn is installed) and its
    model paths, before anything is written; for a sweep, every job's."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check(config)
        _check_launcher_settings(config)
        _dry_run_writes_nothing(config)
        _remember_the_record(config)
        _refuse_a_run_directory_in_use(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global LAUNCHED_SWEEP
        LAUNCHED_SWEEP = str(config.hydra.sweep.dir)
        jobs = sweep_jobs(config)
        if jobs:
            _check_sweep(config, jobs)
        else:  # another sweeper expands the jobs itself: their names are not known here, the sweep dir's is
            _check(config)
            sweep_dir = str(config.hydra.sweep.dir)
            _check_dir_name("", sweep_dir, sweep_dir, {})
        _remember_the_sweep(config)


def _remember_the_sweep(config: DictConfig) -> None:
    """A submitit sweep: what its directory holds before the launcher writes ``multirun.yaml`` and the
    submission's files, so a submission sbatch refuses puts it back (:mod:`pipeline.launch_record`)."""
    from submitit.core.utils import JobPaths

    from pipeline.launch_record import remember_sweep

    launcher, target = _launcher(config)
    if "submitit" not in target:
        return
    folder = launcher.get("submitit_folder")
    # the folder above the per-job ones (%j, %A, ...), where the submission's own files go
    remember_sweep(str(config.hydra.sweep.dir),
                   [str(JobPaths.get_first_id_independent_folder(str(folder)))] if folder else [])




DRY_RUN_JOBS = ("train", "eval", "continual")  # the launchers (Hydra job names) that honour trainer.dry_run


def _dry_run_writes_nothing(config: DictConfig) -> None:
    """``trainer.dry_run=true`` (a single run; a sweep's jobs compose their own configs) writes no
    ``.hydra/`` and no job log: a dry run into an existing run's directory would replace the
    config.yaml its results came from, and one into a new directory would leave a run without results."""
    from omegaconf import OmegaConf, open_dict, read_write

    if not OmegaConf.select(config, "trainer.dry_run", default=False):
        return
    if OmegaConf.select(config, "hydra.job.name") not in DRY_RUN_JOBS:
        return  # a launcher that does its work whatever trainer.dry_run says (prepare.py) keeps its log
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra.output_subdir = None
        logging_cfg = config.hydra.job_logging
        if "file" in (logging_cfg.get("handlers") or {}):
            del logging_cfg.handlers["file"]
            root = logging_cfg.get("root") or {}
            if "handlers" in root:
                root.handlers = [h for h in root.handlers if h != "file"]
    # Hydra makes the run directory whatever a callback does: the ones it creates go at exit (also
    # after a refusal's exit 2), innermost first, each only if still empty
    atexit.register(remove_empty_dirs, dirs_to_create(str(config.hydra.run.dir)))


def _remember_the_record(config: DictConfig) -> None:
    """Rank 0 of a single run: what Hydra's record in the run directory holds before Hydra writes it, so
    a launch refused before its run began puts it back (:mod:`pipeline.launch_record`)."""
    from omegaconf import OmegaConf, open_dict, read_write

    from pipeline.launch_record import remember

    if os.environ.get("RANK", "0") != "0":  # rank 0 writes the same files: one writer, which a refusal can undo
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.output_subdir = None
        return
    run_dir = str(config.hydra.run.dir)
    job_name = OmegaConf.select(config, "hydra.job.name")
    try:  # Hydra's default is <output_dir>/<job name>.log; the output dir is set only once the job starts
        job_log = OmegaConf.select(config, "hydra.job_logging.handlers.file.filename", throw_on_resolution_failure=True)
    except Exception:  # noqa: BLE001  (${hydra.runtime.output_dir}: not resolvable yet)
        job_log = os.path.join(run_dir, f"{job_name}.log")
    remember(run_dir, OmegaConf.select(config, "hydra.output_subdir"), str(job_log) if job_log else None)


LOCKED_JOBS = ("train", "continual")  # the launchers whose job holds its run directory (pipeline.engine.run_lock)


def _refuse_a_run_directory_in_use(config: DictConfig) -> None:
    """A training (or continual) launch into a directory another launch is running in: refused here,
    on every rank, before Hydra writes ``.hydra/`` and opens the job log there (the job's own lock
    refused it only after Hydra had replaced the running run's ``.hydra/config.yaml`` with the refused
    launch's). Rank 0 takes the lock now and the job keeps it; the other ranks look, past a lock that
    names this launch. They open the job log at their first line only."""
    from omegaconf import OmegaConf, open_dict, read_write

    from pipeline.engine.run_lock import RunDirInUseError, hold_early, in_use
    from pipeline.errors import exit_with

    if OmegaConf.select(config, "hydra.job.name") not in LOCKED_JOBS or OmegaConf.select(config, "trainer.dry_run",
                                                                                        default=False):
        return
    run_dir = str(config.hydra.run.dir)
    problem = hold_early(run_dir) if os.environ.get("RANK", "0") == "0" else in_use(run_dir)
    if problem:
        exit_with(RunDirInUseError(problem, every_rank=True), problem)
    if os.environ.get("RANK", "0") != "0":  # they write no .hydra/ (_remember_the_record)
        with read_write(config.hydra), open_dict(config.hydra):
            # opened at its first line (these ranks log only warnings): nothing of theirs in a directory unused
            handlers = config.hydra.job_logging.get("handlers") or {}
            if "file" in handlers:
                handlers.file.delay = True
