"""Hydra callbacks: checks that must run after the config is composed but before Hydra creates the
run directory (``.hydra/``, the job log), so a bad choice leaves nothing behind."""

from __future__ import annotations

import os
import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def _check(config: DictConfig) -> None:
    from pipeline.errors import USER_ERRORS
    from pipeline.models.attention import check_available

    name = config.get("kernels", {}).get("attention", "auto")
    try:
        check_available(str(name))
    except USER_ERRORS as exc:  # the launcher's one-line form (launchers/_bootstrap.run_main)
        print(f"error ({type(exc).__name__}, rank {os.environ.get('RANK', '0')}): {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


class EarlyChecks(Callback):
    """``kernels.attention`` names a backend that can run here (e.g. flash-attn is installed)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check(config)
