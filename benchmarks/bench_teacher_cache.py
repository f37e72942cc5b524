"""Benchmark: KL approximation error and size of the teacher cache (``method.teacher=cached``).

A random tiny Llama (vocabulary ``--vocab``) is the frozen original θ₀; the "student" is θ₀ plus a
small random perturbation (a model some steps into unlearning). On random QA-shaped rows (loss on
the second half of each row) we compute ASU's forget KL(p_teacher_τ ‖ p_student) with the live
tempered teacher and from caches of the teacher with k ∈ {1, 5, 20, 100, full} kept log-probs per
position (+ one tail bucket), and report |KL_cached − KL_live| / KL_live, the cache size on disk and
the build time. The top-k KL coarse-grains the distributions into k + 1 buckets, so it is a lower
bound of the live KL that tightens as k grows; full rows are exact.

    .venv/bin/python benchmarks/bench_teacher_cache.py             # CPU, ~20 s
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

from common import device_info, fmt, print_table, set_threads, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--seq", type=int, default=48)
    ap.add_argument("--tau", type=float, default=2.0)
    ap.add_argument("--perturb", type=float, default=0.02, help="student = teacher + N(0, perturb^2) noise")
    ap.add_argument("--head-scales", type=float, nargs="+", default=[1.0, 8.0],
                    help="lm_head weight multipliers: 1 = a random model's near-flat distributions; larger "
                         "gives peaked, trained-LM-like distributions (teacher entropy is reported)")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 5, 20, 100, 0], help="0 = full rows")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
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
            t0 = time.perf_counter()
            live = {red: float(losses.distill_kl(student, teacher, batch, red, tau=args.tau))
                    for red in ("sequence_mean", "token_mean")}
            live_ms = (time.perf_counter() - t0) * 1e3 / 2
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
                    t1 = time.perf_counter()
                    out = {red: float(losses.cached_distill_kl(student, batch, tb, red))
                           for red in ("sequence_mean", "token_mean")}
                    cached_ms = (time.perf_counter() - t1) * 1e3 / 2
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
    write_json("bench_teacher_cache", {
        "env": device_info("cpu"),
        "config": {**vars(args), "out": None, "loss_tokens": n_tokens},
        "results": results,
        "note": "top-k KL = KL over the k teacher-top tokens + one tail bucket (a lower bound of the full KL); "
                "full rows are exact (float32)",
    }, args.out)


if __name__ == "__main__":
    main()
