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
from pipeline.engine.trainer import NonFiniteLossError
from pipeline.models.attention import AttentionBackendError
from pipeline.models.loading import ModelLoadError

USER_ERRORS = (ConfigError, DataError, ModelLoadError, CheckpointError, NonFiniteLossError, ExportError,
               PreflightError, PromptFormatError, AttentionBackendError)


def exit_with(exc: BaseException, message: str) -> NoReturn:
    """Print the one-line form, ``error (<Type>, rank <r>): <message>``, on stderr and exit with 2."""
    print(f"error ({type(exc).__name__}, rank {os.environ.get('RANK', '0')}): {message}", file=sys.stderr, flush=True)
    sys.exit(2)
