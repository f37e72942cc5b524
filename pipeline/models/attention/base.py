"""What every tempered-attention backend shares: the call it serves, its interface, the registry.

A backend is one small module in this package: a subclass of :class:`AttentionBackend` decorated
with :func:`register_backend`. It says whether it can run at all in this process
(:meth:`AttentionBackend.unavailable`), whether it can serve one particular call
(:meth:`AttentionBackend.refuse`, e.g. soft-capped logits or a sliding-window mask) and which
backend takes over when it cannot (``fallback``); :mod:`.dispatch` walks that chain and logs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from pipeline.registry import Registry

TauLike = Union[float, torch.Tensor]


@dataclass
class AttentionCall:
    """One attention computation, in transformers' attention-interface conventions.

    query (B, H, T, D), key/value (B, H_kv, S, D); ``attention_mask`` None (no mask needed: causal
    when ``is_causal``), bool (B, 1, T, S) with True = visible, or additive float (0 / very
    negative). ``tau``: a float, a 0-d tensor, (H,) per head, (B, 1) per row, or (B, H); a 1-d (B,)
    is read as per row too, except when B == H, where it is ambiguous and refused (the pipeline passes (B, 1)).
    ``softcap``/``sliding_window``/``s_aux`` are the architecture kwargs transformers passes to
    attention functions (Gemma-2 logit soft-capping, Mistral/Qwen/Gemma sliding windows, GPT-OSS
    attention sinks). Tempered attention is ``softmax(softcap(q·kᵀ · scaling / tau) + mask) v``:
    attention on ``q / tau``.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attention_mask: Optional[torch.Tensor]
    scaling: float
    tau: TauLike = 1.0
    dropout: float = 0.0
    is_causal: bool = True
    softcap: Optional[float] = None
    sliding_window: Optional[int] = None
    s_aux: Optional[torch.Tensor] = None
    # per-call scratch space for backends (e.g. the mask analysed once by ``refuse`` for ``forward``)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def num_kv_groups(self) -> int:
        return self.query.shape[1] // self.key.shape[1]

    def scalar_tau(self) -> Optional[float]:
        """``tau`` as a Python float when it is one value for every row and head, else None."""
        if isinstance(self.tau, torch.Tensor):
            return float(self.tau) if self.tau.numel() == 1 else None
        return float(self.tau)

    def tau_bh(self) -> torch.Tensor:
        """``tau`` as a (B, H) fp32 tensor."""
        from kernels.reference import normalize_tau

        return normalize_tau(self.tau, self.query.shape[0], self.query.shape[1], self.query.device)

    def tempered_query_and_scale(self) -> tuple[torch.Tensor, float]:
        """(q', scale') with ``q'·kᵀ·scale' == q·kᵀ·scaling/tau``: a scalar tau folds into the scale
        (no extra pass over q), a per-row / per-head tau is one broadcast multiply of q."""
        t = self.scalar_tau()
        if t is not None:
            return self.query, self.scaling / t
        # multiplied in fp32 and rounded once: 1/τ rounded to bf16 first would move every row's τ the
        # same way (1/3 -> 0.334: τ 2.994), a bias the scalar path (τ folded into the scale) has not
        inv = (1.0 / self.tau_bh())[:, :, None, None]
        return (self.query.float() * inv).to(self.query.dtype), self.scaling

    def visible(self) -> torch.Tensor:
        """Bool (B or 1, 1, T, S) mask of visible keys, materialised (fallback paths only).

        A None mask means what transformers' sdpa path means by it: causal (top-left aligned on
        the first T keys, as SDPA's ``is_causal``) when ``is_causal`` and T > 1, else everything."""
        m = self.attention_mask
        T, S = self.query.shape[2], self.key.shape[2]
        if m is None:
            if self.is_causal and T > 1:
                i = torch.arange(T, device=self.query.device)[:, None]
                j = torch.arange(S, device=self.query.device)[None, :]
                return (j <= i)[None, None]
            return torch.ones(1, 1, T, S, dtype=torch.bool, device=self.query.device)
        m = m[:, :, :, :S]
        if m.dtype == torch.bool:
            return m
        return m > torch.finfo(m.dtype).min / 2


class AttentionBackend:
    """Interface of one ``kernels.attention`` backend (subclass + :func:`register_backend`)."""

    name: str = ""
    #: backend that serves the calls this one refuses (None: it refuses nothing)
    fallback: Optional[str] = "torch"

    def unavailable(self) -> Optional[str]:
        """Why this backend cannot run at all in this process (missing package), or None."""
        return None

    def usable_on(self, device_type: str) -> Optional[str]:
        """Why this backend cannot run on ``device_type`` ("cpu", "cuda"), or None."""
        return None

    def refuse(self, call: AttentionCall) -> Optional[str]:
        """Why this backend cannot serve ``call`` (the reason goes to the log), or None."""
        return None

    def forward(self, call: AttentionCall) -> torch.Tensor:
        """The tempered attention output, (B, T, H, D)."""
        raise NotImplementedError


ATTENTION_BACKENDS: Registry[AttentionBackend] = Registry("attention backend")


def register_backend(cls: type[AttentionBackend]) -> type[AttentionBackend]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    ATTENTION_BACKENDS.register(cls.name)(cls())
    return cls


class ModuleView:
    """The attributes transformers' attention functions read from an attention module (so a backend
    can call them for a bare :class:`AttentionCall`, e.g. in tests)."""

    def __init__(self, num_key_value_groups: int, is_causal: bool) -> None:
        self.num_key_value_groups = num_key_value_groups
        self.is_causal = is_causal
        self.layer_idx = 0
        self.training = False
