"""Run logging: console (python logging) and wandb (offline unless an API key is configured)."""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

log = logging.getLogger("pipeline")

# The console/file format of every launcher; ``%(rank)s`` is filled in by :class:`RankFilter`.
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s]%(rank)s - %(message)s"


# ``log.warning(..., extra=SAME_ON_EVERY_RANK)``: a warning every rank reaches alike (it follows from
# the config or the data, which all ranks share) is written by rank 0 only, not once per rank
SAME_ON_EVERY_RANK = {"same_on_every_rank": True}


class RankFilter(logging.Filter):
    """Multi-rank runs log once: rank 0 passes every record, the other ranks only warnings and
    errors, tagged with their rank (``[rank 3]``) since those are the ones that can differ between
    ranks; a warning logged with ``extra=SAME_ON_EVERY_RANK`` cannot, and stays on rank 0. Without
    it every rank of an N-rank launch writes each info line, N times over, into the same console and
    the same ``train.log``. Sets ``record.rank`` ("" on rank 0) for
    :data:`LOG_FORMAT`; the rank is read per record from ``RANK`` (set for every launch by
    ``pipeline.engine.distributed.setup_environment``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank = int(os.environ.get("RANK", "0") or 0)
        record.rank = f"[rank {rank}]" if rank else ""
        return rank == 0 or (record.levelno >= logging.WARNING and not getattr(record, "same_on_every_rank", False))


def configure_console(stream: Any = None) -> None:
    """For launchers without Hydra: INFO to ``stream`` (stderr) in :data:`LOG_FORMAT`, through
    :class:`RankFilter` (Hydra's launchers get the same from ``conf/config.yaml``)."""
    import sys

    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(RankFilter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])


WANDB_ID_FILE = "wandb_run_id"  # in the run directory: the wandb run a resumed attempt continues


class RunLogger:
    """Logs scalars to wandb on the main process; a no-op elsewhere or when disabled.

    ``run_name``: the wandb run's name (the run directory below ``output_dir``, so a sweep's points
    are told apart); ``group``: the experiment. ``resume``: the run resumes from a checkpoint, so it
    continues the wandb run its earlier attempt opened (its id is kept in the run directory) instead
    of opening another one per preemption; a run that starts from step 0 opens a new one."""

    def __init__(self, cfg: Any, run_dir: str, run_name: str, config: dict, enabled: bool,
                 resume: bool = False, group: Optional[str] = None) -> None:
        self._wandb = None
        if not (enabled and cfg.wandb):
            return
        mode = wandb_mode(cfg.wandb_mode)
        if mode == "disabled":
            return
        try:
            import wandb

            run_id = _wandb_run_id(run_dir, resume)
            self._wandb = wandb.init(
                project=cfg.project, entity=cfg.entity, name=run_name, group=group, dir=run_dir, mode=mode,
                id=run_id, resume="allow", config=config, reinit="finish_previous",
                settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
            )
        except Exception as exc:  # wandb must never kill a training run
            log.warning("wandb disabled: %s", exc)
            self._wandb = None

    def log(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def update_config(self, values: dict[str, Any]) -> None:
        """Settings known only once the run has chosen them (``tau=auto``'s τ), over the configured ones."""
        if self._wandb is not None:
            self._wandb.config.update(values, allow_val_change=True)

    def summary(self, metrics: dict[str, Any]) -> None:
        if self._wandb is not None:
            for k, v in metrics.items():
                self._wandb.summary[k] = v

    def finish(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


_WANDB_MODES = ("online", "offline", "disabled")


def wandb_mode(configured: str) -> str:
    """The wandb mode a run uses: ``logging.wandb_mode`` when set; for ``auto`` the environment's
    ``WANDB_MODE`` when it names a mode (an explicit ``WANDB_MODE=offline`` stays offline with an API
    key configured, ``disabled`` writes nothing), else online with ``WANDB_API_KEY`` and offline without."""
    if configured != "auto":
        return configured
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in _WANDB_MODES:
        return env
    if env == "dryrun":  # wandb's older name for offline
        return "offline"
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def _wandb_run_id(run_dir: str, resume: bool) -> str:
    """The wandb run id of ``run_dir``: the one its earlier attempt wrote when this attempt resumes,
    else a new one (written for a later attempt)."""
    import uuid
    from pathlib import Path

    from pipeline.io import atomic_write_text

    path = Path(run_dir) / WANDB_ID_FILE
    if resume and path.is_file():
        kept = path.read_text().strip()
        if kept:
            return kept
    run_id = uuid.uuid4().hex[:16]  # wandb ids: lowercase letters and digits
    atomic_write_text(path, run_id + "\n")
    return run_id
