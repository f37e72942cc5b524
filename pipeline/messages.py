"""Exception text for one-line user errors (a dependency-free leaf: any layer may import it)."""

from __future__ import annotations

import os
import sys
from typing import Optional


def first_line(exc: BaseException, limit: Optional[int] = None) -> str:
    """The first line of ``exc``'s message (transformers', torch's and DeepSpeed's run on for lines),
    cut to ``limit`` characters, or the exception's type name when it has no message."""
    lines = str(exc).strip().splitlines()
    line = lines[0].strip() if lines else type(exc).__name__
    return line[:limit] if limit is not None else line


def error_line(exc: BaseException, message: str) -> str:
    """The one-line form of a user error: ``error (<Type>, rank <r>): <message>``."""
    return f"error ({type(exc).__name__}, rank {os.environ.get('RANK', '0')}): {message}"


def note(line: str) -> None:
    """One progress line on stderr, with the logs: stdout carries results only (dry-run plans, the
    demo's report), which a user may pipe or parse."""
    print(line, file=sys.stderr, flush=True)
