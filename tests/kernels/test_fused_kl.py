"""Streaming fused-linear KL vs the materialised-logits reference."""

import pytest
import torch

from kernels.fused_kl import (
    DEFAULT_MAX_CHUNK_BYTES,
    _accumulate_weight_grad,
    _FusedLinearKL,
    default_chunk_size,
    fused_linear_kl,
)
from kernels.reference import naive_linear_kl

TOL = 1e-5


def _data(N=29, H=16, V=50, seed=0, bias=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(N, H, generator=g, dtype=dtype).requires_grad_(True)
    W_s = (torch.randn(V, H, generator=g, dtype=dtype) * 0.5).requires_grad_(True)
    h_t = torch.randn(N, H, generator=g, dtype=dtype)
    W_t = torch.randn(V, H, generator=g, dtype=dtype) * 0.5
    b_s = (torch.randn(V, generator=g, dtype=dtype) * 0.1).requires_grad_(True) if bias else None
    b_t = torch.randn(V, generator=g, dtype=dtype) * 0.1 if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.tensor([i for i in (0, 3, 4, 17, 28) if i < N])] = -100
    seq_ids = torch.arange(N) // 7  # 5 sequences: 7, 7, 7, 7, 1 rows (the last one fully ignored)
    return h_s, W_s, h_t, W_t, b_s, b_t, labels, seq_ids


def _compare(loss, ref, params):
    torch.testing.assert_close(loss, ref, atol=TOL, rtol=TOL)
    got = torch.autograd.grad(loss, params)
    exp = torch.autograd.grad(ref, params)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("reduction", ["sequence_mean", "token_mean", "sum"])
@pytest.mark.parametrize("chunk_size", [1, 5, 8, 29, 64, None])
def test_fused_equals_naive_loss_and_grads(reduction, chunk_size):
    h_s, W_s, h_t, W_t, _, _, labels, seq_ids = _data()
    kw = dict(labels=labels, seq_ids=seq_ids, reduction=reduction)
    loss = fused_linear_kl(h_s, W_s, h_t, W_t, chunk_size=chunk_size, **kw)
    ref = naive_linear_kl(h_s, W_s, h_t, W_t, **kw)
    assert loss.dim() == 0 and loss.item() > 0
    _compare(loss, ref, (h_s, W_s))


def test_bias_mask_and_3d_inputs_and_grad_output_scaling():
    h_s, W_s, h_t, W_t, b_s, b_t, labels, _ = _data(N=24, bias=True, seed=1)
    mask = labels != -100
    # (B, T, H) input: seq_ids default to the batch index
    args = (h_s.view(3, 8, -1), W_s, h_t.view(3, 8, -1), W_t)
    loss = fused_linear_kl(*args, mask=mask, chunk_size=7, b_s=b_s, b_t=b_t) * 3.0
    ref = naive_linear_kl(*args, mask=mask, b_s=b_s, b_t=b_t) * 3.0
    _compare(loss, ref, (h_s, W_s, b_s))


def test_sequence_mean_differs_from_token_mean_and_matches_manual():
    h_s, W_s, h_t, W_t, _, _, labels, seq_ids = _data(seed=2)
    with torch.no_grad():
        sm = fused_linear_kl(h_s, W_s, h_t, W_t, labels=labels, seq_ids=seq_ids, reduction="sequence_mean")
        tm = fused_linear_kl(h_s, W_s, h_t, W_t, labels=labels, seq_ids=seq_ids, reduction="token_mean")
        lt = (h_t @ W_t.T).log_softmax(-1)
        ls = (h_s @ W_s.T).log_softmax(-1)
        kl = (lt.exp() * (lt - ls)).sum(-1)
        keep = labels != -100
        per_seq = [kl[(seq_ids == s) & keep].mean() for s in seq_ids.unique() if ((seq_ids == s) & keep).any()]
        manual = torch.stack(per_seq).mean()
    torch.testing.assert_close(sm, manual, atol=TOL, rtol=TOL)
    assert abs(sm.item() - tm.item()) > 1e-4


def test_all_rows_ignored_gives_zero_with_grad():
    h_s, W_s, h_t, W_t, *_ = _data(N=6, seed=3)
    loss = fused_linear_kl(h_s, W_s, h_t, W_t, mask=torch.zeros(6, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and h_s.grad.abs().max() == 0


def test_identical_teacher_and_student_give_zero_kl():
    h_s, W_s, *_ = _data(seed=4)
    loss = fused_linear_kl(h_s, W_s, h_s.detach(), W_s.detach(), reduction="token_mean", chunk_size=4)
    assert abs(loss.item()) < 1e-6


def test_teacher_gets_no_gradient_and_weight_grad_optional():
    h_s, W_s, h_t, W_t, *_ = _data(seed=5)
    W_t.requires_grad_(True)
    W_s.requires_grad_(False)
    loss = fused_linear_kl(h_s, W_s, h_t, W_t)
    loss.backward()
    assert h_s.grad is not None and W_t.grad is None and W_s.grad is None


def test_bf16_close_to_fp32():
    h_s, W_s, h_t, W_t, *_ = _data(N=16, H=32, V=64, seed=6)
    ref = naive_linear_kl(h_s, W_s, h_t, W_t)
    hb, Wb = h_s.detach().bfloat16().requires_grad_(True), W_s.detach().bfloat16().requires_grad_(True)
    loss = fused_linear_kl(hb, Wb, h_t.bfloat16(), W_t.bfloat16(), chunk_size=5)
    loss.backward()
    assert hb.grad.dtype == torch.bfloat16 and Wb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref.detach(), atol=0, rtol=2e-3)  # observed ~3e-4
    ref_h, ref_W = torch.autograd.grad(ref, (h_s, W_s))  # gradients too (observed ~0.6% in bf16)
    torch.testing.assert_close(hb.grad.float(), ref_h, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(Wb.grad.float(), ref_W, rtol=2e-2, atol=2e-3)


def test_an_fp16_loss_scale_above_fp16s_range_gives_no_nan():
    """DeepSpeed's fp16 loss scale starts at 2**16, above fp16's max: cast to fp16 before the product it
    was inf, and 0 * inf made NaN gradients (the run stopped at step 1)."""
    h_s, W_s, h_t, W_t, *_ = _data(N=16, H=32, V=64, seed=6)
    hh, Wh = h_s.detach().half().requires_grad_(True), W_s.detach().half().requires_grad_(True)
    (fused_linear_kl(hh, Wh, h_t.half(), W_t.half(), chunk_size=5) * 2.0**16).backward()
    ref_h, ref_W = torch.autograd.grad(naive_linear_kl(h_s, W_s, h_t, W_t), (h_s, W_s))
    assert torch.isfinite(hh.grad).all() and torch.isfinite(Wh.grad).all()
    torch.testing.assert_close(hh.grad.float() / 2.0**16, ref_h, atol=1e-3, rtol=5e-2)
    torch.testing.assert_close(Wh.grad.float() / 2.0**16, ref_W, atol=1e-3, rtol=5e-2)


def test_weight_grad_accumulates_in_fp32_whatever_the_device():
    """grad_W += gᵀ h over several chunks: equal to one fp32 product of the same (bf16-rounded on a
    GPU, where the product runs in bf16 with fp32 accumulation) inputs, not a bf16 running sum."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(11)
    hs = torch.randn(96, 48, generator=g).to(dev, torch.bfloat16)
    gs = (torch.randn(96, 200, generator=g) * 1e-3).to(dev)
    acc = torch.zeros(200, 48, device=dev)
    for rows in (slice(0, 40), slice(40, 41), slice(41, 96)):
        _accumulate_weight_grad(acc, gs[rows], gs[rows].bfloat16(), hs[rows])
    g_used = gs.bfloat16().float() if dev == "cuda" else gs
    exp = g_used.t() @ hs.float()
    assert acc.dtype == torch.float32
    torch.testing.assert_close(acc, exp, atol=1e-6, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bf16 GEMM path of the weight gradient is CUDA's")
def test_bf16_cuda_as_close_to_fp32_as_naive_bf16():
    h_s, W_s, h_t, W_t, _, _, labels, seq_ids = (x.cuda() if torch.is_tensor(x) else x for x in _data(N=300, H=64, V=5000, seed=8))
    ref = naive_linear_kl(h_s, W_s, h_t, W_t, labels=labels, seq_ids=seq_ids)
    ref_g = torch.autograd.grad(ref, (h_s, W_s))
    errs = {}
    for impl in ("naive", "fused"):
        hb, Wb = (x.detach().bfloat16().requires_grad_(True) for x in (h_s, W_s))
        args = (hb, Wb, h_t.bfloat16(), W_t.bfloat16())
        loss = (fused_linear_kl(*args, labels=labels, seq_ids=seq_ids, chunk_size=37) if impl == "fused" else
                naive_linear_kl(*args, labels=labels, seq_ids=seq_ids))
        got = torch.autograd.grad(loss, (hb, Wb))
        errs[impl] = [float((a.float() - b).abs().max() / b.abs().max()) for a, b in zip(got, ref_g)]
        torch.testing.assert_close(loss.float(), ref.detach(), atol=3e-2, rtol=3e-2)
    for fused_err, naive_err in zip(errs["fused"], errs["naive"]):
        assert fused_err <= max(2 * naive_err, 1e-2), errs


def test_chunk_size_bound_keeps_chunk_by_vocab_under_budget():
    for n, v in [(1, 10), (8192, 32_000), (8192, 128_256), (100, 7), (10**6, 256_000), (5, 10**9)]:
        c = default_chunk_size(n, v)
        assert 1 <= c <= n
        assert c == 1 or c * v * 4 <= DEFAULT_MAX_CHUNK_BYTES
        # at most 1/16 of the full logit block unless that is below the 4 MiB floor
        assert c == 1 or c * v * 4 <= max(n * v * 4 / 16, 4 * 2**20)
    assert default_chunk_size(8192, 128_256) == 128  # 64 MiB / (128256 * 4 B) = 130.8 -> 128
    assert default_chunk_size(100, 7) == 100
    assert default_chunk_size(1024, 32_000) == 64  # 1/16 of 1024 rows
    # a GPU's floor (CUDA_MIN_CHUNK_ROWS) beats the byte budget, never the row count
    assert default_chunk_size(8192, 128_256, min_rows=1024) == 1024
    assert default_chunk_size(300, 128_256, min_rows=1024) == 300


def test_no_full_n_by_v_block_is_formed(monkeypatch):
    """Every logits block the fused loss forms has at most ``chunk_size`` rows."""
    import kernels.fused_kl as fk

    N, V = 40, 50
    h_s, W_s, h_t, W_t, *_ = _data(N=N, V=V, seed=7)
    seen = []
    real = fk._logits_into

    def spy(buf, h, w, b=None):
        seen.append(tuple(buf.shape))
        return real(buf, h, w, b)

    monkeypatch.setattr(fk, "_logits_into", spy)
    fused_linear_kl(h_s, W_s, h_t, W_t, chunk_size=None, max_chunk_bytes=9 * V * 4).backward()
    assert seen and all(s[0] <= 9 and s[1] == V for s in seen)
    assert _FusedLinearKL is fk._FusedLinearKL
