"""Progress bars for long work: rank 0 only, on when ``logging.progress_bar``, and a loop deep in a
library function (evaluation batches, teacher-cache batches, tau=auto probes) advances the bar of the
caller's block without being handed it."""

from __future__ import annotations

import contextlib

from pipeline.progress import current, expect, progress, tracked


def _run_block(enabled: bool = True) -> tuple[list, object]:
    seen, state = [], {}
    with progress("eval[forget]", enabled):
        expect(5)
        for x in tracked([1, 2, 3]):
            seen.append(x)
        with progress("inner"):  # a nested block advances the outer bar
            for x in tracked(range(2)):
                seen.append(x)
        b = current()
        state = None if b is None else {"n": b.n, "total": b.total, "desc": b.desc}
    return seen, state


def test_a_block_counts_every_tracked_item_on_one_bar(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    seen, state = _run_block()
    assert seen == [1, 2, 3, 0, 1]
    assert state == {"n": 5, "total": 5, "desc": "eval[forget]"}
    assert current() is None  # closed and unset after the block


def test_no_bar_off_rank_zero_when_disabled_or_outside_a_block(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert _run_block() == ([1, 2, 3, 0, 1], None)
    monkeypatch.setenv("RANK", "0")
    assert _run_block(enabled=False) == ([1, 2, 3, 0, 1], None)
    assert list(tracked([4, 5])) == [4, 5] and current() is None
    expect(3)  # outside a block: nothing to announce to


def test_unannounced_loops_add_their_length_as_they_start(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    with progress("tau=auto probes"):
        assert current() is None  # nothing used it yet: no bar printed
        totals = [current().total for _ in tracked(range(4))]
        b = current()
        assert totals == [4] * 4 and b.n == 4
        expect(2)  # announced: the next loop of 3 grows the total by the 1 not announced
        list(tracked(range(3)))
        assert (b.n, b.total) == (7, 7)


def test_announced_work_that_will_not_run_is_taken_back(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    with progress("tau=auto probes"):
        expect(-2)  # nothing announced yet: nothing to take back, no bar
        assert current() is None
        expect(8)  # a search's every probe; it stops after 3
        list(tracked(range(3)))
        expect(-5)
        b = current()
        assert (b.n, b.total) == (3, 3)
        expect(-4)  # never below the work done
        assert (b.n, b.total) == (3, 3)


def test_an_item_counts_once_its_work_is_done(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    with progress("cache"):
        counts = []
        for _ in tracked(range(3)):
            counts.append(current().n)
    assert counts == [0, 1, 2]


def test_a_block_with_no_work_prints_no_bar(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    with progress("teacher cache"):  # e.g. the cache was already built
        list(tracked([]))
        expect(0)
        assert current() is None
    assert "teacher cache" not in capsys.readouterr().err


def test_a_block_opens_its_bar_with_the_announced_total(monkeypatch, capsys):
    """The first thing a block's bar prints already has the total (no '0batch' line first)."""
    monkeypatch.setenv("RANK", "0")
    with progress("eval[forget]"):
        expect(4)
        list(tracked(range(4)))
    states = [ln for ln in capsys.readouterr().err.replace("\r", "\n").splitlines() if ln.startswith("eval[forget]")]
    # every state shows the total (opened without it, the first would read "eval[forget]: 0batch [...]")
    assert states and all("/4 [" in st for st in states), states
    assert "4/4 [" in states[-1]


@contextlib.contextmanager
def _stderr_with_a_log_handler(monkeypatch, stream, fmt: str):
    """``stream`` as stderr on rank 0, with a console log handler writing to it in ``fmt``."""
    import logging

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr("sys.stderr", stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


def test_log_lines_print_above_an_open_bar_with_the_handler_kept(monkeypatch):
    """A console log line while a bar is open goes through tqdm.write (its own line, the bar redrawn
    below it) with the handler's format and filters unchanged; closing the bar puts the stream back."""
    import io
    import logging

    from pipeline.progress import bar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    with _stderr_with_a_log_handler(monkeypatch, stream, "LOG %(message)s") as handler:
        b = bar(True, 3, "unlearn[x]")
        b.update(1)
        logging.getLogger("pipeline.test").warning("attention backend: sdpa")
        assert handler.stream is not stream
        b.close()
        assert handler.stream is stream
    lines = stream.getvalue().replace("\r", "\n").splitlines()
    assert "LOG attention backend: sdpa" in lines  # a line of its own, not glued to the bar


def test_into_a_file_the_bar_redraws_rarely_a_state_per_line(monkeypatch):
    """stderr that is not a terminal (a SLURM job's log): one bar state per FILE_INTERVAL_S, not per second,
    each a line of its own, and log lines as they come. Before, tqdm's in-place redraws (``\\r``) glued
    the states and the log lines between them into one line (``grep '^\\['`` missed them)."""
    import io
    import logging

    from pipeline.progress import FILE_INTERVAL_S, bar

    stream = io.StringIO()
    with _stderr_with_a_log_handler(monkeypatch, stream, "[LOG] %(message)s"):
        b = bar(True, 3, "teacher cache")
        assert b.mininterval == FILE_INTERVAL_S >= 10
        b.update(1)
        logging.getLogger("pipeline.test").warning("built the cache")
        b.update(2)
        b.close()
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert "[LOG] built the cache" in lines
    states = [ln for ln in lines if ln.startswith("teacher cache:")]
    assert states[0].startswith("teacher cache:   0%") and "3/3 [" in states[-1], lines
    assert len(states) == len(set(states)) and all(ln == ln.rstrip() for ln in lines), lines


def _library_bars_on(env_rank: str, progress_bar: bool) -> bool:
    """In a fresh process: the launcher environment for rank ``env_rank``, then the run's switch."""
    import os
    import subprocess
    import sys

    code = ("import sys; sys.argv = ['x']\n"
            "import launchers._bootstrap\n"
            "from pipeline.progress import library_bars\n"
            f"library_bars({progress_bar})\n"
            "from transformers.utils import logging as l\n"
            "print(l.is_progress_bar_enabled())")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "ASU_AUTO_RANK")}
    env.update(RANK=env_rank, WORLD_SIZE="2", LOCAL_RANK=env_rank)
    from pathlib import Path

    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    return out.stdout.strip().splitlines()[-1] == "True"


def test_library_bars_show_on_rank_zero_only_and_follow_the_switch():
    # transformers' own bars ("Loading weights") from rank 1 used to draw into rank 0's lines
    assert _library_bars_on("0", True)
    assert not _library_bars_on("1", True)
    assert not _library_bars_on("0", False)
