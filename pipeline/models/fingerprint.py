"""A model's identity for cache keys: its resolved path and a cheap fingerprint of its weight files.

Used wherever something computed from a model is cached or reused (the retain reference, the
teacher cache, evaluation parts, finished-run records): a model rewritten in place (new weights at
the same path) must not match the old entry. Cheap by design — no weights are read: file names,
sizes and mtimes catch a rewritten file, the safetensors header hash a different architecture or
sharding, the config / index hashes the rest.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Optional

from pipeline.models.loading import safetensors_header

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.index.json", "config.json")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_entry(f: Path) -> dict:
    """Name, size, mtime and a content hash of the cheap part of one weight / config file."""
    st = f.stat()
    e: dict[str, Any] = {"name": f.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if f.suffix == ".safetensors":
        e["header_sha256"] = _sha256(safetensors_header(f))
    elif f.suffix == ".json":
        e["sha256"] = _sha256(f.read_bytes())
    return e


def model_fingerprint(path: str | Path, revision: Optional[str] = None) -> dict:
    """Identity of a model: resolved directory + weight-file fingerprints, or hub id + snapshot.

    ``revision`` (``model.revision``: a branch, tag or commit) picks a hub id's snapshot, as the
    loader does; a local directory has no revisions and ignores it. Cheap by design (no weights are
    read): size and mtime catch a rewritten file, the safetensors header hash catches a different
    architecture/sharding, the config/index hashes the rest."""
    p = Path(path)
    if p.is_dir():
        files = sorted({f for pat in WEIGHT_PATTERNS for f in p.glob(pat) if f.is_file()})
        return {"path": str(p.resolve()), "files": [_file_entry(f) for f in files]}
    # A hub id: the run is offline, so the weights come from the local HF cache; its snapshot
    # folder is named by the commit. The revision the model is loaded at, not refs/main's.
    try:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(str(path), revision=revision, local_files_only=True))
    except Exception:  # not cached (or not a hub id): identity is the name (and revision asked for) only
        return {"path": f"hub:{path}", "revision": revision}
    return {"path": f"hub:{path}", "revision": local.name, "files": model_fingerprint(local)["files"]}
