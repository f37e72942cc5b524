"""Shared launcher preamble: make the repo importable, strip launcher args, set the environment."""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from pipeline.engine.distributed import setup_environment, strip_launcher_args  # noqa: E402

sys.argv = strip_launcher_args(sys.argv)
setup_environment()

CONFIG_PATH = os.path.join(REPO, "conf")


def run_main(fn) -> None:
    """Run ``fn`` and turn the pipeline's known errors into one clear line and exit code 2, and a
    Ctrl-C that stops at once (outside training, or pressed twice) into one line and exit code 130."""
    from pipeline.errors import USER_ERRORS, exit_interrupted, exit_with

    global _TASK_STARTED
    _TASK_STARTED = True
    try:
        fn()
    except USER_ERRORS as exc:
        exit_with(exc, str(exc))
    except KeyboardInterrupt:
        exit_interrupted()


_TASK_STARTED = False


def launch(main) -> None:
    """Run a ``@hydra.main`` entry point. A config that does not compose (an unknown group option or
    key, a value of the wrong type, a malformed override) is bad input like any other: one line
    and exit code 2, where Hydra would print a block of text and exit 1. With HYDRA_FULL_ERROR set
    by the user, Hydra's own report (with the traceback) is kept."""
    from pipeline.errors import exit_with
    from pipeline.hydra_errors import COMPOSE_ERRORS, compose_error_line

    user_full_error = bool(os.environ.get("HYDRA_FULL_ERROR"))
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing and exiting 1
    try:
        main()
    except COMPOSE_ERRORS as exc:
        if user_full_error or _TASK_STARTED:  # raised by the job itself: a bug, keep the traceback
            raise
        exit_with(exc, compose_error_line(exc))
    finally:
        if not user_full_error:  # not passed on as if the user had asked for it
            os.environ.pop("HYDRA_FULL_ERROR", None)
