"""Hydra's composition errors as one line (the launchers' ``_bootstrap.launch`` prints it, exit 2).

Hydra reports a bad override over several lines (the options of a config group one per line, the
OmegaConf cause with its ``full_key`` and ``object_type`` below it); a user who mistyped a key wants
one line saying which key and what is allowed.
"""

from __future__ import annotations

import re

from hydra.errors import CompactHydraException, MissingConfigException, OverrideParseException
from omegaconf.errors import OmegaConfBaseException

COMPOSE_ERRORS = (CompactHydraException, OmegaConfBaseException)


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines()
            if ln.strip() and not ln.strip().startswith(("See https://", "full_key:", "object_type=", "reference_type="))]


def compose_error_line(exc: BaseException) -> str:
    """``exc`` (raised while Hydra composed the config) as one line: Hydra's message, the OmegaConf
    cause's first line, and for a missing group option the options there are."""
    if isinstance(exc, OverrideParseException):  # Hydra's message names neither the override nor a way out
        return (f"cannot parse the override {exc.override!r}: {' '.join(_lines(exc.message))}; a value with spaces, "
                f"'=', brackets or quotes goes in quotes: key='...' (in the shell: \"key='...'\")")
    if isinstance(exc, MissingConfigException) and exc.options is not None:
        head = str(exc).split("Available options", 1)[0]
        return f"{' '.join(_lines(head))}; available: {', '.join(exc.options)}"
    parts = _lines(str(exc))
    cause = exc.__cause__
    if isinstance(cause, OmegaConfBaseException) and str(cause).strip():
        parts.append(_lines(str(cause))[0])
    hint = ""
    unknown = re.match(r"Could not override '([\w.]+)'\.", str(exc).strip())
    if unknown:  # Hydra's "use +key=..." adds a key nothing reads (refused later): name the key meant instead
        from pipeline.config import unknown_key_hint

        hint = unknown_key_hint(unknown.group(1))
        if hint:
            parts = [p for p in parts if not p.startswith("To append to your config use +")]
    return " ".join(p if p.endswith((".", ":")) else p + "." for p in parts).rstrip(".") + hint
