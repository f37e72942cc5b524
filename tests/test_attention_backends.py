"""Tempered attention on every backend available on CPU (``torch``, ``sdpa``, ``triton`` under the
interpreter), against the eager reference: kernel-level calls, an architecture matrix of tiny random
transformers models, and the dispatch table (which backend serves which case, and why)."""

import logging

import pytest
import torch
import transformers

from kernels.reference import additive_mask_attention_ref
from pipeline.models import attention as A
from pipeline.models.tempered_attention import attention_modules, enable_tempered_attention, set_temperature

CPU_BACKENDS = [n for n in A.ATTENTION_BACKENDS.names()
                if not A.ATTENTION_BACKENDS.get(n).unavailable() and not A.ATTENTION_BACKENDS.get(n).usable_on("cpu")]
TOL = 2e-5
BF16_TOL = 3e-2  # sdpa in bf16 vs the fp32 eager reference: bf16 has an 8-bit mantissa


@pytest.fixture(autouse=True)
def _restore_backend():
    before = A.get_attention_backend()
    yield
    A.set_attention_backend(before)


def test_cpu_backends_are_the_expected_ones():
    import kernels.tempered_attention as ta

    assert {"torch", "sdpa"} <= set(CPU_BACKENDS)
    assert ("triton" in CPU_BACKENDS) == ta.INTERPRET  # tests/conftest.py sets TRITON_INTERPRET=1 on CPU
    assert "flash_attn" not in CPU_BACKENDS  # CUDA only


# --------------------------------------------------------------------------------------------------
# kernel level: AttentionCall on each backend vs the eager reference
# --------------------------------------------------------------------------------------------------

B, H, HKV, T, D = 3, 4, 2, 13, 16


def _kpm(kind):
    kpm = torch.ones(B, T, dtype=torch.bool)
    if kind == "right":
        kpm[1, 9:] = False
        kpm[2, 11:] = False
    elif kind == "left":
        kpm[0, :4] = False
        kpm[2, :2] = False
    return kpm


def _bool_mask(kpm, window=None):
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    vis = (j <= i)
    if window is not None:
        vis = vis & (j > i - window)
    return vis[None, None] & kpm[:, None, None, :]


TAUS = {
    "1": 1.0,
    "2.3": 2.3,
    "per_head": torch.tensor([1.0, 2.3, 0.7, 4.0]),
    "per_row": torch.tensor([2.3, 1.0, 3.1]),  # (B,): one temperature per sequence
    "per_row_col": torch.tensor([[2.3], [1.0], [3.1]]),  # (B, 1)
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("tau", list(TAUS))
def test_backend_equals_eager_reference_fwd_bwd(backend, padding, tau):
    g = torch.Generator().manual_seed(sum(map(ord, padding + tau)))  # stable across processes
    q = (torch.randn(B, T, H, D, generator=g) * 2).transpose(1, 2).requires_grad_(True)  # transformers' layout
    k = (torch.randn(B, HKV, T, D, generator=g) * 2).requires_grad_(True)
    v = torch.randn(B, HKV, T, D, generator=g).requires_grad_(True)
    kpm = _kpm(padding)
    mask = None if padding == "none" else _bool_mask(kpm)  # what transformers' sdpa mask gives
    eager_mask = torch.zeros(B, 1, T, T).masked_fill(~_bool_mask(kpm), torch.finfo(torch.float32).min)
    call = A.AttentionCall(q, k, v, mask, D ** -0.5, TAUS[tau])
    chosen, why = A.select(call, backend)
    assert chosen.name == backend, why  # no silent fallback on these inputs
    out = chosen.forward(call)
    ref = additive_mask_attention_ref(q, k, v, eager_mask, D ** -0.5, TAUS[tau], H // HKV)
    real = kpm[:, :, None, None].expand_as(out)  # padding query rows are not compared (eager: uniform)
    torch.testing.assert_close(out[real], ref[real], atol=TOL, rtol=TOL)
    gout = torch.randn(out.shape, generator=g) * real
    got = torch.autograd.grad(out, (q, k, v), gout)
    exp = torch.autograd.grad(ref, (q, k, v), gout)
    for name, a, b in zip("qkv", got, exp):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"d{n}: {m}")


def test_sdpa_bf16_within_stated_tolerance():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, h, T, D, generator=g) for h in (H, HKV, HKV))
    kpm = _kpm("left")
    tau = TAUS["per_head"]
    ref = additive_mask_attention_ref(q, k, v, _bool_mask(kpm), D ** -0.5, tau, H // HKV)
    call = A.AttentionCall(q.bfloat16(), k.bfloat16(), v.bfloat16(), _bool_mask(kpm), D ** -0.5, tau)
    out = A.ATTENTION_BACKENDS.get("sdpa").forward(call).float()
    real = kpm[:, :, None, None].expand_as(out)
    torch.testing.assert_close(out[real], ref[real], atol=BF16_TOL, rtol=BF16_TOL)


def test_softcap_and_sinks_in_the_reference_follow_eager():
    """The torch reference honours Gemma-2 soft-capping (after the tau division) and GPT-OSS sinks."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 7, 16, generator=g) * 3 for _ in range(3))
    logits = q @ k.transpose(-1, -2) * 0.25 / 2.0
    capped = torch.tanh(logits / 5.0) * 5.0
    vis = torch.ones(7, 7, dtype=torch.bool).tril()
    exp = torch.softmax(capped.masked_fill(~vis, float("-inf")), -1) @ v
    out = additive_mask_attention_ref(q, k, v, vis[None, None], 0.25, 2.0, softcap=5.0)
    torch.testing.assert_close(out, exp.transpose(1, 2), atol=1e-5, rtol=1e-5)
    sinks = torch.tensor([0.5, -1.0])
    lg = (q @ k.transpose(-1, -2) * 0.25 / 2.0).masked_fill(~vis, float("-inf"))
    full = torch.softmax(torch.cat([lg, sinks.view(1, 2, 1, 1).expand(1, 2, 7, 1)], -1), -1)[..., :-1]
    out = additive_mask_attention_ref(q, k, v, vis[None, None], 0.25, 2.0, sinks=sinks)
    torch.testing.assert_close(out, (full @ v).transpose(1, 2), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# architecture matrix
# --------------------------------------------------------------------------------------------------

WINDOW = 4
SEQ = 12  # > WINDOW: the sliding window bites
COMMON = dict(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)
TWO_TYPES = ["sliding_attention", "full_attention"]
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=WINDOW,
                                                      layer_types=TWO_TYPES)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, use_sliding_window=True, sliding_window=WINDOW,
                                                      layer_types=TWO_TYPES)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=16)),
    # soft-capping far below its default 50 so a dropped softcap shows in the logits
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, sliding_window=WINDOW, layer_types=TWO_TYPES,
                                                         attn_logit_softcapping=1.5, final_logit_softcapping=None,
                                                         query_pre_attn_scalar=16)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=16, sliding_window=WINDOW,
                                                             layer_types=TWO_TYPES, query_pre_attn_scalar=16)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=WINDOW)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(num_key_value_heads=None)),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(sliding_window=WINDOW)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(attention_multiplier=0.3)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(sliding_window=WINDOW, num_local_experts=2,
                                                            num_experts_per_tok=1)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(head_dim=16, sliding_window=WINDOW, layer_types=TWO_TYPES,
                                                          num_local_experts=2, num_experts_per_tok=1)),
}
WINDOWED = {"mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "starcoder2", "mixtral", "gpt_oss"}


def _build(arch):
    cfg_name, cls_name, extra = ARCHS[arch]
    kw = {**COMMON, **extra}
    if kw.get("num_key_value_heads") is None:
        kw.pop("num_key_value_heads")
    cfg = getattr(transformers, cfg_name)(**kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(cfg).eval()


def _batch():
    ids = torch.randint(3, 64, (2, SEQ), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    am[0, :3] = 0  # left padding
    am[1, SEQ - 2:] = 0  # right padding
    ids = ids.masked_fill(am == 0, 0)
    return ids, am


def _logits(model, ids, am):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=am).logits


@pytest.mark.parametrize("arch", list(ARCHS))
def test_architecture_matrix_tempered_equals_eager_with_scaled_scaling(arch):
    """tau=1: the model's own eager logits; tau=2: eager with every attention module's ``scaling``
    halved — on every CPU backend, with left and right padding and biting sliding windows."""
    model = _build(arch)
    ids, am = _batch()
    keep = am.bool()
    eager1 = _logits(model, ids, am)
    mods = attention_modules(model)
    assert len(mods) == 2
    for m in mods:
        m.scaling = m.scaling / 2
    eager2 = _logits(model, ids, am)
    for m in mods:
        m.scaling = m.scaling * 2
    assert (eager2 - eager1)[keep].abs().max() > 1e-3  # tau=2 is a visible change
    if arch in WINDOWED:  # the window bites: a huge window changes the logits
        w = model.config.sliding_window
        model.config.sliding_window = 10_000
        assert (_logits(model, ids, am) - eager1)[keep].abs().max() > 1e-4
        model.config.sliding_window = w
    enable_tempered_attention(model)
    for backend in CPU_BACKENDS:
        A.set_attention_backend(backend)
        for tau, ref in ((1.0, eager1), (2.0, eager2)):
            set_temperature(model, tau)
            out = _logits(model, ids, am)
            err = (out - ref)[keep].abs().max().item()
            assert err < 1e-4, f"{arch} on {backend} at tau={tau}: max logit error {err:.3g}"
        # a per-row temperature (B,): row 0 at tau=1, row 1 at tau=2, in one forward
        set_temperature(model, torch.tensor([1.0, 2.0]))
        out = _logits(model, ids, am)
        for row, ref in ((0, eager1), (1, eager2)):
            err = (out[row] - ref[row])[keep[row]].abs().max().item()
            assert err < 1e-4, f"{arch} on {backend}, per-row tau, row {row}: max logit error {err:.3g}"
        ran = A.attention_backend_report()["ran"]
        assert ran, "dispatch recorded nothing"
        used = set().union(*(set(v) for v in ran.values()))
        if arch == "gemma2" or arch == "gpt_oss":  # soft-capping / sinks: only the reference serves them
            assert used == {"torch"}, ran
        elif backend == "sdpa":
            assert used == {"sdpa"}, ran
        elif backend == "triton" and arch not in WINDOWED:
            assert used == {"triton"}, ran
        elif backend == "triton":  # sliding-window layers fall back to sdpa, full layers stay on triton
            assert "sdpa" in used, ran


# --------------------------------------------------------------------------------------------------
# dispatch table
# --------------------------------------------------------------------------------------------------


def _call(mask="none", **kw):
    q, k, v = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16)
    kpm = torch.ones(2, 6, dtype=torch.bool)
    kpm[1, 4:] = False
    i, j = torch.arange(6)[:, None], torch.arange(6)[None, :]
    masks = {"none": None, "padding": (j <= i)[None, None] & kpm[:, None, None, :],
             "window": ((j <= i) & (j > i - 3))[None, None].expand(2, 1, 6, 6),
             "bidirectional_padding": kpm[:, None, None, :].expand(2, 1, 6, 6)}
    return A.AttentionCall(q, k, v, masks[mask], 0.25, kw.pop("tau", 2.0), **kw)


def test_auto_resolves_to_sdpa_on_cpu_and_cuda_and_names_the_rule():
    for dev in ("cpu", "cuda"):
        res = A.resolve_backend("auto", dev)
        assert res.backend == "sdpa" and "auto on" in res.reason
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for _, evidence in A.AUTO_RULES.values():  # a rule other than sdpa must name a committed measurement
        assert evidence is None or (evidence.startswith("benchmarks/results/gpu_") and (root / evidence).exists())


def test_triton_without_cuda_or_interpreter_falls_back_to_sdpa_with_a_log_line(monkeypatch, caplog):
    import kernels.tempered_attention as ta

    monkeypatch.setattr(ta, "INTERPRET", False)
    with caplog.at_level(logging.INFO, logger="pipeline.attention"):
        res = A.set_attention_backend("triton", "cpu")
    assert res.backend == "sdpa" and "TRITON_INTERPRET" in res.reason
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "kernels.attention=triton -> sdpa" in lines[0] and "falls back" in lines[0]
    assert A.attention_backend_report()["resolved"] == "sdpa"
    assert A.resolve_backend("triton", "cuda").backend == "triton"


def test_mask_analysis_is_remembered_per_mask_tensor_and_version():
    """Every layer of a forward gets the same mask tensor: it is analysed once (the same result
    object comes back), again after an in-place change, and per shape / window."""
    from pipeline.models.attention import masks

    kpm = torch.ones(2, 10, dtype=torch.bool)
    kpm[0, 8:] = False
    i, j = torch.arange(10)[:, None], torch.arange(10)[None, :]
    mask = ((j <= i)[None, None] & kpm[:, None, None, :]).clone()
    first = A.mask_to_causal_and_padding(mask, 10, 10)
    assert A.mask_to_causal_and_padding(mask, 10, 10) is first and torch.equal(first[1], kpm)
    assert A.mask_to_causal_and_padding(mask, 10, 10, window=3) is None  # its own entry: no window in the mask
    assert A.mask_to_causal_and_padding(mask, 10, 10) is first
    mask[1, 0, :, 9] = False  # in place: key 9 of row 1 is now padding
    again = A.mask_to_causal_and_padding(mask, 10, 10)
    assert again is not first and again[0] is True and bool(again[1][1, 9]) is False
    assert torch.equal(again[1], masks.analyse_mask(mask, 10, 10)[1])
    with torch.inference_mode():  # inference tensors have no version counter: analysed every time
        inf = mask.clone()
        assert torch.equal(A.mask_to_causal_and_padding(inf, 10, 10)[1], again[1])
    held = [k for k, v in masks._MEMO.items() if v[0]() is mask]
    del mask, inf
    assert held and all(masks._MEMO[k][0]() is None for k in held if k in masks._MEMO)  # weak: not kept alive


@pytest.mark.skipif(A.ATTENTION_BACKENDS.get("flash_attn").unavailable() is None, reason="flash-attn installed")
def test_flash_attn_missing_is_a_config_error_naming_its_install():
    # with pip's build isolation flash-attn's build cannot import torch: the hint turns it off
    with pytest.raises(A.AttentionBackendError, match=r"pip install --no-build-isolation 'flash-attn>=2\.6'` \(after torch\)"):
        A.check_available("flash_attn")
    with pytest.raises(A.AttentionBackendError, match="unknown backend 'flash'"):
        A.check_available("flash")


@pytest.mark.parametrize("start,case,expect,why", [
    ("sdpa", dict(), "sdpa", None),
    ("sdpa", dict(mask="padding"), "sdpa", None),
    ("sdpa", dict(mask="window"), "sdpa", None),  # the window is in the mask SDPA takes
    ("sdpa", dict(dropout=0.1), "sdpa", None),
    ("sdpa", dict(softcap=30.0), "torch", "soft-capped"),
    ("sdpa", dict(s_aux=torch.zeros(4)), "torch", "sinks"),
    ("triton", dict(mask="padding", tau=torch.tensor([1.0, 2.0])), "triton", None),
    ("triton", dict(mask="bidirectional_padding", is_causal=False), "triton", None),
    ("triton", dict(mask="window"), "sdpa", "not causal + padding"),
    ("triton", dict(dropout=0.1), "sdpa", "dropout"),
    ("triton", dict(softcap=30.0), "torch", "soft-capped"),
    ("flash_attn", dict(mask="padding"), "sdpa", "CUDA"),  # CPU tensors
    ("torch", dict(softcap=30.0, s_aux=torch.zeros(4), dropout=0.1, mask="window"), "torch", None),
])
def test_dispatch_table(start, case, expect, why):
    if start == "triton" and "triton" not in CPU_BACKENDS:
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    call = _call(**case)
    chosen, reason = A.select(call, start)
    assert chosen.name == expect, reason
    if why:
        assert why in reason and f"{start} ->" in reason


def test_triton_refuses_small_head_dim_when_compiled(monkeypatch):
    import kernels.tempered_attention as ta

    monkeypatch.setattr(ta, "INTERPRET", False)
    monkeypatch.setattr(ta, "triton_available_for", lambda x: True)  # as on a CUDA device
    call = A.AttentionCall(*(torch.randn(1, 2, 5, 8).half() for _ in range(3)), None, 0.3)
    chosen, reason = A.select(call, "triton")
    assert chosen.name == "sdpa" and "head_dim 8 < 16" in reason
    # compiled, fp32 tensors would go through tl.dot in TF32: SDPA keeps them fp32
    call = A.AttentionCall(*(torch.randn(1, 2, 5, 16) for _ in range(3)), None, 0.3)
    chosen, reason = A.select(call, "triton")
    assert chosen.name == "sdpa" and "TF32" in reason
    call = A.AttentionCall(*(torch.randn(1, 2, 5, 16).bfloat16() for _ in range(3)), None, 0.3)
    assert A.select(call, "triton")[0].name == "triton"


def test_dispatch_logs_one_line_per_model_type_and_backend(caplog):
    A.set_attention_backend("sdpa")
    with caplog.at_level(logging.INFO, logger="pipeline.attention"):
        for _ in range(3):
            A.dispatch(_call(mask="padding"), "llama")
            A.dispatch(_call(softcap=30.0), "gemma2")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["attention backend for llama: sdpa (kernels.attention=sdpa -> sdpa)",
                     "attention backend for gemma2: torch (sdpa -> torch: soft-capped attention logits "
                     "(softcap=30.0) are not supported by SDPA)"]
    ran = A.attention_backend_report()["ran"]
    assert set(ran) == {"llama", "gemma2"} and list(ran["gemma2"]) == ["torch"]


def test_mask_conversion():
    kpm = torch.ones(2, 10, dtype=torch.bool)
    kpm[1, 7:] = False
    i, j = torch.arange(10)[:, None], torch.arange(10)[None, :]
    causal = (j <= i)[None, None] & kpm[:, None, None, :]
    assert A.mask_to_causal_and_padding(None, 10, 10) == (True, None)
    assert A.mask_to_causal_and_padding(None, 4, 10) is None  # SDPA's top-left "causal": not the kernels'
    c, p = A.mask_to_causal_and_padding(causal, 10, 10)
    assert c is True and torch.equal(p, kpm)
    fl = torch.zeros(2, 1, 10, 10).masked_fill(~causal, torch.finfo(torch.float32).min)
    c, p = A.mask_to_causal_and_padding(fl, 10, 10)
    assert c is True and torch.equal(p, kpm)
    win = causal & (j > i - 3)[None, None]
    assert A.mask_to_causal_and_padding(win, 10, 10) is None
    c, p = A.mask_to_causal_and_padding(win, 10, 10, window=3)
    assert c is True and torch.equal(p, kpm)


@pytest.mark.skipif(A.ATTENTION_BACKENDS.get("flash_attn").unavailable() is None, reason="flash-attn installed")
def test_cli_flash_attn_without_the_package_exits_2_with_one_line_and_writes_nothing(tmp_path):
    from tests.helpers import launch

    out = launch.run(["kernels.attention=flash_attn", f"output_dir={tmp_path / 'runs'}", "run_name=fa"], timeout=180)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(lines) == 1 and "pip install --no-build-isolation 'flash-attn>=2.6'" in lines[0] and "kernels.attention" in lines[0], lines
    assert "Traceback" not in out.stderr and not out.stdout.strip()
    assert not (tmp_path / "runs").exists()  # not even Hydra's .hydra/ or the job log


def test_gpu_check_without_cuda_prints_one_line_and_exits_0():
    import subprocess
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the script would measure")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout == "no CUDA device: nothing measured\n" and not out.stderr


def test_bf16_per_row_tau_tempers_without_a_bias():
    """The joint frozen pass gives each row its own τ as one multiply of q; in bf16 1/τ must not be
    rounded first (1/3 -> 0.334 tempers every logit of that row as τ = 2.994, 1.5 -> 1.497). The
    effective scale q'·s / (q·scaling/τ) is 1 up to bf16's unbiased round-off (mean ≤ 1e-4)."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(3, H, 64, D, generator=g).bfloat16()
    k = torch.randn(3, HKV, 64, D, generator=g).bfloat16()
    tau = torch.tensor([3.0, 1.5, 5.0])
    call = A.AttentionCall(q, k, k, None, D ** -0.5, tau)
    q2, scale = call.tempered_query_and_scale()
    assert q2.dtype == torch.bfloat16
    ratio = (q2.double() * scale) / (q.double() * (D ** -0.5) / tau.double()[:, None, None, None])
    ratio = ratio[q.double().abs() > 1e-3]
    assert (ratio - 1).abs().max() <= 2 ** -8  # one bf16 rounding
    assert abs(float((ratio - 1).mean())) <= 1e-4  # and no systematic shift of τ


def test_bf16_scalar_tau_in_the_torch_reference_folds_into_the_scale():
    """The torch backend's scalar τ is exactly a smaller scale (one rounding, as SDPA's path), and a
    per-row τ equal for every row gives the same logits up to one more bf16 rounding."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, h, 16, D, generator=g).bfloat16() for h in (H, HKV, HKV))
    s = D ** -0.5
    scalar = additive_mask_attention_ref(q, k, v, None, s, 3.0, H // HKV)
    folded = additive_mask_attention_ref(q, k, v, None, s / 3.0, 1.0, H // HKV)
    assert torch.equal(scalar, folded)
    per_row = additive_mask_attention_ref(q, k, v, None, s, torch.tensor([3.0, 3.0]), H // HKV)
    torch.testing.assert_close(per_row.float(), scalar.float(), atol=2e-2, rtol=2e-2)


def _bloom(vocab: int = 64):
    torch.manual_seed(0)
    return transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=vocab, hidden_size=32, n_layer=2,
                                                                  n_head=4)).eval()


def test_a_model_with_its_own_attention_code_refuses_a_tau_instead_of_ignoring_it():
    """Bloom (like Falcon, CodeGen, MPT) keeps its built-in attention whatever attn_implementation says
    (transformers only warns): before, set_temperature set a tau that no code read, and ASU distilled
    from the unchanged model without a word. τ = 1 (every other method) still runs."""
    from pipeline.models.tempered_attention import tempered_attention_problem

    m = enable_tempered_attention(_bloom())
    assert m.config._attn_implementation != "tempered" and len(attention_modules(m)) == 2
    problem = tempered_attention_problem(m)
    assert problem is not None and "BloomForCausalLM runs its own attention code" in problem
    with pytest.raises(ValueError, match="tau would be ignored"):
        set_temperature(m, 2.0)
    with pytest.raises(ValueError, match="tau would be ignored"):
        set_temperature(m, torch.tensor([[2.0]]))  # a per-row tau as the joint frozen pass sets it
    set_temperature(m, 1.0)
    ids = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        assert torch.isfinite(m(input_ids=ids).logits).all()
    llama = enable_tempered_attention(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)))
    assert tempered_attention_problem(llama) is None
    set_temperature(llama, 2.0)


def test_models_that_run_the_attention_interface_take_a_tau_whatever_their_other_flags():
    """StableLM (like BioGPT, Jamba, Qwen3-Next) runs transformers' attention interface but leaves
    ``_supports_attention_backend`` False: ASU was refused on them though the tau does reach their
    attention. A model without layer_idx attention modules (GPT-Neo) loads for the methods without a
    tau; a tau is refused on it in one line."""
    from pipeline.models.tempered_attention import tempered_attention_problem

    torch.manual_seed(0)
    m = enable_tempered_attention(transformers.StableLmForCausalLM(transformers.StableLmConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4)).eval())
    assert m.config._attn_implementation == "tempered" and tempered_attention_problem(m) is None
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        plain = m(input_ids=ids).logits
        set_temperature(m, 2.0)
        tempered = m(input_ids=ids).logits
        set_temperature(m, 1.0)
    assert (tempered - plain).abs().max() > 1e-4  # the tau reached the attention
    neo = enable_tempered_attention(transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global"], 2]])).eval())
    assert "has no attention modules with a layer_idx" in tempered_attention_problem(neo)
    with torch.no_grad():
        assert torch.isfinite(neo(input_ids=ids).logits).all()


def test_cli_asu_on_a_model_with_its_own_attention_is_one_line_before_training(tmp_path):
    from tests.helpers import launch
    from tests.helpers.tiny import build, train_overrides

    model_dir, data_dir = build(tmp_path / "m")
    vocab = transformers.AutoConfig.from_pretrained(model_dir).vocab_size
    for f in ("config.json", "model.safetensors"):
        (model_dir / f).unlink()
    _bloom(vocab).save_pretrained(model_dir, safe_serialization=True)
    args = train_overrides(model_dir, data_dir, tmp_path / "runs", "bloom", steps=1)
    out = launch.run(args + ["method=asu_gd"], timeout=180)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "config error at 'model.path': BloomForCausalLM runs its own attention code" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "runs" / "bloom" / "checkpoints").exists()
    ok = launch.run(args + ["method=grad_diff", "eval.enabled=false"], timeout=180)  # no tau: it trains
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_an_attention_input_no_backend_applies_is_refused_not_dropped():
    """Inkling passes a relative-position logit bias (``position_bias``) to its attention function; the
    tempered backends used to drop it, so student and teacher were another network even at tau = 1
    (max logit error 0.38 on a tiny model) while the probe passed."""
    inkling = pytest.importorskip("transformers.models.inkling.modeling_inkling")
    from transformers.models.inkling.configuration_inkling import InklingTextConfig

    from pipeline.models.tempered_attention import tempered_attention_problem

    cfg = InklingTextConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, swa_num_attention_heads=4, swa_num_key_value_heads=2,
                            swa_head_dim=16, sliding_window_size=4, d_rel=4, rel_extent=8, intermediate_size=64,
                            moe_intermediate_size=32, n_routed_experts=2, num_experts_per_tok=1, n_shared_experts=1,
                            max_position_embeddings=64, initializer_range=0.2, pad_token_id=0)
    torch.manual_seed(0)
    model = enable_tempered_attention(inkling.InklingForCausalLM(cfg).eval())
    problem = tempered_attention_problem(model)
    assert problem is not None and "position_bias" in problem, problem
    with pytest.raises(A.AttentionBackendError, match="position_bias"):
        with torch.no_grad():
            model(input_ids=torch.randint(3, 64, (1, 6)))


@pytest.mark.parametrize("backend", ["sdpa", "torch"])
def test_sparse_attentions_selected_keys_are_applied_at_every_tau(backend):
    """DeepSeek-V3.2's indexer picks each query's top-k keys; transformers applies them as a mask for
    "eager"/"sdpa" only and passes ``indices`` to any other attention function, which dropped them: a
    dense model (max logit error 8.8 at tau = 1, index_topk=3) with the probe passing."""
    dsv32 = pytest.importorskip("transformers.models.deepseek_v32.modeling_deepseek_v32")
    from transformers.models.deepseek_v32.configuration_deepseek_v32 import DeepseekV32Config

    from pipeline.models.tempered_attention import set_temperature

    cfg = DeepseekV32Config(vocab_size=96, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=2,
                            num_experts_per_tok=1, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=16,
                            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, first_k_dense_replace=0,
                            max_position_embeddings=64, index_topk=3, index_head_dim=16, index_n_heads=2,
                            initializer_range=0.3)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = dsv32.DeepseekV32ForCausalLM(cfg).eval()
    ids = torch.randint(3, 90, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # one right-padded row
    rows = mask.bool()
    with torch.no_grad():
        stock = model(input_ids=ids, attention_mask=mask).logits
        for layer in model.model.layers:  # the stock model at tau = 2: q / 2 in every attention
            layer.self_attn.scaling /= 2.0
        stock_tau2 = model(input_ids=ids, attention_mask=mask).logits
        for layer in model.model.layers:
            layer.self_attn.scaling *= 2.0
    enable_tempered_attention(model)
    A.set_attention_backend(backend)
    try:
        for tau, want in ((1.0, stock), (2.0, stock_tau2)):
            set_temperature(model, tau)
            with torch.no_grad():
                got = model(input_ids=ids, attention_mask=mask).logits
            assert (got - want)[rows].abs().max().item() < 1e-4, (tau, backend)
    finally:
        A.set_attention_backend("auto")


def test_an_attention_class_not_named_attention_is_found_and_tempered():
    """LongcatFlash's attention is ``LongcatFlashMLA``: found by its name's ending, it takes a tau (before,
    ASU was refused with "has no attention modules with a layer_idx")."""
    longcat = pytest.importorskip("transformers.models.longcat_flash.modeling_longcat_flash")
    from transformers import LongcatFlashConfig

    from pipeline.models.tempered_attention import temperature, tempered_attention_problem

    cfg = LongcatFlashConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             ffn_hidden_size=64, expert_ffn_hidden_size=32, n_routed_experts=4, moe_topk=2, head_dim=8,
                             kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                             max_position_embeddings=64)
    torch.manual_seed(0)
    model = enable_tempered_attention(longcat.LongcatFlashForCausalLM(cfg).eval())
    assert len(attention_modules(model)) >= 2
    assert tempered_attention_problem(model) is None
    ids = torch.randint(3, 64, (1, 8))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with temperature(model, 2.5):
            tempered = model(input_ids=ids).logits
    assert (tempered - plain).abs().max() > 1e-4


@pytest.mark.parametrize("tau", [0.0, -1.0, float("inf"), float("nan"), torch.tensor([[1.0], [0.0]])])
def test_a_temperature_that_is_not_positive_and_finite_is_refused(tau):
    model = enable_tempered_attention(_build("llama"))
    with pytest.raises(ValueError, match="finite and > 0"):
        set_temperature(model, tau)
