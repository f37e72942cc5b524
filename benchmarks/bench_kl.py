"""Benchmark: streaming fused-linear KL (kernels/fused_kl.py) vs naive materialised logits.

Forward + backward of KL(teacher || student) from last hidden states and lm_head weights, gradients
w.r.t. the student hidden states and lm_head weight. Implementations measured side by side in the
same run (ratios are only meaningful within one run):

* ``naive``  — ``kernels.reference.naive_linear_kl``: N×V logits for both models, log_softmax, kl_div.
* ``fused``  — ``kernels.fused_kl.fused_linear_kl`` (row chunks, chunk×V ≤ 64 MiB fp32).
* ``liger``  — Liger-Kernel's ``LigerFusedLinearJSD(jsd_beta=0)`` (= forward KL(teacher||student),
  token mean) when ``liger-kernel`` is installed and CUDA is available; otherwise listed as skipped.

Peak memory: CUDA ``max_memory_allocated`` (inputs excluded); CPU: resident-set high-water-mark
growth of the measured call in a fresh subprocess per (config, implementation) — see
``benchmarks/common.py``. Threads are pinned (``--threads``, default 1) and recorded in the JSON.

    .venv/bin/python benchmarks/bench_kl.py            # CPU quick defaults (~1 min)
    .venv/bin/python benchmarks/bench_kl.py --rows 8192 --hidden 4096 --vocab 32000 128256  # GPU

Targets (``TARGETS``, fused vs naive in the same run): peak memory <= 1/8, time <= 1.1x; each fused
row records ``targets_met`` (per target true / false, null when not measured) and the table prints
it. The exit code does not depend on it. Writes ``bench_kl_<device>.json``; a ``--vocab`` other than
the default adds ``_v<V>-<V>...`` to the name (``bench_kl_v32000_cpu.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    cpu_peak_bytes,
    cuda_peak_bytes,
    device_info,
    fmt,
    mib,
    print_table,
    run_worker,
    set_threads,
    time_fn,
    write_json,
)

IMPLS = ("naive", "fused", "liger")
DEFAULT_VOCAB = [32_000, 128_256]
TARGETS = {"memory_ratio_max": 1 / 8, "time_ratio_max": 1.1}  # fused vs naive, same run


def _targets_met(ratios: dict) -> dict:
    """Per target: True / False, None when the ratio was not measured."""
    t, m = ratios.get("time"), ratios.get("memory")
    return {"memory_ratio_max": None if m is None else m <= TARGETS["memory_ratio_max"],
            "time_ratio_max": None if t is None else t <= TARGETS["time_ratio_max"]}


def _all_met(vals) -> bool | None:
    vals = [v for v in vals if v is not None]
    return all(vals) if vals else None


def _ok(x) -> str:
    return "-" if x is None else ("ok" if x else "FAIL")


def _build(spec: dict):
    import torch

    dev = spec["device"]
    dt = getattr(torch, spec["dtype"])
    N, H, V, seq = spec["rows"], spec["hidden"], spec["vocab"], spec["seq_len"]
    g = torch.Generator(device="cpu").manual_seed(0)
    h_s = (torch.randn(N, H, generator=g) / H ** 0.5).to(dev, dt).requires_grad_(True)
    W_s = (torch.randn(V, H, generator=g)).to(dev, dt).requires_grad_(True)
    h_t = (h_s.detach() + 0.1 * torch.randn(N, H, generator=g).to(dev, dt) / H ** 0.5)
    W_t = (W_s.detach() + 0.1 * torch.randn(V, H, generator=g).to(dev, dt))
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.1] = -100  # ~10% ignored rows (prompt / padding)
    seq_ids = torch.arange(N) // seq
    return h_s, W_s, h_t, W_t, labels.to(dev), seq_ids.to(dev)


def _step_fn(spec: dict):
    import torch

    from kernels.fused_kl import fused_linear_kl
    from kernels.reference import naive_linear_kl

    h_s, W_s, h_t, W_t, labels, seq_ids = _build(spec)
    impl = spec["impl"]
    if impl == "naive":
        def loss_fn():
            return naive_linear_kl(h_s, W_s, h_t, W_t, labels=labels, seq_ids=seq_ids, reduction=spec["reduction"])
    elif impl == "fused":
        def loss_fn():
            return fused_linear_kl(h_s, W_s, h_t, W_t, labels=labels, seq_ids=seq_ids, reduction=spec["reduction"])
    elif impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearJSD  # type: ignore

        jsd = LigerFusedLinearJSD(jsd_beta=0.0, ignore_index=-100, temperature=1.0)

        def loss_fn():
            return jsd(h_s, W_s, h_t, W_t, labels)
    else:
        raise ValueError(impl)

    def step():
        loss = loss_fn()
        return loss, torch.autograd.grad(loss, (h_s, W_s))

    return step


def _errors_vs_fp32(spec: dict, loss, grads) -> dict:
    """Loss relative error and grad errors (max abs error / max abs reference) of one call against
    the naive KL in fp32 on the same inputs: the price of the implementation's precision."""
    import torch

    from kernels.reference import naive_linear_kl

    h_s, W_s, h_t, W_t, labels, seq_ids = (x.float() if x.is_floating_point() else x for x in _build(spec))
    h_s, W_s = h_s.detach().requires_grad_(True), W_s.detach().requires_grad_(True)
    ref = naive_linear_kl(h_s, W_s, h_t, W_t, labels=labels, seq_ids=seq_ids, reduction=spec["reduction"])
    ref_grads = torch.autograd.grad(ref, (h_s, W_s))
    loss, ref = float(loss.detach()), float(ref.detach())
    out = {"loss_rel_err": abs(loss - ref) / max(abs(ref), 1e-12)}
    for name, a, b in zip(("grad_h", "grad_W"), grads, ref_grads):
        out[f"{name}_err"] = float((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-12))
    return out


def worker(spec: dict) -> dict:
    """Measure one (config, impl): peak memory of the first call, then timing, then its errors
    against the fp32 naive KL (computed last, so it adds to neither)."""
    step = _step_fn(spec)
    if spec["device"] == "cuda":
        step()  # compile / warm the allocator before measuring the peak
        peak = cuda_peak_bytes(step)
    else:
        peak = cpu_peak_bytes(step)
    t = time_fn(step, spec["device"], warmup=spec.get("warmup", 0), iters=spec["iters"])
    loss, grads = step()
    del step
    return {"peak_bytes": peak, **t, "vs_fp32": _errors_vs_fp32(spec, loss, grads)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small CPU-friendly defaults (the default on CPU)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=None, help="N = B*T rows (CPU quick: 1024; CUDA: 8192)")
    ap.add_argument("--hidden", type=int, default=None, help="H (CPU quick: 256; CUDA: 4096)")
    ap.add_argument("--vocab", type=int, nargs="+", default=DEFAULT_VOCAB)
    ap.add_argument("--seq-len", type=int, default=256, help="rows per sequence (for sequence_mean)")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--reduction", default="token_mean", choices=["sequence_mean", "token_mean", "sum"])
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    set_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    import torch

    dev = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = dev == "cuda"
    rows = args.rows or (8192 if on_gpu else 1024)
    hidden = args.hidden or (4096 if on_gpu else 256)
    dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    iters = args.iters or (10 if on_gpu else 1)
    try:
        import liger_kernel  # noqa: F401

        liger_installed = True
    except ImportError:
        liger_installed = False
    has_liger = liger_installed and on_gpu
    notes = []
    if not has_liger:
        why = [] if liger_installed else ["liger-kernel not installed"]
        why += [] if on_gpu else ["its Triton kernels need CUDA"]
        notes.append("liger: skipped (" + "; ".join(why) + ")")

    results = []
    for V in args.vocab:
        row = {"vocab": V, "rows": rows, "hidden": hidden, "dtype": dtype}
        for impl in IMPLS:
            if impl == "liger" and not has_liger:
                continue
            spec = dict(impl=impl, device=dev, dtype=dtype, rows=rows, hidden=hidden, vocab=V,
                        seq_len=args.seq_len, reduction=args.reduction, iters=iters)
            if on_gpu:
                r = worker(spec)
            else:
                r = run_worker(__file__, spec, args.threads)
            row[impl] = r
            print(f"  V={V} {impl}: {r}", flush=True)
        results.append(row)

    headers = ["V", "N", "H", "impl", "ms (median)", "peak MiB", "time vs naive", "memory vs naive",
               "loss err", "dh err", "dW err", "memory target", "time target"]
    table = []
    for row in results:
        base = row["naive"]
        for impl in IMPLS:
            r = row.get(impl)
            if r is None or "error" in r:
                if r is not None:
                    table.append([row["vocab"], row["rows"], row["hidden"], impl, "error", r["error"]] + ["-"] * 7)
                continue
            tr = r["ms_median"] / base["ms_median"] if "ms_median" in base else None
            mr = (r["peak_bytes"] / base["peak_bytes"]) if base.get("peak_bytes") and r.get("peak_bytes") else None
            row.setdefault("ratios", {})[impl] = {"time": tr, "memory": mr}
            met = {}
            if impl == "fused":  # the targets are the fused kernel's
                met = row["targets_met"] = _targets_met(row["ratios"][impl])
            table.append([row["vocab"], row["rows"], row["hidden"], impl, fmt(r["ms_median"], ".1f"),
                          mib(r.get("peak_bytes")), fmt(tr, ".3f"), fmt(mr, ".3f")] +
                         [fmt(r.get("vs_fp32", {}).get(k), ".1e") for k in ("loss_rel_err", "grad_h_err", "grad_W_err")]
                         + [_ok(met.get("memory_ratio_max")), _ok(met.get("time_ratio_max"))])
    print()
    text = print_table(headers, table)
    for n in notes:
        print("note:", n)
    env = device_info(dev)
    payload = {
        "benchmark": "fused_linear_kl",
        "env": env,
        "config": {"rows": rows, "hidden": hidden, "vocab": args.vocab, "dtype": dtype, "iters": iters,
                   "reduction": args.reduction, "seq_len": args.seq_len, "ignored_rows": "~10%"},
        "memory_method": ("torch.cuda.max_memory_allocated minus allocated before the call" if on_gpu else
                          "fresh subprocess per (config, impl); VmHWM reset via /proc/self/clear_refs; "
                          "peak RSS growth of the first fwd+bwd call"),
        "targets": TARGETS,
        # per target over every vocab size: all fused rows met it (None: none measured)
        "targets_met": {k: _all_met(r.get("targets_met", {}).get(k) for r in results) for k in TARGETS},
        "results": results,
        "table": text,
        "notes": notes,
    }
    name = "bench_kl" if args.vocab == DEFAULT_VOCAB else "bench_kl_v" + "-".join(map(str, args.vocab))
    print("targets (fused vs naive): " + ", ".join(f"{k} {TARGETS[k]:.3g}: {_ok(v)}"
                                                   for k, v in payload["targets_met"].items()))
    write_json(name, payload, Path(args.out) if args.out else None)


if __name__ == "__main__":
    main()
