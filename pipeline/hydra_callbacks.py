"""Hydra callbacks: checks that must run after the config is composed but before Hydra creates the
run directory (``.hydra/``, the job log), so a bad choice leaves nothing behind. A ``-m`` sweep checks
every job's config before the first job runs (or is submitted to SLURM): a bad value in job 5 would
otherwise stop the sweep after jobs 1-4 had run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pipeline.eval.sweep import sweep_jobs


def _check(config: DictConfig, where: str = "") -> None:
    """What :func:`pipeline.inputs.check_before_loading` checks: values, attention backend, model paths."""
    from pipeline.errors import USER_ERRORS, exit_with
    from pipeline.inputs import check_before_loading

    try:
        check_before_loading(config)
    except USER_ERRORS as exc:
        exit_with(exc, f"{where}{exc}")


def _check_sweep(config: DictConfig, jobs: Sequence[Sequence[str]]) -> None:
    from hydra.core.global_hydra import GlobalHydra

    from pipeline.config_base import ConfigError
    from pipeline.errors import exit_with
    from pipeline.hydra_errors import COMPOSE_ERRORS, compose_error_line

    loader = GlobalHydra.instance().config_loader()
    dirs: dict[str, int] = {}
    for i, job in enumerate(jobs, 1):
        where = f"sweep job {i} of {len(jobs)} ({' '.join(job)}): "
        try:
            job_config = loader.load_sweep_config(config, list(job))
        except COMPOSE_ERRORS as exc:  # a swept value of the wrong type; Hydra would only warn about it
            exit_with(exc, where + compose_error_line(exc))  # here and fail later, after writing the sweep dir
        _check(job_config, where)
        run_dir = _job_dir(job_config, i - 1)
        if run_dir is not None and run_dir in dirs:
            # the second point would resume (or skip as finished) the first's run and report it as its own
            exit_with(ConfigError(), f"{where}the same run directory as sweep job {dirs[run_dir]} ({run_dir}): they "
                      f"differ only in keys left out of the directory name (hydra.job.config.override_dirname."
                      f"exclude_keys: data.path, model.path, cache_dir, ...); name the points, e.g. "
                      rf"hydra.sweep.subdir=job_\${{hydra.job.num}}")
        if run_dir is not None:
            dirs[run_dir] = i


def _job_dir(job_config: DictConfig, num: int) -> Optional[str]:
    """The run directory Hydra's launcher will give this job (``hydra.sweep.dir``/``subdir``, with
    ``hydra.job.num`` as the launcher sets it); None when it names something only the running job
    knows (an interpolation that cannot resolve here: that sweep is not checked for shared dirs)."""
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    with open_dict(job_config):
        job_config.hydra.job.num = num
        job_config.hydra.job.id = f"job_{num}"
    try:
        return f"{OmegaConf.select(job_config, 'hydra.sweep.dir')}/{OmegaConf.select(job_config, 'hydra.sweep.subdir')}"
    except (OmegaConfBaseException, ValueError):
        return None


def _check_launcher_settings(config: DictConfig) -> None:
    """What only the launcher decides: launchers/eval.py writes results.json, report.md and
    eval_details.json into its run directory, and one that holds a training run (run_name defaults to
    the training run's) would lose that run's results (its steps, times and training record) to the
    evaluation's; launchers/train.py ignores continual.requests."""
    from pathlib import Path

    from pipeline.config_base import ConfigError
    from pipeline.errors import exit_with

    if config.hydra.job.get("name") == "train" and config.get("continual", {}).get("requests"):
        # read by launchers/continual.py only: the plain job would unlearn data.forget_split, silently
        exit_with(ConfigError(), f"config error at 'continual.requests': {list(config.continual.requests)} is read by "
                  "launchers/continual.py (a sequence of requests); launchers/train.py unlearns data.forget_split once")
    if config.hydra.job.get("name") != "eval":
        return
    run_dir = Path(str(config.hydra.run.dir))
    trained = [n for n in ("train_history.json", "checkpoints", "finished.json") if (run_dir / n).exists()]
    if trained:
        exit_with(ConfigError(), f"run_name={config.run_name}: {run_dir} holds a training run ({trained[0]}); "
                  f"evaluating there would replace its results.json: pass another run_name "
                  f"(e.g. run_name={config.run_name}_eval)")


LAUNCHED_SWEEP: Optional[str] = None  # the sweep directory this process launched into (for its error report)


class EarlyChecks(Callback):
    """The composed config's values, its attention backend (e.g. flash-attn is installed) and its
    model paths, before anything is written; for a sweep, every job's."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check(config)
        _check_launcher_settings(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global LAUNCHED_SWEEP
        LAUNCHED_SWEEP = str(config.hydra.sweep.dir)
        jobs = sweep_jobs(config)
        if jobs:
            _check_sweep(config, jobs)
        else:
            _check(config)
