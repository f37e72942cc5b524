"""The prepared GPU check's Python parts (run by ``benchmarks/gpu_check.sh``; one part per call).

Each part writes ``benchmarks/results/gpu_<gpu>_<part>.json`` with the GPU named in it:

* ``kernels``    — the Triton tempered-attention kernels *compiled* (not the interpreter) against the
  fp32 torch reference, bf16 and fp16, forward and backward, odd shapes, GQA, causal + left/right
  padding, per-head and per-row tau; the dual-output mode too. Pass/fail per case with the errors.
* ``attention``  — throughput of tempered attention through the pipeline's backends (sdpa,
  flash_attn when installed, triton) against untempered SDPA / flash-attn: B=4, H=32, T=4096,
  d=128, bf16, forward + backward, causal.
* ``kl``         — fused vs naive KL at V=32k and 128k (``bench_kl.py``): time and peak memory.
* ``step``       — one ASU step (live teacher, ZeRO-3, one GPU) of a random ~1B Llama
  (``bench_step.py --scale 1b --ranks 1``), with the naive and the fused KL (``kernels.kl``):
  tokens/s and CUDA peak memory against the memory preflight's prediction
  (``pipeline.engine.preflight.plan_memory``) for the same setting.
* ``eval``       — the evaluation model placed on the GPU (``eval.dtype`` auto = bf16 here, and
  float32): device and dtype as chosen, TOFU answer probabilities against the CPU float32
  evaluation of the same rows; host memory of a 134M model's GPU load against its file size.
* ``pipeline``   — ``launchers/train.py`` end to end on one GPU (the tiny test model, 3 ASU steps,
  export + its check, evaluation): as the pipeline picks the ZeRO stage, and ZeRO-3 with the fused KL.

    python benchmarks/gpu_check.py --device cuda kernels
    python benchmarks/gpu_check.py --device cpu kernels   # refused: the parts measure CUDA only

``--device`` guards every part: anything but an available CUDA device prints
``no CUDA device: nothing measured`` and exits 0 without writing a file. Every child process (the
benchmark scripts, ``launchers/train.py``) runs in its own session and on a time limit, or when this
process gets SIGTERM / SIGHUP / Ctrl-C, its process group and every descendant are killed (torchrun's
workers run in sessions of their own).
Tolerance checks are NaN-safe: a case passes only when every error is finite and within tolerance.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from common import RESULTS, OneLineParser, cpu_peak_bytes, device_info, positive_int  # noqa: E402

NO_CUDA = "no CUDA device: nothing measured"


def _gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "gpu"


def _write(part: str, payload: dict) -> Path:
    import torch

    name = torch.cuda.get_device_name()
    path = RESULTS / f"gpu_{_gpu_slug(name)}_{part}.json"
    payload = {"part": part, "gpu": name, "env": device_info("cuda"),
               "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), **payload}
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)
    print(f"wrote {path.relative_to(ROOT)}", flush=True)
    return path


def _within(errors, tol: float) -> bool:
    """Every error finite and <= tol (NaN-safe: Python's max() skips a NaN that is not first)."""
    errors = list(errors)
    return bool(errors) and all(math.isfinite(e) and e <= tol for e in errors)


def _max_err(errors) -> float:
    """max() that returns NaN when any error is NaN (so a JSON record shows it)."""
    errors = list(errors)
    return math.nan if any(math.isnan(e) for e in errors) else max(errors)


def _kill_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the child's process group and to every descendant (torchrun starts its workers in
    sessions of their own, out of the group's reach), SIGKILL after ``grace`` s to whatever is left."""
    import psutil

    try:  # snapshot first: once the leader is gone its children are re-parented and out of sight
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        family = []

    def signal_all(sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        for p in family:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass

    signal_all(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    _, alive = psutil.wait_procs(family, timeout=max(1.0, grace / 2))
    if alive or proc.poll() is None:
        signal_all(signal.SIGKILL)
        proc.wait()


def _run_group(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """subprocess.run for every part's children: started in a new session, so that on a timeout (or when
    this process is stopped: SIGTERM from gpu_check.sh's ``timeout``, Ctrl-C) the whole process group --
    torchrun and its workers too, not only the direct child -- is killed (SIGTERM, SIGKILL after a grace).
    TimeoutExpired is re-raised with what the child wrote."""
    proc = subprocess.Popen(cmd, start_new_session=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        _kill_group(proc)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from exc
    except BaseException:
        _kill_group(proc, grace=3.0)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _exit_on_signal(signum, _frame) -> None:
    # the children run in their own sessions: turn SIGTERM/SIGHUP into an exception, so that
    # _run_group's handler kills the running child's group before this process exits
    raise SystemExit(128 + signum)


def _cuda_ms(fn, warmup: int = 3, iters: int = 10) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


# ------------------------------------------------------------------------------------------------
# kernels: compiled Triton vs the reference
# ------------------------------------------------------------------------------------------------

TOL = {"bfloat16": 3e-2, "float16": 5e-3}  # max abs error vs the fp32 reference, outputs and grads (scaled)


def part_kernels() -> None:
    import torch

    import kernels.tempered_attention as ta
    from kernels.reference import tempered_attention_ref

    assert not ta.INTERPRET, "unset TRITON_INTERPRET: this part checks the compiled kernels"
    cases = []
    shapes = [  # (B, H, Hkv, T, S, D, tau): S > T is a KV offset (queries are the last T of S keys)
        (3, 8, 2, 333, 333, 64, "head"),
        (2, 4, 4, 1037, 1037, 128, "head"),
        (2, 6, 3, 77, 77, 80, "head"),
        (1, 4, 1, 129, 129, 16, "head"),
        (2, 4, 2, 40, 70, 80, "row"),  # a (B, 1) tau: the teacher's and the reference's rows in one pass
        (2, 4, 2, 96, 96, 256, "row"),  # head_dim 256 (Gemma): refused by the backend until this passes
    ]
    for dtype_name in ("bfloat16", "float16"):
        dtype = getattr(torch, dtype_name)
        for B, H, Hkv, T, S, D, tau_kind in shapes:
            for padding in ("none", "right", "left"):
                g = torch.Generator(device="cpu").manual_seed(B * 1000 + T)
                q32 = torch.randn(B, H, T, D, generator=g).cuda()
                k32 = torch.randn(B, Hkv, S, D, generator=g).cuda()
                v32 = torch.randn(B, Hkv, S, D, generator=g).cuda()
                kpm = torch.ones(B, S, dtype=torch.bool, device="cuda")
                if padding == "right":
                    kpm[0, S - S // 3:] = False
                elif padding == "left":
                    kpm[-1, : S // 4] = False
                kp = None if padding == "none" else kpm
                tau = (torch.linspace(0.7, 3.0, H) if tau_kind == "head" else torch.linspace(1.0, 2.5, B)[:, None]).cuda()
                row = {"dtype": dtype_name, "B": B, "H": H, "Hkv": Hkv, "T": T, "S": S, "D": D, "tau": tau_kind,
                       "padding": padding}
                try:
                    q, k, v = (x.to(dtype).requires_grad_(True) for x in (q32, k32, v32))
                    out = ta.tempered_attention(q, k, v, tau, causal=True, key_padding_mask=kp, backend="triton")
                    rq, rk, rv = (x.detach().float().requires_grad_(True) for x in (q, k, v))
                    ref = tempered_attention_ref(rq, rk, rv, tau, causal=True, key_padding_mask=kp)
                    real = kpm[:, S - T:, None, None].expand_as(ref).float()  # the queries' own positions
                    gout = torch.randn(ref.shape, device="cuda") * real
                    got = torch.autograd.grad(out, (q, k, v), gout.to(dtype))
                    exp = torch.autograd.grad(ref, (rq, rk, rv), gout)
                    errs = {"out": ((out.float() - ref) * real).abs().max().item()}
                    for n, a, b in zip(("dq", "dk", "dv"), got, exp):
                        errs[n] = ((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
                    row.update(errors=errs, ok=_within(errs.values(), TOL[dtype_name]))
                except Exception as exc:  # record and continue: the JSON must say what failed
                    row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
                cases.append(row)
                print(f"  {row}", flush=True)
        # dual-output mode: teacher (tau) and student (1) from one Q K^T, both backpropagated
        B, H, Hkv, T, D = 2, 8, 2, 513, 64
        g = torch.Generator(device="cpu").manual_seed(7)
        q, k, v = (torch.randn(B, h, T, D, generator=g).cuda().to(dtype).requires_grad_(True) for h in (H, Hkv, Hkv))
        kpm = torch.ones(B, T, dtype=torch.bool, device="cuda")
        kpm[1, 400:] = False
        row = {"dtype": dtype_name, "mode": "dual", "B": B, "H": H, "Hkv": Hkv, "T": T, "D": D, "padding": "right"}
        try:
            o_t, o_s = ta.tempered_attention_dual(q, k, v, 2.5, 1.0, key_padding_mask=kpm, backend="triton")
            rq, rk, rv = (x.detach().float().requires_grad_(True) for x in (q, k, v))
            r_t = tempered_attention_ref(rq, rk, rv, 2.5, key_padding_mask=kpm)
            r_s = tempered_attention_ref(rq, rk, rv, 1.0, key_padding_mask=kpm)
            real = kpm[:, :, None, None].expand_as(r_t).float()
            g_t, g_s = torch.randn_like(r_t) * real, torch.randn_like(r_s) * real
            got = torch.autograd.grad((o_t.float() * g_t).sum() + (o_s.float() * g_s).sum(), (q, k, v))
            exp = torch.autograd.grad((r_t * g_t).sum() + (r_s * g_s).sum(), (rq, rk, rv))
            errs = {"out_teacher": ((o_t.float() - r_t) * real).abs().max().item(),
                    "out_student": ((o_s.float() - r_s) * real).abs().max().item()}
            for n, a, b in zip(("dq", "dk", "dv"), got, exp):
                errs[n] = ((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
            row.update(errors=errs, ok=_within(errs.values(), TOL[dtype_name]))
        except Exception as exc:
            row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
        cases.append(row)
        print(f"  {row}", flush=True)
    n_ok = sum(bool(c.get("ok")) for c in cases)
    print(f"kernels: {n_ok}/{len(cases)} cases within tolerance", flush=True)
    _write("kernels", {"tolerance": TOL, "tolerance_note": "outputs: max abs error on real query rows; grads: "
                       "max abs error / max abs reference grad", "passed": n_ok, "total": len(cases),
                       "cases": cases})
    if n_ok < len(cases):  # like the eval and pipeline parts: gpu_check.sh exits 1
        sys.exit(1)


# ------------------------------------------------------------------------------------------------
# attention throughput
# ------------------------------------------------------------------------------------------------


def part_attention(B: int = 4, H: int = 32, T: int = 4096, D: int = 128, tau: float = 2.3) -> None:
    import torch
    import torch.nn.functional as F

    from pipeline.models.attention import ATTENTION_BACKENDS, AttentionCall

    dtype = torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=g).cuda().to(dtype).requires_grad_(True) for _ in range(3))
    per_head = torch.linspace(1.0, 3.0, H).cuda()
    scale = D ** -0.5
    impls = {
        "untempered sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "tempered sdpa (scalar tau)": lambda: ATTENTION_BACKENDS.get("sdpa").forward(
            AttentionCall(q, k, v, None, scale, tau)),
        "tempered sdpa (per-head tau)": lambda: ATTENTION_BACKENDS.get("sdpa").forward(
            AttentionCall(q, k, v, None, scale, per_head)),
        "tempered triton (scalar tau)": lambda: ATTENTION_BACKENDS.get("triton").forward(_triton_call(q, k, v, scale, tau)),
        "tempered triton (per-head tau)": lambda: ATTENTION_BACKENDS.get("triton").forward(
            _triton_call(q, k, v, scale, per_head)),
    }
    notes = []
    if ATTENTION_BACKENDS.get("flash_attn").unavailable() is None:
        from flash_attn import flash_attn_func

        qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_(True) for x in (q, k, v))
        impls["untempered flash_attn"] = lambda: flash_attn_func(qt, kt, vt, causal=True)
        impls["tempered flash_attn (scalar tau)"] = lambda: ATTENTION_BACKENDS.get("flash_attn").forward(
            _flash_call(q, k, v, scale, tau))
        impls["tempered flash_attn (per-head tau)"] = lambda: ATTENTION_BACKENDS.get("flash_attn").forward(
            _flash_call(q, k, v, scale, per_head))
    else:
        notes.append("flash_attn: not installed (pip install --no-build-isolation flash-attn); its rows are missing")
    flops = 4.0 * B * H * T * T * D / 2 * 3.5  # causal, fwd + bwd (bwd = 2.5x fwd)
    rows = []
    for name, fn in impls.items():
        def step(fn=fn):
            out = fn()
            out.backward(torch.ones_like(out))

        try:
            ms = _cuda_ms(step)
            torch.cuda.reset_peak_memory_stats()
            step()
            peak = torch.cuda.max_memory_allocated()
            rows.append({"impl": name, "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12, "peak_mib": peak / 2**20})
        except Exception as exc:
            rows.append({"impl": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
        print(f"  {rows[-1]}", flush=True)
        for x in (q, k, v):
            x.grad = None
    base = {r["impl"]: r.get("ms") for r in rows}
    for r in rows:
        peer = "untempered flash_attn" if "flash_attn" in r["impl"] else "untempered sdpa"
        if r.get("ms") and base.get(peer):
            r["throughput_vs_" + peer.replace(" ", "_")] = base[peer] / r["ms"]
    fastest = min((r for r in rows if r.get("ms") and r["impl"].startswith("tempered")), key=lambda r: r["ms"],
                  default=None)
    _write("attention", {"config": {"B": B, "H": H, "T": T, "D": D, "dtype": "bfloat16", "causal": True,
                                    "tau": tau, "per_head_tau": "linspace(1, 3, H)", "pass": "forward+backward"},
                         "flops_formula": "4*B*H*T*T*D/2 * 3.5", "results": rows, "notes": notes,
                         "fastest_tempered": fastest and fastest["impl"],
                         "auto_rule_hint": "pipeline/models/attention/dispatch.py AUTO_RULES['cuda'] stays sdpa "
                                           "unless a tempered triton/flash_attn row beats tempered sdpa here"})


def _triton_call(q, k, v, scale, tau):
    from pipeline.models.attention import AttentionCall

    call = AttentionCall(q, k, v, None, scale, tau)
    call.notes["triton_spec"] = (True, None)
    return call


def _flash_call(q, k, v, scale, tau):
    from pipeline.models.attention import AttentionCall

    call = AttentionCall(q, k, v, None, scale, tau)
    call.notes["flash_spec"] = (True, None, None)
    return call


# ------------------------------------------------------------------------------------------------
# KL and the ASU step: the existing benchmarks, re-labelled with the GPU
# ------------------------------------------------------------------------------------------------


def _run(cmd: list[str], timeout: int) -> None:
    print("  $ " + " ".join(cmd), flush=True)
    proc = _run_group(cmd, timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd)


def part_kl(timeout: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        _run([sys.executable, str(HERE / "bench_kl.py"), "--device", "cuda", "--rows", "8192", "--hidden", "4096",
              "--vocab", "32000", "128256", "--iters", "5", "--out", d], timeout)
        payload = json.loads(next(Path(d).glob("bench_kl_*.json")).read_text())
    _write("kl", {"source": "benchmarks/bench_kl.py --rows 8192 --hidden 4096 --vocab 32000 128256 --iters 5", **payload})


def part_step(timeout: int, batch: int = 4, seq: int = 512) -> None:
    from bench_step import SIZES

    from pipeline.engine.preflight import plan_bench_step

    variants = {"asu_live_naive": "naive", "asu_live_fused": "fused"}  # variant -> kernels.kl
    with tempfile.TemporaryDirectory() as d:
        _run([sys.executable, str(HERE / "bench_step.py"), "--scale", "1b", "--ranks", "1", "--variants", *variants,
              "--batch", str(batch), "--seq", str(seq), "--steps", "6", "--warmup", "2", "--out", d], timeout)
        payload = json.loads(next(Path(d).glob("bench_step_scale*.json")).read_text())
    rows = {}
    for variant, kl in variants.items():
        plan = plan_bench_step(SIZES["1b"], batch, seq, kl)
        res = payload["results"][variant]
        measured = max(x for x in res["cuda_peak_mib_per_rank"] if x is not None)
        predicted = plan.gpu_total / 2**20
        rows[variant] = {"kernels.kl": kl, "tokens_per_s": res["tokens_per_s"], "step_ms": res["step_ms"],
                         "cuda_peak_mib": measured, "preflight_predicted_mib": predicted,
                         "measured_over_predicted": measured / predicted,
                         "preflight_components_mib": {k: v / 2**20 for k, v in plan.per_gpu.items()}}
        print(f"step ({variant}): {res['tokens_per_s']:.0f} tokens/s, CUDA peak {measured:.0f} MiB, preflight "
              f"predicted {predicted:.0f} MiB ({measured / predicted:.2f}x)", flush=True)
    naive = rows["asu_live_naive"]
    _write("step", {"source": f"benchmarks/bench_step.py --scale 1b --ranks 1 --variants {' '.join(variants)} "
                              f"--batch {batch} --seq {seq}",
                    **{k: v for k, v in naive.items() if k != "kernels.kl"}, "variants": rows,
                    "bench_step": payload})


def part_eval() -> None:
    """The evaluation model on the GPU (``pipeline.eval.runner.eval_device`` / ``eval_dtype``): loaded straight onto
    the rank's device in ``eval.dtype``, its TOFU scores against the CPU float32 evaluation of the
    same rows; and the host memory a 134M model's GPU load takes, against its file size."""
    import resource

    import torch
    from hydra import compose, initialize_config_dir
    from transformers import AutoTokenizer

    from pipeline.config import register_configs
    from pipeline.eval import runner
    from pipeline.eval.tofu import evaluate_split
    from pipeline.models.loading import load_causal_lm
    from tests.helpers.tiny import build

    def cfg(*overrides: str):
        register_configs()
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return compose("config", overrides=list(overrides))

    out: dict = {"cases": {}}
    with tempfile.TemporaryDirectory() as d:
        # written by another process, so that this one's peak host memory has never held the model
        proc = _run_group([sys.executable, "-c", f"from common import RANDOM_LLAMAS, save_random_llama; from pathlib "
                           f"import Path; save_random_llama(Path({str(Path(d) / 'big')!r}), RANDOM_LLAMAS['134m'], 256)"],
                          300, cwd=HERE)
        if proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, proc.args)
        big = Path(d) / "big" / "model"
        file_mib = sum(f.stat().st_size for f in big.glob("*.safetensors")) / 2**20
        # the load's own peak: VmHWM reset to the current RSS first (common.cpu_peak_bytes), not a
        # ru_maxrss delta (a lifetime high-water mark: an earlier, higher peak would hide the load's)
        # the tiny benchmark's tokenizer serves both loads (the evaluation load checks it against the
        # model's vocabulary: the 134M random model's 32k rows hold its ~50 tokens)
        model_dir, data_dir = build(Path(d) / "tiny")
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        load_cfg = cfg("model.dtype=float32")
        loaded = {}
        peak = cpu_peak_bytes(lambda: loaded.setdefault("m", runner._load_eval_model(big, load_cfg, tok)))
        m = loaded["m"]
        if peak is None:  # no /proc/self/clear_refs: the lifetime high-water mark, an upper bound of RSS
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            out["host_peak_note"] = "clear_refs unavailable: process lifetime ru_maxrss, not the load's growth"
        out["host_peak_growth_mib_134m_gpu_load"] = peak / 2**20
        out["weights_file_mib_134m"] = file_mib
        out["loaded_on"] = str(next(m.parameters()).device)
        del m
        torch.cuda.empty_cache()

        rows = [json.loads(x) for f in ("forget", "retain") for x in (data_dir / f"{f}.jsonl").read_text().splitlines()]
        settings = runner._settings(cfg())
        ref_model = load_causal_lm(model_dir, "float32").eval()  # the CPU float32 evaluation
        ref = evaluate_split(ref_model, tok, rows, settings, name="forget")
        ok = out["loaded_on"].startswith("cuda")
        for dtype, tol in (("float32", 1e-4), ("bfloat16", 5e-2)):
            c = cfg("model.dtype=bfloat16", f"eval.dtype={dtype}") if dtype == "float32" else cfg("model.dtype=bfloat16")
            device, resolved = runner.eval_device(c, model_dir), runner.eval_dtype(c)
            model = runner._load_eval_model(model_dir, c, tok)
            p = next(model.parameters())
            res = evaluate_split(model, tok, rows, settings, name="forget")
            err = _max_err(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(res.answer_prob, ref.answer_prob))
            case = {"eval.dtype": "auto" if dtype == "bfloat16" else dtype, "resolved": [device, resolved],
                    "param_device": str(p.device), "param_dtype": str(p.dtype),
                    "answer_prob_max_rel_err_vs_cpu_fp32": err, "tolerance": tol,
                    "generations_equal_cpu": sum(a == b for a, b in zip(res.generation, ref.generation)),
                    "rows": len(rows)}
            case["pass"] = (p.device.type == "cuda" and str(p.dtype) == f"torch.{dtype}"
                            and len(res.answer_prob) == len(ref.answer_prob) > 0
                            and _within((abs(a - b) / max(abs(b), 1e-12)
                                         for a, b in zip(res.answer_prob, ref.answer_prob)), tol))
            ok &= case["pass"]
            out["cases"][dtype] = case
            print(f"eval {case['eval.dtype']:>8}: {p.dtype} on {p.device}, answer prob max rel err {err:.2e} "
                  f"(<= {tol:g}: {'ok' if case['pass'] else 'FAIL'})", flush=True)
    print(f"eval: 134M load on the GPU grew host peak memory by {out['host_peak_growth_mib_134m_gpu_load']:.0f} MiB "
          f"(weights file {file_mib:.0f} MiB)", flush=True)
    out["pass"] = bool(ok)
    _write("eval", out)
    if not ok:
        sys.exit(1)


# (run name, overrides): the pipeline's own 1-GPU choice (ZeRO stage auto = 0, naive KL), and ZeRO-3
# with every weight partitioned and the fused KL (DeepSpeed's hooks and the fused head on a GPU)
PIPELINE_RUNS = (
    ("asu_kl_auto_stage", ["method=asu_kl"]),
    ("asu_kl_zero3_fused", ["method=asu_kl", "deepspeed.zero_stage=3", "kernels=fused"]),
    # fp16 with a loss scale that overflows (2**32): DeepSpeed skips those updates and lowers the scale;
    # the run must go on (listed in loss_scale_skipped_steps), not stop at a "non-finite gradient"
    ("grad_diff_fp16_overflow", ["method=grad_diff", "deepspeed.precision=fp16",
                                 "+deepspeed.extra.fp16.initial_scale_power=32"]),
)


def part_pipeline(timeout: int) -> None:
    """``launchers/train.py`` end to end on the GPU, as a user runs it on one GPU (no launcher): the
    tiny test model trains 3 ASU steps, exports (and re-checks the export) and evaluates; once as
    the pipeline picks the ZeRO stage, once under ZeRO-3 with the fused KL; then GradDiff in fp16 with a
    loss scale that overflows. Each run passes when it exits 0 with an export check within tolerance
    and its attention and evaluation ran on CUDA (the fp16 run: with its overflow steps listed)."""
    from tests.helpers.tiny import build, train_overrides

    out: dict = {"runs": {}}
    ok = True
    deadline = time.perf_counter() + timeout  # ``timeout``: all runs together (the part's limit is a bit more)
    with tempfile.TemporaryDirectory() as d:
        model_dir, data_dir = build(Path(d) / "tiny")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
                   HF_HUB_OFFLINE="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false")
        env.pop("DS_ACCELERATOR", None)
        for i, (name, extra) in enumerate(PIPELINE_RUNS):
            args = train_overrides(model_dir, data_dir, Path(d) / "runs", name, steps=3) + extra
            # each run gets its share of what is left: a slow first run cannot leave the part killed
            # from outside before any JSON is written
            share = max(1.0, (deadline - time.perf_counter()) / (len(PIPELINE_RUNS) - i))
            t0 = time.perf_counter()
            try:
                proc = _run_group([sys.executable, "launchers/train.py", *args], share, cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                rc, stderr = proc.returncode, proc.stderr
            except subprocess.TimeoutExpired as e:
                err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
                rc, stderr = 124, err + f"\n(timed out after {share:.0f} s)"
            run = {"overrides": extra, "returncode": rc, "seconds": time.perf_counter() - t0}
            res_path, check_path = (Path(d) / "runs" / name / f for f in ("results.json", "export_check.json"))
            if rc != 0 or not res_path.exists():
                run["stderr_tail"] = stderr[-3000:]
                run["pass"] = False
            else:
                res = json.loads(res_path.read_text())
                check = json.loads(check_path.read_text())
                run.update({k: res.get(k) for k in ("zero_stage", "attention_backend", "train_seconds", "job_seconds",
                                                    "final_train", "step_passes", "reductions",
                                                    "loss_scale_skipped_steps")})
                run["evaluation"] = {k: res["evaluation"].get(k) for k in ("device", "dtype", "rows")}
                run["metrics"] = {k: v for k, v in res["metrics"].items() if isinstance(v, (int, float))}
                run["export_check"] = check
                run["pass"] = (check["max_abs_logit_diff"] <= check["tolerance"]
                               and res["attention_backend"]["device"] == "cuda"
                               and str(res["evaluation"].get("device", "")).startswith("cuda")
                               and (not name.endswith("_overflow") or bool(res.get("loss_scale_skipped_steps"))))
            ok &= run["pass"]
            out["runs"][name] = run
            out["pass"] = bool(ok) and len(out["runs"]) == len(PIPELINE_RUNS)
            _write("pipeline", out)  # after every run: what ran is kept if the part is stopped later
            print(f"pipeline {name}: rc {rc}, {run['seconds']:.0f} s, "
                  f"{'ok' if run['pass'] else 'FAIL'}", flush=True)
            if "stderr_tail" in run:
                print(run["stderr_tail"], flush=True)
    if not ok:
        sys.exit(1)


def main() -> None:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=("kernels", "attention", "kl", "step", "eval", "pipeline"))
    # no CUDA-available guard here: --device cpu (or no GPU) is answered with NO_CUDA and exit 0 (docstring)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--timeout", type=positive_int, default=240, help="for the parts that launch a benchmark script")
    args = ap.parse_args()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    import torch

    if args.device != "cuda" or not torch.cuda.is_available():
        print(NO_CUDA)
        return
    {"kernels": part_kernels, "attention": part_attention,
     "kl": lambda: part_kl(args.timeout), "step": lambda: part_step(args.timeout), "eval": part_eval,
     "pipeline": lambda: part_pipeline(args.timeout)}[args.part]()


if __name__ == "__main__":
    main()
