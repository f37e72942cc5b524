"""Progress bars for long work (training, evaluation, the teacher cache, tau=auto), on rank 0 only.

A loop deep inside a library function advances a bar without being handed one: the caller that
knows the job (and ``logging.progress_bar``) opens :func:`progress`, and the loops inside iterate
with :func:`tracked`, each adding its length to the bar's total as it starts. A function that runs
several loops in a row announces them all up front with :func:`expect`, so the bar shows the
whole total from the start. Outside such a block both are no-ops, so evaluation and cache
functions behave the same when called from tests, benchmarks or other ranks.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, Optional, TypeVar

from tqdm import tqdm

T = TypeVar("T")
FILE_INTERVAL_S = 30.0  # seconds between a bar's states when stderr is not a terminal


def _main_process() -> bool:
    # RANK is set for every launch (pipeline.engine.distributed.setup_environment)
    return int(os.environ.get("RANK", "0") or 0) == 0


class _AboveTheBar:
    """A console handler's stream while a bar is open on a terminal: each log line goes through
    ``tqdm.write``, which prints it above the bar instead of into the bar's line. The handler itself
    (its format and the rank filter) stays as configured; only its stream is swapped, and put back on
    close. (Into a file the bar is whole lines of its own, :class:`_BarLines`: log lines go straight.)"""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        if text.strip():
            tqdm.write(text.rstrip("\n"), file=self.stream)

    def flush(self) -> None:
        self.stream.flush()


class _BarLines:
    """The stream of a bar whose stderr is not a terminal (a SLURM job's log, ``2> file``): each bar
    state becomes a line of its own. tqdm redraws in place with ``\\r`` (and pads with spaces), which
    in a file glued every state, and the log lines written between them, into one long line that
    ``grep`` and ``tail`` could not read."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        for state in text.split("\r"):
            state = state.rstrip()
            if state:
                self.stream.write(state + "\n")

    def flush(self) -> None:
        self.stream.flush()


def _console_handlers() -> list[logging.StreamHandler]:
    return [h for h in logging.getLogger().handlers
            if type(h) is logging.StreamHandler and getattr(h, "stream", None) in (sys.stderr, sys.stdout)]


class _Bar(tqdm):
    """A tqdm bar that gives the console handlers their own streams back when it closes."""

    _log_streams: Sequence[tuple[logging.StreamHandler, Any]] = ()

    def close(self) -> None:
        for handler, stream in self._log_streams:
            if isinstance(handler.stream, _AboveTheBar):
                handler.setStream(stream)
        self._log_streams = ()
        super().close()


def bar(enabled: bool, total: Optional[int], desc: str, initial: int = 0, unit: str = "it") -> Optional[Any]:
    """A tqdm bar on stderr when ``enabled`` and this is rank 0, else None. While it is open, log
    lines on the console print above it."""
    if not (enabled and _main_process()):
        return None
    # Redrawn each second on a terminal; into a file (a SLURM job's stderr) every 30 s, so a long
    # run's log is not thousands of bar states
    if sys.stderr.isatty():
        b = _Bar(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, mininterval=1.0)
        b._log_streams = [(h, h.setStream(_AboveTheBar(h.stream))) for h in _console_handlers()]
        return b
    # a file: a state per line, at most one each FILE_INTERVAL_S (and the last), log lines as they come
    return _Bar(total=total, initial=initial, desc=desc, unit=unit, file=_BarLines(sys.stderr), ncols=100,
                mininterval=FILE_INTERVAL_S)


def library_bars(enabled: bool) -> None:
    """``logging.progress_bar=false`` also silences transformers' and huggingface_hub's own bars
    (loading weights, writing shards). Ranks other than 0 never show them
    (:func:`pipeline.engine.distributed.setup_environment`)."""
    if not enabled:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


class _Pending:
    """A block's bar, opened on first use, so a block with nothing to do (a cache already built)
    prints no empty bar."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.bar: Optional[Any] = None

    def get(self, total: int) -> Any:
        """The bar, opened with ``total`` if this is its first use."""
        if self.bar is None:
            self.bar = bar(True, total, self.desc, unit="batch")
        return self.bar


_BLOCK: contextvars.ContextVar[Optional[_Pending]] = contextvars.ContextVar("pipeline_progress_block", default=None)


@contextlib.contextmanager
def progress(desc: str, enabled: bool = True) -> Iterator[None]:
    """One bar named ``desc`` for the block, in batches: every item a :func:`tracked` loop inside it
    iterates advances it. Inside another block it adds to that block's bar instead."""
    if _BLOCK.get() is not None or not (enabled and _main_process()):
        yield
        return
    block = _Pending(desc)
    token = _BLOCK.set(block)
    try:
        yield
    finally:
        _BLOCK.reset(token)
        if block.bar is not None:
            block.bar.close()


def current() -> Optional[Any]:
    """The bar of the enclosing block once something has used it, else None."""
    block = _BLOCK.get()
    return None if block is None else block.bar


def _remaining(b: Any) -> int:
    return 0 if b.total is None else max(0, b.total - b.n)


def expect(n: int) -> None:
    """The current block's bar will advance ``n`` more times (beyond what is already announced).
    A negative ``n`` takes back announced work that will not run (a search that stops early), so
    the bar still ends full."""
    block = _BLOCK.get()
    if block is None or n == 0 or (n < 0 and block.bar is None):
        return
    if block.bar is None:
        block.get(n)
        return
    b = block.bar
    b.total = b.n + max(0, _remaining(b) + n)
    b.refresh()


def tracked(items: Sequence[T]) -> Iterator[T]:
    """Iterate ``items``; inside :func:`progress` each item advances its bar once its work is done.
    The bar's total grows by whatever of ``len(items)`` was not announced before."""
    block = _BLOCK.get()
    if block is None or len(items) == 0:
        yield from items
        return
    b = block.get(len(items))
    if len(items) > _remaining(b):
        b.total = b.n + len(items)
        b.refresh()
    for item in items:
        yield item
        b.update(1)
