"""Triton tempered attention (run by the Triton interpreter on CPU) vs the plain-torch reference.

(Named ``test_attention_kernel.py``, not ``test_tempered_attention.py``: pytest's default
``prepend`` import mode would clash with ``tests/test_tempered_attention.py``.)
"""

import pytest
import torch

from kernels import tempered_attention as ta
from kernels.reference import (
    tempered_attention_ref,
    tempered_attention_sdpa,
)
from kernels.tempered_attention import (
    stack_teacher_student,
    tempered_attention,
    tempered_attention_dual,
)

TOL = 1e-4


def setup_module():
    assert ta.INTERPRET, "tests/kernels/conftest.py must set TRITON_INTERPRET=1 before the kernels load"


def _qkv(B, H, Hkv, T, S, D, seed=0, dtype=torch.float32, transposed=False):
    g = torch.Generator().manual_seed(seed)
    if transposed:  # q as transformers produces it: a (B, T, H, D) buffer viewed as (B, H, T, D)
        q = torch.randn(B, T, H, D, generator=g).transpose(1, 2)
    else:
        q = torch.randn(B, H, T, D, generator=g)
    k = torch.randn(B, Hkv, S, D, generator=g)
    v = torch.randn(B, Hkv, S, D, generator=g)
    return [x.to(dtype).requires_grad_(True) for x in (q, k, v)]


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


def _check(q, k, v, tau, tol=TOL, **kw):
    out = tempered_attention(q, k, v, tau, backend="triton", **kw)
    ref = tempered_attention_ref(q, k, v, tau, **kw)
    assert out.shape == (q.shape[0], q.shape[2], q.shape[1], q.shape[3])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    g = torch.randn_like(out)
    got = _grads(out, (q, k, v), g)
    exp = _grads(ref, (q, k, v), g)
    for name, a, b in zip("qkv", got, exp):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m, n=name: f"d{n}: {m}")
    return out, got


@pytest.mark.parametrize("causal", [True, False])
def test_gqa_8_2_odd_length_padding_tau_per_batch_and_head(causal):
    B, H, Hkv, T, D = 2, 8, 2, 37, 16  # T not a multiple of the 32-block
    q, k, v = _qkv(B, H, Hkv, T, T, D)
    tau = torch.linspace(0.7, 3.0, B * H).view(B, H)
    kpm = torch.ones(B, T, dtype=torch.bool)
    kpm[1, 29:] = False  # right padding on row 1
    _check(q, k, v, tau, causal=causal, key_padding_mask=kpm)


def test_tau_per_head_and_per_row_differ_from_each_other():
    B, H, Hkv, T, D = 2, 4, 4, 20, 16
    q, k, v = _qkv(B, H, Hkv, T, T, D, seed=1)
    per_head = torch.tensor([1.0, 1.5, 2.3, 4.0])
    per_row = torch.tensor([[1.0], [2.5]])
    o1, _ = _check(q, k, v, per_head, causal=True)
    o2, _ = _check(q, k, v, per_row, causal=True)
    assert (o1 - o2).abs().max() > 1e-3


def test_t_equals_one_and_kv_cache_offset():
    # single query against a longer cache: causal is bottom-right aligned (sees every key)
    q, k, v = _qkv(2, 4, 2, 1, 23, 32, seed=2)
    _check(q, k, v, 2.0, causal=True)
    q, k, v = _qkv(1, 2, 1, 1, 1, 16, seed=3)  # T = S = 1, MQA
    _check(q, k, v, 1.5, causal=True)
    q, k, v = _qkv(1, 4, 1, 5, 40, 16, seed=4)  # T=5 queries at the end of a 40-key cache
    _check(q, k, v, torch.tensor([1.0, 2.0, 3.0, 4.0]), causal=True,
           key_padding_mask=torch.arange(40)[None] >= 3)


def test_fully_masked_rows_give_zero_output_and_zero_grads():
    # left padding: the first 6 queries of row 0 see no key at all under causal + key padding
    B, H, T, D = 2, 2, 19, 16
    q, k, v = _qkv(B, H, H, T, T, D, seed=5)
    kpm = torch.ones(B, T, dtype=torch.bool)
    kpm[0, :6] = False
    out, (dq, dk, dv) = _check(q, k, v, 2.0, causal=True, key_padding_mask=kpm)
    assert out[0, :6].abs().max() == 0
    assert dq[0, :, :6].abs().max() == 0
    assert dk[0, :, :6].abs().max() == 0 and dv[0, :, :6].abs().max() == 0
    # also a row with no real key at all
    kpm2 = kpm.clone()
    kpm2[1] = False
    out2 = tempered_attention(q, k, v, 2.0, causal=False, key_padding_mask=kpm2, backend="triton")
    assert out2[1].abs().max() == 0 and torch.isfinite(out2).all()


def test_key_lengths_equal_padding_mask_and_noncontiguous_q():
    B, H, T, D = 3, 4, 33, 16
    q, k, v = _qkv(B, H, 2, T, T, D, seed=6, transposed=True)
    lengths = torch.tensor([33, 20, 7])
    out = tempered_attention(q, k, v, 1.7, key_lengths=lengths, backend="triton")
    ref = tempered_attention_ref(q, k, v, 1.7, key_padding_mask=torch.arange(T)[None] < lengths[:, None])
    torch.testing.assert_close(out, ref, atol=TOL, rtol=TOL)


def test_head_dim_64_and_custom_scale():
    q, k, v = _qkv(1, 2, 1, 21, 21, 64, seed=7)
    _check(q, k, v, torch.tensor([[2.0, 3.0]]), causal=True, scale=0.05)


def test_bf16_inputs():
    q, k, v = _qkv(1, 4, 2, 24, 24, 32, seed=8, dtype=torch.bfloat16)
    out = tempered_attention(q, k, v, 2.0, backend="triton")
    assert out.dtype == torch.bfloat16
    ref = tempered_attention_ref(q.float(), k.float(), v.float(), 2.0)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    dq, dk, dv = torch.autograd.grad(out.float().sum(), (q, k, v))
    rq, rk, rv = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in ((dq, rq), (dk, rk), (dv, rv)):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("causal", [True, False])
def test_dual_output_equals_two_calls_forward_and_backward(causal):
    B, H, Hkv, T, D = 2, 4, 2, 27, 16
    q, k, v = _qkv(B, H, Hkv, T, T, D, seed=9)
    tau_t = torch.tensor([[2.0, 2.3, 2.6, 3.0], [1.5, 2.0, 2.5, 5.0]])
    kpm = torch.ones(B, T, dtype=torch.bool)
    kpm[0, 22:] = False
    kw = dict(causal=causal, key_padding_mask=kpm)
    o_t, o_s = tempered_attention_dual(q, k, v, tau_t, 1.0, backend="triton", **kw)
    r_t = tempered_attention(q, k, v, tau_t, backend="triton", **kw)
    r_s = tempered_attention(q, k, v, 1.0, backend="triton", **kw)
    torch.testing.assert_close(o_t, r_t, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(o_s, r_s, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(o_t, tempered_attention_ref(q, k, v, tau_t, **kw), atol=TOL, rtol=TOL)
    g_t, g_s = torch.randn_like(o_t), torch.randn_like(o_s)
    # both branches differentiable: grads of <g_t, o_t> + <g_s, o_s>
    got = _grads((o_t * g_t).sum() + (o_s * g_s).sum(), (q, k, v), None)
    exp = _grads((r_t * g_t).sum() + (r_s * g_s).sum(), (q, k, v), None)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)
    # student branch alone (teacher output detached / unused)
    o_t, o_s = tempered_attention_dual(q, k, v, tau_t, 1.0, backend="triton", **kw)
    got = _grads((o_s * g_s).sum(), (q, k, v), None)
    exp = _grads((tempered_attention_ref(q, k, v, 1.0, **kw) * g_s).sum(), (q, k, v), None)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)


def test_stacked_teacher_student_equals_separate_calls():
    qt, kt, vt = _qkv(2, 4, 2, 18, 18, 16, seed=10)
    qs, ks, vs = _qkv(2, 4, 2, 18, 18, 16, seed=11)
    ot, os_ = stack_teacher_student(qt, kt, vt, qs, ks, vs, 2.5, 1.0, backend="triton")
    torch.testing.assert_close(ot, tempered_attention_ref(qt, kt, vt, 2.5), atol=TOL, rtol=TOL)
    torch.testing.assert_close(os_, tempered_attention_ref(qs, ks, vs, 1.0), atol=TOL, rtol=TOL)


def test_torch_fallback_matches_reference_without_nans():
    q, k, v = _qkv(2, 4, 2, 15, 15, 16, seed=12)
    kpm = torch.ones(2, 15, dtype=torch.bool)
    kpm[0, :4] = False
    out = tempered_attention(q, k, v, 2.0, key_padding_mask=kpm, backend="torch")
    ref = tempered_attention_ref(q, k, v, 2.0, key_padding_mask=kpm)
    torch.testing.assert_close(out, ref, atol=TOL, rtol=TOL)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    sd = tempered_attention_sdpa(q, k, v, torch.tensor([1.0, 2.0, 3.0, 4.0]), causal=False)
    torch.testing.assert_close(sd, tempered_attention_ref(q, k, v, torch.tensor([1.0, 2.0, 3.0, 4.0]), causal=False),
                               atol=TOL, rtol=TOL)


def test_a_misspelled_backend_or_a_non_positive_tau_is_refused():
    """backend="Triton" ran the torch path silently; tau=0 gave NaN and tau<0 inverted attention."""
    q, k, v = _qkv(1, 2, 2, 5, 5, 16, seed=3)
    with pytest.raises(ValueError, match="backend must be 'auto', 'triton' or 'torch', got 'Triton'"):
        tempered_attention(q, k, v, 2.0, backend="Triton")
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="tau must be finite and > 0"):
            tempered_attention(q, k, v, bad, backend="torch")


def test_auto_sends_fp32_to_the_torch_path_when_compiled(monkeypatch):
    """Compiled, tl.dot runs fp32 inputs in TF32 (~1e-3 off): "auto" keeps fp32 on the torch path
    (as the pipeline's triton backend refuses it); bf16/fp16 take the kernel; "triton" still forces it."""
    monkeypatch.setattr(ta, "INTERPRET", False)
    monkeypatch.setattr(ta, "triton_available_for", lambda x: True)  # as on a CUDA tensor
    q32 = torch.zeros(1, 2, 4, 16)
    assert not ta._use_triton("auto", q32) and ta._use_triton("triton", q32)
    assert ta._use_triton("auto", q32.bfloat16()) and ta._use_triton("auto", q32.half())
    monkeypatch.setattr(ta, "INTERPRET", True)  # the interpreter upcasts to fp32 itself: exact
    assert ta._use_triton("auto", q32)


def test_torch_dual_reference_matches_two_single_references():
    from kernels.reference import tempered_attention_dual_ref

    q, k, v = _qkv(2, 4, 2, 17, 17, 16, seed=14)
    kpm = torch.ones(2, 17, dtype=torch.bool)
    kpm[0, :3] = False
    a, b = tempered_attention_dual_ref(q, k, v, 2.5, 1.0, key_padding_mask=kpm)
    torch.testing.assert_close(a, tempered_attention_ref(q, k, v, 2.5, key_padding_mask=kpm), atol=TOL, rtol=TOL)
    torch.testing.assert_close(b, tempered_attention_ref(q, k, v, 1.0, key_padding_mask=kpm), atol=TOL, rtol=TOL)


def test_small_head_dim_compiled_refuses_triton_and_auto_takes_the_torch_path(monkeypatch):
    q, k, v = _qkv(1, 2, 2, 5, 5, 8, seed=15)
    monkeypatch.setattr(ta, "INTERPRET", False)  # as when compiled: tl.dot needs head dim >= 16
    with pytest.raises(ValueError, match="head dim 8 < 16"):
        tempered_attention(q, k, v, 2.0, backend="triton")
    out = tempered_attention(q, k, v, 2.0, backend="auto")
    torch.testing.assert_close(out, tempered_attention_ref(q, k, v, 2.0), atol=TOL, rtol=TOL)
