"""Command-line parsing for the scripts outside Hydra (the demo launchers, the benchmarks): usage
errors are one line and exit code 2, the project's rule for bad input. Standard library only: cheap
to import before anything heavy."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit code 2 (the project's rule for bad input),
    not the usage block followed by the message."""

    def error(self, message: str) -> NoReturn:
        print(f"error (usage, {self.prog}): {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def int_at_least(low: int) -> Callable[[str], int]:
    """argparse type factory: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"int_at_least_{low}"  # argparse names the type in some messages
    return parse


# ranks, processes, threads, rows, rounds: 0 would silently run or measure nothing
at_least_one = int_at_least(1)
