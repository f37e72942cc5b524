"""Tempered-attention backends behind ``kernels.attention`` (one module per backend).

* :mod:`.base` — :class:`AttentionCall` (one attention computation), the backend interface and
  the registry; a new backend is one file with a registered :class:`AttentionBackend` subclass
  (imported below).
* :mod:`.torch_ref` (``torch``, the eager reference), :mod:`.sdpa` (``sdpa``), :mod:`.flash_attn`
  (``flash_attn``), :mod:`.triton` (``triton``: ``kernels.tempered_attention``).
* :mod:`.dispatch` — ``auto`` and the fallback chains, logged and reported in ``results.json``.

The transformers side (the ``"tempered"`` attention function, temperatures per module) lives in
``pipeline.models.tempered_attention``.
"""

from . import flash_attn, sdpa, torch_ref, triton  # noqa: F401  (each registers its backend)
from .base import ATTENTION_BACKENDS, AttentionBackend, AttentionCall, register_backend
from .dispatch import (
    AUTO_RULES,
    AttentionBackendError,
    Resolution,
    attention_backend_report,
    backend_names,
    check_available,
    dispatch,
    get_attention_backend,
    resolve_backend,
    select,
    set_attention_backend,
)
from .masks import mask_to_causal_and_padding

__all__ = [
    "ATTENTION_BACKENDS",
    "AUTO_RULES",
    "AttentionBackend",
    "AttentionBackendError",
    "AttentionCall",
    "Resolution",
    "attention_backend_report",
    "backend_names",
    "check_available",
    "dispatch",
    "get_attention_backend",
    "mask_to_causal_and_padding",
    "register_backend",
    "resolve_backend",
    "select",
    "set_attention_backend",
]
