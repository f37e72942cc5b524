"""Which backend serves ``kernels.attention=<name>``, and which one actually ran, said out loud.

Two decisions, both logged and both in ``results.json["attention_backend"]``:

1. **Per process** (:func:`set_attention_backend`): the requested name is resolved for the device
   class. ``auto`` follows :data:`AUTO_RULES` (``sdpa`` on CPU and CUDA: torch's own fused
   attention with ``scale/tau``, equal to eager attention to ~1e-6; a rule naming another backend
   must name the committed ``benchmarks/results/gpu_*.json`` that shows it faster). A backend
   that cannot run on the device class (``triton`` without CUDA and without ``TRITON_INTERPRET=1``)
   falls back along its chain with one warning line; one that cannot run at all in this process
   (``flash_attn`` without the package) is a :class:`AttentionBackendError` (a config error: exit
   code 2, one line).
2. **Per call** (:func:`dispatch`): a backend that cannot serve a call (dropout, soft-capping,
   sinks, sliding-window masks, head_dim...) hands it to its ``fallback``; the first time a model
   type runs on a backend, one log line names the backend and the reason.

Fallback chains: ``triton -> sdpa -> torch``, ``flash_attn -> sdpa -> torch``; ``torch`` serves all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch

from pipeline.logging import SAME_ON_EVERY_RANK

from .base import ATTENTION_BACKENDS, AttentionBackend, AttentionCall

log = logging.getLogger("pipeline.attention")

# device class -> (backend, evidence). Change an entry only together with the committed measurement
# that justifies it. On an H200 tempered SDPA ran at 0.96x (scalar tau) / 0.77x (per-head tau) the
# untempered SDPA's throughput, our Triton kernel at 0.35x (B=4 H=32 T=4096 d=128 bf16, fwd+bwd);
# flash-attn was not installed there.
AUTO_RULES: dict[str, tuple[str, Optional[str]]] = {
    "cpu": ("sdpa", None),
    "cuda": ("sdpa", "benchmarks/results/gpu_nvidia_h200_attention.json"),
}


class AttentionBackendError(ValueError):
    """``kernels.attention`` names a backend that does not exist or cannot run in this process
    (a user error: ``pipeline.errors.USER_ERRORS``, so launchers print one line and exit 2)."""


@dataclass
class Resolution:
    """The process-wide choice: requested name, backend it resolved to, and why."""

    requested: str
    backend: str
    device: str
    reason: str
    # model type -> {backend that ran: reason}, filled by dispatch() as models run
    ran: dict[str, dict[str, str]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"requested": self.requested, "resolved": self.backend, "device": self.device,
                "reason": self.reason, "ran": {k: dict(v) for k, v in self.ran.items()}}


_state = Resolution("auto", "sdpa", "cpu", "default before any run configured it: auto on cpu -> sdpa")


def backend_names() -> list[str]:
    """Every value ``kernels.attention`` accepts."""
    return ["auto", *ATTENTION_BACKENDS.names()]


def check_available(requested: str) -> None:
    """Raise :class:`AttentionBackendError` when ``requested`` is unknown or cannot run at all here
    (called before anything is written, so a bad choice leaves no run directory behind)."""
    if requested == "auto":
        return
    if requested not in ATTENTION_BACKENDS:
        raise AttentionBackendError(f"config error at 'kernels.attention': unknown backend {requested!r}; "
                                    f"choose one of {', '.join(backend_names())}")
    why = ATTENTION_BACKENDS.get(requested).unavailable()
    if why:
        raise AttentionBackendError(f"config error at 'kernels.attention': {requested} is not available: {why}")


def _chain_for_device(backend: AttentionBackend, device: str) -> tuple[AttentionBackend, list[str]]:
    reasons: list[str] = []
    while True:
        why = backend.unavailable() or backend.usable_on(device)
        if not why:
            return backend, reasons
        if backend.fallback is None:  # pragma: no cover - the chain always ends at "torch"
            raise AttentionBackendError(f"no attention backend can run on {device}: {why}")
        reasons.append(f"{backend.name}: {why} -> falls back to {backend.fallback}")
        backend = ATTENTION_BACKENDS.get(backend.fallback)


def resolve_backend(requested: str, device: str) -> Resolution:
    """Resolve ``kernels.attention=<requested>`` for a device class ("cpu" or "cuda")."""
    check_available(requested)
    device = "cuda" if str(device).startswith("cuda") else "cpu"
    if requested == "auto":
        name, evidence = AUTO_RULES.get(device, ("sdpa", None))
        why = f"auto on {device} -> {name}" + (f" (measured: {evidence})" if evidence else
                                              " (torch SDPA with scale/tau; no committed GPU measurement "
                                              "shows another backend faster)")
    else:
        name, why = requested, f"requested {requested}"
    backend, falls = _chain_for_device(ATTENTION_BACKENDS.get(name), device)
    if falls:
        why = f"{why}; " + "; ".join(falls)
    return Resolution(requested, backend.name, device, why)


def set_attention_backend(requested: str, device: str = "cpu") -> Resolution:
    """Resolve and activate the backend for every model with ``attn_implementation="tempered"``;
    logs one line (a warning when it fell back) and resets the per-model record."""
    global _state
    res = resolve_backend(requested, device)
    (log.warning if res.backend != requested and requested != "auto" else log.info)(
        "attention backend: kernels.attention=%s -> %s (%s)", requested, res.backend, res.reason,
        extra=SAME_ON_EVERY_RANK)
    _state = res
    return res


def get_attention_backend() -> str:
    """The resolved, active backend name."""
    return _state.backend


def attention_backend_report() -> dict:
    """What was requested, what it resolved to, and which backend each model type ran on (and why);
    goes to ``results.json["attention_backend"]``."""
    return _state.as_dict()


def select(call: AttentionCall, backend: Optional[str] = None) -> tuple[AttentionBackend, str]:
    """The backend that serves ``call`` starting from ``backend`` (default: the active one), and why."""
    b = ATTENTION_BACKENDS.get(backend or _state.backend)
    reasons = []
    while (why := b.refuse(call)) is not None:
        reasons.append(f"{b.name} -> {b.fallback}: {why}")
        b = ATTENTION_BACKENDS.get(b.fallback)
    return b, ("; ".join(reasons) if reasons else f"kernels.attention={_state.requested} -> {b.name}")


def dispatch(call: AttentionCall, model_type: str = "model") -> torch.Tensor:
    """Run ``call`` on the active backend or the first one down its fallback chain that serves it.

    The first time ``model_type`` runs on a given backend, one log line names it and the reason
    (a warning when it is a fallback); the same goes into :func:`attention_backend_report`."""
    b, why = select(call)
    seen = _state.ran.setdefault(model_type, {})
    if b.name not in seen:
        seen[b.name] = why
        (log.warning if b.name != _state.backend else log.info)(
            "attention backend for %s: %s (%s)", model_type, b.name, why)
    return b.forward(call)
