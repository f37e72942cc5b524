"""Shared helpers for the kernel benchmarks: threads, timing, peak memory, tables, JSON.

Peak memory
-----------
* CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the memory
  allocated before the measured call (inputs excluded) — the allocator's own high-water mark.
* CPU: each (config, implementation) runs in a *fresh subprocess* (``run_worker``); after the inputs
  are built the process's resident-set high-water mark is reset (``echo 5 > /proc/self/clear_refs``,
  Linux) and the measured call runs once; peak = VmHWM - VmRSS before the call. This counts every
  page the call touched (allocator caches included), which is what an OOM would see. A fresh
  process is needed because glibc keeps freed blocks, so a second measurement in the same process
  would under-count.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def set_threads(n: int) -> int:
    """Pin intra-op threads (env for child processes too) and return the count actually used."""
    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ["MKL_NUM_THREADS"] = str(n)
    import torch

    torch.set_num_threads(n)
    return torch.get_num_threads()


def device_info(device: str) -> dict:
    import torch

    info = {
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "hostname": platform.node(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # pragma: no cover
        info["triton"] = None
    if device == "cuda":
        info["device_name"] = torch.cuda.get_device_name()
    else:
        name = platform.processor() or "cpu"
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        info["device_name"] = name
    return info


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str, warmup: int = 1, iters: int = 3) -> dict:
    """Median / min wall time in ms over ``iters`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append((time.perf_counter() - t0) * 1e3)
    return {"ms_median": statistics.median(ts), "ms_min": min(ts), "iters": iters}


# ------------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------------


def status_kb(field: str, strict: bool = True) -> int:
    """A /proc/self/status field in KiB (VmRSS, VmHWM, ...); 0 when absent and not ``strict``."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    if strict:
        raise RuntimeError(f"{field} not in /proc/self/status")
    return 0


# Random Llama shapes several benchmarks build (V = 32k, untied embeddings, so every matrix is above
# ZeRO-3's persistence threshold): bench_memory.py's sizes, bench_step.py's "0.1b".
RANDOM_LLAMAS = {
    "34m": dict(vocab_size=32000, hidden_size=384, intermediate_size=1024, num_hidden_layers=5,
                num_attention_heads=6, num_key_value_heads=6),
    "134m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=12),
    "350m": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=22,
                 num_attention_heads=16, num_key_value_heads=16),
}


def save_random_llama(d: Path, arch: dict, max_position_embeddings: int) -> Path:
    """A randomly initialised Llama of ``arch`` (seed 0, untied embeddings) saved as safetensors in
    ``d/model``: the benchmarks' stand-in for a real checkpoint of that size."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**arch, max_position_embeddings=max_position_embeddings, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2, initializer_range=0.02, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(d / "model", safe_serialization=True)
    return d / "model"


def cpu_peak_bytes(fn: Callable[[], object]) -> Optional[int]:
    """Peak resident-set growth (bytes) of one call to ``fn`` in this process (Linux only)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = status_kb("VmRSS")
    except OSError:
        fn()
        return None
    fn()
    return (status_kb("VmHWM") - before) * 1024


def cuda_peak_bytes(fn: Callable[[], object]) -> int:
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def run_worker(script: str, spec: dict, threads: int, timeout: int = 600) -> dict:
    """Run ``python script --worker '<json spec>'`` in a fresh process; it prints one JSON line."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, script, "--worker", json.dumps(spec), "--threads", str(threads)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"]}
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": ["no JSON output"]}


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------


def mib(x: Optional[float]) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def fmt(x, spec: str = ".2f") -> str:
    if x is None:
        return "-"
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def print_table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    text = "\n".join(lines)
    print(text)
    return text


def write_json(name: str, payload: dict, out_dir: Optional[Path] = None) -> Path:
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = payload.get("env", {}).get("device", "cpu")
    path = out_dir / f"{name}_{dev}.json"
    payload = dict(payload, timestamp=_dt.datetime.now().isoformat(timespec="seconds"))
    # atomic: a temporary file in the same directory, then os.replace (a crash or a full disk never
    # leaves a truncated committed result)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=out_dir)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(payload, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as a plain write would (mkstemp makes it 0600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path
