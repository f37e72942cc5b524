"""Benchmark: streaming fused-linear KL (kernels/fused_kl.py) vs naive materialised logits.

Forward + backward of KL(teacher || student) from last hidden states and lm_head weights, gradients
w.r.t. the student hidden states and lm_head weight. Implementations measured side by side in the
same run (ratios are only meaningful within one run):

* ``naive``  — ``kernels.reference.naive_linear_kl``: N×V logits for both models, log_softmax, kl_div.
* ``fused``  — ``kernels.fused_kl.fused_linear_kl`` (row chunks, chunk×V ≤ 64 MiB fp32).
* ``liger``  — Liger-Kernel's ``LigerFusedLinearJSD(jsd_beta=0)`` (= forward KL(teacher||student),
  token mean) when ``liger-kernel`` is installed and CUDA is available; otherwise listed as skipped.

Time: per vocabulary size, every implementation in THIS process on the same inputs, ``--warmup``
untimed calls each, then ``--iters`` rounds (default 5 on CPU, 10 on CUDA) of one call of each, the
order rotated every round (``common.time_rounds``): a change of the shared host's load falls on all
of them alike. Reported: the median per implementation, the ratio of the medians ("time") and the
median of the per-round ratios ("time_paired", the one the time target is judged on).

Peak memory: CUDA ``max_memory_allocated`` (inputs excluded, after one warm-up call); CPU:
resident-set high-water-mark growth of the first call in a fresh subprocess per (config,
implementation) — see ``benchmarks/common.py``. Threads are pinned (``--threads``, default 1) and
recorded in the JSON.

    .venv/bin/python benchmarks/bench_kl.py            # CPU quick defaults (~3 min)
    .venv/bin/python benchmarks/bench_kl.py --rows 8192 --hidden 4096 --vocab 32000 128256  # GPU

Targets (``TARGETS``, fused vs naive in the same run): peak memory <= 1/8, time <= 1.1x; each fused
row records ``targets_met`` (per target true / false, null when not measured) and the table prints
it. The exit code does not depend on it. Writes ``bench_kl_<device>.json``; arguments other than the
device's defaults add to the name (``common.out_name``): ``--vocab`` as ``_v<V>-<V>...``
(``bench_kl_v32000_cpu.json``), the others as ``_<arg>-<value>`` (``bench_kl_rows-64_cpu.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    OneLineParser,
    cpu_peak_bytes,
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
    positive_int,
    print_table,
    resolve_device,
    run_worker,
    set_threads,
    time_rounds,
    write_json,
)

IMPLS = ("naive", "fused", "liger")
DEFAULT_VOCAB = [32_000, 128_256]
TARGETS = {"memory_ratio_max": 1 / 8, "time_ratio_max": 1.1}  # fused vs naive, same run


def _targets_met(ratios: dict) -> dict:
    """Per target: True / False, None when the ratio was not measured. Time: the median of the
    per-round ratios (robust to a drift of the host's load), else the ratio of the medians."""
    t = ratios.get("time_paired")
    if t is None:
        t = ratios.get("time")
    m = ratios.get("memory")
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


def _step_fn(impl: str, inputs: tuple, reduction: str) -> Callable[[], tuple]:
    """One forward + backward of ``impl`` on ``inputs`` (``_build``): returns (loss, grads)."""
    import torch

    from kernels.fused_kl import fused_linear_kl
    from kernels.reference import naive_linear_kl

    h_s, W_s, h_t, W_t, labels, seq_ids = inputs
    if impl == "naive":
        def loss_fn():
            return naive_linear_kl(h_s, W_s, h_t, W_t, labels=labels, seq_ids=seq_ids, reduction=reduction)
    elif impl == "fused":
        def loss_fn():
            return fused_linear_kl(h_s, W_s, h_t, W_t, labels=labels, seq_ids=seq_ids, reduction=reduction)
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


def _fp32_reference(spec: dict) -> tuple:
    """The naive KL in fp32 on the run's inputs (loss, grads): what every implementation's errors are
    measured against (computed once per vocabulary size, after the timing)."""
    import torch

    from kernels.reference import naive_linear_kl

    h_s, W_s, h_t, W_t, labels, seq_ids = (x.float() if x.is_floating_point() else x for x in _build(spec))
    h_s, W_s = h_s.detach().requires_grad_(True), W_s.detach().requires_grad_(True)
    ref = naive_linear_kl(h_s, W_s, h_t, W_t, labels=labels, seq_ids=seq_ids, reduction=spec["reduction"])
    return float(ref.detach()), torch.autograd.grad(ref, (h_s, W_s))


def _errors_vs_fp32(loss, grads, reference: tuple) -> dict:
    """Loss relative error and grad errors (max abs error / max abs reference) of one call against
    the fp32 naive KL on the same inputs: the price of the implementation's precision."""
    ref, ref_grads = reference
    loss = float(loss.detach())
    out = {"loss_rel_err": abs(loss - ref) / max(abs(ref), 1e-12)}
    for name, a, b in zip(("grad_h", "grad_W"), grads, ref_grads):
        out[f"{name}_err"] = float((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-12))
    return out


def worker(spec: dict) -> dict:
    """CPU peak memory of one (config, impl): the first call in this fresh process (``run_worker``);
    the timing is done side by side in the parent (``measure``)."""
    return {"peak_bytes": cpu_peak_bytes(_step_fn(spec["impl"], _build(spec), spec["reduction"]))}


def measure(spec: dict, impls: list[str], threads: int) -> dict[str, dict]:
    """Per implementation at one vocabulary size: peak memory, time (side by side, ``time_rounds``)
    and errors against the fp32 naive KL (computed last, so they add to neither)."""
    import torch

    cuda = spec["device"] == "cuda"
    peaks: dict[str, Optional[int]] = {}
    if not cuda:  # a fresh process per implementation (glibc keeps freed blocks: common.py)
        for impl in impls:
            r = run_worker(__file__, dict(spec, impl=impl), threads)
            peaks[impl] = r
    inputs = _build(spec)  # shared: every implementation runs on the same tensors
    steps = {impl: _step_fn(impl, inputs, spec["reduction"]) for impl in impls}
    if cuda:
        for impl, step in steps.items():
            step()  # compile / warm the allocator before measuring the peak
            peaks[impl] = {"peak_bytes": cuda_peak_bytes(step)}
    times = time_rounds(steps, spec["device"], warmup=spec["warmup"], rounds=spec["iters"])
    reference = _fp32_reference(spec)
    out = {}
    for impl in impls:
        peak, t = peaks[impl], times[impl]
        if "error" in peak or "error" in t:  # the subprocess's last line, or the timing's exception
            err = peak.get("error") or [t["error"]]
            out[impl] = {"error": err if isinstance(err, list) else [err]}
            continue
        loss, grads = steps[impl]()
        out[impl] = {"peak_bytes": peak["peak_bytes"], **t, "vs_fp32": _errors_vs_fp32(loss, grads, reference)}
        del loss, grads
    del steps, inputs
    if cuda:
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", type=device_name, default="auto", help="auto, cpu or cuda")
    ap.add_argument("--threads", type=positive_int, default=1)
    ap.add_argument("--rows", type=positive_int, default=None, help="N = B*T rows (CPU quick: 1024; CUDA: 8192)")
    ap.add_argument("--hidden", type=positive_int, default=None, help="H (CPU quick: 256; CUDA: 4096)")
    ap.add_argument("--vocab", type=positive_int, nargs="+", default=DEFAULT_VOCAB)
    ap.add_argument("--seq-len", type=positive_int, default=256, help="rows per sequence (for sequence_mean)")
    ap.add_argument("--dtype", type=dtype_name, default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--reduction", default="token_mean", choices=["sequence_mean", "token_mean", "sum"])
    ap.add_argument("--iters", type=positive_int, default=None,
                    help="timed rounds, one call of every implementation each (default 5; CUDA 10)")
    ap.add_argument("--warmup", type=non_negative_int, default=1, help="untimed calls of each before the rounds")
    ap.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    set_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    dev = resolve_device(args.device)
    on_gpu = dev == "cuda"
    defaults = {"rows": 8192 if on_gpu else 1024, "hidden": 4096 if on_gpu else 256, "vocab": DEFAULT_VOCAB,
                "seq_len": 256, "dtype": "bfloat16" if on_gpu else "float32", "reduction": "token_mean",
                "iters": 10 if on_gpu else 5, "warmup": 1, "threads": 1}
    given = {k: getattr(args, k) for k in defaults}
    cfg = {k: defaults[k] if given[k] is None else given[k] for k in defaults}
    rows, hidden, dtype, iters = cfg["rows"], cfg["hidden"], cfg["dtype"], cfg["iters"]
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
    impls = [i for i in IMPLS if i != "liger" or has_liger]

    results = []
    for V in args.vocab:
        row = {"vocab": V, "rows": rows, "hidden": hidden, "dtype": dtype}
        spec = dict(device=dev, dtype=dtype, rows=rows, hidden=hidden, vocab=V, seq_len=args.seq_len,
                    reduction=args.reduction, iters=iters, warmup=args.warmup)
        row.update(measure(spec, impls, args.threads))
        for impl in impls:
            r = row[impl]
            print(f"  V={V} {impl}: " + (f"error {r['error']}" if "error" in r else
                                         f"{r['ms_median']:.1f} ms (median of {iters}), peak {mib(r['peak_bytes'])} MiB"),
                  flush=True)
        results.append(row)

    headers = ["V", "N", "H", "impl", "ms (median)", "peak MiB", "time vs naive", "time vs naive (paired)",
               "memory vs naive", "loss err", "dh err", "dW err", "memory target", "time target"]
    table = []
    for row in results:
        base = row["naive"]
        for impl in IMPLS:
            r = row.get(impl)
            if r is None or "error" in r:
                if r is not None:
                    table.append([row["vocab"], row["rows"], row["hidden"], impl, "error", r["error"]] + ["-"] * 8)
                continue
            mr = (r["peak_bytes"] / base["peak_bytes"]) if base.get("peak_bytes") and r.get("peak_bytes") else None
            ratios = row.setdefault("ratios", {})[impl] = {
                "time": median_ratio(r, base),  # ratio of the medians
                "time_paired": paired_ratio(r, base),  # median of the per-round ratios (same round, same load)
                "memory": mr}
            met = {}
            if impl == "fused":  # the targets are the fused kernel's
                met = row["targets_met"] = _targets_met(ratios)
            table.append([row["vocab"], row["rows"], row["hidden"], impl, fmt(r["ms_median"], ".1f"),
                          mib(r.get("peak_bytes")), fmt(ratios["time"], ".3f"), fmt(ratios["time_paired"], ".3f"),
                          fmt(mr, ".3f")] +
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
                   "warmup": args.warmup, "reduction": args.reduction, "seq_len": args.seq_len,
                   "ignored_rows": "~10%"},
        "timing_method": "one process, the same inputs; warmup untimed calls of each implementation, then iters "
                         "rounds of one call of each, the order rotated every round; ms_median = median, "
                         "ratios.time = ratio of the medians, ratios.time_paired = median of the per-round ratios",
        "memory_method": ("torch.cuda.max_memory_allocated minus allocated before the call" if on_gpu else
                          "fresh subprocess per (config, impl); VmHWM reset via /proc/self/clear_refs; "
                          "peak RSS growth of the first fwd+bwd call"),
        "targets": TARGETS,
        "targets_basis": "time: ratios.time_paired (median of the per-round ratios); memory: ratios.memory",
        # per target over every vocab size: all fused rows met it (None: none measured)
        "targets_met": {k: _all_met(r.get("targets_met", {}).get(k) for r in results) for k in TARGETS},
        "results": results,
        "table": text,
        "notes": notes,
    }
    name = out_name("bench_kl", cfg, defaults, labels={"vocab": "v"})
    print("targets (fused vs naive): " + ", ".join(f"{k} {TARGETS[k]:.3g}: {_ok(v)}"
                                                   for k, v in payload["targets_met"].items()))
    write_json(name, payload, args.out)


if __name__ == "__main__":
    main()
