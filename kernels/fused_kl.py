"""Streaming fused-linear KL(teacher || student) — never materialises an N×V logit tensor.

Given student hidden states ``h_s`` (N, H) with lm_head ``W_s`` (V, H) and teacher hidden states
``h_t`` (N, H) with ``W_t`` (V, H), computes

    loss = sum_i w_i * KL(p_t,i || p_s,i),   p = softmax(h W^T + b)   (output temperature 1)

with row weights ``w`` from the reduction (``sequence_mean`` / ``token_mean`` / ``sum``, see
``kernels.reference``). Rows are processed in chunks: for each chunk the two logit blocks
(chunk × V, fp32) are formed, log-softmaxed in place, the KL rows reduced, and the gradient with
respect to the student logits ``w_i (p_s - p_t)`` is turned at once into the chunk's ``dL/dh_s``
and accumulated into ``dL/dW_s`` (and ``dL/db_s``) — Liger-Kernel style: the gradients are computed
in the forward pass and the backward only scales them by ``grad_output``. Ignored rows (mask /
``labels == ignore_index``) are dropped before any GEMM.

Peak extra memory: three reused chunk×V fp32 buffers + the gradient buffers (N×H and V×H fp32), the
chunk being chosen so that one chunk×V fp32 block stays within ``max_chunk_bytes`` (64 MiB) — on a
GPU at least ``CUDA_MIN_CHUNK_ROWS`` rows, since smaller chunks are bound by the weight gradient's
memory traffic (see there).
No gradient flows to the teacher (``h_t``, ``W_t``, ``b_t`` are treated as constants), which is
what distillation from a frozen teacher needs.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .reference import IGNORE_INDEX, flatten_rows, loss_row_mask, row_weights

__all__ = ["fused_linear_kl", "default_chunk_size", "DEFAULT_MAX_CHUNK_BYTES", "CUDA_MIN_CHUNK_ROWS"]

DEFAULT_MAX_CHUNK_BYTES = 64 * 1024 * 1024  # upper bound on one chunk×V fp32 block
DEFAULT_MIN_CHUNK_BYTES = 4 * 1024 * 1024  # below this, chunking only adds overhead
# Each chunk reads and writes the whole V×H fp32 weight gradient once; on a GPU that traffic must stay
# small beside the chunk's four GEMMs (8·rows·V·H FLOPs), i.e. rows ≫ FLOP/s ÷ bandwidth (≈ 180 on an
# H200): at 1024 rows it is under a fifth of them. 128-row chunks (the 64 MiB budget at V = 128k) made
# the fused KL 2.4x slower than the naive one on an H200 (gpu_nvidia_h200_kl_128_row_chunks.json in
# benchmarks/results; gpu_nvidia_h200_kl.json is with this floor).
CUDA_MIN_CHUNK_ROWS = 1024


def default_chunk_size(
    n_rows: int,
    vocab: int,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    min_chunk_bytes: int = DEFAULT_MIN_CHUNK_BYTES,
    max_fraction: float = 1 / 16,
    min_rows: int = 1,
) -> int:
    """Rows per chunk so that one chunk×vocab fp32 block stays within a budget.

    budget = min(max_chunk_bytes, max(min_chunk_bytes, max_fraction · N·V·4)): at most 64 MiB per
    block, and at most 1/16 of the full logit matrix unless that is under 4 MiB (tiny problems run
    in one or a few chunks). At least ``min_rows`` (``CUDA_MIN_CHUNK_ROWS`` on a GPU: the budget
    gives way to GEMM efficiency there) and at most ``n_rows``; rounded down to a multiple of 8 above
    8 rows, for GEMM-friendly shapes.
    """
    n = max(1, int(n_rows))
    v = max(1, int(vocab))
    budget = min(max_chunk_bytes, max(min_chunk_bytes, int(max_fraction * n * v * 4)))
    c = max(1, budget // (4 * v), int(min_rows))
    if c > 8:
        c -= c % 8
    return int(max(1, min(c, n)))


def _logits_into(buf: torch.Tensor, h: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """fp32 logits h Wᵀ + b written into ``buf`` (a reused chunk × V fp32 buffer)."""
    if h.dtype == torch.float32 and W.dtype == torch.float32:
        torch.matmul(h, W.t(), out=buf)
        if b is not None:
            buf.add_(b.float())
    else:
        buf.copy_(F.linear(h, W, b))
    return buf


def _log_softmax_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """In-place row log-softmax of ``x`` using ``tmp`` (same shape) as scratch."""
    x.sub_(x.amax(-1, keepdim=True))
    torch.exp(x, out=tmp)
    x.sub_(tmp.sum(-1, keepdim=True).log_())
    return x


def _chunk_kl_and_grad(ls: torch.Tensor, lt: torch.Tensor, tmp: torch.Tensor, w: torch.Tensor):
    """In place on fp32 chunk × V student / teacher logits ``ls``/``lt`` with scratch ``tmp``.

    Returns (per-row KL (chunk,), grad wrt student logits w·(p_s − p_t), stored in ``ls``).
    No allocation of chunk × V size: the three buffers are reused for every chunk.
    """
    _log_softmax_(ls, tmp)  # log p_s
    _log_softmax_(lt, tmp)  # log p_t
    p_t = torch.exp(lt, out=tmp)
    lt.sub_(ls).mul_(p_t)  # p_t (log p_t − log p_s); 0·finite = 0 where p_t underflows
    kl = lt.sum(-1)
    g = ls.exp_().sub_(p_t).mul_(w[:, None])  # w (p_s − p_t)
    return kl, g


def _accumulate_weight_grad(grad_W: torch.Tensor, g: torch.Tensor, g_low: torch.Tensor, hs: torch.Tensor) -> None:
    """``grad_W += gᵀ hs`` into the fp32 ``grad_W``.

    bf16 on CUDA: one bf16 GEMM accumulated in fp32 (``addmm`` with ``out_dtype``), as the gradient
    of ``h`` is already formed from ``g_low``. The fp32 GEMM it replaces ran on no tensor cores and
    made the fused KL 3-4x slower than the naive one on an H200
    (benchmarks/results/gpu_nvidia_h200_kl_fp32_weight_grad.json). CPU has no such kernel, and fp16
    was not run on a GPU: fp32 there.
    """
    if hs.is_cuda and hs.dtype == torch.bfloat16 and g_low.dtype == hs.dtype:
        torch.addmm(grad_W, g_low.t(), hs, out_dtype=torch.float32, out=grad_W)
    else:
        grad_W.addmm_(g.t(), hs if hs.dtype == torch.float32 else hs.float())


class _FusedLinearKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, W_s, b_s, h_t, W_t, b_t, weights, chunk_size):
        # h_s, h_t: (M, H) kept rows only; weights (M,) fp32
        M = h_s.shape[0]
        V = W_s.shape[0]
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        need_b = b_s is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(h_s) if need_h else None
        grad_W = torch.zeros(W_s.shape, dtype=torch.float32, device=W_s.device) if need_w else None
        grad_b = torch.zeros(V, dtype=torch.float32, device=W_s.device) if need_b else None
        loss = torch.zeros((), dtype=torch.float32, device=h_s.device)
        rows = min(chunk_size, M)
        bufs = [torch.empty(rows, V, dtype=torch.float32, device=h_s.device) for _ in range(3)]
        low = W_s.dtype != torch.float32
        for start in range(0, M, chunk_size):
            end = min(M, start + chunk_size)
            n = end - start
            ls, lt, tmp = (x[:n] for x in bufs)
            hs = h_s[start:end]
            _logits_into(ls, hs, W_s, b_s)
            if W_t is None:  # the teacher given as (log-)probability logits: a cached teacher
                lt.copy_(h_t[start:end])
            else:
                _logits_into(lt, h_t[start:end], W_t, b_t)
            w = weights[start:end]
            kl, g = _chunk_kl_and_grad(ls, lt, tmp, w)
            loss += (kl * w).sum()
            g_low = g.to(W_s.dtype) if low and (need_h or need_w) else g
            if need_h:
                grad_h[start:end] = g_low @ W_s
            if need_w:
                _accumulate_weight_grad(grad_W, g, g_low, hs)
            if need_b:
                grad_b += g.sum(0)
        del bufs
        ctx.save_for_backward(grad_h, grad_W.to(W_s.dtype) if need_w else None,
                              grad_b.to(b_s.dtype) if need_b else None)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_W, grad_b = ctx.saved_tensors
        if bool(grad_out == 1):  # the usual case (loss.backward()): no extra V×H product
            return grad_h, grad_W, grad_b, None, None, None, None, None

        def scale(x):
            # grad_out as the 0-d fp32 tensor it is: the product keeps x's dtype and needs no V×H fp32 copy.
            # On the CPU the scalar stays fp32 (cast to fp16 first, DeepSpeed's first loss scale 2**16 >
            # fp16's max was inf -> NaN); a CUDA kernel may take it in x's dtype. Either way the gradients
            # were rounded to x.dtype before this scale, so under fp16 small ones underflow: the pipeline
            # refuses kernels.kl=fused with deepspeed.precision=fp16.
            return None if x is None else x * grad_out

        return scale(grad_h), scale(grad_W), scale(grad_b), None, None, None, None, None


def fused_linear_kl(
    h_s: torch.Tensor,
    W_s: torch.Tensor,
    h_t: torch.Tensor,
    W_t: Optional[torch.Tensor],
    mask: Optional[torch.Tensor] = None,
    seq_ids: Optional[torch.Tensor] = None,
    reduction: str = "sequence_mean",
    chunk_size: Optional[int] = None,
    *,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = IGNORE_INDEX,
    b_s: Optional[torch.Tensor] = None,
    b_t: Optional[torch.Tensor] = None,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    tokens: Optional[float] = None,
) -> torch.Tensor:
    """Streaming KL(teacher || student) from last hidden states and lm_head weights -> scalar.

    ``h_s``/``h_t``: (N, H) or (B, T, H) (then ``seq_ids`` defaults to the batch index). ``mask``:
    (N,) bool/0-1, True = loss row; ``labels``: (N,) with ``ignore_index`` rows ignored (both may be
    given). ``seq_ids``: (N,) sequence id per row for ``sequence_mean`` (without it
    ``sequence_mean`` equals ``token_mean``). Gradients flow to ``h_s``, ``W_s`` and ``b_s`` only.

    ``tokens``: ``token_mean``'s denominator instead of the kept rows' count (a training step's loss
    tokens per micro-batch and rank, so the mean is over the whole step).

    ``W_t=None``: ``h_t`` is the teacher's logits (N, V) themselves — e.g. a cached teacher's
    log-probs — streamed chunk by chunk like the student's (no N×V temporary beyond the cache).
    """
    if reduction not in ("sequence_mean", "token_mean", "sum"):
        raise ValueError(f"unknown reduction {reduction!r}; use sequence_mean, token_mean or sum")
    h_s, seq_ids = flatten_rows(h_s, seq_ids)
    h_t, _ = flatten_rows(h_t, None)
    if h_s.shape[0] != h_t.shape[0] or (W_t is not None and h_s.shape != h_t.shape):
        raise ValueError(f"student rows {tuple(h_s.shape)} and teacher rows {tuple(h_t.shape)} differ")
    if W_t is None and h_t.shape[1] != W_s.shape[0]:
        raise ValueError(f"teacher logits have {h_t.shape[1]} columns, the student vocab is {W_s.shape[0]}")
    if W_t is not None and W_s.shape[0] != W_t.shape[0]:
        raise ValueError(f"student vocab {W_s.shape[0]} != teacher vocab {W_t.shape[0]}")
    N = h_s.shape[0]
    keep = loss_row_mask(N, h_s.device, mask, labels, ignore_index)
    weights = row_weights(keep, seq_ids, reduction, tokens)
    idx = keep.nonzero().squeeze(1)
    if idx.numel() == 0:
        # no loss rows: a zero that still depends on the inputs (so .backward() works)
        return (h_s.sum() * 0.0 + W_s.sum() * 0.0).float()
    all_kept = idx.numel() == N
    hs = h_s if all_kept else h_s.index_select(0, idx)
    ht = (h_t if all_kept else h_t.index_select(0, idx)).detach()
    w = weights if all_kept else weights.index_select(0, idx)
    if chunk_size is None:
        gpu_rows = hs.is_cuda and max_chunk_bytes >= DEFAULT_MAX_CHUNK_BYTES  # a lowered budget is kept
        chunk_size = default_chunk_size(hs.shape[0], W_s.shape[0], max_chunk_bytes,
                                        min(DEFAULT_MIN_CHUNK_BYTES, max_chunk_bytes),
                                        min_rows=CUDA_MIN_CHUNK_ROWS if gpu_rows else 1)
    chunk_size = max(1, int(chunk_size))
    return _FusedLinearKL.apply(hs, W_s, b_s, ht, None if W_t is None else W_t.detach(), None if b_t is None else b_t.detach(), w,
                                chunk_size)
