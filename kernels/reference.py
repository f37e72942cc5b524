"""Plain-torch references for the kernels in this package (used as CPU fallbacks and in tests).

Nothing here imports ``pipeline``.

Attention conventions (shared with ``kernels.tempered_attention``)
-----------------------------------------------------------------
q (B, H, T, D), k/v (B, Hkv, S, D) with H a multiple of Hkv (GQA/MQA), output (B, T, H, D) — the
layout transformers' attention functions return. Logits are ``q·kᵀ · scale / tau`` with ``scale``
defaulting to ``1/sqrt(D)`` and ``tau`` broadcast to (B, H). ``causal`` uses bottom-right alignment
(query i sees keys j <= i + S - T, as flash-attn does, so a KV cache with S > T works).
``key_padding_mask`` (B, S) is 1/True for real keys. Rows with no visible key (padding queries)
give an output of 0 and receive 0 gradient, never NaN.

KL conventions (shared with ``kernels.fused_kl``)
-------------------------------------------------
KL(p_t || p_s) = sum_v p_t (log p_t - log p_s) per row with p = softmax(h W^T + b) at temperature 1.
Reductions: ``sequence_mean`` (mean over each sequence's loss rows, then mean over sequences that
have at least one loss row — the ASU authors' reduction), ``token_mean`` (one mean over all loss
rows) and ``sum``.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

TauLike = Union[float, torch.Tensor]
IGNORE_INDEX = -100

# --------------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------------


def scalar_tau(tau: float) -> float:
    """A Python-number ``tau`` as a float, checked: finite and > 0 (0 gave NaN, a negative one inverted
    attention). Tensors are the caller's (the pipeline checks its own in ``set_temperature``)."""
    t = float(tau)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"tau must be finite and > 0, got {tau!r}")
    return t


def normalize_tau(tau: TauLike, batch: int, heads: int, device: torch.device) -> torch.Tensor:
    """Return ``tau`` as a contiguous (B, H) fp32 tensor.

    Accepts a Python float, a 0-d tensor, an (H,) tensor (per head), a (B,) or (B, 1) tensor (per
    sequence / row) or a (B, H) tensor. A 1-d tensor is per head when it has H values and per row
    when it has B; when B == H > 1 that is ambiguous and refused (use (1, H) or (B, 1)).
    """
    if not isinstance(tau, torch.Tensor):
        return torch.full((batch, heads), scalar_tau(tau), device=device, dtype=torch.float32)
    t = tau.detach().to(device=device, dtype=torch.float32)
    if t.dim() == 0:
        t = t.view(1, 1)
    elif t.dim() == 1:
        n = t.numel()
        if n == 1:
            t = t.view(1, 1)
        elif n == heads and n == batch:
            raise ValueError(f"a 1-d tau of {n} values is ambiguous with B = H = {n}: pass (1, H) for per-head "
                             "or (B, 1) for per-row temperatures")
        elif n == heads:
            t = t.view(1, heads)
        elif n == batch:
            t = t.view(batch, 1)
        else:
            raise ValueError(f"a 1-d tau is per head ({heads} values) or per row ({batch} values); got {n}")
    elif t.dim() != 2:
        raise ValueError(f"tau must be a float, (H,), (B, 1) or (B, H); got shape {tuple(t.shape)}")
    if t.shape[0] not in (1, batch) or t.shape[1] not in (1, heads):
        raise ValueError(f"tau of shape {tuple(t.shape)} does not broadcast to (B={batch}, H={heads})")
    return t.expand(batch, heads).contiguous()


def key_padding_from_lengths(lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B,) key lengths -> (B, S) bool mask, True for the first ``lengths[b]`` keys."""
    ar = torch.arange(seq_len, device=lengths.device)
    return ar[None, :] < lengths.to(ar.device)[:, None]


def _visible(T: int, S: int, causal: bool, key_padding_mask: Optional[torch.Tensor], batch: int,
             device) -> torch.Tensor:
    """Boolean (B, 1, T, S) mask of visible keys."""
    vis = torch.ones(batch, 1, T, S, dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(T, device=device)[:, None]
        j = torch.arange(S, device=device)[None, :]
        vis = vis & (j <= i + (S - T))
    if key_padding_mask is not None:
        vis = vis & key_padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    return vis


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def tempered_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tau: TauLike = 1.0,
    *,
    causal: bool = True,
    key_padding_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Explicit-matrix reference (materialises B×H×T×S logits). Returns (B, T, H, D)."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if H % Hkv:
        raise ValueError(f"query heads {H} must be a multiple of key/value heads {Hkv}")
    scale = D ** -0.5 if scale is None else scale
    tau_bh = normalize_tau(tau, B, H, q.device)
    dt = torch.float32 if upcast else q.dtype
    kk = _repeat_kv(k, H // Hkv).to(dt)
    vv = _repeat_kv(v, H // Hkv).to(dt)
    logits = ((torch.matmul(q.to(dt), kk.transpose(-1, -2)) * scale).float() / tau_bh[:, :, None, None]).to(dt)
    vis = _visible(T, S, causal, key_padding_mask, B, q.device)
    logits = logits.masked_fill(~vis, float("-inf"))
    any_vis = vis.any(-1, keepdim=True)  # (B, 1, T, 1)
    logits = torch.where(any_vis, logits, torch.zeros((), dtype=dt, device=q.device))
    probs = torch.softmax(logits, dim=-1) * any_vis
    out = torch.matmul(probs, vv)
    return out.transpose(1, 2).contiguous().to(q.dtype)


def tempered_attention_dual_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tau_teacher: TauLike,
    tau_student: TauLike = 1.0,
    *,
    causal: bool = True,
    key_padding_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch dual-output reference: one materialised Q Kᵀ, two tempered softmaxes, two P·V.

    Returns (out_teacher, out_student), each (B, T, H, D); same conventions as
    ``tempered_attention_ref`` (computed in the input dtype, softmax in fp32)."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    kk = _repeat_kv(k, H // Hkv)
    vv = _repeat_kv(v, H // Hkv)
    logits = torch.matmul(q, kk.transpose(-1, -2)).float() * scale
    vis = _visible(T, S, causal, key_padding_mask, B, q.device)
    any_vis = vis.any(-1, keepdim=True)
    vis = vis | ~any_vis  # rows without keys: dummy uniform softmax, zeroed below
    logits = logits.masked_fill(~vis, float("-inf"))
    outs = []
    for tau in (tau_teacher, tau_student):
        tau_bh = normalize_tau(tau, B, H, q.device)[:, :, None, None]
        p = torch.softmax(logits / tau_bh, dim=-1) * any_vis
        outs.append(torch.matmul(p.to(q.dtype), vv).transpose(1, 2).contiguous())
    return outs[0], outs[1]


def tempered_attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tau: TauLike = 1.0,
    *,
    causal: bool = True,
    key_padding_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Fast torch fallback: ``scaled_dot_product_attention`` with ``q`` pre-divided by tau.

    Fully masked query rows are given one dummy visible key (so SDPA never sees an all -inf row and
    no NaN reaches the backward pass) and their output is then zeroed. Returns (B, T, H, D).
    """
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    if isinstance(tau, torch.Tensor):  # per row / head: divided in fp32, rounded once (no τ bias in bf16)
        qs = (q.float() / normalize_tau(tau, B, H, q.device)[:, :, None, None]).to(q.dtype)
    else:  # a scalar τ folds into the scale: no pass over q, no host sync
        qs, scale = q, scale / scalar_tau(tau)
    kk = _repeat_kv(k, H // Hkv)
    vv = _repeat_kv(v, H // Hkv)
    if key_padding_mask is None and (not causal or T == S):
        out = F.scaled_dot_product_attention(qs, kk, vv, is_causal=causal and T > 1, scale=scale)
        return out.transpose(1, 2).contiguous()
    vis = _visible(T, S, causal, key_padding_mask, B, q.device)
    any_vis = vis.any(-1, keepdim=True)
    dummy = torch.zeros_like(vis)
    dummy[..., 0] = True
    vis = torch.where(any_vis, vis, dummy)
    out = F.scaled_dot_product_attention(qs, kk, vv, attn_mask=vis, scale=scale)
    out = out * any_vis.to(out.dtype)
    return out.transpose(1, 2).contiguous()


def additive_mask_attention_ref(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    scaling: float,
    tau: TauLike = 1.0,
    num_kv_groups: int = 1,
    dropout: float = 0.0,
    *,
    softcap: Optional[float] = None,
    sinks: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Eager attention with logits divided by tau, additive float (or bool) mask and fp32 softmax;
    the pipeline's ``kernels.attention=torch`` backend calls this (``kernels`` never imports
    ``pipeline``, the dependency goes the other way). Returns (B, T, H, D).

    ``softcap`` (Gemma-2): logits become ``softcap·tanh(logits/softcap)`` after the tau division,
    so tempering stays "attention on q/tau". ``sinks`` (GPT-OSS, (H,)): one extra learned logit per
    head joins the softmax and is dropped afterwards, computed as transformers' GPT-OSS eager path
    does (max-subtracted softmax in the logits' dtype); sinks are not tempered (they are not q·k)."""
    key = _repeat_kv(key, num_kv_groups)
    value = _repeat_kv(value, num_kv_groups)
    if not isinstance(tau, torch.Tensor):  # a scalar τ folds into the scale (fp32), as SDPA's path does
        logits = torch.matmul(query, key.transpose(2, 3)) * (scaling / float(tau))
    else:  # per row / head: multiplied in fp32 and rounded once (1/τ in bf16 would bias every row's τ)
        logits = torch.matmul(query, key.transpose(2, 3)) * scaling
        inv = 1.0 / normalize_tau(tau, query.shape[0], query.shape[1], query.device)
        logits = (logits.float() * inv[:, :, None, None]).to(logits.dtype)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask[:, :, :, : key.shape[-2]], torch.finfo(logits.dtype).min)
        else:
            logits = logits + attn_mask[:, :, :, : key.shape[-2]]
    if sinks is not None:
        sink = sinks.reshape(1, -1, 1, 1).expand(logits.shape[0], -1, logits.shape[2], -1).to(logits.dtype)
        combined = torch.cat([logits, sink], dim=-1)
        combined = combined - combined.max(dim=-1, keepdim=True).values
        probs = F.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1].to(value.dtype)
    else:
        probs = F.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout > 0.0:
        probs = F.dropout(probs, p=dropout, training=True)
    return torch.matmul(probs, value).transpose(1, 2).contiguous()


# --------------------------------------------------------------------------------------------------
# KL
# --------------------------------------------------------------------------------------------------


def loss_row_mask(n: int, device, mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                  ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(N,) bool: rows that count. ``mask`` is bool/0-1 (True = counts); ``labels`` uses ``ignore_index``."""
    keep = torch.ones(n, dtype=torch.bool, device=device)
    if mask is not None:
        keep = keep & (mask.reshape(-1).to(device) != 0)
    if labels is not None:
        keep = keep & (labels.reshape(-1).to(device) != ignore_index)
    return keep


def row_weights(keep: torch.Tensor, seq_ids: Optional[torch.Tensor], reduction: str,
                tokens: Optional[float] = None) -> torch.Tensor:
    """(N,) fp32 weights w so that the reduced loss is sum_i w_i * kl_i (``tokens``: ``token_mean``'s
    denominator when it is not these rows' own count, e.g. a whole training step's per micro-batch)."""
    keepf = keep.to(torch.float32)
    if reduction == "sum":
        return keepf
    if reduction == "token_mean":
        return keepf / (keepf.sum().clamp_min(1.0) if tokens is None else (float(tokens) or 1.0))
    if reduction == "sequence_mean":
        if seq_ids is None:
            return keepf / keepf.sum().clamp_min(1.0)
        sid = seq_ids.reshape(-1).to(keep.device).long()
        _, inv = torch.unique(sid, return_inverse=True)
        nseq = int(inv.max().item()) + 1 if inv.numel() else 0
        counts = torch.zeros(nseq, dtype=torch.float32, device=keep.device).index_add_(0, inv, keepf)
        n_with = (counts > 0).sum().clamp_min(1).to(torch.float32)
        return keepf / counts.clamp_min(1.0)[inv] / n_with
    raise ValueError(f"unknown reduction {reduction!r}; use sequence_mean, token_mean or sum")


def flatten_rows(h: torch.Tensor, seq_ids: Optional[torch.Tensor]):
    """(B, T, H) -> (B·T, H) with seq_ids = batch index when not given; (N, H) passes through."""
    if h.dim() == 3:
        B, T, _ = h.shape
        if seq_ids is None:
            seq_ids = torch.arange(B, device=h.device).repeat_interleave(T)
        return h.reshape(B * T, -1), seq_ids
    if h.dim() != 2:
        raise ValueError(f"hidden states must be (N, H) or (B, T, H); got {tuple(h.shape)}")
    return h, seq_ids


def naive_linear_kl(
    h_s: torch.Tensor,
    W_s: torch.Tensor,
    h_t: torch.Tensor,
    W_t: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    seq_ids: Optional[torch.Tensor] = None,
    reduction: str = "sequence_mean",
    *,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = IGNORE_INDEX,
    b_s: Optional[torch.Tensor] = None,
    b_t: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Materialised-logits KL(teacher || student): the N×V baseline the fused loss replaces."""
    h_s, seq_ids = flatten_rows(h_s, seq_ids)
    h_t, _ = flatten_rows(h_t, None)
    keep = loss_row_mask(h_s.shape[0], h_s.device, mask, labels, ignore_index)
    w = row_weights(keep, seq_ids, reduction)
    ls = F.linear(h_s, W_s, b_s).float().log_softmax(-1)
    with torch.no_grad():
        lt = F.linear(h_t, W_t, b_t).float().log_softmax(-1)
    kl = F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)
    return (kl * w).sum()


__all__ = [
    "IGNORE_INDEX",
    "additive_mask_attention_ref",
    "key_padding_from_lengths",
    "naive_linear_kl",
    "normalize_tau",
    "tempered_attention_ref",
    "tempered_attention_dual_ref",
    "tempered_attention_sdpa",
    "loss_row_mask",
    "row_weights",
    "flatten_rows",
]
