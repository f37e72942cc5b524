"""Streaming distillation KL for ``kernels.kl=fused``: KL(teacher || student) from the last hidden
states and the lm_head weights, chunked over rows (kernels/fused_kl.py), so no B×T×V logits exist.

Under ZeRO-3 the student's lm_head weight is sharded. We run the fused loss *as the lm_head
module's forward* (a temporary ``forward`` swap), so DeepSpeed's own module hooks gather the
weight for the forward, re-gather it for the backward and reduce-scatter its gradient exactly as
for a normal ``lm_head(h)`` call. The teacher's weight needs no gradient and is gathered with
``GatheredParameters``.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from pipeline.methods.model_io import shifted_mask, tempered, unwrap


def _gathered(params: list[nn.Parameter]):
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def last_hidden(model: nn.Module, inputs: dict) -> torch.Tensor:
    """Final-norm hidden states (B, T, H) of a causal LM, without running its lm_head."""
    base = getattr(unwrap(model), "model", None)
    if base is None:
        raise ValueError(f"{type(unwrap(model)).__name__} has no `.model` decoder: kernels.kl=fused needs a "
                         f"Llama-like causal LM (use kernels.kl=naive)")
    return base(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False).last_hidden_state


def fused_distill_kl(
    student: nn.Module,
    teacher: nn.Module,
    inputs: dict,
    reduction: str = "sequence_mean",
    tau: Optional[float] = None,
    layers: Optional[Sequence[int]] = None,
    skip_first: bool = False,
) -> torch.Tensor:
    """Same value and gradients as ``losses.distill_kl(..., kl_impl="naive")``, streamed."""
    from kernels.fused_kl import fused_linear_kl

    t_mod, s_mod = unwrap(teacher), unwrap(student)
    with torch.no_grad(), tempered(teacher, tau, layers):
        h_t = last_hidden(t_mod, inputs)[:, :-1]
    h_s = last_hidden(s_mod, inputs)[:, :-1]
    mask = shifted_mask(inputs["labels"], skip_first)
    seq_ids = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)
    head_t, head_s = t_mod.get_output_embeddings(), s_mod.get_output_embeddings()

    # A LoRA student's teacher is its own base (model.peft): one lm_head, already gathered by this
    # forward's hooks; gathering it again would free it under the module's feet on exit.
    shared = head_t is head_s

    def head_forward(self, hs: torch.Tensor) -> torch.Tensor:
        with contextlib.nullcontext() if shared else _gathered([head_t.weight]):
            return fused_linear_kl(hs.reshape(-1, hs.shape[-1]), self.weight, h_t.reshape(-1, h_t.shape[-1]),
                                   self.weight if shared else head_t.weight, mask=mask.reshape(-1),
                                   seq_ids=seq_ids.reshape(-1), reduction=reduction, b_s=self.bias,
                                   b_t=self.bias if shared else head_t.bias)

    original = head_s.forward
    head_s.forward = types.MethodType(head_forward, head_s)
    try:
        return head_s(h_s)
    finally:
        head_s.forward = original
