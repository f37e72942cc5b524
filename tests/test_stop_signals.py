"""StopSignals: what a stop signal does while training, and that it stops doing it afterwards.

In-process: the signals are sent to this process (pytest runs tests in the main thread, where
Python runs signal handlers). The whole path (a run interrupted with Ctrl-C checkpoints, exits 130
and resumes) is ``tests/faults/test_training_faults.py``.
"""

import os
import signal

import pytest

from pipeline.engine.trainer import StoppedOutsideTraining, StopSignals, outside_training_stops


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
        with pytest.raises(KeyboardInterrupt):  # ...but a second one still stops at once
            _send(signal.SIGINT)
            signal.getsignal(signal.SIGINT)  # a bytecode boundary: the handler has run by now
    assert {s: signal.getsignal(s) for s in StopSignals.SIGNALS} == before  # and evaluation gets SIGTERM back


def test_submitits_sigusr2_handler_runs_after_the_checkpoint_not_on_arrival():
    """submitit's job process handles SIGUSR2 (its preemption/timeout signal) by requeueing the job and
    exiting at once. While training, SIGUSR2 asks for the stop checkpoint instead; submitit's handler
    is run afterwards (``hand_over``), so the requeued job resumes from this step."""
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        with StopSignals() as stop:
            _send(signal.SIGUSR2)
            assert stop.requested and not stop.interrupted and calls == []  # not requeued before the checkpoint
            assert stop.hand_over() and calls == [signal.SIGUSR2]
        with StopSignals() as stop:  # default handlers (SIG_DFL) are never called
            _send(signal.SIGTERM)
            assert not stop.hand_over()
        with StopSignals() as stop:  # nor Python's Ctrl-C handler (it raises KeyboardInterrupt)
            _send(signal.SIGINT)
            assert not stop.hand_over()
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_a_preemptions_sigterm_before_submitits_sigusr2_still_hands_over_to_its_requeue():
    """A SLURM preemption sends SIGTERM, then (under submitit) SIGUSR2. submitit's SIGTERM handler only
    logs; its SIGUSR2 handler requeues. Both run after the checkpoint, in arrival order. Before, only
    the first signal's ran: the job checkpointed, exited, and was never requeued."""
    calls = []
    before = {s: signal.signal(s, lambda signum, frame: calls.append(signum)) for s in (signal.SIGTERM, signal.SIGUSR2)}
    try:
        with StopSignals() as stop:
            _send(signal.SIGTERM)
            _send(signal.SIGUSR2)
            _send(signal.SIGTERM)  # repeated: handed over once
            assert stop.signum == signal.SIGTERM and calls == []
            assert stop.hand_over() and calls == [signal.SIGTERM, signal.SIGUSR2]
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_restore_gives_the_handlers_back_and_keeps_what_arrived_before_for_the_last_look():
    """The loop's end: the handlers go back first, then the last look reads what arrived before
    (a notice after the last step's look was a flag nobody read: the run evaluated and exited 0)."""
    calls = []

    def handler(signum, frame):
        calls.append(signum)

    previous = signal.signal(signal.SIGUSR2, handler)
    try:
        with StopSignals() as stop:
            _send(signal.SIGUSR2)  # after the last step's look, before the end of training
            stop.restore()
            assert signal.getsignal(signal.SIGUSR2) is handler and calls == []
            assert stop.requested  # the last look still sees it, and stops there
            _send(signal.SIGUSR2)  # from here a signal acts as outside training
            assert calls == [signal.SIGUSR2]
            assert stop.hand_over() and calls == [signal.SIGUSR2] * 2  # the checkpoint's hand-over still runs it
            stop.restore()  # idempotent, and so is the exit
        assert signal.getsignal(signal.SIGUSR2) is handler
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_the_first_ctrl_c_asks_to_stop_and_the_second_stops_at_once(caplog):
    with StopSignals() as stop:
        _send(signal.SIGINT)
        assert stop.requested and stop.interrupted
        assert "Ctrl-C: will checkpoint at the next step boundary" in caplog.text
        with pytest.raises(KeyboardInterrupt):
            _send(signal.SIGINT)
            signal.getsignal(signal.SIGINT)  # a bytecode boundary: the handler has run by now


def test_ctrl_c_while_the_launcher_imports_is_one_line_and_130():
    """Ctrl-C in the launcher's first seconds (torch, hydra imports): before, a KeyboardInterrupt
    traceback from inside an import."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "launchers/train.py", "trainer.dry_run=true"], cwd=root,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    time.sleep(0.3)  # still importing torch (about a second or more here)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("interrupted (Ctrl-C, rank 0)"), err[-2000:]


def test_outside_training_a_signal_stops_once_with_124_and_the_defaults_come_back():
    """Outside training a scheduler's signal ended the process silently (143 / 138); now it raises exit
    124 once (a second signal, e.g. train.sbatch's USR1 after a scancel's TERM, cannot break into the
    cleanup), a handler installed before is left alone, and the defaults are back after the job."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    theirs = []
    signal.signal(signal.SIGUSR2, lambda signum, frame: theirs.append(signum))
    try:
        with outside_training_stops():
            assert signal.getsignal(signal.SIGUSR2) is not signal.SIG_DFL
            with StopSignals() as stop:  # training takes them over and gives them back
                _send(signal.SIGTERM)
                assert stop.requested and not stop.hand_over()  # ours is nobody's to hand over to
            cleaned = False
            with pytest.raises(StoppedOutsideTraining) as raised:
                try:
                    _send(signal.SIGTERM)
                finally:
                    _send(signal.SIGUSR1)  # ignored: the cleanup goes on
                    cleaned = True
            assert raised.value.code == 124 and cleaned
            _send(signal.SIGUSR2)
            assert theirs == [signal.SIGUSR2]
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # stopping: not restored
        with outside_training_stops():
            pass
        with outside_training_stops():
            pass
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        with outside_training_stops():
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
