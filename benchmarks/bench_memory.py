"""Benchmark: where the per-rank host-memory peak of a ZeRO-3 unlearning run goes (CPU ranks).

The run is the pipeline's own sequence (``pipeline/run.py``): a random Llama saved as safetensors
is loaded twice with ``load_causal_lm`` under ``HfDeepSpeedConfig`` (student, frozen teacher), the
engines come from ``student_config`` / ``reference_config`` + ``deepspeed.initialize`` (Adam), and
``asu_kl`` (live tempered teacher, retain KL to the untempered reference) trains a few steps in fp32.

Per rank it samples the resident set (``/proc/self/status`` VmRSS) at each stage and the
high-water mark during each stage (VmHWM, reset with ``/proc/self/clear_refs``), starting from the
*start-up footprint*: the process after its imports and ``init_distributed``, before any model is
built. Beside the measurement it prints the bytes that each ZeRO-3 term really holds, read from the
DeepSpeed objects (parameter partitions, gradient partition, Adam moments, whether the fp32 master
partition is a second copy or the parameter partition itself, the reduce bucket, the most
parameters gathered at once, the teacher's partitions), and the preflight's prediction for the same
run (``pipeline.engine.preflight.plan_for_run``).

    .venv/bin/python benchmarks/bench_memory.py --size 134m            # ~2 min, ~2 x 2.1 GiB
    .venv/bin/python benchmarks/bench_memory.py --size 34m 134m 350m   # one launch per size (350m: ~2 x 4.4 GiB)
    .venv/bin/python benchmarks/bench_memory.py --size 134m --passes per_group  # two student forwards per step
    .venv/bin/python benchmarks/bench_memory.py --size 134m --baseline # as before the fixes (~2 x 4 GiB)

Writes ``bench_memory_cpu.json``, plus ``_per_group`` / ``_baseline`` and every other argument that
differs from its default as ``_<arg>-<value>`` (``common.out_name``: ``bench_memory_size-34m_cpu.json``);
``--out DIR`` writes it into DIR (a path ending in ``.json`` gives the name, ``_<device>`` appended, as before).

``ASU_BENCH_TRACE=<file.json>`` writes rank 0's resident set at every student module's backward
hooks and around every ZeRO-3 reduce-scatter of the second step (how the backward peak was found).
``ASU_BENCH_CENSUS=<file.json>`` writes rank 0's glibc heap (in use / free, ``mallinfo2``), mmapped
bytes and the tensors reachable from Python after each step, and which parameters are gathered
when the loss is computed (how the heap fragmentation and the prefetch-held layers were found).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    RANDOM_LLAMAS,
    OneLineParser,
    device_info,
    fmt,
    int_at_least,
    json_object,
    non_negative_int,
    out_name,
    positive_int,
    print_table,
    save_random_llama,
    status_kb,
    write_json,
)

MiB = 2**20
SIZES = RANDOM_LLAMAS  # random Llamas, V=32k, untied embeddings (every matrix is partitioned by ZeRO-3)


# ------------------------------------------------------------------------------------------------
# worker (one rank)
# ------------------------------------------------------------------------------------------------



class Stages:
    """RSS at the end of each stage and the RSS high-water mark during it (KiB -> MiB)."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.hwm_ok = self._reset()

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            return True
        except OSError:
            return False

    def mark(self, name: str) -> None:
        self.rows.append({"stage": name, "rss_mib": status_kb("VmRSS", strict=False) / 1024,
                          "stage_peak_mib": status_kb("VmHWM", strict=False) / 1024 if self.hwm_ok else None})
        self._reset()


class GatherWatch:
    """Most parameter elements held gathered (ZeRO-3 status AVAILABLE, not persistent) at once."""

    def __init__(self, models) -> None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        self.available = ZeroParamStatus.AVAILABLE
        self.params = [p for m in models for p in m.parameters() if hasattr(p, "ds_status") and not p.ds_persist]
        self.peak = 0
        for m in models:  # after DeepSpeed's own hooks: its pre-hook has gathered the module, its post-hook released it
            for mod in m.modules():
                mod.register_forward_pre_hook(self._hook)
                mod.register_forward_hook(self._hook)

    def sample(self) -> None:
        n = sum(p.ds_numel for p in self.params if p.ds_status == self.available)
        self.peak = max(self.peak, n)

    def _hook(self, *_):
        self.sample()


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if t is not None else 0


def _zero3_terms(engine, ref_engine) -> dict:
    """Bytes each ZeRO-3 term holds on this rank, read from the DeepSpeed objects."""
    import torch

    opt = engine.optimizer
    out = {}
    out["student param partitions"] = sum(_nbytes(p.ds_tensor) for p in engine.module.parameters())
    fp32 = list(getattr(opt, "fp32_partitioned_groups_flat", []))
    bit16 = list(getattr(opt, "fp16_partitioned_groups_flat", []))
    dup = sum(_nbytes(a) for a, b in zip(fp32, bit16) if a.data_ptr() != b.data_ptr())
    out["fp32 master partition (second copy)"] = dup
    out["gradient partition"] = _nbytes(getattr(opt, "grad_partitions_flat_buffer", None))
    states = 0
    for st in opt.optimizer.state.values():
        states += sum(_nbytes(v) for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    out["Adam moments"] = states
    buckets = getattr(opt, "ipg_buckets", {}) or {}
    out["reduce bucket (allocated)"] = sum(_nbytes(getattr(b, "buffer", None)) for b in buckets.values())
    out["teacher param partitions"] = sum(_nbytes(p.ds_tensor) for p in ref_engine.module.parameters()) if ref_engine else 0
    out["persistent (unpartitioned) params"] = sum(
        _nbytes(p.data) for e in (engine, ref_engine) if e is not None for p in e.module.parameters()
        if getattr(p, "ds_persist", False))
    return out


def census(label: str) -> dict:
    """Where the resident set is (diagnostic, ``ASU_BENCH_CENSUS``): glibc's heap in use / free and
    its mmapped blocks (``mallinfo2``), and the tensors reachable from Python (unique storages)."""
    import ctypes
    import gc

    import torch

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    mi = libc.mallinfo2()
    seen, by_shape = {}, {}
    for o in gc.get_objects():
        try:
            if not isinstance(o, torch.Tensor) or o.device.type != "cpu":
                continue
            st = o.untyped_storage()
            ptr, n = st.data_ptr(), st.nbytes()
        except Exception:
            continue
        if ptr and ptr not in seen:
            seen[ptr] = n
            key = f"{tuple(o.shape)} {o.dtype}"
            c, b = by_shape.get(key, (0, 0))
            by_shape[key] = (c + 1, b + n)
    top = sorted(by_shape.items(), key=lambda kv: -kv[1][1])[:25]
    return {"label": label, "rss_mib": status_kb("VmRSS", strict=False) / 1024,
            "heap_arena_mib": mi.arena / MiB, "heap_in_use_mib": mi.uordblks / MiB, "heap_free_mib": mi.fordblks / MiB,
            "mmapped_mib": mi.hblkhd / MiB, "python_tensors_mib": sum(seen.values()) / MiB,
            "top": [(k, c, b / MiB) for k, (c, b) in top]}


def worker(spec: dict) -> None:
    import torch
    from omegaconf import OmegaConf

    torch.set_num_threads(spec["threads"])
    from pipeline.engine.distributed import init_distributed

    dist_info = init_distributed()
    rank, world = dist_info.rank, dist_info.world_size
    import deepspeed  # noqa: F401  (imported by the pipeline before any model is built)
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from pipeline.config import DeepSpeedConfig, TrainerConfig
    from pipeline.data.collate import pad_batch
    from pipeline.engine.ds_config import reference_config, student_config
    from pipeline.engine.trainer import lr_lambda
    from pipeline.methods import build_method
    from pipeline.methods.asu import ASUConfig
    from pipeline.models.loading import load_causal_lm
    from pipeline.models.tempered_attention import set_attention_backend

    set_attention_backend("torch")
    torch.distributed.barrier()
    st = Stages()
    st.mark("python, torch, deepspeed, process group")
    # The architecture's code (transformers imports ~200 MiB of modules with it: same for any model
    # size) is part of the start-up footprint; no model is built yet.
    import transformers.models.llama.modeling_llama  # noqa: F401

    st.mark("start-up (+ model code imported)")
    ds = OmegaConf.structured(DeepSpeedConfig(param_persistence_threshold=spec["persistence"],
                                              extra=spec.get("ds_extra") or {}))
    tr = OmegaConf.structured(TrainerConfig(batch_size=spec["batch"], retain_batch_size=spec["batch"], lr=1e-5))
    s_cfg, r_cfg = student_config(ds, tr, False, world_size=world), reference_config(ds, tr, False, world_size=world)
    if spec.get("ds_extra", {}).get("zero_optimization"):  # exploration knob: the teacher's gathers too
        r_cfg["zero_optimization"].update({k: v for k, v in spec["ds_extra"]["zero_optimization"].items()
                                           if k.startswith("stage3_")})

    hf_ds = HfDeepSpeedConfig(s_cfg)
    student = load_causal_lm(spec["model_dir"], "float32")
    torch.distributed.barrier()
    st.mark("student loaded (from_pretrained under zero.Init)")
    reference = load_causal_lm(spec["model_dir"], "float32")
    reference.requires_grad_(False)
    torch.distributed.barrier()
    st.mark("teacher loaded")
    del hf_ds
    unset_hf_deepspeed_config()
    n_params = sum(p.ds_numel for p in student.parameters())
    from pipeline.engine.host_memory import mmap_threshold_for, tune_host_allocator

    if not torch.cuda.is_available():
        tune_host_allocator(mmap_threshold_for(n_params))  # as pipeline/run.py does after loading
    from pipeline.engine.ds_config import gather_per_layer

    # as pipeline/run.py does, both engines (the student's layers only with one forward per backward)
    gather_per_layer(student, s_cfg, torch.cuda.is_available(), joint_pass=spec.get("passes", "joint") == "joint")
    engine = deepspeed.initialize(
        model=student, model_parameters=[p for p in student.parameters() if p.requires_grad], config=s_cfg,
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(spec["steps"], 0.0, "linear")))[0]
    if spec.get("share_master", True):
        from pipeline.engine.host_memory import share_fp32_master

        share_fp32_master(engine)
    torch.distributed.barrier()
    st.mark("student engine (ZeRO-3 optimizer)")
    gather_per_layer(reference, r_cfg, torch.cuda.is_available())  # as pipeline/run.py does
    ref_engine = deepspeed.initialize(model=reference, config=r_cfg)[0]
    ref_engine.eval()
    torch.distributed.barrier()
    st.mark("teacher engine")

    vocab = student.config.vocab_size
    g = torch.Generator().manual_seed(rank)

    def rows(n):
        out = []
        for i in range(n):
            ids = torch.randint(3, vocab, (spec["seq"],), generator=g).tolist()
            out.append({"input_ids": ids, "labels": [-100] * (spec["seq"] // 2) + ids[spec["seq"] // 2:], "index": i})
        return out

    batch = {"forget": pad_batch(rows(spec["batch"]), 0), "retain": pad_batch(rows(spec["batch"]), 0)}
    method = build_method(OmegaConf.structured(ASUConfig(tau=2.0)), kl_impl=spec["kl"],
                          joint_pass=spec.get("passes", "joint") == "joint")
    watch = GatherWatch([engine.module, ref_engine.module])
    trace = []
    if os.environ.get("ASU_BENCH_TRACE") and rank == 0:  # where in backward the resident set peaks
        def rec(name):
            def f(*_):
                trace.append((name, status_kb("VmRSS", strict=False) // 1024))
            return f
        for name, mod in engine.module.named_modules():
            if not list(mod.children()):
                mod.register_forward_pre_hook(rec("fwd-pre " + name))
                mod.register_forward_hook(rec("fwd-post " + name))
                mod.register_full_backward_pre_hook(rec("bwd-pre " + name))
                mod.register_full_backward_hook(rec("bwd-post " + name))
        for name, mod in ref_engine.module.named_modules():
            if not list(mod.children()):
                mod.register_forward_hook(rec("teacher fwd-post " + name))
        opt = engine.optimizer
        orig = opt._DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads

        def wrapped(params, dtype):
            trace.append((f"reduce-scatter {sum(p.numel() for p in params)} in", status_kb("VmRSS", strict=False) // 1024))
            out = orig(params, dtype)
            trace.append(("reduce-scatter out", status_kb("VmRSS", strict=False) // 1024))
            return out
        opt._DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads = wrapped
    step_s = []
    censuses = []
    do_census = bool(os.environ.get("ASU_BENCH_CENSUS")) and rank == 0
    if do_census:
        censuses.append(census("engines built"))
    for i in range(spec["steps"]):
        t = time.perf_counter()
        out = method.compute_loss(engine, ref_engine, batch)
        if trace:
            trace.append(("loss computed", status_kb("VmRSS", strict=False) // 1024))
        if do_census and i == 1:
            censuses.append(census("step 2: loss computed (before backward)"))
            censuses[-1]["gathered"] = [f"{tag} {n} {tuple(p.ds_shape)}" for tag, e in (("student", engine), ("teacher", ref_engine))
                                        for n, p in e.module.named_parameters()
                                        if getattr(p, "ds_status", None) == watch.available and not p.ds_persist]
        watch.sample()
        st.mark(f"step {i + 1}: forward (teacher + student, loss)")
        engine.backward(out.loss)
        watch.sample()
        del out
        st.mark(f"step {i + 1}: backward (gradient reduce-scatter)")
        engine.step()
        step_s.append(time.perf_counter() - t)
        torch.distributed.barrier()
        st.mark(f"step {i + 1}: optimizer step")
        if do_census:
            censuses.append(census(f"after step {i + 1}"))
            Path(os.environ["ASU_BENCH_CENSUS"]).write_text(json.dumps(censuses, indent=1))
        if trace and i == 1:
            Path(os.environ["ASU_BENCH_TRACE"]).write_text(json.dumps(trace))
        trace.clear()
    terms = _zero3_terms(engine, ref_engine)
    terms["most params gathered at once (student + teacher)"] = 4 * watch.peak
    res = {"rank": rank, "world_size": world, "params": int(n_params), "stages": st.rows, "terms": terms,
           "step_s": step_s, "process_peak_mib": max(r["stage_peak_mib"] or r["rss_mib"] for r in st.rows),
           "ru_maxrss_mib": __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss / 1024}
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, res)
    if rank == 0:
        Path(spec["out"]).write_text(json.dumps(gathered))
    torch.distributed.barrier()


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------


def _save_model(d: Path, size: str) -> Path:
    return save_random_llama(d, SIZES[size], 512)


def _predict(model_dir: Path, spec: dict, ranks: int) -> tuple[dict, int]:
    """The preflight's per-rank plan for this exact run (pipeline.engine.preflight.plan_for_run)."""
    from omegaconf import OmegaConf

    from pipeline.config import DeepSpeedConfig, TrainerConfig
    from pipeline.engine.preflight import plan_for_run
    from pipeline.methods.asu import ASUConfig

    cfg = OmegaConf.create({
        # the method the ranks train (worker): the preflight plans its passes and trainable weights
        "method": OmegaConf.structured(ASUConfig(tau=2.0)),
        "model": {"source": "pretrained", "path": str(model_dir), "arch": None},
        "deepspeed": OmegaConf.structured(DeepSpeedConfig(param_persistence_threshold=spec["persistence"])),
        "trainer": OmegaConf.structured(TrainerConfig(batch_size=spec["batch"], retain_batch_size=spec["batch"],
                                                      passes=spec.get("passes", "joint"))),
        "data": {"max_length": spec["seq"]}, "kernels": {"kl": spec["kl"], "attention": "torch"}})
    plan = plan_for_run(cfg, ranks, False, str(model_dir), True, local_world_size=ranks)
    return dict(plan.per_gpu), plan.rank_total


def launch(spec: dict, ranks: int, timeout: int) -> list[dict]:
    out = Path(spec["model_dir"]).parent / "out.json"
    spec = dict(spec, out=str(out))
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu")
    from tests.helpers.launch import free_port

    if spec.get("baseline"):
        from pipeline.engine.ds_config import GPU_BUFFERS

        spec = dict(spec, share_master=False, ds_extra={"zero_optimization": dict(GPU_BUFFERS)})
        env["MALLOC_CHECK_"] = "0"  # any MALLOC_* variable leaves glibc's defaults alone (host_memory.py)

    cmd = [torchrun, "--nproc_per_node", str(ranks), "--master_port", str(free_port()), str(Path(__file__).resolve()),
           "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"worker launch failed (rc {proc.returncode}) for {spec['size']}")
    return json.loads(out.read_text())


def main() -> None:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--size", nargs="+", choices=tuple(SIZES), default=["134m"])
    # >= 2: the pipeline's deepspeed.zero_stage=auto picks ZeRO-3 (what this measures) only with partners
    ap.add_argument("--ranks", type=int_at_least(2), default=2, help="ranks (>= 2: ZeRO-3 as the pipeline picks it)")
    ap.add_argument("--batch", type=positive_int, default=1, help="forget and retain rows per rank")
    ap.add_argument("--seq", type=positive_int, default=64)
    ap.add_argument("--steps", type=positive_int, default=3)
    ap.add_argument("--kl", default="naive", choices=("naive", "fused"))
    ap.add_argument("--persistence", type=non_negative_int, default=10000, help="deepspeed.param_persistence_threshold")
    ap.add_argument("--threads", type=positive_int, default=1)
    ap.add_argument("--passes", default="joint", choices=("joint", "per_group"),
                    help="trainer.passes: one student forward over forget + retain rows (joint) or one per group")
    ap.add_argument("--ds-extra", type=json_object, default={},
                    help="a JSON object merged into the student/teacher DeepSpeed configs")
    ap.add_argument("--no-share-master", action="store_true")
    ap.add_argument("--baseline", action="store_true",
                    help="as before the memory fixes: DeepSpeed's GPU buffer limits on CPU ranks, the duplicate fp32 "
                         "master partition, glibc's default malloc tuning")
    ap.add_argument("--out", type=Path, default=None,
                    help="results directory (default benchmarks/results); a path ending in .json gives the name, _<device> appended")
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    results = {}
    for size in args.size:
        with tempfile.TemporaryDirectory(prefix="bench_memory-") as d:
            spec = {"size": size, "batch": args.batch, "seq": args.seq, "steps": args.steps, "kl": args.kl,
                    "threads": args.threads, "persistence": args.persistence, "passes": args.passes,
                    "ds_extra": args.ds_extra, "share_master": not args.no_share_master,
                    "baseline": args.baseline,
                    "model_dir": str(_save_model(Path(d), size))}
            t = time.perf_counter()
            ranks = launch(spec, args.ranks, timeout=3600)
            pred_terms, pred_total = _predict(Path(spec["model_dir"]), spec, args.ranks)
            results[size] = _report(size, ranks, pred_terms, pred_total, time.perf_counter() - t)
    summary = [[s, f"{r['params'] / 1e6:.1f}M", fmt(r["peak_mib"], ".0f"), fmt(r["predicted_mib"], ".0f"),
                fmt(r["peak_over_prediction"], ".2f"), fmt(r["startup_mib"], ".0f"),
                fmt(r["growth_bytes_per_param"], ".1f"), fmt(r["peak_bytes_per_param"], ".1f")]
               for s, r in results.items()]
    print(f"\nsummary ({args.ranks} CPU ranks, fp32, asu_kl live teacher, Adam; per rank, max over ranks)")
    print_table(["size", "params", "peak MiB", "preflight MiB", "peak/pred", "start-up MiB",
                 "growth B/param", "peak B/param"], summary)
    # non-default --passes / --baseline: their own file, never the default run's (bench_memory_per_group_cpu.json);
    # every other non-default argument too (common.out_name: bench_memory_size-34m_steps-1_cpu.json)
    name = "bench_memory" + ("" if args.passes == "joint" else f"_{args.passes}") + ("_baseline" if args.baseline else "")
    name = out_name(name, {"size": args.size, "ranks": args.ranks, "batch": args.batch, "seq": args.seq,
                           "steps": args.steps, "kl": args.kl, "persistence": args.persistence, "threads": args.threads,
                           "ds_extra": args.ds_extra, "no_share_master": args.no_share_master},
                    {"size": ["134m"], "ranks": 2, "batch": 1, "seq": 64, "steps": 3, "kl": "naive",
                     "persistence": 10000, "threads": 1, "ds_extra": {}, "no_share_master": False})
    write_json(name, {
        "env": device_info("cpu"),
        "config": {"ranks": args.ranks, "batch": args.batch, "seq": args.seq, "steps": args.steps, "kl": args.kl,
                   "persistence_threshold": args.persistence, "threads": args.threads, "method": "asu_kl",
                   "passes": args.passes, "baseline": args.baseline,
                   "precision": "fp32", "models": {s: SIZES[s] for s in args.size}},
        "results": results,
        "notes": ["peak = VmHWM of the rank over the whole run (max over ranks); start-up = VmRSS after imports "
                  "(incl. the architecture's modeling code) and init_distributed, before any model is built; "
                  "growth = peak - start-up.",
                  "terms are read from the DeepSpeed objects at the end of the run (bytes on rank 0); "
                  "'most params gathered at once' is sampled before and after every module forward and after backward."],
    }, args.out)


def _report(size: str, ranks: list[dict], pred_terms: dict, pred_total: int, wall: float) -> dict:
    r0 = ranks[0]
    P = r0["params"]
    print(f"\n== {size}: {P / 1e6:.1f}M params, {len(ranks)} ranks, launch {wall:.0f}s, "
          f"step {min(r0['step_s']):.1f}s")
    rows = []
    for i, s in enumerate(r0["stages"]):
        rows.append([s["stage"]] + [fmt(r["stages"][i]["rss_mib"], ".0f") for r in ranks]
                    + [fmt(r["stages"][i]["stage_peak_mib"], ".0f") for r in ranks])
    print_table(["stage"] + [f"RSS r{r['rank']}" for r in ranks] + [f"peak in stage r{r['rank']}" for r in ranks], rows)
    print("ZeRO-3 terms held on rank 0 (MiB):")
    print_table(["term", "MiB", "B/param"], [[k, fmt(v / MiB, ".1f"), fmt(v / P, ".2f")] for k, v in r0["terms"].items()])
    print("preflight plan per rank (MiB):")
    print_table(["component", "MiB"], [[k, fmt(v / MiB, ".1f")] for k, v in pred_terms.items()]
                + [["TOTAL per rank", fmt(pred_total / MiB, ".1f")]])
    peak = max(r["process_peak_mib"] for r in ranks)
    startup = max(r["stages"][1]["rss_mib"] for r in ranks)
    growth = max(r["process_peak_mib"] - r["stages"][1]["rss_mib"] for r in ranks)
    return {"params": P, "peak_mib": peak, "startup_mib": startup, "growth_mib": growth,
            "growth_bytes_per_param": growth * MiB / P, "peak_bytes_per_param": peak * MiB / P,
            "predicted_mib": pred_total / MiB, "peak_over_prediction": peak * MiB / pred_total,
            "predicted_terms_mib": {k: v / MiB for k, v in pred_terms.items()},
            "per_rank": ranks}


if __name__ == "__main__":
    main()
