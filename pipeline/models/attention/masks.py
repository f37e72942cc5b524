"""Read transformers' attention masks as (causal, key padding[, window]) for the kernels that take
those instead of a mask tensor (Triton, flash-attn)."""

from __future__ import annotations

import weakref
from typing import Optional

import torch

# One forward passes the same mask tensor to every layer, and the analysis below costs (B, T, S)
# temporaries and two or three host syncs: remembered per mask tensor (weakly: a freed mask is
# never matched again) and per in-place version, so a model's layers ask once per forward.
_MEMO: dict[tuple, tuple[weakref.ref, int, Optional[tuple[bool, Optional[torch.Tensor]]]]] = {}
_MEMO_SIZE = 8


def _visible(attn_mask: torch.Tensor) -> torch.Tensor:
    return attn_mask if attn_mask.dtype == torch.bool else attn_mask > torch.finfo(attn_mask.dtype).min / 2


def mask_to_causal_and_padding(
    attn_mask: Optional[torch.Tensor], T: int, S: int, window: Optional[int] = None
) -> Optional[tuple[bool, Optional[torch.Tensor]]]:
    """:func:`analyse_mask`, remembered per mask tensor, shape and window (see ``_MEMO``)."""
    if attn_mask is None:
        return analyse_mask(attn_mask, T, S, window)
    try:
        version = attn_mask._version
    except RuntimeError:  # an inference tensor has no version counter: not remembered
        return analyse_mask(attn_mask, T, S, window)
    key = (id(attn_mask), T, S, window)
    hit = _MEMO.get(key)
    if hit is not None and hit[0]() is attn_mask and hit[1] == version:
        return hit[2]
    result = analyse_mask(attn_mask, T, S, window)
    for k in [k for k, v in _MEMO.items() if v[0]() is None]:
        del _MEMO[k]
    while len(_MEMO) >= _MEMO_SIZE:
        del _MEMO[next(iter(_MEMO))]
    _MEMO[key] = (weakref.ref(attn_mask), version, result)
    return result


def analyse_mask(
    attn_mask: Optional[torch.Tensor], T: int, S: int, window: Optional[int] = None
) -> Optional[tuple[bool, Optional[torch.Tensor]]]:
    """Express transformers' (B, 1, T, S') mask as (causal, key_padding_mask) or return None.

    ``attn_mask`` is additive float (0 = visible, very negative = hidden), bool (True = visible) or
    None (transformers' sdpa mask skipped it: plain causal, or nothing for one query). The key
    padding is read as "some query sees this key" (right and left padding alike, with or without a
    bottom-right aligned KV-cache offset or a sliding window). The candidate (causal & padding [& a sliding window of ``window`` keys], else padding
    only) is compared with the full mask and ``None`` is returned when it does not reproduce it
    exactly (sliding windows when ``window`` is None, packed sequences, per-query masks...).
    Query rows that see no key at all (left-padding queries) are compared too.
    """
    if attn_mask is None:
        if T > 1 and S != T:
            return None  # SDPA would align "causal" top-left; the kernels align bottom-right
        return (True, None) if T > 1 else (False, None)
    m = attn_mask[:, :, :, :S]
    if m.dim() != 4 or m.shape[1] != 1 or m.shape[2] != T:
        return None
    vis = _visible(m)[:, 0]
    kpm = vis.any(dim=1)  # (B, S): a real key is seen by some query, a padding key by none
    i = torch.arange(T, device=m.device)[:, None]
    j = torch.arange(S, device=m.device)[None, :]
    allowed = j <= i + (S - T)
    if window is not None:
        allowed = allowed & (j > i + (S - T) - window)
    causal_vis = allowed[None] & kpm[:, None, :]
    if torch.equal(causal_vis, vis):
        return True, (None if bool(kpm.all()) else kpm)
    if window is None and torch.equal(kpm[:, None, :].expand_as(vis), vis):
        return False, (None if bool(kpm.all()) else kpm)
    return None
