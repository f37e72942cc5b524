"""Benchmark: one unlearning training step under ZeRO-3, ASU vs GradDiff, same batch, same engines.

Variants (all but ``asu_kl_live_fused`` with NLL on retain, so only the forget term differs):

* ``grad_diff``        — gradient ascent on forget + NLL on retain (no reference model);
* ``npo``              — NPO (frozen reference's sequence log-probs on the forget rows) + NLL on retain;
* ``asu_live_naive``   — ASU-GD, tempered teacher forward every step, materialised-logits KL;
* ``asu_live_fused``   — ASU-GD, tempered teacher forward every step, streaming fused KL (kernels.kl=fused);
* ``asu_cached``       — ASU-GD, teacher read from the teacher cache (method.teacher=cached, top-k);
  no teacher forward and no reference engine;
* ``asu_kl_live_fused`` — ``asu_kl`` (the default ASU: KL to the original on retain too), live
  teacher, fused KL: the frozen model serves forget rows at τ and retain rows at 1.

The student is a DeepSpeed ZeRO-3 engine built by the pipeline's own ``student_config``; the
frozen teacher a second ZeRO-3 engine from ``reference_config`` (as in ``pipeline/run.py``). Ranks
are launched with ``torchrun --nproc_per_node N`` (default 2, gloo on CPU).

Measured in ONE launch (the same engines, the same batch): each variant first runs as a block of
``--warmup`` steps (ZeRO-3 records its prefetch trace; switching the loss invalidates it) and one
step that measures its memory; then, with several variants, one untimed warm-up round and ``--steps``
timed rounds of one step of every variant, the order rotated each round, so the variants are timed
side by side and a change of the host's load falls on all of them alike (a single variant, or
``--timing blocks``: each variant's ``--steps`` timed steps in its own block, the way this script
timed before 2026-12-05 and the way an older commit's bench_step.py still times; recorded as
``config.interleave``). Reported per variant: median and min step wall time, ZeRO-3 all-gather volume of
one steady step (bytes of the gathered output tensors of every all-gather DeepSpeed issues on rank
0, counted by wrapping the DeepSpeed comm backend's ``all_gather*`` methods; reduce-scatter volume
too), and peak memory of the step: CUDA ``max_memory_allocated`` after a reset; CPU the growth of
the process's resident-set high-water mark during the block over the RSS at its start (VmHWM reset
with ``/proc/self/clear_refs``; the workers run with ``MALLOC_MMAP_THRESHOLD_=65536`` and
``malloc_trim(0)`` between blocks, so freed tensors go back to the OS and a later block's peak is
not hidden by an earlier block's freed-but-kept heap). The process peak RSS (engines included) is
reported too.

``--compare-passes``: every variant twice in the same launch, as ``<variant>@per_group``
(``trainer.passes=per_group``: one forward per row group and model, the step before the joint pass)
and as the joint step (one forward per model per step, pipeline/methods/passes.py); timed in the
same interleaved rounds, so a change of load falls on old and new alike.

``--lora-compare`` (with ``--scale 134m``): ASU-LoRA vs full ASU, both live teacher (ASU-GD, naive KL),
in ONE run of this script: two launches, the same model, batch and ranks. Full ASU = the student
engine + a frozen reference engine; ASU-LoRA = ``model.peft`` defaults (r=8 on q,k,v,o,gate,up,down)
with the teacher the student's own base, adapters off (pipeline/models/peft_student.py), no
second model. Reported per rank: process peak RSS, the peak above the RSS before any model was
built (model states + step; the interpreter/library baseline is the same in both), and the median
step time; written to ``bench_step_lora_<device>.json``.

``--one-process``: the embedded demo's model (the synthetic benchmark's target, ``+exp=tofu_tiny``),
ONE process, 1 thread, 8 forget + 8 retain rows per step, for GradDiff, NPO and ASU (``asu_kl`` with
the demo's tuned values, live teacher). "ours" = the pipeline's own step, built by the pipeline's own
stages (``pipeline.run._start`` / ``_load_inputs`` / ``_build_engines`` with world size 1, so
``deepspeed.zero_stage=auto`` resolves as a real run would): ``method.compute_loss`` +
``engine.backward`` + ``engine.step``. "plain" = a plain-torch loop of the same losses written here
(HF model with its stock SDPA attention, ``model(labels=...).loss`` for NLL terms, the tempered
teacher by dividing each attention module's ``scaling`` by tau, ``clip_grad_norm_`` and
``torch.optim.AdamW``: what open-unlearning's HF-Trainer step does), no DeepSpeed. Both start from
the same weights on the same batches; their first-step losses must agree to 1e-5 (else the script
stops: the comparison would not be of the same work). Every method's pair is built first; then each
round runs one step of all eight (method, ours|plain) variants, the order rotated every round, after
warm-up rounds; median per-step ms, ours/plain per method and ASU/GradDiff (ours) go
to ``bench_step_one_process_<device>.json``. ``--zero-stage 3`` forces ZeRO-3 (the pre-auto default).

``--scale 1b`` builds a random ~1B-parameter Llama from a config (no download) under
``deepspeed.zero.Init`` and runs a couple of GradDiff and ASU (live, and cached) steps, recording
tokens/s and peak host memory to ``bench_step_scale_1b_<device>.json``.

Output name: ``bench_step`` (``--scale small``), ``bench_step_134m`` (``0.1b``),
``bench_step_scale_<size>`` (other sizes, the dot dropped: ``bench_step_scale_05b``), then
``_passes`` (``--compare-passes``), ``_per_module`` (``--gather per-module``) and
``_v-<variant>-<variant>...`` (``--variants`` other than the default list), then every other
argument that differs from its default as ``_<arg>-<value>`` (``--batch``, ``--seq``, ``--steps``,
``--warmup``, ``--ranks``, ``--threads``, ``--topk``, ``--offload-optimizer``, ``--attention``,
``--timing``; ``common.out_name``), then ``_<device>.json``: a run with other arguments never
overwrites another's committed file. ``--out DIR`` writes it into DIR instead of
benchmarks/results; a ``--out`` ending in ``.json`` gives the name, ``_<device>`` appended (the earlier meaning,
still accepted: the tests and bench_step_vs_commit.py use it).

    .venv/bin/python benchmarks/bench_step.py                 # CPU, 2 ranks, ~2 min
    .venv/bin/python benchmarks/bench_step.py --compare-passes                # old vs new step, 7 M
    .venv/bin/python benchmarks/bench_step.py --compare-passes --scale 134m   # old vs new step, 134 M (~4 GiB/rank)
    .venv/bin/python benchmarks/bench_step.py --scale 1b      # CPU, needs ~20 GiB RAM, ~10 min
    .venv/bin/python benchmarks/bench_step.py --scale 134m --lora-compare   # CPU, ~4 GiB RAM, ~3 min
    .venv/bin/python benchmarks/bench_step.py --one-process                  # CPU, 1 thread, ~2 min
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
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
    non_negative_int,
    out_name,
    positive_int,
    print_table,
    save_random_llama,
    set_threads,
    status_kb,
    write_json,
)

VARIANTS = ("grad_diff", "npo", "asu_live_naive", "asu_live_fused", "asu_cached", "asu_kl_live_fused")
PER_GROUP = "@per_group"  # variant suffix: trainer.passes=per_group (one forward per row group and model)
SIZES = {
    # SmolLM2-135M's architecture (134.5M parameters, tied embeddings), randomly initialised
    "134m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    # small: every weight matrix > stage3_param_persistence_threshold (1e4), so ZeRO-3 really shards it
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4),
    # ~0.13B parameters: what fitted (student + frozen teacher + Adam, 2 ranks) on the 23 GiB shared CPU host
    "0.1b": RANDOM_LLAMAS["134m"],
    # ~0.55B parameters: OOM-killed on the 23 GiB shared CPU host (peak ~10.7 GiB RSS per rank, see docs/performance.md)
    "0.5b": dict(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=16,
                 num_attention_heads=12, num_key_value_heads=12),
    # ~0.94B parameters (Llama-style, untied embeddings)
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=16,
               num_attention_heads=16, num_key_value_heads=16),
}


# ------------------------------------------------------------------------------------------------
# worker (one rank)
# ------------------------------------------------------------------------------------------------


class CommCounter:
    """Counts bytes moved by DeepSpeed's all-gathers / reduce-scatters on this rank (output sizes)."""

    GATHER = ("all_gather", "all_gather_into_tensor", "all_gather_base", "all_gather_coalesced")
    SCATTER = ("reduce_scatter_tensor", "reduce_scatter", "reduce_scatter_fn", "reduce_scatter_coalesced")

    def __init__(self) -> None:
        import deepspeed.comm.comm as dcomm

        self.cdb = dcomm.cdb
        self.bytes = {"all_gather": 0, "reduce_scatter": 0}
        self.calls = {"all_gather": 0, "reduce_scatter": 0}
        for name in self.GATHER + self.SCATTER:
            fn = getattr(self.cdb, name, None)
            if fn is not None:
                setattr(self.cdb, name, self._wrap(fn, name, "all_gather" if name in self.GATHER else "reduce_scatter"))

    @staticmethod
    def _nbytes(x) -> int:
        import torch

        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, (list, tuple)):
            return sum(CommCounter._nbytes(t) for t in x)
        return 0

    def _wrap(self, fn, name, kind):
        def wrapped(*args, **kwargs):
            if kind == "all_gather":
                out = kwargs.get("output_tensor", kwargs.get("tensor_list", kwargs.get("output_tensors")))
                out = args[0] if out is None and args else out
            else:
                out = kwargs.get("input_tensor", kwargs.get("input_list"))
                out = args[1] if out is None and len(args) > 1 else out
            self.bytes[kind] += self._nbytes(out)
            self.calls[kind] += 1
            return fn(*args, **kwargs)

        return wrapped

    def reset(self) -> None:
        self.bytes = dict.fromkeys(self.bytes, 0)
        self.calls = dict.fromkeys(self.calls, 0)



def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rows(n: int, seq: int, vocab: int, seed: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, vocab, (seq,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (seq // 2) + ids[seq // 2:], "index": i})
    return out


def worker(spec: dict) -> None:
    import torch
    from omegaconf import OmegaConf

    set_threads(spec["threads"])
    from pipeline.engine.distributed import init_distributed

    dist_info = init_distributed()
    rank, world = dist_info.rank, dist_info.world_size
    cuda = dist_info.device == "cuda"
    import deepspeed
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from pipeline.config import DeepSpeedConfig, TrainerConfig
    from pipeline.data.collate import pad_batch
    from pipeline.engine.ds_config import reference_config, student_config
    from pipeline.engine.teacher_cache import TeacherCache, build_teacher_cache
    from pipeline.methods import build_method
    from pipeline.methods.asu import ASUConfig, ASUGDConfig
    from pipeline.methods.grad_diff import GradDiffConfig
    from pipeline.methods.npo import NPOConfig
    from pipeline.models.tempered_attention import set_attention_backend

    set_attention_backend(spec.get("attention", "auto"), "cuda" if cuda else "cpu")
    counter = CommCounter()
    variants = spec["variants"]
    bases = {v.split("@")[0] for v in variants}
    need_ref = any(b.startswith(("asu_live", "asu_kl")) or b == "npo" for b in bases)
    need_cache = "asu_cached" in bases

    # ZeRO-3 on any number of ranks, as this mode always measured (the pipeline's auto would pick stage
    # 0 for --ranks 1; benchmarks/gpu_check.py compares a 1-GPU run with its ZeRO-3 memory plan);
    # persistence threshold 0: every weight is partitioned, as on a 7B model
    ds = OmegaConf.structured(DeepSpeedConfig(zero_stage=3, offload_optimizer=spec["offload_optimizer"],
                                              param_persistence_threshold=spec.get("persistence", 0)))
    tr = OmegaConf.structured(TrainerConfig(batch_size=spec["batch"], retain_batch_size=spec["batch"], lr=1e-5,
                                            max_grad_norm=1.0))
    s_cfg, r_cfg = student_config(ds, tr, cuda), reference_config(ds, tr, cuda)
    dtype = torch.bfloat16 if cuda else torch.float32
    mcfg = LlamaConfig(**{"tie_word_embeddings": False, **SIZES[spec["size"]]},
                       max_position_embeddings=max(256, spec["seq"]), pad_token_id=0,
                       bos_token_id=1, eos_token_id=2, initializer_range=0.02)
    rss0 = status_kb("VmRSS", strict=False)
    t0 = time.perf_counter()
    hf_ds = HfDeepSpeedConfig(s_cfg)

    def make():
        if spec.get("model_dir"):
            return AutoModelForCausalLM.from_pretrained(spec["model_dir"], torch_dtype=dtype)
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(mcfg, torch_dtype=dtype)

    student = make()
    lora = bool(spec.get("lora"))
    if lora:  # model.peft defaults; the teacher is the student's own base (no second model)
        from pipeline.config import PeftConfig
        from pipeline.models.peft_student import FrozenBaseView, wrap_lora

        student = wrap_lora(student, OmegaConf.structured(PeftConfig(enabled=True)))
    reference = None
    if (need_ref or need_cache) and not lora:
        reference = make()
        reference.requires_grad_(False)
    del hf_ds
    unset_hf_deepspeed_config()
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in student.parameters())
    per_layer = spec.get("gather", "per-layer") == "per-layer"
    if per_layer:  # as pipeline/run.py builds both engines (CPU ranks; a no-op on GPUs)
        from pipeline.engine.ds_config import gather_per_layer

        gather_per_layer(student, s_cfg, cuda, joint_pass=not any(v.endswith(PER_GROUP) for v in variants))
        if reference is not None:
            gather_per_layer(reference, r_cfg, cuda)
    engine = deepspeed.initialize(model=student, model_parameters=[p for p in student.parameters() if p.requires_grad],
                                  config=s_cfg)[0]
    ref_engine = None
    if reference is not None:
        ref_engine = deepspeed.initialize(model=reference, config=r_cfg)[0]
        ref_engine.eval()
    elif lora and (need_ref or need_cache):
        ref_engine = FrozenBaseView(engine)
    device = next(engine.module.parameters()).device
    forget_rows = _rows(spec["batch"] * world, spec["seq"], mcfg.vocab_size, 1)
    retain_rows = _rows(spec["batch"] * world, spec["seq"], mcfg.vocab_size, 2)
    mine = list(range(rank * spec["batch"], (rank + 1) * spec["batch"]))
    batch = {"forget": {k: v.to(device) for k, v in pad_batch([forget_rows[i] for i in mine], 0).items()},
             "retain": {k: v.to(device) for k, v in pad_batch([retain_rows[i] for i in mine], 0).items()}}

    methods = {}
    for v in variants:
        base = v.split("@")[0]
        joint = not v.endswith(PER_GROUP)
        if base == "grad_diff":
            methods[v] = build_method(OmegaConf.structured(GradDiffConfig()), kl_impl="naive", joint_pass=joint)
        elif base == "npo":
            methods[v] = build_method(OmegaConf.structured(NPOConfig()), kl_impl="naive", joint_pass=joint)
        elif base == "asu_kl_live_fused":
            methods[v] = build_method(OmegaConf.structured(ASUConfig(tau=2.0)), kl_impl="fused", joint_pass=joint)
        else:
            teacher = "cached" if base == "asu_cached" else "live"
            c = OmegaConf.structured(ASUGDConfig(tau=2.0, teacher=teacher, cache_topk=spec["topk"]))
            methods[v] = build_method(c, kl_impl="fused" if base == "asu_live_fused" else "naive", joint_pass=joint)
    cached_key = next((v for v in variants if v.startswith("asu_cached")), None)
    cache_s = None
    if need_cache:
        tc0 = time.perf_counter()
        path = build_teacher_cache(ref_engine, forget_rows, methods[cached_key].cfg, spec["cache_dir"],
                                   spec["batch"], model_path=f"bench-{spec['size']}", split="bench",
                                   max_length=spec["seq"], pad_token_id=0, device=device,
                                   dtype=str(dtype).removeprefix("torch."))
        cache_s = time.perf_counter() - tc0
        cache = TeacherCache(path)
        batch["forget_teacher"] = cache.selected(mine, batch["forget"]["labels"])
        if not need_ref:
            ref_engine = reference = None  # cached ASU-GD trains without the reference engine
            import gc

            gc.collect()
    setup_s = time.perf_counter() - t0

    def step(v: str) -> None:
        out = methods[v].compute_loss(engine, ref_engine, batch)
        engine.backward(out.loss)
        engine.step()

    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # pragma: no cover
        libc = None
    times = {v: [] for v in variants}
    comm, mem = {}, {}

    def timed(v: str) -> None:
        torch.distributed.barrier()
        counter.reset()
        t = time.perf_counter()
        step(v)
        if cuda:
            torch.cuda.synchronize()
        times[v].append(time.perf_counter() - t)
        comm[v] = {"all_gather_bytes": counter.bytes["all_gather"], "all_gather_calls": counter.calls["all_gather"],
                   "reduce_scatter_bytes": counter.bytes["reduce_scatter"]}  # the last (steady) step

    interleave = bool(spec.get("interleave")) and len(variants) > 1
    for v in variants:  # one block per variant: warm-up steps (ZeRO-3 records its prefetch trace), then timed
        for _ in range(spec["warmup"]):
            step(v)
        torch.distributed.barrier()
        if libc is not None:
            libc.malloc_trim(0)  # give freed heap back so the next block's RSS peak is its own
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        rss_before = status_kb("VmRSS", strict=False)
        hwm_ok = _reset_hwm()
        for _ in range(1 if interleave else spec["steps"]):  # interleaved: this block measures memory only
            timed(v)
        mem[v] = {"rss_before_kb": rss_before,
                  "peak_rss_kb": status_kb("VmHWM", strict=False) if hwm_ok else None,
                  "step_rss_growth_kb": (status_kb("VmHWM", strict=False) - rss_before) if hwm_ok else None,
                  "cuda_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None}
    if interleave:
        # timed rounds: one step of every variant per round, the order rotated each round, so a change of
        # the host's load during the run falls on all variants alike (the blocks above only warmed up and
        # measured memory); first untimed rounds: the switch between variants is warmed up too
        for _ in range(spec.get("warmup_rounds", 1)):
            for v in variants:
                step(v)
        times = {v: [] for v in variants}
        for r in range(spec["steps"]):
            k = r % len(variants)
            for v in variants[k:] + variants[:k]:
                timed(v)
    res = {
        "rank": rank, "world_size": world, "params": int(n_params), "setup_s": setup_s, "cache_build_s": cache_s,
        "tokens_per_step": spec["batch"] * world * spec["seq"] * 2,  # forget + retain, all ranks
        "step_s": {v: statistics.median(ts) for v, ts in times.items()},
        "step_s_min": {v: min(ts) for v, ts in times.items()},
        "step_s_all": times,
        "comm": comm,
        "rss_setup_kb": rss0,
        "process_peak_rss_kb": __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss,
        "mem": mem,
    }
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, res)
    if rank == 0:
        Path(spec["out"]).write_text(json.dumps(gathered))
    torch.distributed.barrier()


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------


def launch(spec: dict, ranks: int, port: int, timeout: int) -> list[dict]:
    out = Path(spec["cache_dir"]).parent / f"out-{port}.json"
    spec = dict(spec, out=str(out))
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]),
               MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    if not _cuda():
        env["DS_ACCELERATOR"] = "cpu"
    cmd = [torchrun, "--nproc_per_node", str(ranks), "--master_port", str(port), str(Path(__file__).resolve()),
           "--worker", json.dumps(spec)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"worker launch failed (rc {proc.returncode}): {' '.join(spec['variants'])}")
    res = json.loads(out.read_text())
    print(f"  launch {'+'.join(spec['variants'])}: {time.perf_counter() - t:.1f}s", flush=True)
    return res


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _save_small_model(d: Path, size: str) -> Path:
    return save_random_llama(d, SIZES[size], 256)


def main() -> None:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--scale", choices=tuple(SIZES), default="small")
    ap.add_argument("--ranks", type=positive_int, default=2)
    ap.add_argument("--batch", type=positive_int, default=None, help="rows per rank (forget and retain each)")
    ap.add_argument("--seq", type=positive_int, default=None)
    ap.add_argument("--steps", type=positive_int, default=None)
    ap.add_argument("--topk", type=non_negative_int, default=100,
                    help="cache_topk of the cached-teacher variant (0 = full rows)")
    ap.add_argument("--threads", type=positive_int, default=1, help="torch threads per rank")
    ap.add_argument("--warmup", type=non_negative_int, default=None)
    ap.add_argument("--offload-optimizer", default=None, choices=("none", "cpu"))
    ap.add_argument("--variants", nargs="+", default=None, choices=VARIANTS, metavar="VARIANT",
                    help=f"some of {', '.join(VARIANTS)}")
    ap.add_argument("--timing", choices=("interleaved", "blocks"), default="interleaved",
                    help="several variants: timed side by side in rotated rounds (default), or each in its own "
                         "block of --steps steps (the way before 2026-12-05; bench_step_vs_commit.py uses it "
                         "against an old commit that can only time that way)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results directory (default benchmarks/results); a path ending in .json gives the name, _<device> appended")
    ap.add_argument("--attention", default="auto", help="kernels.attention backend (auto = sdpa)")
    ap.add_argument("--gather", choices=("per-layer", "per-module"), default="per-layer",
                    help="ZeRO-3 on CPU ranks: each decoder layer's weights in one fetch (the pipeline's way, "
                         "ds_config.gather_per_layer) or DeepSpeed's per-module fetches (before it)")
    ap.add_argument("--compare-passes", action="store_true",
                    help="each variant twice in one launch: the per-group step (old: one forward per row group and "
                         "model) then the joint step (new: one forward per model)")
    ap.add_argument("--lora-compare", action="store_true",
                    help="ASU-LoRA vs full ASU (live teacher): two launches in one run, memory + step time")
    ap.add_argument("--one-process", action="store_true",
                    help="the demo's model, one process: our step vs a plain-torch loop of the same losses")
    ap.add_argument("--zero-stage", default="auto", choices=("auto", "0", "1", "2", "3"),
                    help="--one-process: deepspeed.zero_stage (auto | 0..3)")
    ap.add_argument("--override", action="append", default=[],
                    help="--one-process: a further Hydra override (repeatable; the tests shrink the benchmark)")
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.one_process:
        one_process(args)
        return
    if args.lora_compare:
        lora_compare(args)
        return
    threads = set_threads(args.threads)
    big = args.scale != "small"
    shape = _shape(args, _shape_defaults(args.scale))
    batch, seq, steps, warmup = shape["batch"], shape["seq"], shape["steps"], shape["warmup"]
    variants = args.variants or _default_variants(args.scale)
    if args.compare_passes:  # every variant old and new, timed interleaved
        variants = [x for v in variants for x in (v + PER_GROUP, v)]
    dev = "cuda" if _cuda() else "cpu"
    with tempfile.TemporaryDirectory(prefix="bench_step-") as d:
        d = Path(d)
        spec = {"size": args.scale, "batch": batch, "seq": seq, "steps": steps, "warmup": warmup, "topk": args.topk,
                "threads": args.threads, "cache_dir": str(d / "cache"),
                "offload_optimizer": args.offload_optimizer or "none", "attention": args.attention,
                "model_dir": None if big else str(_save_small_model(d, args.scale)),
                # several variants: timed side by side (interleaved rounds), after one untimed round,
                # unless --timing blocks (each variant's steps in its own block, as before 2026-12-05)
                "interleave": args.timing == "interleaved" and len(variants) > 1, "warmup_rounds": 1,
                "gather": args.gather}
        port = 29850 + os.getpid() % 100
        how = (f"{warmup} warm-up + 1 memory step each, then 1 warm-up round + {steps} timed rounds interleaved"
               if spec["interleave"] else f"{warmup} warm-up + {steps} timed steps")
        print(f"one launch: {', '.join(variants)} ({args.ranks} ranks, {how})", flush=True)
        ranks = launch(dict(spec, variants=variants), args.ranks, port, timeout=7200 if big else 1200)
        _report(ranks, spec, args, dev, threads, variants)


def lora_compare(args) -> None:
    """Full ASU (student + frozen reference engine) vs ASU-LoRA (teacher = own base, adapters off):
    the same model, batch and ranks, two launches in this one run; memory per rank and step time."""
    threads = set_threads(args.threads)
    dev = "cuda" if _cuda() else "cpu"
    defaults = {"batch": 1, "seq": 64, "steps": 3, "warmup": 1}
    shape = _shape(args, defaults)
    batch, seq, steps, warmup = shape["batch"], shape["seq"], shape["steps"], shape["warmup"]
    # named by what differs from the documented run (--scale 134m, module docstring)
    name = out_name("bench_step_lora", {**shape, "scale": args.scale, "ranks": args.ranks, "threads": args.threads},
                    {**defaults, "scale": "134m", "ranks": 2, "threads": 1})
    rows, results = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_step_lora-") as d:
        spec = {"size": args.scale, "batch": batch, "seq": seq, "steps": steps, "warmup": warmup, "topk": args.topk,
                "threads": args.threads, "cache_dir": str(Path(d) / "cache"), "offload_optimizer": "none",
                "model_dir": None, "variants": ["asu_live_naive"]}
        port = 29750 + os.getpid() % 100
        for i, (name, lora) in enumerate((("full ASU (live teacher)", False), ("ASU-LoRA (base = teacher)", True))):
            ranks = launch(dict(spec, lora=lora), args.ranks, port + i, timeout=7200)
            peak = [r["process_peak_rss_kb"] / 1024 for r in ranks]
            above = [(r["process_peak_rss_kb"] - r["rss_setup_kb"]) / 1024 for r in ranks]
            t = max(r["step_s"]["asu_live_naive"] for r in ranks)
            results["lora" if lora else "full"] = {
                "name": name, "params": ranks[0]["params"], "step_ms": t * 1e3,
                "process_peak_rss_mib_per_rank": peak, "peak_above_baseline_mib_per_rank": above,
                "rss_before_models_mib_per_rank": [r["rss_setup_kb"] / 1024 for r in ranks],
                "step_ms_all_rank0": [x * 1e3 for x in ranks[0]["step_s_all"]["asu_live_naive"]],
                "setup_s": ranks[0]["setup_s"]}
            rows.append([name, fmt(t * 1e3, ".0f"), fmt(max(peak), ".0f"), fmt(max(above), ".0f")])
    full, lora = results["full"], results["lora"]
    ratios = {"peak_rss_ratio": max(lora["process_peak_rss_mib_per_rank"]) / max(full["process_peak_rss_mib_per_rank"]),
              "peak_above_baseline_ratio": max(lora["peak_above_baseline_mib_per_rank"])
              / max(full["peak_above_baseline_mib_per_rank"]),
              "step_time_ratio": lora["step_ms"] / full["step_ms"]}
    rows.append(["LoRA / full", fmt(ratios["step_time_ratio"], ".2f"), fmt(ratios["peak_rss_ratio"], ".2f"),
                 fmt(ratios["peak_above_baseline_ratio"], ".2f")])
    print(f"\nZeRO-3, {args.ranks} ranks x {threads} thread(s), {dev}; random Llama {SIZES[args.scale]} = "
          f"{full['params'] / 1e6:.1f}M params; ASU-GD tau=2, naive KL; per rank {batch} forget + {batch} retain rows "
          f"x {seq} tokens; median of {steps} steps after {warmup} warm-up")
    print_table(["variant", "step ms", "peak RSS MiB (max rank)", "peak above pre-model RSS MiB (max rank)"], rows)
    write_json(name, {
        "env": device_info(dev),
        "config": {**{k: v for k, v in spec.items() if k not in ("cache_dir", "model_dir")}, "ranks": args.ranks,
                   "model": SIZES[args.scale], "lora": "model.peft defaults: r=8, alpha=16, q,k,v,o,gate,up,down"},
        "results": results, "ratios": ratios,
        "notes": ["two launches in one run of the script, same model/batch/ranks; full = student + frozen reference "
                  "ZeRO-3 engines; LoRA = one engine, the teacher is its base with the adapters disabled.",
                  "peak above baseline = process peak RSS minus the RSS before any model was built (after imports "
                  "and process-group set-up): model states + the step; the baseline is the same in both runs."],
    }, args.out)


# ------------------------------------------------------------------------------------------------
# --one-process: our step vs a plain-torch loop of the same losses
# ------------------------------------------------------------------------------------------------

# asu_kl is the demo's ASU (retain KL: the frozen model serves forget and retain rows); asu_gd's retain
# term is an NLL, so its frozen pass covers the forget rows only
ONE_PROCESS_METHODS = ("grad_diff", "npo", "asu_kl", "asu_gd")


def _plain_logits(model, b: dict):
    return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits


def _plain_hf_nll(model, b: dict):
    """HF's own causal-LM loss (one mean over the batch's labelled tokens), as an HF Trainer step uses it."""
    return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                 use_cache=False).loss


def _plain_seq_logprob(logits, labels):
    """Sum of the labelled next-token log-probs per row (open-unlearning's compute_batch_nll, negated)."""
    import torch.nn.functional as F

    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")
    return -nll.sum(-1)


def _plain_kl_seq_mean(t_logits, s_logits, labels):
    """KL(p_t || p_s) at labelled next-token positions: mean over each row's positions, then over rows."""
    import torch

    mask = (labels[:, 1:] != -100).float()
    lt = torch.log_softmax(t_logits[:, :-1].float(), -1)
    ls = torch.log_softmax(s_logits[:, :-1].float(), -1)
    kl = (lt.exp() * (lt - ls)).sum(-1)
    per_row, has = mask.sum(1), mask.sum(1) > 0
    return ((kl * mask).sum(1) / per_row.clamp_min(1))[has].mean()


class _PlainTempered:
    """Attention temperature on a stock HF Llama: every attention module's ``scaling`` divided by tau
    (softmax(QK^T * scaling / tau)), restored on exit. Independent of the pipeline's attention backends."""

    def __init__(self, model, tau: float) -> None:
        self.mods = [m for m in model.modules() if hasattr(m, "scaling") and hasattr(m, "q_proj")]
        self.tau = float(tau)

    def __enter__(self):
        self.saved = [m.scaling for m in self.mods]
        for m in self.mods:
            m.scaling = m.scaling / self.tau

    def __exit__(self, *exc):
        for m, v in zip(self.mods, self.saved):
            m.scaling = v


def _plain_loss(name: str, mcfg, model, ref, batch: dict):
    """The method's loss in plain torch (the formulas of docs/methods.md, written independently)."""
    import torch
    import torch.nn.functional as F

    f, r = batch["forget"], batch["retain"]
    gamma, alpha = float(mcfg.gamma), float(mcfg.alpha)
    # the settings these formulas implement (the demo's configs); anything else would not be the same work
    assert mcfg.get("rna_noise", 0) == 0 and mcfg.get("retain_reduction", "auto") == "auto", mcfg
    if name in ("grad_diff", "npo"):
        assert mcfg.retain_loss == "nll" and (name == "npo" or mcfg.reduction == "token_mean"), mcfg
    if name == "grad_diff":
        return gamma * -_plain_hf_nll(model, f) + alpha * _plain_hf_nll(model, r)
    if name == "npo":
        with torch.no_grad():
            lp_ref = _plain_seq_logprob(_plain_logits(ref, f), f["labels"])
        lp = _plain_seq_logprob(_plain_logits(model, f), f["labels"])
        beta = float(mcfg.beta)
        lf = -(2.0 / beta) * F.logsigmoid(-beta * (lp - lp_ref)).mean()
        return gamma * lf + alpha * _plain_hf_nll(model, r)
    if name in ("asu_kl", "asu_gd"):
        assert (mcfg.teacher_layers is None and mcfg.retain_loss == ("kl" if name == "asu_kl" else "nll")
                and mcfg.reduction == "sequence_mean" and mcfg.teacher == "live"
                and not mcfg.skip_first_answer_token), mcfg
        with torch.no_grad(), _PlainTempered(ref, float(mcfg.tau)):
            t_f = _plain_logits(ref, f)
        lf = _plain_kl_seq_mean(t_f, _plain_logits(model, f), f["labels"])
        if name == "asu_gd":
            return gamma * lf + alpha * _plain_hf_nll(model, r)
        with torch.no_grad():
            t_r = _plain_logits(ref, r)
        lr = _plain_kl_seq_mean(t_r, _plain_logits(model, r), r["labels"])
        return gamma * lf + alpha * lr
    raise ValueError(name)


def _one_process_method(name: str, args, tmp: Path) -> dict:
    """Our engines built the pipeline's way and a plain-torch copy: their step functions and batches."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from transformers import AutoModelForCausalLM

    from pipeline.config import register_configs
    from pipeline.demo import method_choice
    from pipeline.engine.trainer import UnlearningTrainer
    from pipeline.run import _build_engines, _load_inputs, _needs_reference, _start

    register_configs()
    conf = ROOT / "conf"
    if not GlobalHydra.instance().is_initialized():
        initialize_config_dir(config_dir=str(conf), version_base="1.3")
    cfg = compose(config_name="config", overrides=[
        "+exp=tofu_tiny", f"method={method_choice(name, conf)}", "trainer.batch_size=8", "trainer.retain_batch_size=8",
        "trainer.num_threads=1", f"deepspeed.zero_stage={args.zero_stage}", "logging=none", "eval.enabled=false",
        f"output_dir={tmp}", f"run_name={name}", f"cache_dir={ROOT / '.cache' / 'asu'}", *args.override])
    dist, method = _start(cfg)
    inputs = _load_inputs(cfg)
    engines, plan, total = _build_engines(cfg, dist, method, inputs,
                                          _needs_reference(cfg, method, inputs, dist.device == "cuda"), tmp / name)
    engine, reference = engines.engine, engines.reference
    engine.train()  # as UnlearningTrainer.train() sets them
    if reference is not None:
        reference.eval()
    trainer = UnlearningTrainer(cfg, tmp / name, engine, reference, method, inputs.forget, inputs.retain,
                                inputs.tokenizer.pad_token_id, plan, total, None, {})
    n = args.warmup_one + args.steps_one
    # the pipeline's own collation and step token counts (grad_accum=1), prepared up front
    batches = [next(trainer.step_batches(i % total, 1)) for i in range(n)]

    tr = cfg.trainer
    plain = AutoModelForCausalLM.from_pretrained(inputs.paths.model, dtype=torch.float32,
                                                 attn_implementation="sdpa").train()
    ref = None
    if method.uses_reference:
        ref = AutoModelForCausalLM.from_pretrained(inputs.paths.model, dtype=torch.float32,
                                                   attn_implementation="sdpa").eval().requires_grad_(False)
    opt = torch.optim.AdamW(plain.parameters(), lr=float(tr.lr), betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=float(tr.weight_decay))

    def ours(b: dict) -> float:
        out = method.compute_loss(engine, reference, b)
        engine.backward(out.loss)
        engine.step()
        return float(out.loss.detach())

    def plain_step(b: dict) -> float:
        loss = _plain_loss(name, cfg.method, plain, ref, b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), float(tr.max_grad_norm))
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    rows = len(batches[0]["forget"]["input_ids"]) + len(batches[0]["retain"]["input_ids"])
    return {"fns": {"ours": ours, "plain": plain_step}, "batches": batches,
            "meta": {"config": cfg.method.name, "zero_stage": engines.zero_stage, "rows_per_step": rows,
                     "tokens_per_step_max": max(b["forget"]["input_ids"].numel() + b["retain"]["input_ids"].numel()
                                                for b in batches)}}


def _time_interleaved(built: dict, warmup: int) -> dict:
    """Run every (method, ours|plain) step once per round, the order rotated each round so no variant
    always runs first or after the same neighbour; times after ``warmup`` rounds."""
    jobs = [(name, who) for name in built for who in ("ours", "plain")]
    times = {j: [] for j in jobs}
    losses = {j: [] for j in jobs}
    for i in range(len(next(iter(built.values()))["batches"])):
        k = i % len(jobs)
        for name, who in jobs[k:] + jobs[:k]:
            b = built[name]["batches"][i]
            t = time.perf_counter()
            losses[(name, who)].append(built[name]["fns"][who](b))
            dt = time.perf_counter() - t
            if i >= warmup:
                times[(name, who)].append(dt)
    out = {}
    for name in built:
        lo, lp = losses[(name, "ours")], losses[(name, "plain")]
        diff0 = abs(lo[0] - lp[0])
        if not diff0 <= 1e-5 * max(1.0, abs(lp[0])):
            raise SystemExit(f"{name}: our first-step loss {lo[0]!r} != the plain-torch loss {lp[0]!r} "
                             f"(|diff| {diff0:.3g}): the two steps are not the same work")
        to, tp = times[(name, "ours")], times[(name, "plain")]
        out[name] = {**built[name]["meta"],
                     "ours_ms": statistics.median(to) * 1e3, "plain_ms": statistics.median(tp) * 1e3,
                     "ours_ms_all": [t * 1e3 for t in to], "plain_ms_all": [t * 1e3 for t in tp],
                     "first_step_loss": {"ours": lo[0], "plain": lp[0], "abs_diff": diff0},
                     # later steps drift apart by round-off that Adam amplifies (NPO most: a log-ratio of
                     # two summed sequence log-probs); the same work is established by step 1
                     "max_abs_loss_diff_all_steps": max(abs(a - c) for a, c in zip(lo, lp)),
                     "losses": {"ours": lo, "plain": lp}}
    return out


def one_process(args) -> None:
    """``--one-process``: see the module docstring."""
    from pipeline.engine.distributed import setup_environment

    threads = set_threads(1)
    setup_environment()  # a world of one, CPU DeepSpeed: before deepspeed is imported
    import logging

    logging.basicConfig(level=logging.WARNING)
    args.warmup_one = args.warmup if args.warmup is not None else 3
    args.steps_one = args.steps or 20
    with tempfile.TemporaryDirectory(prefix="bench_step_one-") as d:
        built = {}
        for name in ONE_PROCESS_METHODS:  # every method's engines and plain copy live side by side
            t = time.perf_counter()
            built[name] = _one_process_method(name, args, Path(d))
            print(f"  built {name}: {time.perf_counter() - t:.0f}s", flush=True)
        t = time.perf_counter()
        results = _time_interleaved(built, args.warmup_one)
        print(f"  timed: {time.perf_counter() - t:.0f}s", flush=True)
    gd = results["grad_diff"]["ours_ms"]
    rows = []
    for name, r in results.items():
        r["ours_over_plain"] = r["ours_ms"] / r["plain_ms"]
        r["ours_over_grad_diff_ours"] = r["ours_ms"] / gd
        rows.append([name, r["config"], fmt(r["ours_ms"], ".1f"), fmt(r["plain_ms"], ".1f"),
                     fmt(r["ours_over_plain"], ".2f"), fmt(r["ours_over_grad_diff_ours"], ".2f"),
                     f"{r['first_step_loss']['abs_diff']:.1e}"])
    z = results["grad_diff"]["zero_stage"]
    print(f"\none process, {threads} thread, cpu; the demo's model (+exp=tofu_tiny); "
          f"{results['grad_diff']['rows_per_step']} rows per step (8 forget + 8 retain); "
          f"deepspeed.zero_stage={z['requested']} -> {z['resolved']} ({z['reason']}); median of {args.steps_one} "
          f"steps after {args.warmup_one} warm-up, all eight variants interleaved")
    print_table(["method", "config", "ours ms", "plain torch ms", "ours / plain", "x GradDiff (ours)",
                 "|loss diff| step 1"], rows)
    name = "bench_step_one_process" + ("" if str(args.zero_stage) == "auto" else f"_zero{args.zero_stage}")
    name = out_name(name, {"steps": args.steps_one, "warmup": args.warmup_one, "override": args.override},
                    {"steps": 20, "warmup": 3, "override": []})
    write_json(name, {
        "env": device_info("cpu"),
        "config": {"model": "synthetic target (+exp=tofu_tiny)", "threads": threads, "warmup": args.warmup_one,
                   "steps": args.steps_one, "zero_stage": z, "batch": "8 forget + 8 retain rows"},
        "results": results,
        "ratios": {"grad_diff_ours_over_plain": results["grad_diff"]["ours_over_plain"],
                   "npo_ours_over_plain": results["npo"]["ours_over_plain"],
                   "asu_kl_over_grad_diff_ours": results["asu_kl"]["ours_over_grad_diff_ours"],
                   "asu_kl_ours_over_plain": results["asu_kl"]["ours_over_plain"],
                   "asu_gd_over_grad_diff_ours": results["asu_gd"]["ours_over_grad_diff_ours"],
                   "asu_gd_ours_over_plain": results["asu_gd"]["ours_over_plain"]},
        "notes": ["ours = method.compute_loss + engine.backward + engine.step on engines built by pipeline.run's "
                  "stages (world size 1); plain = the same losses in plain torch (HF model, stock SDPA, "
                  "clip_grad_norm_, torch.optim.AdamW), no DeepSpeed; same initial weights, same batches.",
                  "batches are collated before timing (the pipeline's own UnlearningTrainer.step_batches) and shared.",
                  "all eight variants are interleaved: one step of each per round, the order rotated every round.",
                  "the first step's losses must agree to 1e-5 or the script stops."],
    }, args.out)


def _mem_fields(ranks: list[dict], v: str) -> dict:
    def mib(r, key, div=1024):
        x = r["mem"][v][key]
        return None if x is None else x / div

    out = {
        "step_peak_mib_per_rank": [mib(r, "step_rss_growth_kb") for r in ranks],
        "rss_at_block_start_mib_per_rank": [mib(r, "rss_before_kb") for r in ranks],
        "block_peak_rss_mib_per_rank": [mib(r, "peak_rss_kb") for r in ranks],
        "cuda_peak_mib_per_rank": [mib(r, "cuda_peak_bytes", 2**20) for r in ranks],
    }
    vals = [x for x in out["block_peak_rss_mib_per_rank"] if x is not None]
    out["block_peak_rss_mib_all_ranks"] = sum(vals) if vals else None
    return out


def _out_name(size: str, args: argparse.Namespace, variants: list[str], shape: dict) -> str:
    """The result file's name (without ``_<device>.json``): distinct for every non-default argument that
    changes what is measured, so one run never overwrites another's committed file (module docstring)."""
    name = {"small": "bench_step", "0.1b": "bench_step_134m"}.get(size) or "bench_step_scale_" + size.replace(".", "")
    if args.compare_passes:
        name += "_passes"
    if args.gather != "per-layer":
        name += "_" + args.gather.replace("-", "_")
    base = [v.removesuffix(PER_GROUP) for v in variants if not v.endswith(PER_GROUP)]
    if args.variants and base != _default_variants(size):
        name += "_v-" + "-".join(base)
    values = {**shape, "ranks": args.ranks, "threads": args.threads, "topk": args.topk,
              "offload_optimizer": args.offload_optimizer or "none", "attention": args.attention, "timing": args.timing}
    defaults = {**_shape_defaults(size), "ranks": 2, "threads": 1, "topk": 100, "offload_optimizer": "none",
                "attention": "auto", "timing": "interleaved"}
    return out_name(name, values, defaults)


def _shape_defaults(size: str) -> dict:
    """Rows per rank, tokens per row, timed and warm-up steps when not given: smaller above 'small'."""
    if size == "small":
        return {"batch": 2, "seq": 128, "steps": 4, "warmup": 2}
    return {"batch": 1, "seq": 64, "steps": 2, "warmup": 1}


def _shape(args: argparse.Namespace, defaults: dict) -> dict:
    """``defaults`` with the arguments given on the command line."""
    return {k: d if getattr(args, k) is None else getattr(args, k) for k, d in defaults.items()}


def _default_variants(size: str) -> list[str]:
    return ["grad_diff", "asu_live_naive", "asu_cached"] if size != "small" else list(VARIANTS)


def _report(ranks, spec, args, dev, threads, variants) -> None:
    r0 = ranks[0]

    def step_s(v: str, key: str = "step_s") -> float:
        return max(r[key][v] for r in ranks)  # ranks wait on each other's collectives: ~equal

    def ratio(a: str, b: str | None, key: str = "step_s") -> float | None:
        return step_s(a, key) / step_s(b, key) if b else None

    def gather(v: str) -> int:
        return r0["comm"][v]["all_gather_bytes"]

    rows, results = [], {}
    for v in variants:
        t, g = step_s(v), gather(v)
        # ratios to GradDiff of the same step kind (per-group variants to per-group GradDiff)
        gd = "grad_diff" + (PER_GROUP if v.endswith(PER_GROUP) else "")
        base_t = step_s(gd) if gd in r0["step_s"] else None
        base_g = gather(gd) if gd in r0["comm"] else None
        old = v + PER_GROUP if v + PER_GROUP in r0["step_s"] else None
        mem = _mem_fields(ranks, v)
        results[v] = {
            "step_ms": t * 1e3,
            # the fastest of the rounds: the shared host's load spikes only ever add time
            "step_ms_min": step_s(v, "step_s_min") * 1e3,
            "time_ratio_vs_grad_diff_min": ratio(v, gd if base_t else None, "step_s_min"),
            "time_ratio_vs_per_group_min": ratio(v, old, "step_s_min"),
            "tokens_per_s": r0["tokens_per_step"] / t,
            "time_ratio_vs_grad_diff": t / base_t if base_t else None,
            "time_ratio_vs_per_group": t / step_s(old) if old else None,
            "all_gather_ratio_vs_per_group": g / gather(old) if old and gather(old) else None,
            "all_gather_mib_per_step_rank0": g / 2**20,
            "all_gather_calls_rank0": r0["comm"][v]["all_gather_calls"],
            "all_gather_ratio_vs_grad_diff": g / base_g if base_g else None,
            "reduce_scatter_mib_per_step_rank0": r0["comm"][v]["reduce_scatter_bytes"] / 2**20,
            "step_ms_all_rank0": [x * 1e3 for x in r0["step_s_all"][v]],
            **mem,
        }
        rr = results[v]
        peak = max((x for x in rr["step_peak_mib_per_rank"] if x is not None), default=None)
        cpeak = max((x for x in rr["cuda_peak_mib_per_rank"] if x is not None), default=None)
        rows.append([v, fmt(rr["step_ms"], ".1f"), fmt(rr["tokens_per_s"], ".0f"), fmt(rr["time_ratio_vs_grad_diff"], ".2f"),
                     fmt(rr["time_ratio_vs_per_group"], ".2f"), fmt(rr["step_ms_min"], ".1f"),
                     fmt(rr["time_ratio_vs_grad_diff_min"], ".2f"), fmt(rr["time_ratio_vs_per_group_min"], ".2f"),
                     fmt(rr["all_gather_mib_per_step_rank0"], ".1f"), fmt(rr["all_gather_ratio_vs_grad_diff"], ".2f"),
                     fmt(rr["all_gather_ratio_vs_per_group"], ".2f"),
                     fmt(rr["reduce_scatter_mib_per_step_rank0"], ".1f"), fmt(peak, ".1f"),
                     fmt(rr["block_peak_rss_mib_all_ranks"], ".0f"), fmt(cpeak, ".0f")])
    size = SIZES[spec["size"]]
    print(f"\nZeRO-3, {args.ranks} ranks x {threads} thread(s), {dev}; random Llama {size} = {r0['params'] / 1e6:.1f}M "
          f"params; per rank {spec['batch']} forget + {spec['batch']} retain rows x {spec['seq']} tokens; "
          f"median (and min) of {spec['steps']} steps after {spec['warmup']} warm-up"
          f"{' + 1 memory step per variant and an untimed round, timed interleaved' if spec.get('interleave') else ''}; "
          f"cache top-k={spec['topk']}; "
          f"offload_optimizer={spec['offload_optimizer']}; setup {r0['setup_s']:.0f}s")
    print_table(["variant", "step ms", "tokens/s", "x GradDiff", "x per-group", "min ms", "x GradDiff (min)",
                 "x per-group (min)", "all-gather MiB/step", "x GradDiff",
                 "x per-group",
                 "reduce-scatter MiB", "step peak MiB (max rank)", "peak RSS MiB (sum of ranks)", "CUDA peak MiB"], rows)
    name = _out_name(spec["size"], args, variants, {k: spec[k] for k in ("batch", "seq", "steps", "warmup")})
    write_json(name, {
        "env": device_info(dev),
        "config": {**{k: v for k, v in spec.items() if k not in ("cache_dir", "model_dir")}, "ranks": args.ranks,
                   "timing": "interleaved" if spec["interleave"] else "blocks",
                   "model": size, "params": r0["params"], "variants": variants, "setup_s": r0["setup_s"],
                   "cache_build_s": r0["cache_build_s"], "process_peak_rss_mib_per_rank":
                   [r["process_peak_rss_kb"] / 1024 for r in ranks]},
        "results": results,
        "notes": [
            "one launch, same engines and batch; per variant a block of warm-up steps, then (several variants, "
            "config.interleave) one step measuring memory, an untimed round and the timed rounds of one step of "
            "every variant (order rotated each round), or (one variant) its timed steps in the block. step_ms = "
            "median, step_ms_min = fastest.",
            "all-gather bytes = output tensor bytes of every DeepSpeed all_gather* call on rank 0 during the last "
            "timed step (parameter gathers of the student AND of the reference engine).",
            "step peak = growth of the rank's RSS high-water mark during the block over its RSS at block start "
            "(CPU) / torch.cuda.max_memory_allocated (CUDA); block peak RSS includes the engines.",
            "asu_cached = asu_gd with method.teacher=cached (top-k cache built once before timing); in this shared "
            "launch the reference engine stays resident for the live variants, but asu_cached never calls it.",
            "tokens/s counts forget + retain tokens of all ranks.",
            "variant@per_group = trainer.passes=per_group: one forward per row group and model (the step before the "
            "joint pass; its head also runs at the loss positions only, so it is faster than that step was); "
            "x per-group = this joint step over its per-group block, measured right before it in the same launch.",
            "every weight partitioned (stage3_param_persistence_threshold=0); NPO and the ASU variants use a "
            "frozen reference engine, GradDiff none.",
        ],
    }, args.out)


if __name__ == "__main__":
    main()
