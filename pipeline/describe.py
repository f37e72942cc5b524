"""One-line descriptions of what a training job runs: the method's settings (tau, teacher layers and
mode, loss weights, lr, steps) and its trainable set. Logged before training and printed by the dry run."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig


def teacher_settings(m: Any, auto_tau: bool = False) -> list[str]:
    """``tau=..``, ``teacher_layers=..``, ``teacher live|cached`` of a method config with a tau (else
    []); ``auto_tau``: the tau was chosen by tau=auto (marked)."""
    if "tau" not in m:
        return []
    layers = m.get("teacher_layers")
    tau = f"{round(float(m.tau), 3)}" + (" (auto)" if auto_tau else "") if str(m.tau) != "auto" else "auto"
    return [f"tau={tau}", "teacher_layers=" + ("all" if layers is None else ",".join(str(int(i)) for i in layers)),
            f"teacher {m.get('teacher', 'live')}"]


def _count(n: int) -> str:
    """A parameter count as 4.2M / 6.7B / 10.5K."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def param_counts(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters of ``model``, ZeRO-3 partitioned parameters counted whole."""
    def numel(p: Any) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    params = list(model.parameters())
    return sum(numel(p) for p in params if p.requires_grad), sum(numel(p) for p in params)


def trainable_set(method: Any, counts: tuple[int, int], lora: bool = False) -> str:
    """``<trainable> of <all> params (<which>)`` from :func:`param_counts`'s ``counts``: ``all``, the
    layer-wise methods' module and layers (RMU, asu_wmdp), or LoRA adapters."""
    trained, total = counts
    if hasattr(method, "update_layers"):  # pipeline.methods.rmu.LayerwiseMethod
        which = f"{method.cfg.update_module} of layers {','.join(str(i) for i in method.update_layers)}"
        which = f"LoRA adapters in {which}" if lora else which
    elif lora:
        which = "LoRA adapters"
    else:
        which = "all" if trained == total else "a subset"
    return f"{_count(trained)} of {_count(total)} params ({which})"


def loss_settings(m: Any) -> list[str]:
    """``layer=..`` (the hidden state the layer-wise methods, RMU and asu_wmdp, match) and the loss
    weights ``gamma`` / ``alpha`` / ``beta`` a method config has."""
    parts = [f"layer={int(m.layer)}"] if m.get("layer") is not None else []
    return parts + [f"{k}={round(float(m[k]), 6)}" for k in ("gamma", "alpha", "beta") if m.get(k) is not None]


def optimizer_line(t: Any) -> str:
    """The trainer's optimisation settings in one line (the dry run's; the launch logs the resolved
    step and warm-up counts itself): lr and its schedule, weight decay, clipping, and how long."""
    length = f"{int(t.max_steps)} steps (trainer.max_steps)" if int(t.max_steps) > 0 else f"{float(t.epochs):g} epochs"
    return (f"trainer: lr {float(t.lr):g}, {t.lr_scheduler} schedule, warm-up ratio {float(t.warmup_ratio):g}, "
            f"weight decay {float(t.weight_decay):g}, max grad norm {float(t.max_grad_norm):g}; {length}")


def method_line(cfg: DictConfig, trainable: str, steps: int, auto_tau: bool = False) -> str:
    """The log's one line on what trains: method, tau (chosen by tau=auto or fixed), teacher layers and
    mode, the loss weights, lr, steps and the trainable set; a method without tau leaves those out."""
    m = cfg.method
    parts = teacher_settings(m, auto_tau) + loss_settings(m)
    settings = f"{', '.join(parts)}; " if parts else ""
    return (f"method {m.name}: {settings}lr {float(cfg.trainer.lr):g}, {steps} step{'' if steps == 1 else 's'}; "
            f"trainable: {trainable}")
