"""The error types a user can cause (bad config, data, model, checkpoint, NaN loss).

Launchers print these as one line naming the cause and exit with code 2 instead of a traceback.
"""

import json
import os
import sys
import time
from typing import NoReturn

from pipeline.config import ConfigError
from pipeline.data.loaders import DataError
from pipeline.data.prompt_formats import PromptFormatError
from pipeline.engine.checkpoint import CheckpointError
from pipeline.engine.distributed import node_local_rank
from pipeline.engine.export import ExportError
from pipeline.engine.preflight import PreflightError
from pipeline.engine.teacher_cache import TeacherCacheError
from pipeline.engine.trainer import EXIT_INTERRUPTED, NonFiniteLossError
from pipeline.eval.lm_eval_bridge import LmEvalError
from pipeline.messages import error_line  # noqa: F401  (launchers import it from here)
from pipeline.models.attention import AttentionBackendError
from pipeline.models.loading import ModelLoadError

USER_ERRORS = (ConfigError, DataError, ModelLoadError, CheckpointError, NonFiniteLossError, ExportError,
               PreflightError, PromptFormatError, AttentionBackendError, LmEvalError, TeacherCacheError)


class SweepJobFailed(RuntimeError):
    """A job of a submitit (SLURM) sweep stopped with a user error; the message is its error line.
    Raised in the job instead of exiting, so that Hydra records it as the job's outcome and the
    launcher learns of it (an exit leaves submitit no result to read)."""


# errors every rank of a node meets alike, from the same config, data, model files, checkpoint meta and
# installed packages (an attention backend or input the model needs)
SAME_ON_EVERY_RANK = (ConfigError, DataError, PromptFormatError, ModelLoadError, AttentionBackendError)
# how long another rank waits for the launcher to end it once rank 0 has reported the same error:
# deepspeed's launch.py polls its ranks each second, torchrun's agent every 0.1 s
SPOKEN_FOR_S = 5.0


def on_every_rank(exc: BaseException) -> bool:
    """Whether every rank of the job meets ``exc`` alike: a :data:`SAME_ON_EVERY_RANK` type, or an error
    raised with ``every_rank=True`` (a refused resume, a held run directory)."""
    return isinstance(exc, SAME_ON_EVERY_RANK) or bool(getattr(exc, "every_rank", False))


def exit_with(exc: BaseException, message: str, every_rank: bool = False) -> NoReturn:
    """Print :func:`error_line` on stderr and exit with 2. An error every rank meets alike (a bad
    config, a refused resume) is printed by rank 0 at once; another rank first gives the launcher
    :data:`SPOKEN_FOR_S` seconds to end it (it does, as rank 0 exited), so N ranks print one line,
    not N — and where rank 0 did not fail, the line still comes, a few seconds late (``every_rank``:
    the caller knows every rank fails alike, e.g. an override Hydra cannot compose; an error raised with
    ``every_local_rank=True``, such as a node's memory, is printed by each node's local rank 0). Under
    torchrun the line also goes to the agent's error file, which its failure summary shows."""
    line = error_line(exc, message)
    _record_for_torchrun(line)
    spoken_for = ((every_rank or on_every_rank(exc)) and os.environ.get("RANK", "0") != "0") or (
        getattr(exc, "every_local_rank", False) and node_local_rank() != 0)
    if spoken_for:
        try:
            time.sleep(SPOKEN_FOR_S)
        except KeyboardInterrupt:  # a Ctrl-C meanwhile (deepspeed sends it to every rank): say it and stop
            pass
    print(line, file=sys.stderr, flush=True)
    sys.exit(2)


def _record_for_torchrun(line: str) -> None:
    """Write ``line`` where torchrun's agent reads a failed rank's error (torch.distributed.elastic's
    error-file format), so its summary shows it instead of "To enable traceback see ..."."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as f:
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                   "timestamp": str(int(time.time()))}}}, f)
    except OSError:
        pass  # the line still goes to stderr


def exit_interrupted() -> NoReturn:
    """A Ctrl-C that stopped the job at once: one line on stderr, exit code 130 (no traceback).
    (A single Ctrl-C during training checkpoints first: :class:`pipeline.engine.trainer.StopSignals`.)"""
    print(f"interrupted (Ctrl-C, rank {os.environ.get('RANK', '0')}): stopped at once; a re-run of the same "
          f"command resumes from the newest complete checkpoint, if any", file=sys.stderr, flush=True)
    sys.exit(EXIT_INTERRUPTED)
