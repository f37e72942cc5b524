"""Benchmark: KL approximation error and size of the teacher cache (``method.teacher=cached``).

A random tiny Llama (vocabulary ``--vocab``) is the frozen original θ₀; the "student" is θ₀ plus a
small random perturbation (a model some steps into unlearning). On random QA-shaped rows (loss on
the second half of each row) we compute ASU's forget KL(p_teacher_τ ‖ p_student) with the live
tempered teacher and from caches of the teacher with k ∈ {1, 5, 20, 100, full} kept log-probs per
position (+ one tail bucket), and report |KL_cached − KL_live| / KL_live, the cache size on disk and
the build time. The top-k KL coarse-grains the distributions into k + 1 buckets, so it is a lower
bound of the live KL that tightens as k grows; full rows are exact.

    .venv/bin/python benchmarks/bench_teacher_cache.py             # CPU, ~20 s

The KL forward times (``live_kl_fwd_ms``, ``cached_kl_fwd_ms``, per KL) are medians of 3 calls
after one untimed call (``common.time_fn``). Writes ``bench_teacher_cache_cpu.json``; every argument other
than its default adds ``_<arg>-<value>`` to the name (``common.out_name``); ``--out DIR`` writes
into DIR.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    OneLineParser,
    device_info,
    fmt,
    int_at_least,
    non_negative_int,
    out_name,
    positive_float,
    positive_int,
    print_table,
    set_threads,
    time_fn,
    write_json,
)

# the timed arguments' names as in argparse's namespace (the result's name carries those not at default)
NAMED = ("vocab", "hidden", "layers", "rows", "seq", "tau", "perturb", "head_scales", "ks", "threads")


def main() -> None:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int_at_least(2), default=4096)
    ap.add_argument("--hidden", type=positive_int, default=64, help="a multiple of 4 (4 attention heads)")
    ap.add_argument("--layers", type=positive_int, default=2)
    ap.add_argument("--rows", type=positive_int, default=32)
    # rows are seq/2..seq tokens with the loss on their second half: 4 keeps a loss token in every row
    ap.add_argument("--seq", type=int_at_least(4), default=48)
    ap.add_argument("--tau", type=positive_float, default=2.0)
    ap.add_argument("--perturb", type=float, default=0.02, help="student = teacher + N(0, perturb^2) noise")
    ap.add_argument("--head-scales", type=positive_float, nargs="+", default=[1.0, 8.0],
                    help="lm_head weight multipliers: 1 = a random model's near-flat distributions; larger "
                         "gives peaked, trained-LM-like distributions (teacher entropy is reported)")
    ap.add_argument("--ks", type=non_negative_int, nargs="+", default=[1, 5, 20, 100, 0], help="0 = full rows")
    ap.add_argument("--threads", type=positive_int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results)")
    args = ap.parse_args()
    if args.hidden % 4:
        ap.error(f"argument --hidden: must be a multiple of 4 (4 attention heads), got {args.hidden}")
    if max(args.ks) > args.vocab:
        ap.error(f"argument --ks: at most --vocab ({args.vocab}) kept log-probs per position, got {max(args.ks)}")
    threads = set_threads(args.threads)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.data.collate import pad_batch
    from pipeline.engine.teacher_cache import TeacherCache, build_teacher_cache
    from pipeline.methods import losses

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2 * args.seq, initializer_range=0.1, pad_token_id=0)
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(args.rows):
        n = int(torch.randint(args.seq // 2, args.seq + 1, (1,), generator=g))
        ids = torch.randint(1, args.vocab, (n,), generator=g).tolist()
        labels = [-100] * (n // 2) + ids[n // 2:]
        rows.append({"input_ids": ids, "labels": labels, "index": i})
    batch = pad_batch(rows, 0)
    idx = list(range(len(rows)))
    mask = losses.shifted_mask(batch["labels"])
    n_tokens = int(mask.sum())
    results = []
    for scale in args.head_scales:
        torch.manual_seed(0)
        teacher = LlamaForCausalLM(cfg).eval()
        with torch.no_grad():
            teacher.lm_head.weight.mul_(scale)
        student = LlamaForCausalLM(cfg).eval()
        student.load_state_dict(teacher.state_dict())
        with torch.no_grad():
            for p in student.parameters():
                p.add_(args.perturb * p.detach().abs().mean() / 0.08 * torch.randn_like(p))
            with losses.tempered(teacher, args.tau, None):
                lt = torch.log_softmax(losses.logits_of(teacher, batch)[:, :-1].float(), -1)[mask]
            entropy = float(-(lt.exp() * lt).sum(-1).mean())
            top = lt.exp().sort(-1, descending=True).values.cumsum(-1)
            live = {red: float(losses.distill_kl(student, teacher, batch, red, tau=args.tau))
                    for red in ("sequence_mean", "token_mean")}
            # the forwards' time after an untimed call (the first pays one-off set-up), per KL (both reductions)
            live_ms = time_fn(lambda s=student, t=teacher: [losses.distill_kl(s, t, batch, red, tau=args.tau)
                                                            for red in ("sequence_mean", "token_mean")],
                              "cpu", warmup=1, iters=3)["ms_median"] / 2
        with tempfile.TemporaryDirectory() as d:
            for k in args.ks:
                mcfg = SimpleNamespace(tau=args.tau, teacher_layers=None, cache_topk=k)
                t0 = time.perf_counter()
                path = build_teacher_cache(teacher, rows, mcfg, d, batch_size=8, model_path=f"bench-random-{scale}",
                                           split="bench", max_length=args.seq, pad_token_id=0,
                                           dtype=str(next(teacher.parameters()).dtype).removeprefix("torch."))
                build_s = time.perf_counter() - t0
                cache = TeacherCache(path)
                with torch.no_grad():
                    tb = cache.batch(idx, batch["labels"])
                    out = {red: float(losses.cached_distill_kl(student, batch, tb, red))
                           for red in ("sequence_mean", "token_mean")}
                    cached_ms = time_fn(lambda s=student, tb=tb: [losses.cached_distill_kl(s, batch, tb, red)
                                                                  for red in ("sequence_mean", "token_mean")],
                                        "cpu", warmup=1, iters=3)["ms_median"] / 2
                results.append({
                    "head_scale": scale,
                    "teacher_entropy_nats": entropy,
                    "teacher_topk_mass": None if k == 0 else float(top[:, k - 1].mean()),
                    "k": "full" if k == 0 else k,
                    "kl_live": live["sequence_mean"],
                    "kl_cached": out["sequence_mean"],
                    "rel_err": abs(out["sequence_mean"] - live["sequence_mean"]) / live["sequence_mean"],
                    "rel_err_token_mean": abs(out["token_mean"] - live["token_mean"]) / live["token_mean"],
                    "cache_bytes": cache.nbytes,
                    "bytes_per_token": cache.nbytes / n_tokens,
                    "build_s": build_s,
                    "live_kl_fwd_ms": live_ms,
                    "cached_kl_fwd_ms": cached_ms,
                })
    print(f"tiny random Llama: V={args.vocab}, H={args.hidden}, L={args.layers}, {args.rows} rows, "
          f"{n_tokens} loss tokens, tau={args.tau}, student perturb={args.perturb}; threads={threads}")
    print_table(["lm_head x", "H(teacher) nats", "k", "top-k mass", "KL live", "KL cached", "rel err (seq mean)", "rel err (token mean)", "cache MiB",
                 "B/token", "build s"],
                [[r["head_scale"], fmt(r["teacher_entropy_nats"], ".2f"), r["k"], fmt(r["teacher_topk_mass"], ".3f"),
                  fmt(r["kl_live"], ".5f"), fmt(r["kl_cached"], ".5f"), fmt(r["rel_err"], ".2e"),
                  fmt(r["rel_err_token_mean"], ".2e"), fmt(r["cache_bytes"] / 2**20, ".3f"),
                  fmt(r["bytes_per_token"], ".0f"), fmt(r["build_s"], ".2f")] for r in results])
    name = out_name("bench_teacher_cache", {k: getattr(args, k) for k in NAMED}, {k: ap.get_default(k) for k in NAMED})
    write_json(name, {
        "env": device_info("cpu"),
        "config": {**vars(args), "out": None, "loss_tokens": n_tokens},
        "results": results,
        "note": "top-k KL = KL over the k teacher-top tokens + one tail bucket (a lower bound of the full KL); "
                "full rows are exact (float32); live_kl_fwd_ms / cached_kl_fwd_ms: per KL forward, "
                "median of 3 calls (both reductions each) after one untimed call",
    }, args.out)


if __name__ == "__main__":
    main()
