"""Benchmark: tempered attention, forward + backward, implementations side by side in one run.

Single output (``softmax(Q Kᵀ / (tau·sqrt d)) V``, causal, GQA):

* ``torch_ref``  — ``kernels.reference.tempered_attention_ref`` (explicit B×H×T×T logits, fp32 softmax)
* ``sdpa``       — ``torch.nn.functional.scaled_dot_product_attention`` with q pre-scaled by 1/tau
                   (= ``scale = 1/(tau·sqrt d)``; the pipeline's CPU fallback)
* ``triton``     — ``kernels.tempered_attention`` (CUDA only; on CPU it would run in the Triton
                   interpreter, which measures numpy, not the kernel — skipped with a note)
* ``flash_attn`` — ``flash_attn_func(softmax_scale=1/(tau·sqrt d))`` when flash-attn is installed (CUDA)

Dual output (teacher at tau, student at 1 from the same Q/K/V), compared with one single call of
the same implementation family (target: dual <= 1.35x one call; two calls = 2x):

* ``dual_torch``  — ``tempered_attention_dual_ref`` (one Q Kᵀ GEMM, two softmaxes, two P·V)
* ``2x sdpa`` / ``2x torch_ref`` — two separate calls
* ``dual_triton`` / ``2x triton`` — on CUDA

Throughput = attention FLOPs (4·B·H·T·S·D forward, ×2.5 more for the backward, halved when causal)
per second. Peak memory (CUDA only) from ``torch.cuda.max_memory_allocated``. Threads pinned.

    .venv/bin/python benchmarks/bench_attention.py           # CPU quick defaults (< 1 min)
    .venv/bin/python benchmarks/bench_attention.py --backends  # the pipeline's kernels.attention backends:
        # sdpa vs the eager reference (torch), T in {256, 1024, 2048}, fwd+bwd, time + peak memory
        # (bench_attention_backends_<device>.json; the table in docs/performance.md)
    .venv/bin/python benchmarks/bench_attention.py --seq 1024 2048 4096   # CUDA: B2 H32 Hkv8 D128 bf16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cuda_peak_bytes, device_info, fmt, mib, print_table, set_threads, time_fn, write_json  # noqa: E402


def _flops(B, H, T, S, D, causal, fwd_bwd=True):
    f = 4.0 * B * H * T * S * D
    if causal:
        f /= 2
    return f * (3.5 if fwd_bwd else 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small CPU-friendly defaults (the default on CPU)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--head-dim", type=int, default=None)
    ap.add_argument("--seq", type=int, nargs="+", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--tau", type=float, default=2.3)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--backends", action="store_true",
                    help="compare the pipeline's kernels.attention backends (sdpa vs the eager reference)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed calls before the timed ones (default 1; 3 on CUDA outside --backends)")
    args = ap.parse_args()
    if args.backends:
        args.warmup = 1 if args.warmup is None else args.warmup
        return pipeline_backends(args)

    threads = set_threads(args.threads)
    import torch

    from kernels.reference import tempered_attention_dual_ref, tempered_attention_ref, tempered_attention_sdpa
    from kernels.tempered_attention import INTERPRET, tempered_attention, tempered_attention_dual

    dev = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = dev == "cuda"
    B = args.batch or (2 if gpu else 1)
    H = args.heads or (32 if gpu else 8)
    Hkv = args.kv_heads or (8 if gpu else 2)
    D = args.head_dim or (128 if gpu else 64)
    seqs = args.seq or ([1024, 2048, 4096] if gpu else [256, 512, 1024])
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    iters = args.iters or (20 if gpu else 5)
    warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    tau = args.tau
    notes = []

    flash = None
    if gpu:
        try:
            from flash_attn import flash_attn_func as flash  # type: ignore
        except ImportError:
            notes.append("flash_attn: skipped (flash-attn not installed)")
    else:
        notes.append("flash_attn: skipped (CUDA only)")
    run_triton = gpu and not INTERPRET
    if not run_triton:
        notes.append("triton / dual_triton: skipped on CPU (the interpreter would time numpy, not the kernel)")

    single = {
        "torch_ref": lambda q, k, v: tempered_attention_ref(q, k, v, tau, causal=True),
        "sdpa": lambda q, k, v: tempered_attention_sdpa(q, k, v, tau, causal=True),
    }
    if run_triton:
        single["triton"] = lambda q, k, v: tempered_attention(q, k, v, tau, causal=True, backend="triton")
    if flash is not None:
        single["flash_attn"] = lambda q, k, v: flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     softmax_scale=1.0 / (tau * D ** 0.5), causal=True)
    dual = {
        "dual_torch": lambda q, k, v: tempered_attention_dual_ref(q, k, v, tau, 1.0, causal=True),
        "2x torch_ref": lambda q, k, v: (tempered_attention_ref(q, k, v, tau), tempered_attention_ref(q, k, v, 1.0)),
        "2x sdpa": lambda q, k, v: (tempered_attention_sdpa(q, k, v, tau), tempered_attention_sdpa(q, k, v, 1.0)),
    }
    if run_triton:
        dual["dual_triton"] = lambda q, k, v: tempered_attention_dual(q, k, v, tau, 1.0, causal=True,
                                                                      backend="triton")
        dual["2x triton"] = lambda q, k, v: (tempered_attention(q, k, v, tau, backend="triton"),
                                            tempered_attention(q, k, v, 1.0, backend="triton"))

    results = []
    for T in seqs:
        g = torch.Generator(device="cpu").manual_seed(T)
        q = torch.randn(B, H, T, D, generator=g).to(dev, dtype).requires_grad_(True)
        k = torch.randn(B, Hkv, T, D, generator=g).to(dev, dtype).requires_grad_(True)
        v = torch.randn(B, Hkv, T, D, generator=g).to(dev, dtype).requires_grad_(True)
        for group, impls in (("single", single), ("dual", dual)):
            for name, fn in impls.items():
                def step(fn=fn, q=q, k=k, v=v):
                    out = fn(q, k, v)
                    outs = out if isinstance(out, tuple) else (out,)
                    loss = sum(o.float().square().mean() for o in outs)
                    torch.autograd.grad(loss, (q, k, v))

                try:
                    t = time_fn(step, dev, warmup=warmup, iters=iters)
                    peak = cuda_peak_bytes(step) if gpu else None
                    err = None
                except Exception as exc:  # keep the other rows of the table
                    t, peak, err = {}, None, f"{type(exc).__name__}: {exc}"[:200]
                r = {"T": T, "group": group, "impl": name, "peak_bytes": peak, "error": err, **t}
                results.append(r)
                print(f"  T={T} {name}: {fmt(t.get('ms_median'), '.2f')} ms" + (f"  ({err})" if err else ""),
                      flush=True)

    # ratios within the run
    by = {(r["T"], r["impl"]): r for r in results}
    table = []
    for r in results:
        ms = r.get("ms_median")
        fl = _flops(B, H, r["T"], r["T"], D, True) * (2 if r["group"] == "dual" else 1)
        tflops = fl / (ms * 1e-3) / 1e12 if ms else None
        if r["group"] == "single":
            peer = by.get((r["T"], "flash_attn")) or by.get((r["T"], "sdpa"))
            rel_name = "flash_attn" if by.get((r["T"], "flash_attn")) else "sdpa"
            rel = peer["ms_median"] / ms if ms and peer.get("ms_median") else None  # throughput vs peer
            r["throughput_vs_" + rel_name] = rel
            rel_txt = f"{fmt(rel, '.2f')}x thr vs {rel_name}"
        else:
            base_name = {"dual_torch": "torch_ref", "2x torch_ref": "torch_ref", "2x sdpa": "sdpa",
                         "dual_triton": "triton", "2x triton": "triton"}[r["impl"]]
            one = by.get((r["T"], base_name), {}).get("ms_median")
            rel = ms / one if ms and one else None
            r["time_vs_one_call"] = rel
            r["one_call_impl"] = base_name
            rel_txt = f"{fmt(rel, '.2f')}x one {base_name} call"
        table.append([r["T"], r["group"], r["impl"], fmt(ms, ".2f"), fmt(tflops, ".3f"), mib(r["peak_bytes"]), rel_txt])
    print()
    text = print_table(["T", "group", "impl", "fwd+bwd ms", "TFLOP/s", "peak MiB", "relative"], table)
    for n in notes:
        print("note:", n)
    payload = {
        "benchmark": "tempered_attention",
        "env": device_info(dev),
        "config": {"batch": B, "heads": H, "kv_heads": Hkv, "head_dim": D, "seq": seqs, "dtype": str(dtype),
                   "tau": tau, "causal": True, "warmup": warmup, "iters": iters, "threads": threads},
        "flops_formula": "4*B*H*T*S*D/2 (causal) * 3.5 for fwd+bwd; dual counts two attentions",
        "targets": {"triton_vs_flash_attn_throughput_min": 0.9, "dual_vs_one_call_max": 1.35},
        "results": results,
        "table": text,
        "notes": notes,
    }
    write_json("bench_attention", payload, Path(args.out) if args.out else None)


def pipeline_backends(args) -> None:
    """``kernels.attention`` backends exactly as the pipeline calls them (``AttentionCall`` ->
    backend ``forward``), with the masks transformers gives each: the eager reference (``torch``)
    gets the materialised (B, 1, T, T) float causal mask (built outside the timed step, as the model
    builds it once per forward), ``sdpa`` gets none (``is_causal``). fwd+bwd, tau=2.3, causal."""
    threads = set_threads(args.threads)
    import torch
    from common import cpu_peak_bytes
    from transformers.masking_utils import eager_mask

    from pipeline.models.attention import ATTENTION_BACKENDS, AttentionCall

    dev = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = dev == "cuda"
    libc = None
    if not gpu:
        import ctypes

        # CPU peak = growth of the RSS high-water mark in one step. Tensors above 64 KiB get their own
        # mmap (M_MMAP_THRESHOLD = -3) and go back to the OS when freed, so a step's peak is not hidden
        # by heap the previous step freed but kept (the same setting bench_step.py uses via env).
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 65536)
        except OSError:
            libc = None
    B, H = args.batch or 2, args.heads or 8
    Hkv, D = args.kv_heads or 8, args.head_dim or 64
    seqs = args.seq or [256, 1024, 2048]
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    iters = args.iters or 1
    names = ["torch", "sdpa"]
    results, table = [], []
    for T in seqs:
        g = torch.Generator(device="cpu").manual_seed(T)
        q = torch.randn(B, H, T, D, generator=g).to(dev, dtype).requires_grad_(True)
        k = torch.randn(B, Hkv, T, D, generator=g).to(dev, dtype).requires_grad_(True)
        v = torch.randn(B, Hkv, T, D, generator=g).to(dev, dtype).requires_grad_(True)
        masks = {"torch": eager_mask(B, T, T, dtype=dtype, device=dev), "sdpa": None}
        outs = {}
        for name in names:
            backend = ATTENTION_BACKENDS.get(name)

            def step(backend=backend, mask=masks[name], q=q, k=k, v=v):
                out = backend.forward(AttentionCall(q, k, v, mask, D ** -0.5, args.tau))
                torch.autograd.grad(out.float().square().mean(), (q, k, v))
                return out

            t = time_fn(step, dev, warmup=args.warmup, iters=iters)
            if libc is not None:
                libc.malloc_trim(0)
            peak = cuda_peak_bytes(step) if gpu else cpu_peak_bytes(step)
            with torch.no_grad():
                outs[name] = backend.forward(AttentionCall(q, k, v, masks[name], D ** -0.5, args.tau)).float()
            results.append({"T": T, "backend": name, "peak_bytes": peak, **t})
            print(f"  T={T} {name}: {fmt(t['ms_median'], '.1f')} ms, peak {mib(peak)} MiB", flush=True)
        diff = (outs["sdpa"] - outs["torch"]).abs().max().item()
        ref = next(r for r in results if r["T"] == T and r["backend"] == "torch")
        for r in results:
            if r["T"] == T:
                r["speedup_vs_eager"] = ref["ms_median"] / r["ms_median"]
                r["max_abs_diff_vs_eager"] = diff if r["backend"] == "sdpa" else 0.0
                table.append([T, r["backend"], fmt(r["ms_median"], ".1f"), mib(r["peak_bytes"]),
                              fmt(r["speedup_vs_eager"], ".2f") + "x", f"{r['max_abs_diff_vs_eager']:.1e}"])
    print()
    text = print_table(["T", "backend", "fwd+bwd ms", "peak MiB", "speed vs eager", "max |diff|"], table)
    payload = {
        "benchmark": "attention_backends",
        "env": device_info(dev),
        "config": {"batch": B, "heads": H, "kv_heads": Hkv, "head_dim": D, "seq": seqs, "dtype": str(dtype),
                   "tau": args.tau, "causal": True, "warmup": args.warmup, "iters": iters, "threads": threads},
        "peak_memory": "CUDA: max_memory_allocated growth; CPU: RSS high-water-mark growth of one step "
                       "(glibc M_MMAP_THRESHOLD=64 KiB, malloc_trim before it)",
        "results": results,
        "table": text,
    }
    write_json("bench_attention_backends", payload, Path(args.out) if args.out else None)


if __name__ == "__main__":
    main()
