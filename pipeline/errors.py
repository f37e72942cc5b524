"""The error types a user can cause (bad config, data, model, checkpoint, NaN loss).

Launchers print these as one line naming the cause and exit with code 2 instead of a traceback.
"""

import os
import sys
from typing import NoReturn

from pipeline.config import ConfigError
from pipeline.data.loaders import DataError
from pipeline.data.prompt_formats import PromptFormatError
from pipeline.engine.checkpoint import CheckpointError
from pipeline.engine.export import ExportError
from pipeline.engine.preflight import PreflightError
from pipeline.engine.teacher_cache import TeacherCacheError
from pipeline.engine.trainer import EXIT_INTERRUPTED, NonFiniteLossError
from pipeline.eval.lm_eval_bridge import LmEvalError
from pipeline.models.attention import AttentionBackendError
from pipeline.models.loading import ModelLoadError

USER_ERRORS = (ConfigError, DataError, ModelLoadError, CheckpointError, NonFiniteLossError, ExportError,
               PreflightError, PromptFormatError, AttentionBackendError, LmEvalError, TeacherCacheError)


class SweepJobFailed(RuntimeError):
    """A job of a submitit (SLURM) sweep stopped with a user error; the message is its error line.
    Raised in the job instead of exiting, so that Hydra records it as the job's outcome and the
    launcher learns of it (an exit leaves submitit no result to read)."""


def error_line(exc: BaseException, message: str) -> str:
    """The one-line form of a user error: ``error (<Type>, rank <r>): <message>``."""
    return f"error ({type(exc).__name__}, rank {os.environ.get('RANK', '0')}): {message}"


def exit_with(exc: BaseException, message: str) -> NoReturn:
    """Print :func:`error_line` on stderr and exit with 2."""
    print(error_line(exc, message), file=sys.stderr, flush=True)
    sys.exit(2)


def exit_interrupted() -> NoReturn:
    """A Ctrl-C that stopped the job at once: one line on stderr, exit code 130 (no traceback).
    (A single Ctrl-C during training checkpoints first: :class:`pipeline.engine.trainer.StopSignals`.)"""
    print(f"interrupted (Ctrl-C, rank {os.environ.get('RANK', '0')}): stopped at once; a re-run of the same "
          f"command resumes from the newest complete checkpoint, if any", file=sys.stderr, flush=True)
    sys.exit(EXIT_INTERRUPTED)
