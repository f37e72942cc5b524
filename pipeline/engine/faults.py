"""Test-only fault injection at precise points of a real run (``ASU_INJECT`` environment variable).

The fault suite (tests/faults/) uses it to deliver real faults at deterministic moments — a real
SIGKILL of one rank while its checkpoint shards are being written, a NaN loss at step k — which
an external process cannot time reliably. Unset in normal runs: every hook is then a no-op.

Format: comma-separated ``<fault>@<step>[:rank]``, e.g. ``kill_in_save@4:1,nan_loss@3``.
Faults: ``nan_loss``, ``nan_grad``, ``nan_weights`` (after the optimizer step), ``kill_in_save``,
``kill_after_save`` (SIGKILL right after checkpoint ``<step>`` is published: a deterministic kill-and-resume),
``sigterm_in_save`` (a preemption notice during the save), ``sigterm_after_training`` (one after the
last step's look at the stop flag), ``enospc_in_save`` (this rank's write fails),
``enospc_in_export@0`` (rank 0's write of the exported model fails), ``error_in_step`` (a plain
exception in this rank's forward at that step, as an out-of-memory error on one GPU).
"""

from __future__ import annotations

import os
import signal


def _spec() -> dict[str, tuple[int, int | None]]:
    raw = os.environ.get("ASU_INJECT", "")
    out: dict[str, tuple[int, int | None]] = {}
    for item in filter(None, (s.strip() for s in raw.split(","))):
        name, _, where = item.partition("@")
        step, _, rank = where.partition(":")
        out[name] = (int(step), int(rank) if rank else None)
    return out


def _hit(name: str, step: int) -> bool:
    spec = _spec().get(name)
    if spec is None or spec[0] != step:
        return False
    return spec[1] is None or spec[1] == int(os.environ.get("RANK", "0"))


def maybe_kill(name: str, step: int) -> None:
    """SIGKILL this process when ``name@step[:rank]`` is injected."""
    if _hit(name, step):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_signal(name: str, step: int, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to this process when ``name@step[:rank]`` is injected (a preemption notice that
    arrives at a precise moment, e.g. during a checkpoint's save)."""
    if _hit(name, step):
        os.kill(os.getpid(), sig)


def nan_loss(step: int) -> bool:
    return _hit("nan_loss", step)


def nan_grad(step: int) -> bool:
    return _hit("nan_grad", step)


def nan_weights(step: int) -> bool:
    return _hit("nan_weights", step)


def maybe_fail_write(name: str, step: int) -> None:
    """Raise a disk-full ``OSError`` when ``name@step[:rank]`` is injected: one rank's write fails
    while the others' succeed (a node-local quota, a full local scratch)."""
    if _hit(name, step):
        import errno

        raise OSError(errno.ENOSPC, "No space left on device (injected)")


def maybe_raise(name: str, step: int) -> None:
    """Raise a ``RuntimeError`` when ``name@step[:rank]`` is injected: one rank fails where the others
    go on into their next collective (an out-of-memory error on one GPU)."""
    if _hit(name, step):
        raise RuntimeError(f"injected failure: {name}@{step} on rank {os.environ.get('RANK', '0')}")
