"""Benchmark: tempered attention, forward + backward, implementations side by side in one run.

Single output (``softmax(Q Kᵀ / (tau·sqrt d)) V``, causal, GQA):

* ``torch_ref``  — ``kernels.reference.tempered_attention_ref`` (explicit B×H×T×T logits, fp32 softmax)
* ``sdpa``       — ``torch.nn.functional.scaled_dot_product_attention`` with q pre-scaled by 1/tau
                   (= ``scale = 1/(tau·sqrt d)``; the pipeline's CPU fallback)
* ``triton``     — ``kernels.tempered_attention`` (CUDA only; on CPU it would run in the Triton
                   interpreter, which measures numpy, not the kernel — skipped with a note)
* ``flash_attn`` — ``flash_attn_func(softmax_scale=1/(tau·sqrt d))`` when flash-attn is installed (CUDA)

Dual output (teacher at tau, student at 1 from the same Q/K/V), compared with one single call of
the same implementation family (target: dual <= 1.35x one call; two calls = 2x) and with two
separate calls ("vs two calls": the same two outputs from the same inputs, like for like):

* ``dual_torch``  — ``tempered_attention_dual_ref`` (one Q Kᵀ GEMM, two softmaxes, two P·V)
* ``2x sdpa`` / ``2x torch_ref`` — two separate calls
* ``dual_triton`` / ``2x triton`` — on CUDA

``dual_torch`` against ONE ``torch_ref`` call is not like for like: ``tempered_attention_ref``
also runs a ``where`` over the T×T logits (rows without visible keys) and, in bf16/fp16, casts them
to fp32 and back, passes the dual reference leaves out, so its "vs one call" ratio understates what
the second output costs; the table marks it ``(not like for like)``, and its ``vs two calls``
(against ``2x torch_ref``) is the fair one. ``dual_triton`` vs one ``triton`` call is the kernel
against itself (the target's ratio).

Time: per sequence length, every implementation (single and dual) in this process on the same
Q/K/V, ``--warmup`` untimed calls each, then ``--iters`` rounds (default 5; CUDA 20) of one call of
each, the order rotated every round (``common.time_rounds``), so a change of the host's load falls
on all alike. Reported: the median per implementation, ratios of the medians and (``*_paired``)
the median of the per-round ratios. Throughput = attention FLOPs (4·B·H·T·S·D forward, ×2.5 more
for the backward, halved when causal) per second. Peak memory (CUDA only) from
``torch.cuda.max_memory_allocated``. Threads pinned. Arguments other than the device's defaults
add to the result's name (``common.out_name``: ``bench_attention_seq-256_cpu.json``).

    .venv/bin/python benchmarks/bench_attention.py           # CPU quick defaults (~1 min)
    .venv/bin/python benchmarks/bench_attention.py --backends  # the pipeline's kernels.attention backends:
        # sdpa vs the eager reference (torch), T in {256, 1024, 2048}, fwd+bwd, time (side by side,
        # as above) + peak memory (bench_attention_backends_<device>.json; docs/performance.md)
    .venv/bin/python benchmarks/bench_attention.py --seq 1024 2048 4096   # CUDA: B2 H32 Hkv8 D128 bf16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    OneLineParser,
    cuda_peak_bytes,
    device_info,
    device_name,
    dtype_name,
    fmt,
    median_ratio,
    mib,
    non_negative_int,
    out_name,
    paired_ratio,
    positive_float,
    positive_int,
    print_table,
    resolve_device,
    set_threads,
    time_rounds,
    write_json,
)

# the implementation whose single call each dual-group row is compared with, and its two-call peer
ONE_CALL = {"dual_torch": "torch_ref", "2x torch_ref": "torch_ref", "2x sdpa": "sdpa",
            "dual_triton": "triton", "2x triton": "triton"}
TWO_CALLS = {"dual_torch": "2x torch_ref", "dual_triton": "2x triton"}
NOT_LIKE_FOR_LIKE = {"dual_torch"}  # its one-call peer does more elementwise T x T passes (module docstring)


def _flops(B: int, H: int, T: int, S: int, D: int, causal: bool, fwd_bwd: bool = True) -> float:
    """Attention FLOPs of one call: 4·B·H·T·S·D forward (halved when causal), ×3.5 with the backward."""
    f = 4.0 * B * H * T * S * D
    if causal:
        f /= 2
    return f * (3.5 if fwd_bwd else 1.0)


def main() -> None:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", type=device_name, default="auto", help="auto, cpu or cuda")
    ap.add_argument("--threads", type=positive_int, default=1)
    ap.add_argument("--batch", type=positive_int, default=None)
    ap.add_argument("--heads", type=positive_int, default=None)
    ap.add_argument("--kv-heads", type=positive_int, default=None)
    ap.add_argument("--head-dim", type=positive_int, default=None)
    ap.add_argument("--seq", type=positive_int, nargs="+", default=None)
    ap.add_argument("--dtype", type=dtype_name, default=None)
    ap.add_argument("--tau", type=positive_float, default=2.3)
    ap.add_argument("--iters", type=positive_int, default=None,
                    help="timed rounds, one call of every implementation each (default 5; CUDA 20 outside --backends)")
    ap.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results)")
    ap.add_argument("--backends", action="store_true",
                    help="compare the pipeline's kernels.attention backends (sdpa vs the eager reference)")
    ap.add_argument("--warmup", type=non_negative_int, default=None,
                    help="untimed calls of each before the rounds (default 1; 3 on CUDA outside --backends)")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    defaults = _defaults(args.backends, dev == "cuda")
    cfg = _resolved(args, defaults)
    if cfg["heads"] % cfg["kv_heads"]:
        ap.error(f"heads {cfg['heads']} must be a multiple of kv heads {cfg['kv_heads']} (--heads / --kv-heads)")
    if args.backends:
        return pipeline_backends(args, dev, cfg, defaults)
    single_and_dual(args, dev, cfg, defaults)


def _defaults(backends: bool, gpu: bool) -> dict:
    """Each setting's default (they depend on the mode and the device); ``out_name`` names the
    result by the settings that differ from these."""
    if backends:
        return {"batch": 2, "heads": 8, "kv_heads": 8, "head_dim": 64, "seq": [256, 1024, 2048],
                "dtype": "bfloat16" if gpu else "float32", "tau": 2.3, "iters": 5, "warmup": 1, "threads": 1}
    return {"batch": 2 if gpu else 1, "heads": 32 if gpu else 8, "kv_heads": 8 if gpu else 2,
            "head_dim": 128 if gpu else 64, "seq": [1024, 2048, 4096] if gpu else [256, 512, 1024],
            "dtype": "bfloat16" if gpu else "float32", "tau": 2.3, "iters": 20 if gpu else 5,
            "warmup": 3 if gpu else 1, "threads": 1}


def single_and_dual(args: argparse.Namespace, dev: str, cfg: dict, defaults: dict) -> None:
    """The default mode: single- and dual-output implementations side by side (module docstring)."""
    threads = set_threads(args.threads)
    import torch

    from kernels.reference import tempered_attention_dual_ref, tempered_attention_ref, tempered_attention_sdpa
    from kernels.tempered_attention import INTERPRET, tempered_attention, tempered_attention_dual

    gpu = dev == "cuda"
    B, H, Hkv, D, seqs = cfg["batch"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["seq"]
    dtype = getattr(torch, cfg["dtype"])
    iters, warmup, tau = cfg["iters"], cfg["warmup"], cfg["tau"]
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
        groups = {name: group for group, impls in (("single", single), ("dual", dual)) for name in impls}
        steps = {}
        for name, fn in {**single, **dual}.items():
            def step(fn=fn, q=q, k=k, v=v):
                out = fn(q, k, v)
                outs = out if isinstance(out, tuple) else (out,)
                loss = sum(o.float().square().mean() for o in outs)
                torch.autograd.grad(loss, (q, k, v))

            steps[name] = step
        # every implementation side by side: single and dual rows are timed in the same rounds
        times = time_rounds(steps, dev, warmup=warmup, rounds=iters)
        for name, step in steps.items():
            t = times[name]
            err = t.pop("error", None)
            peak = None
            if gpu and err is None:
                try:
                    peak = cuda_peak_bytes(step)
                except Exception as exc:  # keep the other rows of the table
                    err = f"{type(exc).__name__}: {exc}"[:200]
            results.append({"T": T, "group": groups[name], "impl": name, "peak_bytes": peak, "error": err, **t})
            print(f"  T={T} {name}: {fmt(t.get('ms_median'), '.2f')} ms" + (f"  ({err})" if err else ""), flush=True)

    # ratios within the run: of the medians, and (_paired) the median of the per-round ratios
    by = {(r["T"], r["impl"]): r for r in results}
    table = []
    for r in results:
        ms = r.get("ms_median")
        fl = _flops(B, H, r["T"], r["T"], D, True) * (2 if r["group"] == "dual" else 1)
        tflops = fl / (ms * 1e-3) / 1e12 if ms else None
        two_txt = "-"
        if r["group"] == "single":
            rel_name = "flash_attn" if by.get((r["T"], "flash_attn")) else "sdpa"
            peer = by.get((r["T"], rel_name), {})
            rel = median_ratio(peer, r)  # throughput vs peer = peer's time / this time
            r["throughput_vs_" + rel_name] = rel
            r["throughput_vs_" + rel_name + "_paired"] = paired_ratio(peer, r)
            rel_txt = f"{fmt(rel, '.2f')}x / {fmt(r['throughput_vs_' + rel_name + '_paired'], '.2f')}x thr vs {rel_name}"
        else:
            base_name = ONE_CALL[r["impl"]]
            one = by.get((r["T"], base_name), {})
            rel = median_ratio(r, one)
            r["time_vs_one_call"] = rel
            r["time_vs_one_call_paired"] = paired_ratio(r, one)
            r["one_call_impl"] = base_name
            r["one_call_like_for_like"] = r["impl"] not in NOT_LIKE_FOR_LIKE
            rel_txt = f"{fmt(rel, '.2f')}x / {fmt(r['time_vs_one_call_paired'], '.2f')}x one {base_name} call"
            if r["impl"] in NOT_LIKE_FOR_LIKE:
                rel_txt += " (not like for like)"
            if r["impl"] in TWO_CALLS:
                two = by.get((r["T"], TWO_CALLS[r["impl"]]), {})
                r["two_calls_impl"] = TWO_CALLS[r["impl"]]
                r["time_vs_two_calls"] = median_ratio(r, two)
                r["time_vs_two_calls_paired"] = paired_ratio(r, two)
                two_txt = (f"{fmt(r['time_vs_two_calls'], '.2f')}x / {fmt(r['time_vs_two_calls_paired'], '.2f')}x "
                           f"{TWO_CALLS[r['impl']]}")
        table.append([r["T"], r["group"], r["impl"], fmt(ms, ".2f"), fmt(tflops, ".3f"), mib(r["peak_bytes"]), rel_txt,
                      two_txt])
    print()
    # ratios: of the medians / the median of the per-round ratios (the JSON's x and x_paired)
    text = print_table(["T", "group", "impl", "fwd+bwd ms (median)", "TFLOP/s", "peak MiB", "relative (medians / paired)",
                        "dual vs two calls (medians / paired)"], table)
    notes.append("dual_torch vs one torch_ref call is not like for like (tempered_attention_ref also runs a where() "
                 "over the T x T logits, and in bf16/fp16 casts them to fp32 and back, which the dual reference leaves "
                 "out); its time_vs_two_calls (vs 2x torch_ref: the same two outputs) is.")
    for n in notes:
        print("note:", n)
    payload = {
        "benchmark": "tempered_attention",
        "env": device_info(dev),
        "config": {"batch": B, "heads": H, "kv_heads": Hkv, "head_dim": D, "seq": seqs, "dtype": str(dtype),
                   "tau": tau, "causal": True, "warmup": warmup, "iters": iters, "threads": threads},
        "timing_method": TIMING_METHOD,
        "flops_formula": "4*B*H*T*S*D/2 (causal) * 3.5 for fwd+bwd; dual counts two attentions",
        "targets": {"triton_vs_flash_attn_throughput_min": 0.9, "dual_vs_one_call_max": 1.35},
        "results": results,
        "table": text,
        "notes": notes,
    }
    write_json(out_name("bench_attention", cfg, defaults), payload, args.out)


TIMING_METHOD = ("one process, the same inputs per T; warmup untimed calls of each implementation, then iters rounds "
                 "of one call of each, the order rotated every round; ms_median = median; a ratio = ratio of the "
                 "medians, *_paired = median of the per-round ratios")


def _resolved(args: argparse.Namespace, defaults: dict) -> dict:
    """The run's settings: each argument as given, or its (device's) default when not given."""
    return {k: defaults[k] if getattr(args, k) is None else getattr(args, k) for k in defaults}


def pipeline_backends(args: argparse.Namespace, dev: str, cfg: dict, defaults: dict) -> None:
    """``kernels.attention`` backends exactly as the pipeline calls them (``AttentionCall`` ->
    backend ``forward``), with the masks transformers gives each: the eager reference (``torch``)
    gets the materialised (B, 1, T, T) float causal mask (built outside the timed step, as the model
    builds it once per forward), ``sdpa`` gets none (``is_causal``). fwd+bwd, tau=2.3, causal."""
    threads = set_threads(args.threads)
    import torch
    from common import cpu_peak_bytes
    from transformers.masking_utils import eager_mask

    from pipeline.models.attention import ATTENTION_BACKENDS, AttentionCall

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
    B, H, Hkv, D, seqs = cfg["batch"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["seq"]
    dtype = getattr(torch, cfg["dtype"])
    iters, warmup = cfg["iters"], cfg["warmup"]
    names = ["torch", "sdpa"]
    results, table = [], []
    for T in seqs:
        g = torch.Generator(device="cpu").manual_seed(T)
        q = torch.randn(B, H, T, D, generator=g).to(dev, dtype).requires_grad_(True)
        k = torch.randn(B, Hkv, T, D, generator=g).to(dev, dtype).requires_grad_(True)
        v = torch.randn(B, Hkv, T, D, generator=g).to(dev, dtype).requires_grad_(True)
        masks = {"torch": eager_mask(B, T, T, dtype=dtype, device=dev), "sdpa": None}
        outs, steps = {}, {}
        for name in names:
            backend = ATTENTION_BACKENDS.get(name)

            def step(backend=backend, mask=masks[name], q=q, k=k, v=v):
                out = backend.forward(AttentionCall(q, k, v, mask, D ** -0.5, args.tau))
                torch.autograd.grad(out.float().square().mean(), (q, k, v))
                return out

            steps[name] = step
        times = time_rounds(steps, dev, warmup=warmup, rounds=iters)  # side by side, order rotated
        for name in names:
            if "error" in times[name]:
                raise SystemExit(f"error: backend {name} failed at T={T}: {times[name]['error']}")
            if libc is not None:
                libc.malloc_trim(0)
            peak = cuda_peak_bytes(steps[name]) if gpu else cpu_peak_bytes(steps[name])
            with torch.no_grad():
                backend = ATTENTION_BACKENDS.get(name)
                outs[name] = backend.forward(AttentionCall(q, k, v, masks[name], D ** -0.5, args.tau)).float()
            results.append({"T": T, "backend": name, "peak_bytes": peak, **times[name]})
            print(f"  T={T} {name}: {fmt(times[name]['ms_median'], '.1f')} ms, peak {mib(peak)} MiB", flush=True)
        diff = (outs["sdpa"] - outs["torch"]).abs().max().item()
        ref = next(r for r in results if r["T"] == T and r["backend"] == "torch")
        for r in results:
            if r["T"] == T:
                r["speedup_vs_eager"] = median_ratio(ref, r)
                r["speedup_vs_eager_paired"] = paired_ratio(ref, r)
                r["max_abs_diff_vs_eager"] = diff if r["backend"] == "sdpa" else 0.0
                table.append([T, r["backend"], fmt(r["ms_median"], ".1f"), mib(r["peak_bytes"]),
                              f"{fmt(r['speedup_vs_eager'], '.2f')}x / {fmt(r['speedup_vs_eager_paired'], '.2f')}x",
                              f"{r['max_abs_diff_vs_eager']:.1e}"])
    print()
    text = print_table(["T", "backend", "fwd+bwd ms (median)", "peak MiB", "speed vs eager (medians / paired)",
                        "max |diff|"], table)
    payload = {
        "benchmark": "attention_backends",
        "env": device_info(dev),
        "config": {"batch": B, "heads": H, "kv_heads": Hkv, "head_dim": D, "seq": seqs, "dtype": str(dtype),
                   "tau": args.tau, "causal": True, "warmup": warmup, "iters": iters, "threads": threads},
        "timing_method": TIMING_METHOD,
        "peak_memory": "CUDA: max_memory_allocated growth; CPU: RSS high-water-mark growth of one step "
                       "(glibc M_MMAP_THRESHOLD=64 KiB, malloc_trim before it)",
        "results": results,
        "table": text,
    }
    write_json(out_name("bench_attention_backends", cfg, defaults), payload, args.out)


if __name__ == "__main__":
    main()
