"""Teacher cache for ``method.teacher=cached`` (DESIGN §4.3).

θ₀ and the forget set are fixed, so ASU's tempered teacher distributions on the forget answers can be
computed once, stored, and streamed into training: no teacher forward per step (and, for ``asu_gd``,
no reference model at all during training).

Layout of one cache (a directory named by :func:`cache_key` under the cache root)::

    <root>/<key>/index.json                  meta + which shard holds each forget row
    <root>/<key>/rows-r<rank>-<j>.safetensors per-row tensors, keys "<row>.logprobs" [, "<row>.ids", "<row>.tail"]

Per forget row only the loss positions are kept (``labels[1:] != -100``, the positions
:func:`~pipeline.methods.model_io.shifted_mask` selects; ``skip_first`` is applied at loss time):

* ``cache_topk = 0``: ``logprobs`` (n, V) float32, the teacher's full log-softmax rows (exact KL);
* ``cache_topk = k``: ``logprobs`` (n, k) float32, ``ids`` (n, k) int32 and ``tail`` (n,) float32,
  the log of the teacher mass outside the top k (KL over k + 1 buckets, see
  :func:`~pipeline.methods.losses.kl_from_cache`).

The key hashes the model's identity (its weight files' fingerprint — names, sizes, safetensors
headers, sampled bytes of every tensor, config, remote code: :func:`pipeline.models.fingerprint.model_fingerprint`,
so a model rewritten in place gets a new cache, while a byte-identical copy elsewhere, a job's
scratch staging or a moved ``cache_dir``, reuses it: the path is recorded in the index, not hashed;
for a hub id, the snapshot of ``model.revision``, so two revisions get two caches), tau,
teacher_layers, topk, the dtype, the token ids/labels of the encoded forget rows — exactly what the
teacher is fed, so a changed tokenizer, truncation (max_length) or subset (split) never reuses a
stale cache; the split name and max_length
are recorded in the index but not hashed — and a digest of the code that computes the cached values
(:func:`code_digest`: tempered attention and its backends, the frozen pass, batching and
:func:`_teacher_rows`), so a fix to that code is a new cache without a hand-bumped FORMAT_VERSION —
and what runs that code (:func:`runtime_fields`): the attention backend ``kernels.attention``
resolved to (auto picks per node: flash_attn / triton / sdpa / torch round differently, ~0.06 in a
bf16 log-prob), the device type, and the torch and transformers versions.

A build is atomic: every rank writes its shards into a temporary directory next to the final one,
rank 0 writes ``index.json`` last and renames the directory into place; an existing complete cache
is reused without running the teacher. Two jobs building the same cache at once each build their
own (there is no lock); the first rename wins, the other discards its copy and says so in its log.

Every reuse or publication refreshes the cache directory's mtime (its last use; the integrity check
reads only the files inside it), and rank 0 logs one line with the totals of the caches under the
root and those unused for over 30 days (a sweep over tau leaves one cache per value): nothing is
deleted automatically — another job may still need one — they are removed by hand.

The index records each shard's size, sha256 and a sampled digest (:func:`_shard_record`). Before a
cache is reused (and by :func:`cache_ready`, which decides whether the teacher is loaded at all)
every shard's size is checked, and its sha256 when the cache is at most ``FULL_CHECK_BYTES`` (about
a second of hashing), else the sampled digest (its safetensors header and ``SAMPLE_BLOCKS`` blocks
spread over the file): hashing a multi-GiB full-vocabulary cache on every run would cost as much as
a good part of building it. A cache that fails is moved aside, deleted and rebuilt, with one log
line saying why; so is a cache whose index records no shards (written before these checks). Damage
between a large cache's sampled blocks passes that check, so :class:`TeacherCache` checks every row
it reads (finite log-probs <= 0): a damaged one stops the run with a :class:`TeacherCacheError`
naming the cache, shard and row, instead of feeding NaN to the loss.

A build killed outright (SIGKILL, a SIGTERM's default action, a lost node) cannot clean up: its temp
directory ``.<key>.tmp-<host>-<pidns>-<pid>-<random>`` stays. Before building, rank 0 removes every
such directory under the cache root that no live build owns: its writer's PID is gone (checked only
on the same host and PID namespace), or nothing touched it for ``STALE_AFTER_S`` — a live build,
on any node, refreshes its directory's mtime at least every ``HEARTBEAT_S`` between batches. It
also removes every ``.<key>.stale-<pid>-<random>`` directory: a cache moved aside to be deleted
whose deletion was interrupted (nothing reads or writes one after the move).

Distributed: batches are dealt round-robin over ranks. Under ZeRO-3 every rank must run the same
number of forwards (each layer's parameters are all-gathered collectively), so ranks with fewer
batches run a discarded forward on their first batch. The cache root must be on a filesystem every
rank sees (like checkpoints).
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import inspect
import json
import logging
import math
import os
import re
import secrets
import shutil
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline.engine.distributed import all_true
from pipeline.io import current_umask, size_text, tree_bytes
from pipeline.models.fingerprint import content_fingerprint, model_fingerprint
from pipeline.progress import tracked

log = logging.getLogger(__name__)

INDEX = "index.json"
# 2: the index records each shard's size and hashes, the key holds the code digest
FORMAT_VERSION = 2
SHARD_BYTES = 256 * 2**20
# Reuse checks every shard's sha256 up to this total (about a second at sha256's 1.5 GB/s); above,
# its size and sampled digest only: full-vocabulary caches of 7B models reach tens of GiB, and
# re-hashing those on every run would cost a good part of building them.
FULL_CHECK_BYTES = 2 * 2**30
# The sampled digest: the safetensors header and this many blocks spread evenly over the shard.
SAMPLE_BLOCKS, SAMPLE_BLOCK_BYTES = 16, 64 * 2**10
# The code whose output the cache stores, as globs under the pipeline and kernels packages (hashed
# into the key by code_digest, with _teacher_rows' own source): tempered attention, its backends and
# their kernels, the frozen pass, the sharded-embedding lookup it uses, batching.
CODE_FILES = {
    "pipeline": ("models/tempered_attention.py", "models/attention/*.py", "models/sharded_embedding.py",
                 "methods/passes.py", "methods/model_io.py", "data/collate.py"),
    "kernels": ("reference.py", "tempered_attention.py"),
}
# In the key's fields but not hashed: rows_sha256 hashes the ids the teacher is fed, which is what
# the split and max_length decide (another split name with the same rows is the same cache); the
# model's path, where its files' fingerprint ("model") identifies it.
NOT_IN_KEY = ("split", "max_length", "model_path")
# A live build refreshes its temp dir at least this often (between batches); one untouched for
# STALE_AFTER_S is an interrupted build's, whatever node wrote it (a batch's forward takes far less).
HEARTBEAT_S = 60.0
STALE_AFTER_S = 30 * 60.0
# .<key>.tmp-<host>-<pidns>-<pid>-<random>; the older .<key>.tmp-<random> goes by age only
TEMP_RE = re.compile(r"^\.[0-9a-f]+\.tmp-(?:(?P<owner>.+)-(?P<pid>\d+)-)?[0-9a-f]{8}$")
# .<key>.stale-<pid>-<random>: a cache moved aside to be deleted (_discard)
STALE_RE = re.compile(r"^\.[0-9a-f]+\.stale-\d+-[0-9a-f]{8}$")
# a published cache's directory: cache_key's 20 hex digits
KEY_RE = re.compile(r"^[0-9a-f]{20}$")
# A cache whose directory's mtime (refreshed on every reuse) is older than this is reported as unused.
UNUSED_AFTER_S = 30 * 86400.0
# Cached log-probs are <= 0 (log_softmax, and the tail's log of a mass <= 1); float32 rounding stays
# far below this. A larger value, a NaN or an infinite log-prob is a damaged shard (TeacherCache reads).
LOGPROB_TOL = 1e-4


class TeacherCacheError(RuntimeError):
    """The cache does not match the batch it is asked for (stale or foreign cache)."""


# -- distributed helpers (no-ops in a single process) ---------------------------------------------------


def _dist():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist
    return None


def _rank_world() -> tuple[int, int]:
    d = _dist()
    return (d.get_rank(), d.get_world_size()) if d else (0, 1)


def _barrier() -> None:
    d = _dist()
    if d:
        d.barrier()


def _broadcast(obj: Any) -> Any:
    d = _dist()
    if not d or d.get_world_size() == 1:
        return obj
    box = [obj]
    d.broadcast_object_list(box, src=0)
    return box[0]


# -- key --------------------------------------------------------------------------------------------------


def _model_id(teacher: Any) -> str:
    from pipeline.methods.model_io import unwrap

    cfg = getattr(unwrap(teacher), "config", None)
    return str(getattr(cfg, "_name_or_path", "") or type(unwrap(teacher)).__name__)


def code_files() -> list[Path]:
    """The files :data:`CODE_FILES` names, sorted; a pattern that matches nothing is an error (a
    moved module would otherwise drop out of the key silently)."""
    spec = importlib.util.find_spec("kernels")  # the package `from kernels...` imports, wherever it is
    if spec is None or not spec.submodule_search_locations:
        raise TeacherCacheError("teacher cache: cannot locate the kernels package to hash its code")
    roots = {"pipeline": Path(__file__).resolve().parents[1],
             "kernels": Path(next(iter(spec.submodule_search_locations))).resolve()}
    files: list[Path] = []
    for pkg, patterns in CODE_FILES.items():
        for pattern in patterns:
            found = sorted(roots[pkg].glob(pattern))
            if not found:
                raise TeacherCacheError(f"teacher cache: no file matches {pkg}/{pattern} (update CODE_FILES)")
            files += found
    return files


def code_digest(files: Optional[Sequence[Path]] = None) -> str:
    """SHA-256 of the code that computes the cached values (:func:`code_files`, and
    :func:`_teacher_rows`' source rather than this whole module, whose cleanup and read side do not
    change a value): a cache computed by other code is not reused."""
    from pipeline.code_digest import code_sha256

    return code_sha256(code_files() if files is None else files,
                       [("_teacher_rows", inspect.getsource(_HASHED_FUNCTIONS[0]))])


def runtime_fields(attention: Optional[str] = None, device: Optional[str] = None) -> dict:
    """What computes the cached values besides their code: the attention backend ``attention``
    (``kernels.attention``, auto included) resolves to on ``device``, the device type, and the torch
    and transformers versions. Without ``attention`` / ``device``: the process's active resolution
    (:func:`pipeline.models.attention.set_attention_backend`). Backends and devices round
    differently (bf16 log-probs differ by ~0.06 between sdpa and torch), so each has its own cache."""
    import transformers

    from pipeline.models.attention import attention_backend_report, resolve_backend

    active = attention_backend_report()
    device_type = torch.device(str(device)).type if device is not None else str(active["device"])
    backend = resolve_backend(attention, device_type).backend if attention is not None else str(active["resolved"])
    fields = {"attention": backend, "device": device_type, "torch": str(torch.__version__),
              "transformers": str(transformers.__version__)}
    # a backend's own library computes the values too (another flash-attn or Triton release rounds
    # differently); sdpa and torch are covered by torch's version
    library = {"flash_attn": "flash-attn", "triton": "triton"}.get(backend)
    if library is not None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            fields[library] = version(library)
        except PackageNotFoundError:
            fields[library] = None
    return fields


def cache_fields(model_path: str, tau: float, teacher_layers: Optional[Sequence[int]], split: str,
                 max_length: int, topk: int, forget_encoded: Sequence[dict], dtype: str, *,
                 revision: Optional[str] = None, runtime: Optional[dict] = None) -> dict:
    """Everything the cached distributions depend on (hashed into the directory name, all but
    :data:`NOT_IN_KEY`): the model's files' fingerprint at ``revision`` (new weights at the same path,
    or another revision of a hub id, are another teacher), the dtype the teacher computes in (a bf16
    GPU run's distributions are not an fp32 run's), the ids and labels it is fed, the code that
    computes them and what runs it (``runtime``, default :func:`runtime_fields` of the active backend)."""
    # the ids/labels exactly as pad_batch feeds them to the teacher (labels default to the ids)
    h = hashlib.sha256()
    for r in forget_encoded:
        h.update(json.dumps([list(map(int, r["input_ids"])), list(map(int, r.get("labels", r["input_ids"])))]).encode())
        h.update(b"|")
    return {
        "format": FORMAT_VERSION,
        "model": _model_identity(model_path, revision),
        "model_path": str(model_path),
        "tau": float(tau),
        # a set of layers: [8, 7, 6] and [6, 7, 8] temper the same layers, one cache
        "teacher_layers": None if teacher_layers is None else sorted({int(i) for i in teacher_layers}),
        "split": str(split),
        "max_length": int(max_length),
        "topk": int(topk),
        "rows": len(forget_encoded),
        "rows_sha256": h.hexdigest(),
        "dtype": str(dtype),
        "code": code_digest(),
        **(runtime_fields() if runtime is None else runtime),
    }


def _model_identity(model_path: str, revision: Optional[str]) -> dict:
    """The model's fingerprint without its path when its files were found (a copy of the same files
    elsewhere is the same teacher); an uncached hub id, identified by its name alone, keeps it."""
    fingerprint = model_fingerprint(model_path, revision)
    return content_fingerprint(fingerprint) if fingerprint.get("files") else fingerprint


def cache_key(fields: dict) -> str:
    """The cache directory's name: a hash of ``fields`` but the informational :data:`NOT_IN_KEY`."""
    keyed = {k: v for k, v in fields.items() if k not in NOT_IN_KEY}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:20]


# -- build ------------------------------------------------------------------------------------------------


def _teacher_rows(teacher: Any, rows: list[dict], tau: float, layers, topk: int, pad_id: int,
                  device) -> list[dict[str, torch.Tensor]]:
    """Tempered teacher tensors of ``rows`` (one padded batch), loss positions only."""
    from pipeline.data.collate import pad_batch
    from pipeline.methods.passes import LOGITS, StepPlan, run_step

    # the training step's own frozen pass: the same tempered logits the live teacher gives, at the
    # loss positions only (row-major), so a cached run equals a live one
    b = {k: v.to(device) for k, v in pad_batch(rows, pad_id).items()}
    plan = StepPlan(teacher_layers=layers).need_frozen("forget", LOGITS, tau)
    with torch.no_grad():
        part = run_step(plan, teacher, teacher, {"forget": b}).frozen["forget"]
    lt = torch.log_softmax(part.logits.float(), dim=-1).cpu()
    out = []
    for sel in lt.split(part.mask.sum(1).tolist()):  # (n_j, V) per row
        if topk and topk < sel.shape[-1]:
            vals, ids = sel.topk(topk, dim=-1)
            tail = sel.scatter(-1, ids, float("-inf")).logsumexp(-1)
            out.append({"logprobs": vals.contiguous(), "ids": ids.to(torch.int32).contiguous(),
                        "tail": tail.contiguous()})
        else:
            out.append({"logprobs": sel.contiguous()})
    return out


# bound at import: code_digest hashes this code, not whatever replaces the module's name (tests do)
_HASHED_FUNCTIONS = (_teacher_rows,)


def _row_problem(tensors: dict[str, torch.Tensor]) -> Optional[str]:
    """What is wrong with one row's teacher tensors (:func:`_teacher_rows`' dict: ``logprobs`` and,
    with top-k, ``ids`` and ``tail``), or None. Log-probs must be finite and <= 0 (an infinite one
    would make the loss NaN: 0 * -inf); the tail's log-mass may be -inf (no mass outside the top k,
    which the loss handles). The build checks the teacher's rows with it, :class:`TeacherCache` the
    rows it reads."""
    named = [("log-probs", tensors["logprobs"], True)]
    if "tail" in tensors:
        named.append(("tail log-masses", tensors["tail"], False))
    for name, t, finite in named:
        ok = t <= LOGPROB_TOL  # NaN compares False: caught with the positive values
        if finite:
            ok &= t > float("-inf")
        if not bool(ok.all()):
            return f"{name} hold {float(t[~ok][0]):g} (log-probs are finite and <= 0)"
    if "ids" in tensors and bool((tensors["ids"] < 0).any()):
        return "token ids are negative"
    return None


def _teacher_rows_problem(res: Sequence[dict[str, torch.Tensor]], idx: Sequence[int], tau: float,
                          dtype: str) -> Optional[str]:
    """Why the teacher's rows ``res`` (forget rows ``idx``) must not be written — one is not a
    distribution (NaN / inf: an fp16 overflow in the tempered forward, or NaN weights) — or None. Not
    in the cache key's code (:func:`_teacher_rows` is): a check computes no cached value. Rebuilding
    would give the same values, so the message says what to change instead (the read side's says to
    delete)."""
    for i, tensors in zip(idx, res):
        bad = _row_problem(tensors)
        if bad is None:
            continue
        tail = tensors.get("tail")  # -inf there is legitimate (no mass outside the top k)
        nonfinite = not bool(tensors["logprobs"].isfinite().all()) or (
            tail is not None and bool((tail.isnan() | (tail == float("inf"))).any()))
        what = "non-finite log-probs" if nonfinite else "invalid log-probs"
        dt = str(dtype).removeprefix("torch.")
        if dt in ("float16", "fp16", "half"):
            hint = ("fp16 overflows easily in the tempered forward: set deepspeed.precision=bf16 or fp32 (and "
                    "model.dtype=bfloat16 or float32); if it persists, check the model's weights for NaN/inf")
        elif dt in ("float32", "fp32", "float"):
            hint = "check the model's weights for NaN/inf"
        else:
            hint = ("check the model's weights for NaN/inf; if they are finite, try deepspeed.precision=fp32 "
                    "(and model.dtype=float32)")
        return (f"teacher cache build: the teacher's forward at tau={tau:g} ({dtype}) produced {what} on forget "
                f"row {i}: {bad}; nothing was cached (a rebuild gives the same values): {hint}")
    return None


def build_teacher_cache(
    teacher: Any,
    forget_encoded: Sequence[dict],
    method_cfg: Any,
    out_dir: str | os.PathLike,
    batch_size: int,
    *,
    model_path: Optional[str] = None,
    split: str = "forget",
    max_length: int = 0,
    pad_token_id: int = 0,
    device: Optional[torch.device] = None,
    dtype: str,
    revision: Optional[str] = None,
) -> Path:
    """Compute (or reuse) the cache of ``teacher``'s tempered next-token distributions on the forget
    rows; returns the cache directory ``out_dir/<key>``. ``revision``: the hub revision ``model_path``
    is loaded at (``model.revision``). Collective under torch.distributed: every rank must call it
    with the same arguments."""
    tau = float(method_cfg.tau)
    layers = list(method_cfg.teacher_layers) if method_cfg.teacher_layers is not None else None
    topk = int(getattr(method_cfg, "cache_topk", 0) or 0)
    root = Path(out_dir)
    rank, world = _rank_world()

    # rank 0 decides (a concurrent job may be finishing the same cache): it fingerprints the model
    # files once (every rank uses its key, even where another node's view of them would differ),
    # then prepares the build; a refusal travels with the decision, so every rank stops with the
    # same error
    decision = None
    if rank == 0:
        fields = cache_fields(model_path or _model_id(teacher), tau, layers, split, max_length, topk,
                              forget_encoded, dtype, revision=revision,
                              runtime=runtime_fields(device=device) if device is not None else None)
        decision = (fields, *_prepare(root, cache_key(fields), teacher, forget_encoded, topk))
    fields, exists, tmp, refusal = _broadcast(decision)
    final = root / cache_key(fields)
    if refusal is not None:
        from pipeline.engine.preflight import PreflightError

        raise PreflightError(refusal, every_rank=True)  # decided by rank 0 and broadcast
    if exists:
        log.info("teacher cache: reusing %s", final)
        if rank == 0:
            _mark_used(final)
            _log_root_usage(root)
        return final
    tmp = Path(tmp)
    try:
        if device is None:
            from pipeline.methods.model_io import unwrap

            device = next(unwrap(teacher).parameters()).device
        vocab = _write_rank_part(teacher, list(forget_encoded), batch_size, tau, layers, topk, pad_token_id, device,
                                 tmp, rank, world, dtype)
        _barrier()
        if rank == 0:
            _publish(tmp, final, fields, len(forget_encoded), vocab, topk)
            _log_root_usage(root)
        _barrier()
    except BaseException:
        if rank == 0 or world == 1:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _prepare(root: Path, key: str, teacher: Any, forget_encoded: Sequence[dict],
             topk: int) -> tuple[bool, Optional[str], Optional[str]]:
    """Rank 0: ``(exists, temp dir, refusal)`` for the cache ``root/key``. It first removes interrupted
    builds' leftovers (so their space counts as free), then, unless a cache that passes
    :func:`_reuse_refusal` exists, discards a failing one, checks the disk and creates the temp dir."""
    _remove_stale_temps(root)
    final = root / key
    if (final / INDEX).exists():
        reason = _reuse_refusal(final)
        if reason is None:
            return True, None, None
        if teacher is None:  # judged ready before the run loaded no frozen model: nothing to rebuild it with
            return False, None, (f"teacher cache {final} was ready when the run started but fails its check now "
                                 f"({reason}): launch again to rebuild it")
        log.warning("teacher cache: %s fails its check (%s): rebuilding it", final, reason)
        # moved aside first: the publishing rename would keep a complete-looking copy in place
        _discard(final)
    elif teacher is None:  # removed (by hand, a scratch purge) since the run found it ready
        return False, None, (f"teacher cache {final} was ready when the run started but is gone now: launch again "
                             f"to rebuild it")
    root.mkdir(parents=True, exist_ok=True)
    refusal = _check_size(forget_encoded, _vocab_size(teacher), topk, root)
    if refusal is not None:
        return False, None, refusal
    tmp = root / _temp_name(key)
    tmp.mkdir()
    return False, str(tmp), None


# -- interrupted builds' temp dirs ------------------------------------------------------------------------


def _owner() -> str:
    """This process's host and PID namespace, as its temp dirs' names carry them: a PID in a name
    is only looked up where it names the same process (another container on this host, with the
    same host name, has its own PIDs)."""
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"
    try:
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # not Linux: the host name alone
        ns = 0
    return f"{host}-{ns}"


def _temp_name(key: str, pid: Optional[int] = None, owner: Optional[str] = None) -> str:
    """``.<key>.tmp-<host>-<pidns>-<pid>-<random>``: the name says who writes it, so a later build can
    tell an interrupted build's leftover from a live one's."""
    return f".{key}.tmp-{owner or _owner()}-{pid or os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this host (in this PID namespace); an unanswerable check says yes."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process (EPERM), or not a PID at all: age decides
        return True
    return True


def _stale_reason(d: Path, owner: str, now: float) -> Optional[str]:
    """Why temp dir ``d`` belongs to no live build, or None while one may still be writing it."""
    m = TEMP_RE.match(d.name)
    if m is None:
        return None
    if m["owner"] == owner and not _pid_alive(int(m["pid"])):
        return f"its writer, pid {m['pid']} on this host, is gone"
    idle = now - d.stat().st_mtime
    if idle > STALE_AFTER_S:
        return f"untouched for {idle / 3600:.1f} h"
    return None


def _remove_stale_temps(root: Path) -> None:
    """Rank 0: delete the temp dirs under ``root`` (of any key) that interrupted builds left (a
    requeued job would otherwise leak one per attempt until the disk check refuses); live builds'
    temp dirs, here or on another node, stay."""
    if not root.is_dir():
        return
    owner, now = _owner(), time.time()
    for d in sorted(root.iterdir()):
        try:
            if d.is_symlink() or not d.is_dir():
                continue
            # a discarded cache's directory is only ever deleted once moved aside: any left was interrupted
            discarded = STALE_RE.match(d.name) is not None
            reason = None if discarded else _stale_reason(d, owner, now)
            if reason is None and not discarded:
                continue
            size = tree_bytes(d)
        except FileNotFoundError:  # another job's cleanup, or its build's rename, got there first
            continue
        shutil.rmtree(d, ignore_errors=True)
        if d.exists():
            continue
        if discarded:
            log.info("teacher cache: removed %s, a discarded cache whose deletion was interrupted: %s freed", d,
                     size_text(size))
        else:
            log.info("teacher cache: removed %s, an interrupted build's temp dir (%s): %s freed", d, reason,
                     size_text(size))


def _mark_used(final: Path) -> None:
    """Refresh the published cache ``final``'s directory mtime: it records the cache's last use, which
    :func:`_log_root_usage` reports (:func:`_signature` reads only the files inside, so it does not
    make the cache's integrity check run again)."""
    try:
        os.utime(final)
    except OSError as e:  # a read-only cache root still serves: the report is all that is lost
        log.debug("teacher cache: cannot record the use of %s (%s)", final, e.strerror)


def _log_root_usage(root: Path, now: Optional[float] = None) -> None:
    """Rank 0, once per build or reuse: one line with the published caches under ``root``, their size
    and those unused for over :data:`UNUSED_AFTER_S` (a sweep over tau leaves one per value; nothing
    deletes them automatically: another job may still use one)."""
    now = time.time() if now is None else now
    n = total = n_old = old = 0
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            if d.is_symlink() or not KEY_RE.match(d.name) or not (d / INDEX).is_file():
                continue
            size, idle = tree_bytes(d), now - d.stat().st_mtime
        except FileNotFoundError:  # discarded meanwhile by another job
            continue
        n, total = n + 1, total + size
        if idle > UNUSED_AFTER_S:
            n_old, old = n_old + 1, old + size
    days = UNUSED_AFTER_S / 86400
    unused = (f"{n_old} unused for > {days:.0f} days: {size_text(old)}; remove them by hand" if n_old
              else f"none unused for > {days:.0f} days")
    log.info("teacher caches under %s: %d caches, %s (%s)", root, n, size_text(total), unused)


class _Heartbeat:
    """Keeps a live build's temp dir fresh (its mtime, at most every HEARTBEAT_S), so that no other
    job's :func:`_remove_stale_temps` takes it for an interrupted build's."""

    def __init__(self, directory: Path) -> None:
        self.directory, self._last = directory, time.monotonic()

    def beat(self) -> None:
        now = time.monotonic()
        if now - self._last < HEARTBEAT_S:
            return
        try:
            os.utime(self.directory)
        except OSError as e:  # ENOENT, or ESTALE on NFS: the build cannot finish; say why in one line
            raise TeacherCacheError(
                f"teacher cache build: cannot touch its temp dir {self.directory} ({e.strerror}): another "
                f"job removes one untouched for {STALE_AFTER_S / 60:.0f} min as an interrupted build's "
                f"(was this one stopped that long?)") from None
        self._last = now


def cache_bytes(forget_encoded: Sequence[dict], vocab: int, topk: int) -> int:
    """Bytes the cache of these rows takes on disk: per loss position V fp32 log-probs, or with
    ``topk`` the top-k log-probs (fp32) and ids (int32) and the tail mass (fp32)."""
    from pipeline.methods.model_io import shifted_mask

    # the positions the build keeps (and TeacherCache.selected reads back): shifted_mask's
    positions = sum(int(shifted_mask(torch.as_tensor(r.get("labels", r["input_ids"]))[None]).sum())
                    for r in forget_encoded)
    per_position = (8 * topk + 4) if topk and topk < vocab else 4 * vocab
    return positions * per_position


def _vocab_size(teacher: Any) -> int:
    from pipeline.methods.model_io import unwrap

    return int(unwrap(teacher).config.vocab_size)


def _check_size(forget_encoded: Sequence[dict], vocab: int, topk: int, root: Path) -> Optional[str]:
    """Log the cache's size; the reason to refuse when the disk under ``root`` cannot hold it."""
    need = cache_bytes(forget_encoded, vocab, topk)
    free = shutil.disk_usage(root).free
    log.info("teacher cache: %d rows, ~%s on disk (%s)", len(forget_encoded), size_text(need),
             f"top-{topk} of {vocab}" if topk and topk < vocab else f"all {vocab} log-probs per position")
    if not topk and need > 16 * 2**30:
        log.warning("teacher cache: full-vocabulary rows take ~%s here (and are read back every step); "
                    "method.cache_topk=100 (with kernels.kl=naive: the fused KL reads full rows) keeps ~%s",
                    size_text(need), size_text(cache_bytes(forget_encoded, vocab, 100)))
    if need * 1.05 > free:
        return (f"teacher cache needs ~{need / 2**30:.1f} GiB but {root} has {free / 2**30:.1f} GiB free "
                "(set cache_dir elsewhere, or method.cache_topk with kernels.kl=naive to keep fewer log-probs per "
                "position)")
    return None


class _ShardWriter:
    """This rank's cached rows as safetensors shards of about SHARD_BYTES in ``directory``."""

    def __init__(self, directory: Path, rank: int) -> None:
        self.directory, self.rank = directory, rank
        self.part: dict[str, str] = {}  # row -> shard file
        self.lengths: dict[str, int] = {}  # row -> cached positions
        self.files: dict[str, dict] = {}  # shard file -> its size and digests (_shard_record)
        self._buf: dict[str, torch.Tensor] = {}
        self._bytes, self._shards = 0, 0

    def add(self, row: int, tensors: dict[str, torch.Tensor]) -> None:
        self.lengths[str(row)] = int(tensors["logprobs"].shape[0])
        for k, v in tensors.items():
            self._buf[f"{row}.{k}"] = v
            self._bytes += v.numel() * v.element_size()
        if self._bytes >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        from safetensors.torch import save_file

        name = f"rows-r{self.rank:03d}-{self._shards:05d}.safetensors"
        save_file(self._buf, str(self.directory / name))
        # safetensors writes 0600 whatever the umask: readable as the index is, for others sharing the root
        os.chmod(self.directory / name, 0o666 & ~current_umask())
        # hashed by the rank that wrote it, just written (from the page cache): ranks share the work
        self.files[name] = _shard_record(self.directory / name)
        for k in self._buf:
            self.part[k.split(".")[0]] = name
        self._buf, self._bytes, self._shards = {}, 0, self._shards + 1


def _write_rank_part(teacher: Any, rows: list[dict], batch_size: int, tau: float, layers: Optional[list],
                     topk: int, pad_token_id: int, device: Any, tmp: Path, rank: int, world: int,
                     dtype: str = "") -> Optional[int]:
    """Run the tempered teacher on this rank's share of the batches and write its shards and
    ``part-rNNN.json`` into ``tmp``; returns the vocabulary size (None with top-k). A row that is not
    a distribution stops the build on every rank (:func:`_teacher_rows_problem`; the caller removes ``tmp``)."""
    batches = [list(range(i, min(i + batch_size, len(rows)))) for i in range(0, len(rows), batch_size)]
    mine = batches[rank::world]
    writer = _ShardWriter(tmp, rank)
    heartbeat = _Heartbeat(tmp)
    vocab: Optional[int] = None
    was_training = getattr(teacher, "training", False)
    teacher.eval()
    for r in tracked(range(math.ceil(len(batches) / world))):
        heartbeat.beat()
        idx = mine[r] if r < len(mine) else (mine[0] if mine else batches[0])
        res = _teacher_rows(teacher, [rows[i] for i in idx], tau, layers, topk, pad_token_id, device)
        vocab = None if "ids" in res[0] else int(res[0]["logprobs"].shape[-1])
        filler = r >= len(mine)  # a ZeRO-3 filler forward: every rank runs the same number of forwards
        problem = None if filler else _teacher_rows_problem(res, idx, tau, dtype)
        if not all_true(problem is None):  # every rank stops here together, not in the next forward's gather
            raise TeacherCacheError(problem or "teacher cache build: another rank's teacher rows are not a "
                                    "distribution (its error names the row); nothing was cached")
        if filler:
            continue
        for i, tensors in zip(idx, res):
            writer.add(i, tensors)
    writer.flush()
    if was_training:
        teacher.train()
    (tmp / f"part-r{rank:03d}.json").write_text(json.dumps({"shards": writer.part, "lengths": writer.lengths,
                                                           "files": writer.files}))
    return vocab


def _publish(tmp: Path, final: Path, fields: dict, n_rows: int, vocab: Optional[int], topk: int) -> None:
    """Rank 0: merge the ranks' parts into the index and rename ``tmp`` to ``final`` (unless a
    concurrent job published the same cache first)."""
    from pipeline.io import atomic_write_json

    shards: dict[str, str] = {}
    lens: dict[str, int] = {}
    files: dict[str, dict] = {}
    for p in sorted(tmp.glob("part-r*.json")):
        d = json.loads(p.read_text())
        shards.update(d["shards"])
        lens.update(d["lengths"])
        files.update(d["files"])
        p.unlink()
    missing = [i for i in range(n_rows) if str(i) not in shards]
    if missing:
        raise TeacherCacheError(f"teacher cache build: rows {missing[:10]} missing from {tmp} (is the cache "
                                f"directory on a filesystem every rank sees?)")
    index = {"fields": fields, "vocab_size": vocab, "shards": shards, "lengths": lens, "files": files,
             "bytes": sum(f["bytes"] for f in files.values())}
    atomic_write_json(tmp / INDEX, index)
    if not _rename_unless_published(tmp, final):
        log.info("teacher cache: built %s, but another job published this cache first; this copy was "
                 "discarded (the published one is used)", final)
        _mark_used(final)
        return
    _mark_used(final)
    log.info("teacher cache: built %s (%d rows, topk=%s, %s)", final, n_rows, topk or "full",
             size_text(index["bytes"]))


def _discard(final: Path) -> bool:
    """Move ``final`` aside under ``.<key>.stale-<pid>-<random>`` and delete it there (a deletion
    interrupted there is finished by :func:`_remove_stale_temps`, never mistaken for a cache);
    False if it was gone already."""
    aside = final.with_name(f".{final.name}.stale-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.rename(final, aside)
    except FileNotFoundError:
        return False
    shutil.rmtree(aside, ignore_errors=True)
    return True


def _rename_unless_published(tmp: Path, final: Path) -> bool:
    """Publish ``tmp`` as ``final`` unless a concurrent job published it first (then ``tmp`` goes);
    True when this call published it.
    The rename itself decides the race (it fails on a non-empty target): checking first and renaming
    after let a second job delete the copy the first had just published. A final directory without an
    index (an interrupted older layout) is moved aside under a unique name, never deleted in place."""
    for _ in range(3):
        try:
            os.rename(tmp, final)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        if (final / INDEX).exists():  # another job won the race: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        _discard(final)  # gone already (someone else moved it): try again all the same
    os.rename(tmp, final)
    return True


# -- integrity of a published cache -----------------------------------------------------------------------


def _chunks(f: Any, n: int, size: int = 2**20) -> Iterator[bytes]:
    """Up to ``n`` bytes of the open file ``f`` from where it stands, in chunks."""
    while n > 0:
        b = f.read(min(size, n))
        if not b:
            return
        n -= len(b)
        yield b


def _sample_sha256(path: Path, size: int) -> str:
    """SHA-256 of a shard's safetensors header (its 8-byte length and JSON) and ``SAMPLE_BLOCKS``
    blocks spread evenly over the file: a cheap check of a large shard (about 1 MiB read)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
        h.update(head)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        for b in _chunks(f, min(n, max(size - 8, 0))):  # a damaged length reads to the end, no further
            h.update(b)
        span = max(size - SAMPLE_BLOCK_BYTES, 0)
        for i in range(SAMPLE_BLOCKS):
            f.seek(span * i // max(SAMPLE_BLOCKS - 1, 1))
            h.update(f.read(SAMPLE_BLOCK_BYTES))
    return h.hexdigest()


def _sha256(path: Path) -> str:
    """SHA-256 of the whole file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in _chunks(f, path.stat().st_size):
            h.update(b)
    return h.hexdigest()


def _shard_record(path: Path) -> dict:
    """What the index records of a shard, and reuse checks: its size, sha256 and sampled digest."""
    size = path.stat().st_size
    return {"bytes": size, "sha256": _sha256(path), "sample_sha256": _sample_sha256(path, size)}


# path -> (the files' stat signature, the check's answer): cache_ready and the build check once
_CHECKED: dict[Path, tuple[tuple, Optional[str]]] = {}


def _signature(path: Path) -> tuple:
    """Names, sizes, mtimes, ctimes and inodes of a cache directory's files: a changed one is checked anew."""
    out = []
    for f in sorted(path.iterdir()):
        st = f.stat()
        out.append((f.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    return tuple(out)


def _reuse_refusal(path: Path) -> Optional[str]:
    """Why the published cache ``path`` must not be reused (damaged after publishing, or written
    before the index recorded its shards), or None: every shard has the size recorded when it was
    published, and its sha256 (up to ``FULL_CHECK_BYTES`` in all) or sampled digest (above)."""
    try:
        sig = _signature(path)
    except OSError as e:
        return f"cannot list it: {e.strerror}"
    memo = _CHECKED.get(path)
    if memo is not None and memo[0] == sig:
        return memo[1]
    reason = _check_shards(path)
    _CHECKED[path] = (sig, reason)
    return reason


def _check_shards(path: Path) -> Optional[str]:
    """:func:`_reuse_refusal`'s check itself, uncached."""
    try:
        index = json.loads((path / INDEX).read_text())
    except (OSError, ValueError) as e:
        return f"its {INDEX} is unreadable: {e}"
    files = index.get("files") if isinstance(index, dict) else None
    if not isinstance(files, dict):
        return f"written before {INDEX} recorded shard sizes and hashes"
    unrecorded = sorted(set(index.get("shards", {}).values()) - files.keys())
    if unrecorded:
        return f"its {INDEX} records no size for shard {unrecorded[0]}"
    try:
        full = sum(int(r["bytes"]) for r in files.values()) <= FULL_CHECK_BYTES
        digests = {name: r["sha256" if full else "sample_sha256"] for name, r in files.items()}
    except (KeyError, TypeError, ValueError):
        return f"its {INDEX} has malformed shard records"
    for name, rec in sorted(files.items()):
        try:
            size = (path / name).stat().st_size
            if size != rec["bytes"]:
                return f"shard {name} has {size} bytes, {rec['bytes']} when published"
            if full and _sha256(path / name) != digests[name]:
                return f"shard {name}'s sha256 differs from the one recorded when published"
            if not full and _sample_sha256(path / name, size) != digests[name]:
                return f"shard {name}'s sampled digest differs from the one recorded when published"
        except FileNotFoundError:
            return f"shard {name} is missing"
        except OSError as e:  # another user's cache it cannot read (a shared root)
            return f"shard {name} cannot be read ({e.strerror or type(e).__name__})"
    return None


# -- read -------------------------------------------------------------------------------------------------


class TeacherCache:
    """Read side: per-row tensors, or a padded batch aligned with a training batch's labels."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not (self.path / INDEX).exists():
            raise TeacherCacheError(f"{self.path} is not a complete teacher cache (no {INDEX})")
        self.index = json.loads((self.path / INDEX).read_text())
        self.fields = self.index["fields"]
        self.topk = int(self.fields["topk"])
        self.vocab_size = self.index.get("vocab_size")
        self._handles: dict[str, Any] = {}

    @property
    def full(self) -> bool:
        return self.vocab_size is not None

    def __len__(self) -> int:
        return int(self.fields["rows"])

    @property
    def nbytes(self) -> int:
        return int(self.index["bytes"])

    def _get(self, row: int, name: str) -> torch.Tensor:
        shard = self.index["shards"].get(str(row))
        if shard is None:
            raise TeacherCacheError(f"row {row} is not in the teacher cache {self.path} ({len(self)} rows)")
        h = self._handles.get(shard)
        if h is None:
            from safetensors import safe_open

            h = self._handles[shard] = safe_open(str(self.path / shard), framework="pt")
        return h.get_tensor(f"{row}.{name}")

    def rows(self, indices: Sequence[int]):
        """Full rows: a list of (n_i, V) log-prob tensors. Top-k: a list of
        ``(topk_logprobs (n_i, k), topk_ids (n_i, k), tail_logmass (n_i,))`` tuples. Each row's values
        are checked (:meth:`_check_values`): a damaged one raises :class:`TeacherCacheError`."""
        out = [self._get(i, "logprobs") if self.full else
               (self._get(i, "logprobs"), self._get(i, "ids").long(), self._get(i, "tail")) for i in indices]
        for i, r in zip(indices, out):
            self._check_values(i, r)
        return out

    def _checked_rows(self, indices: Sequence[int], mask: torch.Tensor):
        """:meth:`rows` (values checked there), checked against the batch's loss positions."""
        rows = self.rows(indices)
        counts = mask.sum(1).tolist()
        for j, (i, r) in enumerate(zip(indices, rows)):
            n = (r if self.full else r[0]).shape[0]
            if n != counts[j]:
                raise TeacherCacheError(f"teacher cache {self.path}: row {i} has {n} cached positions but the batch "
                                        f"has {counts[j]} loss tokens (stale cache?)")
        return rows

    def _check_values(self, row: int, r: Any) -> None:
        """Raise when row ``row``'s values cannot be the teacher's: a NaN, an infinite or positive log-prob,
        a negative id (the reuse check samples a large cache's shards, so damage between its blocks is
        only seen here)."""
        bad = self._value_problem(r)
        if bad is not None:
            raise TeacherCacheError(
                f"teacher cache {self.path} is damaged: shard {self.index['shards'][str(row)]}, row {row}: {bad}; "
                f"delete {self.path} to rebuild it")

    def _value_problem(self, r: Any) -> Optional[str]:
        """What is wrong with one row's cached tensors, or None (:func:`_row_problem`, the build's check)."""
        return _row_problem({"logprobs": r} if self.full else {"logprobs": r[0], "ids": r[1], "tail": r[2]})

    def selected(self, indices: Sequence[int], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows' cached distributions at ``labels``' loss positions, concatenated in row-major
        order — (N, V) log-probs, or (N, k) log-probs + ids and (N,) tail — as the training step reads
        them (pipeline/methods/passes.py): no (B, T-1, V) tensor is built."""
        from pipeline.methods.model_io import shifted_mask

        rows = self._checked_rows(indices, shifted_mask(labels).cpu())
        if self.full:
            out = {"logprobs": torch.cat(rows)}
        else:
            out = {"logprobs": torch.cat([r[0] for r in rows]), "ids": torch.cat([r[1] for r in rows]),
                   "tail": torch.cat([r[2] for r in rows])}
        return {k: v.to(labels.device) for k, v in out.items()}

    def batch(self, indices: Sequence[int], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tensors aligned with ``labels``' shifted loss positions (B, T-1, ...) for
        :func:`~pipeline.methods.losses.kl_from_cache`; non-loss slots are zero (ignored there)."""
        from pipeline.methods.model_io import shifted_mask

        mask = shifted_mask(labels).cpu()
        B, T1 = mask.shape
        rows = self._checked_rows(indices, mask)
        if self.full:
            lp = torch.zeros(B, T1, int(self.vocab_size))
            for j, r in enumerate(rows):
                lp[j, mask[j]] = r
            out = {"logprobs": lp}
        else:
            k = self.topk
            lp, ids, tail = torch.zeros(B, T1, k), torch.zeros(B, T1, k, dtype=torch.long), torch.zeros(B, T1)
            for j, (a, b, c) in enumerate(rows):
                lp[j, mask[j]], ids[j, mask[j]], tail[j, mask[j]] = a, b, c
            out = {"logprobs": lp, "ids": ids, "tail": tail}
        return {k: v.to(labels.device) for k, v in out.items()}


def cache_ready(root: str | os.PathLike, model_path: str, method_cfg: Any, forget_encoded: Sequence[dict],
                split: str, max_length: int, dtype: str, *, revision: Optional[str] = None,
                attention: Optional[str] = None, device: Optional[str] = None) -> bool:
    """Whether the cache :func:`build_teacher_cache` would reuse exists and passes its check (rank 0
    decides, every rank gets the same answer). ``revision``: ``model.revision``; ``attention`` and
    ``device``: ``kernels.attention`` and the device the run will activate it for (called before the
    run sets its backend; default: the active one, see :func:`runtime_fields`)."""
    ready = None
    if _rank_world()[0] == 0:
        layers = list(method_cfg.teacher_layers) if method_cfg.teacher_layers is not None else None
        runtime = runtime_fields(attention, device) if attention is not None or device is not None else None
        fields = cache_fields(model_path, float(method_cfg.tau), layers, split, max_length,
                              int(getattr(method_cfg, "cache_topk", 0) or 0), forget_encoded, dtype,
                              revision=revision, runtime=runtime)
        final = Path(root) / cache_key(fields)
        # the same check as the build's reuse: a damaged cache needs the teacher loaded to rebuild it
        ready = (final / INDEX).exists() and _reuse_refusal(final) is None
    return bool(_broadcast(ready))
