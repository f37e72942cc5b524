"""StopSignals: what a stop signal does while training, and that it stops doing it afterwards.

In-process: the signals are sent to this process (pytest runs tests in the main thread, where
Python runs signal handlers). The whole path (a run interrupted with Ctrl-C checkpoints, exits 130
and resumes) is ``tests/faults/test_training_faults.py``.
"""

import os
import signal

import pytest

from pipeline.engine.trainer import StopSignals


def _send(sig: int) -> None:
    os.kill(os.getpid(), sig)  # the handler runs before the next bytecode of this thread


def test_sigterm_asks_to_stop_as_a_preemption_and_the_old_handlers_come_back():
    before = {s: signal.getsignal(s) for s in StopSignals.SIGNALS}
    with StopSignals() as stop:
        assert not stop.requested
        _send(signal.SIGTERM)
        assert stop.requested and not stop.interrupted
        _send(signal.SIGINT)  # a later Ctrl-C does not turn a preemption into an interruption...
        assert not stop.interrupted
    assert {s: signal.getsignal(s) for s in StopSignals.SIGNALS} == before  # ...and evaluation gets SIGTERM back


def test_the_first_ctrl_c_asks_to_stop_and_the_second_stops_at_once(caplog):
    with StopSignals() as stop:
        _send(signal.SIGINT)
        assert stop.requested and stop.interrupted
        assert "Ctrl-C: will checkpoint at the next step boundary" in caplog.text
        with pytest.raises(KeyboardInterrupt):
            _send(signal.SIGINT)
            signal.getsignal(signal.SIGINT)  # a bytecode boundary: the handler has run by now
