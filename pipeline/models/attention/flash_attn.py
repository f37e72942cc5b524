"""``kernels.attention=flash_attn``: flash-attn 2 (``flash_attn_func`` / ``flash_attn_varlen_func``).

The temperature goes through ``softmax_scale = scaling / tau`` (scalar tau) or a broadcast multiply
of q (per-row / per-head tau); flash-attn's own ``window_size`` and ``softcap`` serve Mistral/Qwen/
Gemma sliding windows and Gemma-2 soft-capping. Padding is handled by unpadding to the varlen API.
Needs flash-attn (``pip install --no-build-isolation 'flash-attn>=2.6'``: its build imports the torch installed) and fp16/bf16 CUDA tensors; other calls
(fp32, CPU, attention sinks, masks that are not causal + padding [+ the module's window]) fall back
to ``sdpa``. Without flash-attn installed, ``kernels.attention=flash_attn`` is a config error.
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import AttentionBackend, AttentionCall, register_backend
from .masks import mask_to_causal_and_padding

INSTALL_HINT = "pip install --no-build-isolation 'flash-attn>=2.6'"  # its build imports torch


def _flash():
    import flash_attn

    return flash_attn


@register_backend
class FlashAttnBackend(AttentionBackend):
    name = "flash_attn"
    fallback = "sdpa"

    def unavailable(self) -> Optional[str]:
        try:
            _flash()
        except Exception as exc:  # ImportError, or a CUDA/ABI error raised by the extension
            return (f"flash-attn is not installed or does not import ({type(exc).__name__}); install it "
                    f"with `{INSTALL_HINT}` (after torch) or choose kernels.attention=sdpa")
        return None

    def usable_on(self, device_type: str) -> Optional[str]:
        if device_type != "cuda":
            return f"flash-attn needs CUDA, this is {device_type}"
        return None

    def refuse(self, call: AttentionCall) -> Optional[str]:
        q = call.query
        if not q.is_cuda:
            return f"flash-attn needs CUDA tensors, these are on {q.device.type}"
        if q.dtype not in (torch.float16, torch.bfloat16):
            return f"flash-attn needs fp16/bf16, these are {q.dtype}"
        if q.shape[-1] > 256 or call.value.shape[-1] != q.shape[-1]:
            return f"head_dim {q.shape[-1]} (flash-attn takes equal q/v head dims up to 256)"
        if call.s_aux is not None:
            return "attention sinks (s_aux) are not supported by flash-attn 2"
        T, S = q.shape[2], call.key.shape[2]
        window = call.sliding_window if call.sliding_window is not None and S > call.sliding_window else None
        if call.attention_mask is None and not call.is_causal:
            spec = (False, None)
        else:
            spec = mask_to_causal_and_padding(call.attention_mask, T, S, window=window)
            if spec is None and window is not None:
                spec = mask_to_causal_and_padding(call.attention_mask, T, S)
                window = None  # the mask shows no window (e.g. it was already cut to the window)
        if spec is None:
            return "the mask is not causal + padding (+ the module's sliding window): a static cache's unfilled keys or a custom mask"
        call.notes["flash_spec"] = (spec[0], spec[1], window)
        return None

    def forward(self, call: AttentionCall) -> torch.Tensor:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
        from flash_attn.bert_padding import pad_input, unpad_input

        if "flash_spec" not in call.notes and self.refuse(call) is not None:
            raise ValueError(f"flash_attn backend called for a call it refuses: {self.refuse(call)}")
        causal, kpm, window = call.notes["flash_spec"]
        query, scale = call.tempered_query_and_scale()
        q = query.transpose(1, 2)  # (B, T, H, D): flash-attn's layout
        k = call.key.transpose(1, 2)
        v = call.value.transpose(1, 2)
        kw = dict(dropout_p=call.dropout, softmax_scale=scale, causal=causal,
                  window_size=(window - 1, 0) if window is not None else (-1, -1),
                  softcap=float(call.softcap) if call.softcap is not None else 0.0)
        if kpm is None:
            return flash_attn_func(q, k, v, **kw)
        B, T = q.shape[0], q.shape[1]
        q_mask = kpm[:, -T:]  # the queries are the last T positions of the keys
        # unpad_input returns 4 values in flash-attn 2.5 and 5 from 2.6 on; the first 4 are the same
        q_u, q_idx, cu_q, max_q = unpad_input(q, q_mask)[:4]
        k_u, _, cu_k, max_k = unpad_input(k, kpm)[:4]
        v_u = unpad_input(v, kpm)[0]
        out = flash_attn_varlen_func(q_u, k_u, v_u, cu_q, cu_k, max_q, max_k, **kw)
        return pad_input(out, q_idx, B, T)
