"""One SHA-256 over source files: the key part that says which code computed a cached result
(evaluation parts, the teacher cache), so that results computed by other code are not reused."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path


def code_sha256(files: Iterable[Path], extra: Iterable[tuple[str, str]] = ()) -> str:
    """SHA-256 of ``files`` (name and bytes, in the order given) and of ``extra`` (name, source
    text) pairs, e.g. one function's source where its whole module would change the key too often."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    for name, text in extra:
        h.update(name.encode() + b"\0" + text.encode())
    return h.hexdigest()
