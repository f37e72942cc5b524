"""Flash-style tempered attention in Triton: ``softmax(Q Kᵀ · scale / tau + mask) V``.

* Online softmax over key tiles; no T×S matrix is ever stored (forward keeps the per-row
  log-sum-exp, backward recomputes the probabilities tile by tile).
* ``tau`` per (batch, head): a float, an (H,) tensor, a (B, 1) tensor or a (B, H) tensor. There is
  no gradient with respect to ``tau``.
* Causal (bottom-right aligned: query i sees keys j <= i + S - T) and key padding through a (B, S)
  0/1 mask or per-sequence key lengths. Query rows with no visible key produce 0 and get 0 gradient.
* GQA/MQA: H_q a multiple of H_kv; dK/dV are summed over each group inside the kernel (no atomics).
* bf16 / fp16 inputs, fp32 accumulation. fp32 inputs: compiled, ``tl.dot`` runs them in TF32 (~1e-3
  off), so ``backend="auto"`` sends them to the torch path and only ``backend="triton"`` forces the
  kernel. Under ``TRITON_INTERPRET=1`` the tiles are upcast to fp32 before ``tl.dot`` (bf16
  ``tl.dot`` is wrong in the interpreter), and fp32 is exact.
* Dual-output mode (``tempered_attention_dual``): one Q Kᵀ per tile, two online softmaxes (tau_teacher
  and tau_student) and two P·V products; the backward handles gradients from *both* outputs
  (one recomputed Q Kᵀ per tile, the two branches' dS summed before the dQ/dK GEMMs).
* Stacked mode (teacher and student Q/K/V concatenated along the batch) is plain
  ``tempered_attention`` with a (2B, H) tau; see ``stack_teacher_student``.

Dispatch inside this module: the Triton kernels run when the inputs are on CUDA, or when this module
was imported with ``TRITON_INTERPRET=1`` (tests, CPU); with ``backend="auto"`` anything else goes to
the torch SDPA reference (``kernels.reference.tempered_attention_sdpa``). The pipeline does not rely
on that: its ``triton`` backend (``pipeline.models.attention.triton``) decides, logs and falls back
itself. This module never imports ``pipeline``.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .reference import (
    TauLike,
    key_padding_from_lengths,
    normalize_tau,
    tempered_attention_sdpa,
)

try:  # Triton is an install requirement, but keep the torch fallback importable without it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - environment dependent
    triton = None
    tl = None
    HAS_TRITON = False

# Decided once, at import, exactly like triton.jit decides between compiled and interpreted kernels.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
LOG2E = 1.4426950408889634

__all__ = [
    "tempered_attention",
    "tempered_attention_dual",
    "stack_teacher_student",
    "triton_available_for",
]


def triton_available_for(x: torch.Tensor) -> bool:
    """True when the Triton kernels (compiled or interpreted) can run on ``x``'s device."""
    if not HAS_TRITON:
        return False
    if INTERPRET:
        return True  # interpreter: works on CPU tensors (and on CUDA tensors, copying to host)
    return x.is_cuda


# ==================================================================================================
# Triton kernels
# ==================================================================================================

if HAS_TRITON:

    # ---- pieces every kernel shares (inlined by Triton; ordinary calls under the interpreter) ----

    @triton.jit
    def _load_tile(base, rows, stride_r, offs_d, stride_d, row_ok, d_ok, UPCAST: tl.constexpr):
        """A (rows, BLOCK_D) tile, zero outside ``row_ok`` × ``d_ok``; fp32 under the interpreter."""
        x = tl.load(base + rows[:, None] * stride_r + offs_d[None, :] * stride_d,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        return x

    @triton.jit
    def _visible(offs_m, cols, m_ok, n_ok, offset, KPM, b, S, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr):
        """(BLOCK_M, BLOCK_N): which keys each query sees (in range, causal, not padding)."""
        valid = m_ok[:, None] & n_ok[None, :]
        if CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None] + offset)
        if HAS_KPM:
            kp = tl.load(KPM + b * S + cols, mask=n_ok, other=0)
            valid = valid & (kp[None, :] != 0)
        return valid

    @triton.jit
    def _online_softmax_step(qk, c, valid, v, m, norm, acc):
        """One key tile of the online softmax at log2-domain multiplier ``c``: the new running max,
        normaliser and unnormalised output."""
        s = tl.where(valid, qk * c, -1.0e30)
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.where(valid, tl.math.exp2(s - m_new[:, None]), 0.0)
        alpha = tl.math.exp2(m - m_new)
        norm = norm * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, norm, acc

    @triton.jit
    def _store_output(Out, LSE, o_off, o_mask, lse_off, m_ok, m, norm, acc):
        """acc / norm into ``Out`` and the base-2 log-sum-exp into ``LSE``; 0 for rows with no key."""
        has = norm > 0.0
        safe_l = tl.where(has, norm, 1.0)
        tl.store(Out + o_off, (acc / safe_l[:, None]).to(Out.dtype.element_ty), mask=o_mask)
        tl.store(LSE + lse_off, tl.where(has, m + tl.math.log2(safe_l), 0.0), mask=m_ok)

    @triton.jit
    def _score_grad(qk, c, n, lse, delta, do, v, valid):
        """One branch's probabilities P = exp2(qk·c − lse) and dS = P ∘ (dO Vᵀ − delta) · n
        (query-major: qk is (BLOCK_M, BLOCK_N))."""
        p = tl.where(valid, tl.math.exp2(qk * c - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        return p, p * (dp - delta[:, None]) * n

    @triton.jit
    def _score_grad_t(qkT, c, n, lse, delta, do, v, validT):
        """:func:`_score_grad` transposed (key-major: qkT is (BLOCK_N, BLOCK_M)), for the dK/dV kernel."""
        pT = tl.where(validT, tl.math.exp2(qkT * c - lse[None, :]), 0.0)
        dpT = tl.dot(v, tl.trans(do))
        return pT, pT * (dpT - delta[None, :]) * n

    # ---- kernels ----

    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V, TAU, TAU2, KPM, Out, Out2, LSE, LSE2,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        stride_ob, stride_oh, stride_ot, stride_od,
        H, T, S, GROUPS, scale_log2,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DUAL: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        # int64 before any stride product: b * stride_qb passes 2**31 elements on large batches.
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        hk = h // GROUPS
        offset = S - T  # causal diagonal offset (bottom-right alignment)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        m_ok = offs_m < T

        # log2-domain multiplier: s2 = (q.k) * scale * log2(e) / tau
        c1 = scale_log2 / tl.load(TAU + pid_bh)
        q = _load_tile(Q + b * stride_qb + h * stride_qh, offs_m, stride_qt, offs_d, stride_qd, m_ok, d_ok, UPCAST)
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh

        m1 = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l1 = tl.zeros([BLOCK_M], tl.float32)
        acc1 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if DUAL:
            c2 = scale_log2 / tl.load(TAU2 + pid_bh)
            m2 = tl.full([BLOCK_M], -1.0e30, tl.float32)
            l2 = tl.zeros([BLOCK_M], tl.float32)
            acc2 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        hi = S
        if CAUSAL:
            hi = tl.minimum(S, (pid_m + 1) * BLOCK_M + offset)
        for start_n in range(0, hi, BLOCK_N):
            cols = start_n + offs_n
            n_ok = cols < S
            k = _load_tile(k_base, cols, stride_ks, offs_d, stride_kd, n_ok, d_ok, UPCAST)
            v = _load_tile(v_base, cols, stride_vs, offs_d, stride_vd, n_ok, d_ok, UPCAST)
            qk = tl.dot(q, tl.trans(k))
            valid = _visible(offs_m, cols, m_ok, n_ok, offset, KPM, b, S, CAUSAL, HAS_KPM)
            m1, l1, acc1 = _online_softmax_step(qk, c1, valid, v, m1, l1, acc1)
            if DUAL:
                m2, l2, acc2 = _online_softmax_step(qk, c2, valid, v, m2, l2, acc2)

        o_off = b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
        o_mask = m_ok[:, None] & d_ok[None, :]
        lse_off = pid_bh * T + offs_m
        _store_output(Out, LSE, o_off, o_mask, lse_off, m_ok, m1, l1, acc1)
        if DUAL:
            _store_output(Out2, LSE2, o_off, o_mask, lse_off, m_ok, m2, l2, acc2)

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q, K, V, TAU, TAU2, KPM, DO, DO2, LSE, LSE2, DELTA, DELTA2, DK, DV,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        stride_ob, stride_oh, stride_ot, stride_od,
        stride_o2b, stride_o2h, stride_o2t, stride_o2d,
        stride_dkb, stride_dkh, stride_dks, stride_dkd,
        H, HKV, T, S, GROUPS, scale_log2, scale,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DUAL: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """One program per (key tile, batch, kv head): dK, dV summed over the GQA group."""
        pid_n = tl.program_id(0)
        pid_bk = tl.program_id(1)
        b = (pid_bk // HKV).to(tl.int64)  # int64: see _fwd_kernel
        hk = (pid_bk % HKV).to(tl.int64)
        offset = S - T

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m0 = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        n_ok = offs_n < S

        k = _load_tile(K + b * stride_kb + hk * stride_kh, offs_n, stride_ks, offs_d, stride_kd, n_ok, d_ok, UPCAST)
        v = _load_tile(V + b * stride_vb + hk * stride_vh, offs_n, stride_vs, offs_d, stride_vd, n_ok, d_ok, UPCAST)
        kvalid = n_ok
        if HAS_KPM:
            kp = tl.load(KPM + b * S + offs_n, mask=n_ok, other=0)
            kvalid = kvalid & (kp != 0)

        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

        lo = 0
        if CAUSAL:
            # first query that can see key pid_n*BLOCK_N is i = j - offset
            lo = tl.maximum(0, pid_n * BLOCK_N - offset)
            lo = (lo // BLOCK_M) * BLOCK_M
        for g in range(0, GROUPS):
            h = hk * GROUPS + g
            bh = b * H + h
            c1 = scale_log2 / tl.load(TAU + bh)  # log2 domain
            n1 = scale / tl.load(TAU + bh)  # natural units (chain rule)
            if DUAL:
                c2 = scale_log2 / tl.load(TAU2 + bh)
                n2 = scale / tl.load(TAU2 + bh)
            for start_m in range(lo, T, BLOCK_M):
                offs_m = start_m + offs_m0
                m_ok = offs_m < T
                q = _load_tile(Q + b * stride_qb + h * stride_qh, offs_m, stride_qt, offs_d, stride_qd,
                               m_ok, d_ok, UPCAST)
                do1 = _load_tile(DO + b * stride_ob + h * stride_oh, offs_m, stride_ot, offs_d, stride_od,
                                 m_ok, d_ok, UPCAST)
                lse1 = tl.load(LSE + bh * T + offs_m, mask=m_ok, other=0.0)
                dl1 = tl.load(DELTA + bh * T + offs_m, mask=m_ok, other=0.0)
                qkT = tl.dot(k, tl.trans(q))  # (BLOCK_N, BLOCK_M)
                validT = kvalid[:, None] & m_ok[None, :]
                if CAUSAL:
                    validT = validT & (offs_n[:, None] <= offs_m[None, :] + offset)
                pT1, dsT = _score_grad_t(qkT, c1, n1, lse1, dl1, do1, v, validT)
                dv += tl.dot(pT1.to(do1.dtype), do1)
                if DUAL:
                    do2 = _load_tile(DO2 + b * stride_o2b + h * stride_o2h, offs_m, stride_o2t, offs_d, stride_o2d,
                                     m_ok, d_ok, UPCAST)
                    lse2 = tl.load(LSE2 + bh * T + offs_m, mask=m_ok, other=0.0)
                    dl2 = tl.load(DELTA2 + bh * T + offs_m, mask=m_ok, other=0.0)
                    pT2, dsT2 = _score_grad_t(qkT, c2, n2, lse2, dl2, do2, v, validT)
                    dv += tl.dot(pT2.to(do2.dtype), do2)
                    dsT += dsT2
                dk += tl.dot(dsT.to(q.dtype), q)

        dk_off = b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :] * stride_dkd
        st_mask = n_ok[:, None] & d_ok[None, :]
        tl.store(DK + dk_off, dk.to(DK.dtype.element_ty), mask=st_mask)
        tl.store(DV + dk_off, dv.to(DV.dtype.element_ty), mask=st_mask)

    @triton.jit
    def _attn_bwd_dq_kernel(
        Q, K, V, TAU, TAU2, KPM, DO, DO2, LSE, LSE2, DELTA, DELTA2, DQ,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        stride_ob, stride_oh, stride_ot, stride_od,
        stride_o2b, stride_o2h, stride_o2t, stride_o2d,
        stride_dqb, stride_dqh, stride_dqt, stride_dqd,
        H, T, S, GROUPS, scale_log2, scale,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DUAL: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """One program per (query tile, batch, head): dQ."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        # int64 before any stride product: b * stride_qb passes 2**31 elements on large batches.
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        hk = h // GROUPS
        offset = S - T

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        m_ok = offs_m < T

        q = _load_tile(Q + b * stride_qb + h * stride_qh, offs_m, stride_qt, offs_d, stride_qd, m_ok, d_ok, UPCAST)
        do1 = _load_tile(DO + b * stride_ob + h * stride_oh, offs_m, stride_ot, offs_d, stride_od, m_ok, d_ok, UPCAST)
        lse1 = tl.load(LSE + pid_bh * T + offs_m, mask=m_ok, other=0.0)
        dl1 = tl.load(DELTA + pid_bh * T + offs_m, mask=m_ok, other=0.0)
        c1 = scale_log2 / tl.load(TAU + pid_bh)
        n1 = scale / tl.load(TAU + pid_bh)
        if DUAL:
            do2 = _load_tile(DO2 + b * stride_o2b + h * stride_o2h, offs_m, stride_o2t, offs_d, stride_o2d,
                             m_ok, d_ok, UPCAST)
            lse2 = tl.load(LSE2 + pid_bh * T + offs_m, mask=m_ok, other=0.0)
            dl2 = tl.load(DELTA2 + pid_bh * T + offs_m, mask=m_ok, other=0.0)
            c2 = scale_log2 / tl.load(TAU2 + pid_bh)
            n2 = scale / tl.load(TAU2 + pid_bh)

        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        hi = S
        if CAUSAL:
            hi = tl.minimum(S, (pid_m + 1) * BLOCK_M + offset)
        for start_n in range(0, hi, BLOCK_N):
            cols = start_n + offs_n0
            n_ok = cols < S
            k = _load_tile(k_base, cols, stride_ks, offs_d, stride_kd, n_ok, d_ok, UPCAST)
            v = _load_tile(v_base, cols, stride_vs, offs_d, stride_vd, n_ok, d_ok, UPCAST)
            qk = tl.dot(q, tl.trans(k))
            valid = _visible(offs_m, cols, m_ok, n_ok, offset, KPM, b, S, CAUSAL, HAS_KPM)
            _, ds = _score_grad(qk, c1, n1, lse1, dl1, do1, v, valid)
            if DUAL:
                _, ds2 = _score_grad(qk, c2, n2, lse2, dl2, do2, v, valid)
                ds += ds2
            dq += tl.dot(ds.to(k.dtype), k)

        md = m_ok[:, None] & d_ok[None, :]
        tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd,
                 dq.to(DQ.dtype.element_ty), mask=md)


# ==================================================================================================
# launch helpers
# ==================================================================================================


def _blocks(D: int, backward: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Untuned defaults for sm80/sm90; small tiles in the
    interpreter (its cost is per-element numpy work, so tile size barely matters; 32 keeps the masks
    exercised on small test shapes)."""
    if INTERPRET:
        return 32, 32, 4, 1
    if backward:
        return (64, 64, 4, 2) if D <= 64 else (64, 64, 8, 2)
    return (128, 64, 4, 3) if D <= 64 else (128, 64, 8, 2)


def _check_shapes(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q must be (B, H, T, D) and k/v (B, Hkv, S, D)")
    B, H, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"incompatible shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if H % k.shape[1]:
        raise ValueError(f"query heads {H} must be a multiple of key/value heads {k.shape[1]}")


def _use_triton(backend: str, q: torch.Tensor) -> bool:
    """``backend="triton"`` forces the kernel (head_dim < 16 is refused: ``tl.dot`` needs 16 when
    compiled); ``"auto"`` takes it when it can run here, the head dim fits and, compiled, the inputs are
    not fp32 (TF32 in ``tl.dot``), else the torch path."""
    if backend not in ("auto", "triton", "torch"):  # a typo ("Triton", "sdpa") ran the torch path silently
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    small = q.shape[-1] < 16 and not INTERPRET
    if backend == "triton":
        if small:
            raise ValueError(f"head dim {q.shape[-1]} < 16: the compiled Triton kernel needs >= 16 for tl.dot")
        return True
    tf32 = q.dtype == torch.float32 and not INTERPRET
    return backend == "auto" and triton_available_for(q) and not small and not tf32


def _prep_kpm(key_padding_mask, key_lengths, B, S, device):
    if key_padding_mask is None and key_lengths is None:
        return None
    if key_lengths is not None:
        kpm = key_padding_from_lengths(torch.as_tensor(key_lengths, device=device), S)
        if key_padding_mask is not None:
            kpm = kpm & key_padding_mask.to(device=device, dtype=torch.bool)
    else:
        kpm = key_padding_mask
    if kpm.shape != (B, S):
        raise ValueError(f"key_padding_mask must be (B={B}, S={S}); got {tuple(kpm.shape)}")
    return (kpm.to(device) != 0).to(torch.int32).contiguous()


def _fwd(q, k, v, tau_bh, tau2_bh, kpm, causal, scale, dual):
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    o = torch.empty(B, T, H, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    o2 = torch.empty_like(o) if dual else o
    lse2 = torch.empty_like(lse) if dual else lse
    ol = o.permute(0, 2, 1, 3)  # (B, H, T, D) view of the (B, T, H, D) buffer
    BM, BN, nw, ns = _blocks(D, backward=False)
    grid = (triton.cdiv(T, BM), B * H)
    _attn_fwd_kernel[grid](
        q, k, v, tau_bh, tau2_bh if dual else tau_bh, kpm if kpm is not None else tau_bh,
        o, o2, lse, lse2,
        *q.stride(), *k.stride(), *v.stride(), *ol.stride(),
        H, T, S, H // Hkv, scale * LOG2E,
        D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_M=BM, BLOCK_N=BN,
        CAUSAL=bool(causal), HAS_KPM=kpm is not None, DUAL=bool(dual), UPCAST=INTERPRET,
        num_warps=nw, num_stages=ns,
    )
    return o, lse, o2, lse2


def _bwd(q, k, v, tau_bh, tau2_bh, kpm, causal, scale, dual, o, lse, do, o2, lse2, do2):
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    # delta_i = sum_d O_id dO_id  (rowsum of P∘dP), fp32, (B, H, T)
    delta = (o.float() * do.float()).sum(-1).transpose(1, 2).contiguous()
    dol = do.permute(0, 2, 1, 3)
    if dual:
        delta2 = (o2.float() * do2.float()).sum(-1).transpose(1, 2).contiguous()
        do2l = do2.permute(0, 2, 1, 3)
    else:
        delta2, do2l = delta, dol
    dq = torch.empty_like(q)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    BM, BN, nw, ns = _blocks(D, backward=True)
    BD = max(16, triton.next_power_of_2(D))
    t2 = tau2_bh if dual else tau_bh
    kpm_arg = kpm if kpm is not None else tau_bh
    common = dict(D=D, BLOCK_D=BD, BLOCK_M=BM, BLOCK_N=BN, CAUSAL=bool(causal), HAS_KPM=kpm is not None,
                  DUAL=bool(dual), UPCAST=INTERPRET, num_warps=nw, num_stages=ns)
    _attn_bwd_dkdv_kernel[(triton.cdiv(S, BN), B * Hkv)](
        q, k, v, tau_bh, t2, kpm_arg, dol, do2l, lse, lse2, delta, delta2, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *dol.stride(), *do2l.stride(), *dk.stride(),
        H, Hkv, T, S, H // Hkv, scale * LOG2E, scale, **common,
    )
    _attn_bwd_dq_kernel[(triton.cdiv(T, BM), B * H)](
        q, k, v, tau_bh, t2, kpm_arg, dol, do2l, lse, lse2, delta, delta2, dq,
        *q.stride(), *k.stride(), *v.stride(), *dol.stride(), *do2l.stride(), *dq.stride(),
        H, T, S, H // Hkv, scale * LOG2E, scale, **common,
    )
    return dq, dk, dv


class _TemperedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, tau_bh, kpm, causal, scale):
        o, lse, _, _ = _fwd(q, k, v, tau_bh, None, kpm, causal, scale, dual=False)
        ctx.save_for_backward(q, k, v, tau_bh, kpm if kpm is not None else torch.empty(0), o, lse)
        ctx.has_kpm = kpm is not None
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, tau_bh, kpm, o, lse = ctx.saved_tensors
        dq, dk, dv = _bwd(q, k, v, tau_bh, None, kpm if ctx.has_kpm else None, ctx.causal, ctx.scale, False,
                          o, lse, do, None, None, None)
        return dq, dk, dv, None, None, None, None


class _TemperedAttentionDual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, tau_bh, tau2_bh, kpm, causal, scale):
        o, lse, o2, lse2 = _fwd(q, k, v, tau_bh, tau2_bh, kpm, causal, scale, dual=True)
        ctx.save_for_backward(q, k, v, tau_bh, tau2_bh, kpm if kpm is not None else torch.empty(0),
                              o, lse, o2, lse2)
        ctx.has_kpm = kpm is not None
        ctx.causal, ctx.scale = causal, scale
        return o, o2

    @staticmethod
    def backward(ctx, do, do2):
        q, k, v, tau_bh, tau2_bh, kpm, o, lse, o2, lse2 = ctx.saved_tensors
        dq, dk, dv = _bwd(q, k, v, tau_bh, tau2_bh, kpm if ctx.has_kpm else None, ctx.causal, ctx.scale, True,
                          o, lse, do, o2, lse2, do2)
        return dq, dk, dv, None, None, None, None, None


# ==================================================================================================
# public API
# ==================================================================================================


def tempered_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tau: TauLike = 1.0,
    *,
    causal: bool = True,
    key_padding_mask: Optional[torch.Tensor] = None,
    key_lengths: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``softmax(q kᵀ · scale / tau + mask) v``; q (B, H, T, D), k/v (B, Hkv, S, D) -> (B, T, H, D).

    ``tau``: float, (H,), (B,), (B, 1) or (B, H) (no gradient). ``key_padding_mask``: (B, S), nonzero =
    real key; ``key_lengths``: (B,) number of leading real keys (alternative/combined). ``scale``
    defaults to 1/sqrt(D). ``backend``: "auto" (Triton when usable, else the torch fallback),
    "triton" or "torch".
    """
    _check_shapes(q, k, v)
    B, H, T, D = q.shape
    S = k.shape[2]
    scale = D ** -0.5 if scale is None else float(scale)
    use_triton = _use_triton(backend, q)
    if not use_triton:
        kpm = key_padding_mask
        if key_lengths is not None:
            kpm = _prep_kpm(key_padding_mask, key_lengths, B, S, q.device).bool()
        return tempered_attention_sdpa(q, k, v, tau, causal=causal, key_padding_mask=kpm, scale=scale)
    tau_bh = normalize_tau(tau, B, H, q.device)
    kpm = _prep_kpm(key_padding_mask, key_lengths, B, S, q.device)
    return _TemperedAttention.apply(q, k, v, tau_bh, kpm, bool(causal), scale)


def tempered_attention_dual(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tau_teacher: TauLike,
    tau_student: TauLike = 1.0,
    *,
    causal: bool = True,
    key_padding_mask: Optional[torch.Tensor] = None,
    key_lengths: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two outputs from one Q Kᵀ: (attention at ``tau_teacher``, attention at ``tau_student``).

    Both outputs are differentiable (the backward sums both branches' contributions to dQ/dK/dV);
    wrap the teacher output in ``.detach()`` if it must not train anything. The torch fallback runs
    two separate reference calls.
    """
    _check_shapes(q, k, v)
    B, H, T, D = q.shape
    S = k.shape[2]
    scale = D ** -0.5 if scale is None else float(scale)
    use_triton = _use_triton(backend, q)
    if not use_triton:
        kpm = key_padding_mask
        if key_lengths is not None:
            kpm = _prep_kpm(key_padding_mask, key_lengths, B, S, q.device).bool()
        kw = dict(causal=causal, key_padding_mask=kpm, scale=scale)
        return (tempered_attention_sdpa(q, k, v, tau_teacher, **kw),
                tempered_attention_sdpa(q, k, v, tau_student, **kw))
    t1 = normalize_tau(tau_teacher, B, H, q.device)
    t2 = normalize_tau(tau_student, B, H, q.device)
    kpm = _prep_kpm(key_padding_mask, key_lengths, B, S, q.device)
    return _TemperedAttentionDual.apply(q, k, v, t1, t2, kpm, bool(causal), scale)


def stack_teacher_student(
    q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor,
    q_s: torch.Tensor, k_s: torch.Tensor, v_s: torch.Tensor,
    tau_teacher: TauLike, tau_student: TauLike = 1.0,
    *,
    causal: bool = True,
    key_padding_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked mode: teacher and student Q/K/V concatenated along the batch, one launch with a
    (2B, H) tau. Returns (out_teacher, out_student), each (B, T, H, D)."""
    B, H = q_t.shape[0], q_t.shape[1]
    tau = torch.cat([normalize_tau(tau_teacher, B, H, q_t.device), normalize_tau(tau_student, B, H, q_t.device)])
    kpm = None if key_padding_mask is None else torch.cat([key_padding_mask, key_padding_mask])
    out = tempered_attention(torch.cat([q_t, q_s]), torch.cat([k_t, k_s]), torch.cat([v_t, v_s]), tau,
                             causal=causal, key_padding_mask=kpm, scale=scale, backend=backend)
    return out[:B], out[B:]
