"""Command-line parsing for the scripts outside Hydra (the demo launchers, the benchmarks): usage
errors are one line and exit code 2, the project's rule for bad input. Standard library only: cheap
to import before anything heavy."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, Optional

from pipeline.io import why_no_directory


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit code 2 (the project's rule for bad input),
    not the usage block followed by the message."""

    def error(self, message: str) -> NoReturn:
        print(f"error (usage, {self.prog}): {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def int_at_least(low: int, high: Optional[int] = None) -> Callable[[str], int]:
    """argparse type factory: an integer >= ``low`` (and <= ``high``)."""
    want = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {want}, got {value}")
        return value

    parse.__name__ = f"int_at_least_{low}"  # argparse names the type in some messages
    return parse


# ranks, processes, threads, rows, rounds: 0 would silently run or measure nothing
at_least_one = int_at_least(1)
# a rendezvous port: one outside this range started the launch, which then failed as "step failed"
port_number = int_at_least(1, 65535)


def out_dir(ap: argparse.ArgumentParser, given: str, base: Optional[Path] = None) -> Path:
    """``--out`` as a directory (relative to ``base``, default the working directory; an absolute
    ``given`` stays itself); a file in its place, or above it, is a usage error."""
    path = (base or Path()) / given
    why = why_no_directory(path)
    if why:
        ap.error(f"--out {given}: {why}")
    return path
