"""Triton kernels for attention-smoothing unlearning, with plain-torch references.

* ``kernels.tempered_attention``: flash-style attention with a per-(sequence, head) temperature,
  forward + backward, causal/padding/GQA, single, dual-output and stacked modes.
* ``kernels.fused_kl``: streaming fused-linear KL(teacher || student) over row chunks.
* ``kernels.reference``: the plain-torch references (CPU fallbacks, test oracles).

This package never imports ``pipeline``: the pipeline's ``kernels.attention=triton`` backend
(``pipeline.models.attention.triton``) calls into it.
"""

from __future__ import annotations

from .fused_kl import default_chunk_size, fused_linear_kl
from .reference import naive_linear_kl, tempered_attention_ref
from .tempered_attention import stack_teacher_student, tempered_attention_dual

# NB: the *function* ``tempered_attention`` is deliberately not re-exported here: it would shadow the
# submodule ``kernels.tempered_attention`` (use ``from kernels.tempered_attention import tempered_attention``).

__all__ = [
    "default_chunk_size",
    "fused_linear_kl",
    "naive_linear_kl",
    "stack_teacher_student",
    "tempered_attention_dual",
    "tempered_attention_ref",
]

