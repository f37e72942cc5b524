"""``kernels.attention=sdpa``: torch's ``scaled_dot_product_attention`` with the temperature folded in.

A scalar tau becomes ``scale = scaling / tau``; a per-row or per-head tau is one broadcast
multiply of q (:meth:`AttentionCall.tempered_query_and_scale`). Masks, GQA and ``is_causal`` are
handled exactly as transformers' own sdpa path handles them: this backend calls
``transformers.integrations.sdpa_attention.sdpa_attention_forward``. With the ``sdpa``-style mask
the adapter registers, a causal batch without padding reaches SDPA as ``is_causal=True`` and no
T×S mask is ever built; padding and sliding windows arrive as one boolean (B, 1, T, S) mask.
SDPA has no logit soft-capping and no attention sinks: those calls fall back to ``torch``.
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import AttentionBackend, AttentionCall, ModuleView, register_backend


@register_backend
class SdpaBackend(AttentionBackend):
    name = "sdpa"
    fallback = "torch"

    def refuse(self, call: AttentionCall) -> Optional[str]:
        if call.softcap is not None:
            return f"soft-capped attention logits (softcap={call.softcap}) are not supported by SDPA"
        if call.s_aux is not None:
            return "attention sinks (s_aux) are not supported by SDPA"
        return None

    def forward(self, call: AttentionCall) -> torch.Tensor:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        query, scale = call.tempered_query_and_scale()
        out, _ = sdpa_attention_forward(ModuleView(call.num_kv_groups, call.is_causal), query, call.key,
                                        call.value, call.attention_mask, dropout=call.dropout, scaling=scale,
                                        is_causal=call.is_causal)
        return out
