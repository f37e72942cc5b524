"""Read transformers' attention masks as (causal, key padding[, window]) for the kernels that take
those instead of a mask tensor (Triton, flash-attn)."""

from __future__ import annotations

from typing import Optional

import torch


def _visible(attn_mask: torch.Tensor) -> torch.Tensor:
    return attn_mask if attn_mask.dtype == torch.bool else attn_mask > torch.finfo(attn_mask.dtype).min / 2


def mask_to_causal_and_padding(
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
