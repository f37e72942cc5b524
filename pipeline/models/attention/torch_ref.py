"""``kernels.attention=torch``: the eager reference (materialised logits, fp32 softmax).

It serves every call (dropout, soft-capping, sliding windows or any other mask, attention sinks),
so it ends every fallback chain, and it is the oracle the other backends are tested against. At
tau = 1 it is transformers' own eager attention, operation for operation.
"""

from __future__ import annotations

import torch

from .base import AttentionBackend, AttentionCall, register_backend


@register_backend
class TorchReference(AttentionBackend):
    name = "torch"
    fallback = None

    def forward(self, call: AttentionCall) -> torch.Tensor:
        from kernels.reference import additive_mask_attention_ref

        mask = call.attention_mask
        if mask is None and call.is_causal and call.query.shape[2] > 1:
            mask = call.visible()  # transformers' sdpa mask skipped it: "causal" is implied
        return additive_mask_attention_ref(call.query, call.key, call.value, mask, call.scaling, call.tau,
                                           call.num_kv_groups, call.dropout, softcap=call.softcap,
                                           sinks=call.s_aux)
