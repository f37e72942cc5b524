"""``kernels.attention=triton``: our flash-style Triton kernel (``kernels.tempered_attention``).

It runs compiled on CUDA, or on CPU under ``TRITON_INTERPRET=1`` (tests). It takes causal + key
padding + GQA and a per-(row, head) tau; everything else (dropout, soft-capping, sinks, sliding
windows or other masks, head_dim < 16 or > 128 or fp32 tensors when compiled, different q/v head dims) falls back to
``sdpa``, which serves all of those but soft-capping/sinks (then ``torch``).
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import AttentionBackend, AttentionCall, register_backend
from .masks import mask_to_causal_and_padding

MAX_HEAD_DIM = 128  # the widest head the compiled kernel has been checked at (gpu_check's kernels part)


def _kernels():
    import kernels.tempered_attention as ta  # imported late: TRITON_INTERPRET is read at its import

    return ta


@register_backend
class TritonBackend(AttentionBackend):
    name = "triton"
    fallback = "sdpa"

    def unavailable(self) -> Optional[str]:
        if not _kernels().HAS_TRITON:
            return "the triton package does not import"
        return None

    def usable_on(self, device_type: str) -> Optional[str]:
        ta = _kernels()
        if not ta.HAS_TRITON:
            return "the triton package does not import"
        if device_type != "cuda" and not ta.INTERPRET:
            return f"the Triton kernel needs CUDA (or TRITON_INTERPRET=1), this is {device_type}"
        return None

    def refuse(self, call: AttentionCall) -> Optional[str]:
        ta = _kernels()
        q = call.query
        if not ta.triton_available_for(q):
            return f"the Triton kernel needs CUDA (or TRITON_INTERPRET=1), the tensors are on {q.device.type}"
        if q.dtype == torch.float32 and not ta.INTERPRET:
            # compiled tl.dot truncates fp32 inputs to TF32 by default (~1e-3 off); SDPA keeps fp32
            return "fp32 tensors (the compiled kernel's tl.dot would run them in TF32)"
        if call.dropout > 0:
            return f"attention dropout {call.dropout} is not implemented in the Triton kernel"
        if call.softcap is not None:
            return f"soft-capped attention logits (softcap={call.softcap}) are not implemented in the Triton kernel"
        if call.s_aux is not None:
            return "attention sinks (s_aux) are not implemented in the Triton kernel"
        if q.shape[-1] < 16 and not ta.INTERPRET:
            return f"head_dim {q.shape[-1]} < 16 (tl.dot needs 16)"
        if q.shape[-1] > MAX_HEAD_DIM and not ta.INTERPRET:
            # its tiles at 256 need ~200 KB of shared memory, near an H100's 227 KB: not yet run compiled
            # (benchmarks/gpu_check.py's kernels part has the case); an out-of-resources error would stop
            # the run instead of falling back
            return f"head_dim {q.shape[-1]} > {MAX_HEAD_DIM} (the compiled kernel is checked up to {MAX_HEAD_DIM})"
        if call.value.shape[-1] != q.shape[-1] or q.shape[1] % call.key.shape[1]:
            return "query/key/value head shapes the kernel does not take"
        if call.attention_mask is None and not call.is_causal:
            spec = (False, None)
        else:
            spec = mask_to_causal_and_padding(call.attention_mask, q.shape[2], call.key.shape[2])
        if spec is None:
            return "the mask is not causal + padding (a sliding window, a static cache's unfilled keys or a custom mask)"
        call.notes["triton_spec"] = spec
        return None

    def forward(self, call: AttentionCall) -> torch.Tensor:
        if "triton_spec" not in call.notes and self.refuse(call) is not None:
            raise ValueError(f"triton backend called for a call it refuses: {self.refuse(call)}")
        causal, kpm = call.notes["triton_spec"]
        return _kernels().tempered_attention(call.query, call.key, call.value, call.tau, causal=causal,
                                             key_padding_mask=kpm, scale=call.scaling, backend="triton")
