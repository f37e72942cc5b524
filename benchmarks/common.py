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

Timing
------
Implementations that are compared are timed in ONE process, one call of each per round, the order
rotated each round (``time_rounds``): a change of the shared host's load then falls on all of them
alike. Reported: the median per implementation and, for a ratio, the median of the per-round ratios
(``paired_ratio``), which a slow drift of the load does not move.

Command lines and result files
------------------------------
Every script parses with ``OneLineParser`` (pipeline/cli.py: a usage error is one line, exit 2)
and the argument types below. ``--out DIR`` is a directory in every script; a result is written to
``DIR/<name>_<device>.json`` (default ``benchmarks/results``), where ``<name>`` carries every
argument that differs from its default (``out_name``), so a smoke run never overwrites a committed
file. A ``--out`` ending in ``.json`` still names the file itself (its stem without a trailing
``_cpu`` / ``_cuda`` is the name), as bench_step.py and bench_memory.py took it before.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
if str(ROOT) not in sys.path:  # the pipeline package for the one-line parser below
    sys.path.insert(0, str(ROOT))

# the launchers' one-line usage errors (exit 2), re-exported for the scripts; stdlib only: cheap to import
from pipeline.cli import OneLineParser, at_least_one, int_at_least  # noqa: E402, F401

DTYPES = ("float32", "bfloat16", "float16", "float64")


# ------------------------------------------------------------------------------------------------
# argument types: a bad value is one line and exit 2 (OneLineParser), not a traceback later
# ------------------------------------------------------------------------------------------------

positive_int = at_least_one  # threads, rows, ranks, rounds, ...: 0 would silently measure nothing


non_negative_int = int_at_least(0)  # warm-up calls, top-k (0 = full rows), thresholds


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0 (a temperature, a learning rate)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def dtype_name(text: str) -> str:
    """argparse type: a floating torch dtype by name (``float32``, ``bfloat16``, ...)."""
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; choose from {', '.join(DTYPES)}")
    return text


def device_name(text: str) -> str:
    """argparse type: ``auto``, ``cpu`` or ``cuda``; ``cuda`` only where torch sees a CUDA device
    (else the run would fail later with a traceback, or write an error-filled JSON)."""
    if text not in ("auto", "cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; choose from auto, cpu, cuda")
    if text == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"cuda: no CUDA device available (torch {torch.__version__})")
    return text


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; other names as given (``device_name`` checked them)."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def json_object(text: str) -> dict:
    """argparse type: a JSON object (``--ds-extra '{"a": 1}'``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg} at character {exc.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object ({{...}}), got {text!r}")
    return value


# ------------------------------------------------------------------------------------------------
# result file names
# ------------------------------------------------------------------------------------------------


def _slug(value: object) -> str:
    """A value as a file-name piece: lists joined by '-', floats by %g, other characters -> '-'."""
    if isinstance(value, (list, tuple)):
        return "-".join(_slug(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        value = json.dumps(value, sort_keys=True)
    text = re.sub(r"[^A-Za-z0-9.]+", "-", str(value)).strip("-") or "none"
    # a long value (a JSON object, Hydra overrides) by its hash: the name stays short and distinct
    return text if len(text) <= 40 else hashlib.sha1(text.encode()).hexdigest()[:8]


def out_name(base: str, values: dict, defaults: dict, labels: Optional[dict] = None) -> str:
    """``base`` plus ``_<label><value>`` for every key of ``defaults`` whose value in ``values``
    differs from its default, in the order of ``defaults``: a run with other arguments never
    overwrites another's result file. The label is ``<key>-`` unless ``labels`` gives one (bench_kl's
    ``v`` for ``--vocab``: ``bench_kl_v32000``); a flag that is set is ``_<key>`` alone."""
    labels = labels or {}
    name = base
    for key, default in defaults.items():
        value = values[key]
        if isinstance(value, tuple):
            value = list(value)
        if value == (list(default) if isinstance(default, tuple) else default):
            continue
        if value is True:
            name += f"_{labels.get(key, key)}"
        else:
            name += f"_{labels.get(key, key + '-')}{_slug(value)}"
    return name


def set_threads(n: int) -> int:
    """Pin intra-op threads (env for child processes too) and return the count actually used."""
    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ["MKL_NUM_THREADS"] = str(n)
    import torch

    torch.set_num_threads(n)
    return torch.get_num_threads()


def git_state() -> dict:
    """The checkout's commit, whether it has uncommitted changes and its sources' SHA-256, as a run's
    results.json records them (``pipeline.provenance.code_record``; None outside a git checkout)."""
    from pipeline.provenance import code_record

    return dict(code_record())


def device_info(device: str) -> dict:
    """The machine and the code a result was measured on (recorded in every result JSON)."""
    import torch

    info = {
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "hostname": platform.node(),
        **git_state(),
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
    """Wait for the device's queued work (CUDA kernels run asynchronously), so a wall time covers it."""
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


def time_rounds(fns: dict[str, Callable[[], object]], device: str, warmup: int = 1,
                rounds: int = 5) -> dict[str, dict]:
    """Time the implementations ``fns`` side by side in this process: ``warmup`` untimed calls of
    each, then ``rounds`` rounds of one timed call of each, the order rotated every round (round r
    starts with the r-th), so a change of the host's load falls on all alike and no implementation
    always runs first or after the same neighbour. Per name: ``ms_median``, ``ms_min``, ``iters``
    (= rounds), ``warmup`` and ``ms_all`` (one time per round, in round order, for ``paired_ratio``).
    An implementation that raises is dropped from the rounds and gets ``{"error": "..."}``; the
    others go on (a table keeps its other rows)."""
    errors: dict[str, str] = {}
    times: dict[str, list[float]] = {name: [] for name in fns}

    def call(name: str) -> Optional[float]:
        try:
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            return (time.perf_counter() - t0) * 1e3
        except Exception as exc:  # recorded, the rest of the table still runs
            errors[name] = f"{type(exc).__name__}: {exc}"[:300]
            return None

    names = list(fns)
    for _ in range(warmup):
        for name in names:
            if name not in errors:
                call(name)
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if name not in errors:
                ms = call(name)
                if ms is not None:
                    times[name].append(ms)
    out = {}
    for name in names:
        if name in errors:
            out[name] = {"error": errors[name]}
        else:
            ts = times[name]
            out[name] = {"ms_median": statistics.median(ts), "ms_min": min(ts), "iters": rounds, "warmup": warmup,
                         "ms_all": ts}
    return out


def paired_ratio(num: dict, den: dict) -> Optional[float]:
    """Median over rounds of ``num``'s time / ``den``'s time in the same round (``time_rounds``
    entries); None when either has no times (an error)."""
    a, b = num.get("ms_all"), den.get("ms_all")
    if not a or not b or len(a) != len(b):
        return None
    return statistics.median(x / y for x, y in zip(a, b))


def median_ratio(num: dict, den: dict) -> Optional[float]:
    """``num``'s median time / ``den``'s median time; None when either is missing."""
    a, b = num.get("ms_median"), den.get("ms_median")
    return a / b if a and b else None


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


def write_json(name: str, payload: dict, out: Optional[Path] = None, device_suffix: bool = True) -> Path:
    """Write ``payload`` (plus a timestamp) atomically to ``<out>/<name>_<device>.json``; ``out`` is
    the scripts' ``--out``: a directory (default benchmarks/results) or, ending in ``.json``, the file
    itself (its stem without a trailing ``_cpu`` / ``_cuda`` is the name; module docstring).
    ``device_suffix=False``: ``<name>.json`` (a result file committed under that name)."""
    out_dir = Path(out) if out else RESULTS
    if out_dir.suffix == ".json":
        name, out_dir = re.sub(r"_(cpu|cuda)$", "", out_dir.stem), out_dir.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = payload.get("env", {}).get("device", "cpu")
    path = out_dir / (f"{name}_{dev}.json" if device_suffix else f"{name}.json")
    payload = dict(payload, timestamp=_dt.datetime.now().isoformat(timespec="seconds"))
    # atomic (a crash or a full disk never leaves a truncated committed result), strict JSON (NaN: null)
    from pipeline.io import atomic_write_json

    atomic_write_json(path, payload)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path
