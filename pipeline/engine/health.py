"""Finite-ness checks of gradients and weights on each rank's local shard (ZeRO-3 aware)."""

from __future__ import annotations

from typing import Any

import torch


def _params(engine: Any):
    module = engine.module if hasattr(engine, "module") else engine
    return [p for p in module.parameters() if p.requires_grad]


def _zero3(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_id") and hasattr(p, "_z3_optimizer")


def _all_finite(tensors: Any) -> bool:
    """True when every element of every tensor is finite: one flag per tensor, left on its device,
    and one host sync per device (on a GPU, one per parameter would stall every step ~300 times at 7B)."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        if t is not None:
            flags.setdefault(t.device, []).append(torch.isfinite(t).all())
    return all(bool(torch.stack(f).all()) for f in flags.values())


def local_grads_finite(engine: Any) -> bool:
    """True when every gradient element this rank holds is finite (call after backward)."""
    from deepspeed.utils import safe_get_local_grad

    return _all_finite(safe_get_local_grad(p) if _zero3(p) else p.grad for p in _params(engine))


def zero_local_grads(engine: Any) -> None:
    """Drop this step's gradient (``trainer.nan_policy=skip``)."""
    from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

    for p in _params(engine):
        if _zero3(p):
            g = safe_get_local_grad(p)
            if g is not None:
                safe_set_local_grad(p, torch.zeros_like(g))
        elif p.grad is not None:
            p.grad.zero_()


def local_params_finite(engine: Any) -> bool:
    """True when this rank's shard of the trainable weights is finite."""
    from deepspeed.utils import safe_get_local_fp32_param

    return _all_finite(safe_get_local_fp32_param(p) if _zero3(p) else p.data for p in _params(engine))


def fill_local(engine: Any, what: str, value: float) -> None:
    """Overwrite this rank's gradients or weights with ``value`` (fault injection only)."""
    from deepspeed.utils import (
        safe_get_local_fp32_param,
        safe_get_local_grad,
        safe_set_local_fp32_param,
        safe_set_local_grad,
    )

    for p in _params(engine):
        if _zero3(p):
            get, put = (safe_get_local_grad, safe_set_local_grad) if what == "grad" else \
                (safe_get_local_fp32_param, safe_set_local_fp32_param)
            t = get(p)
            if t is not None:
                put(p, torch.full_like(t, value))
        else:
            t = p.grad if what == "grad" else p.data
            if t is not None:
                t.fill_(value)
