"""A model's identity for cache keys: its resolved path and a cheap fingerprint of its weight files.

Used wherever something computed from a model is cached or reused (the retain reference, the
teacher cache, evaluation parts, finished-run records, the checkpoint meta's
``model.content_sha256``): a model rewritten in place (new weights at the same path) must not match
the old entry, and a byte-identical copy (a model staged to node-local scratch by each SLURM job:
``cp`` gives its files new mtimes) must. Cheap by design — the weights are sampled, not read in full:
file names and sizes, the safetensors header hash (architecture, sharding, every tensor's offsets)
and a hash of a few small slices of every tensor's data (:data:`SLICE` bytes at its start, middle
and end), so any tensor that changed (a LoRA merged into one projection) changes it; a pickled
``.bin`` / ``.pt`` (no index of its tensors) hashes :data:`BLOCKS` evenly spaced blocks; the config /
index JSON files and a remote-code model's ``*.py`` (config.json with an ``auto_map``) are hashed in
full. mtimes are not used: a copy has new ones. A change confined to bytes no slice covers (one row
in the middle of an embedding) goes unseen.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

from pipeline.models.loading import safetensors_header

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.index.json", "config.json")
# a remote-code model's own modeling / configuration code (its config.json has an auto_map) computes its
# outputs as much as its weights do: an edited modeling_*.py at the same path must not match the old
# cache entries. Other directories' *.py (a conversion script) are no part of the model.
CODE_SUFFIX = ".py"
CODE_PATTERNS = ("*" + CODE_SUFFIX,)
SLICE = 64  # bytes hashed at the start, middle and end of each safetensors tensor (all of a smaller one)
BLOCKS, BLOCK = 64, 4096  # evenly spaced blocks hashed in a pickled weight file (all of a smaller one)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _spans(begin: int, end: int, n: int, size: int) -> list[tuple[int, int]]:
    """``n`` spans of ``size`` bytes evenly spaced over [begin, end), the first at its start and the
    last at its end; the whole range when it is not larger than them."""
    length = end - begin
    if length <= n * size:
        return [(begin, end)] if length > 0 else []
    step = (length - size) / (n - 1)
    return [(begin + round(i * step), begin + round(i * step) + size) for i in range(n)]


def _hash_spans(f: Path, spans: list[tuple[int, int]]) -> str:
    h = hashlib.sha256()
    fd = os.open(f, os.O_RDONLY)
    try:
        for a, b in spans:
            h.update(os.pread(fd, b - a, a))
    finally:
        os.close(fd)
    return h.hexdigest()


def _tensor_spans(header: bytes, size: int) -> Optional[list[tuple[int, int]]]:
    """Start, middle and end slices of every tensor of a safetensors file with this header; None
    when the header does not parse (then the file is sampled as a pickle is)."""
    try:
        meta = json.loads(header)
        base = 8 + len(header)
        offsets = sorted((int(t["data_offsets"][0]), int(t["data_offsets"][1]))
                         for k, t in meta.items() if k != "__metadata__")
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
    spans = [s for b, e in offsets for s in _spans(base + b, base + e, 3, SLICE)]
    return spans if all(0 <= a <= b <= size for a, b in spans) else None


def _file_entry(f: Path) -> dict:
    """Name, size and a content hash of one weight / config / code file: in full for JSON and Python,
    sampled for weights."""
    size = f.stat().st_size
    e: dict[str, Any] = {"name": f.name, "size": size}
    if f.suffix in (".json", ".py"):
        e["sha256"] = _sha256(f.read_bytes())
        return e
    spans = None
    if f.suffix == ".safetensors":
        header = safetensors_header(f)
        e["header_sha256"] = _sha256(header)
        spans = _tensor_spans(header, size)
    e["sample_sha256"] = _hash_spans(f, spans if spans is not None else _spans(0, size, BLOCKS, BLOCK))
    return e


def _has_remote_code(directory: Path) -> bool:
    """Whether ``directory``'s config.json maps classes to its own code (``auto_map``)."""
    try:
        return "auto_map" in json.loads((directory / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def split_code(fingerprint: dict) -> tuple[dict, list[dict]]:
    """``fingerprint`` without a remote-code model's ``*.py`` entries, and those entries: the checkpoint
    meta records the code apart (``model.code_sha256``), so checkpoints written before the code was
    fingerprinted still match on the weights."""
    files = fingerprint.get("files")
    if not files:
        return fingerprint, []
    code = [f for f in files if str(f.get("name", "")).endswith(CODE_SUFFIX)]
    return {**fingerprint, "files": [f for f in files if f not in code]}, code


def content_fingerprint(fingerprint: dict) -> dict:
    """:func:`model_fingerprint` without its ``path``: the same for a byte-identical copy of the
    weights wherever it is. Its digest is the checkpoint meta's ``model.content_sha256`` (the meta
    records the configured ``model.path`` on its own)."""
    return {k: v for k, v in fingerprint.items() if k != "path"}


def model_fingerprint(path: str | Path, revision: Optional[str] = None) -> dict:
    """Identity of a model: resolved directory + weight-file fingerprints, or hub id + snapshot.

    ``revision`` (``model.revision``: a branch, tag or commit) picks a hub id's snapshot, as the
    loader does; a local directory has no revisions and ignores it. Cheap by design (weights are
    sampled, not read): a slice hash of every tensor catches a rewritten file, the safetensors header
    hash a different architecture/sharding, the config/index hashes the rest. No mtimes: a copy of
    the same files (re-staged to scratch) is the same model."""
    p = Path(path)
    if p.is_dir():
        patterns = WEIGHT_PATTERNS + (CODE_PATTERNS if _has_remote_code(p) else ())
        files = sorted({f for pat in patterns for f in p.glob(pat) if f.is_file()})
        return {"path": str(p.resolve()), "files": [_file_entry(f) for f in files]}
    # A hub id: the run is offline, so the weights come from the local HF cache; its snapshot
    # folder is named by the commit. The revision the model is loaded at, not refs/main's.
    try:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(str(path), revision=revision, local_files_only=True))
    except Exception:  # not cached (or not a hub id): identity is the name (and revision asked for) only
        return {"path": f"hub:{path}", "revision": revision}
    return {"path": f"hub:{path}", "revision": local.name, "files": model_fingerprint(local)["files"]}
