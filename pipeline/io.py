"""Atomic output helpers: a reader never sees a half-written file or directory.

* :func:`atomic_write_text` / :func:`atomic_write_json` write a temporary file in the *same*
  directory, ``fsync`` it, then ``os.replace`` it over the target (atomic on POSIX).
* :func:`atomic_dir` yields a temporary directory next to the final one and swaps it in only when
  the ``with`` block succeeds: an existing directory is renamed away, the new one renamed in,
  then the old one deleted. An exception inside the block removes the temporary directory and
  leaves the previous directory untouched.

Temporary names start with ``.`` and contain ``.tmp-`` or ``.old-`` so that listings and globbing
for checkpoints ignore them. If the process is killed between the two renames of
:func:`atomic_dir` (a window of two syscalls) the previous contents survive as
``.<name>.old-*`` next to the missing final path; :func:`atomic_dir` restores such a leftover
before it starts.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional


def nearest_existing(path: Path) -> Path:
    """``path``, or its closest ancestor that exists: where making ``path`` as a directory would start.
    A link to nothing (or a loop of links) counts as existing: ``mkdir`` stops there ("File exists")."""
    while not path.exists() and not path.is_symlink() and path != path.parent:
        path = path.parent
    return path


def dirs_to_create(path: str | os.PathLike) -> list[Path]:
    """The directories making ``path`` (absolute) would create, innermost first: ``path`` and its
    missing parents (none when it exists)."""
    path = Path(os.path.abspath(path))
    return [path, *path.parents][: len(path.parents) - len(nearest_existing(path).parents)]


def remove_empty_dirs(paths: list[Path] | list[str]) -> bool:
    """Remove ``paths`` in order (innermost first), each only if empty; stop at the first that is not
    (or is gone): it and those after it stay. True when every one was removed."""
    for path in paths:
        try:
            os.rmdir(path)
        except OSError:
            return False
    return True


def why_no_directory(path: Path) -> Optional[str]:
    """Why ``path`` cannot be a directory, for a one-line error: the file or link to nothing in its place
    or above it. None when it is one or can be made (write permission aside)."""
    parent = nearest_existing(path)
    if parent.is_dir():
        return None
    if parent.is_symlink() and not parent.exists():
        return f"{parent} is a link to nothing (or a loop of links)"
    return f"{parent} is a file, not a directory"


def tree_bytes(directory: Path) -> int:
    """Bytes of the files under ``directory`` (links not followed). A file removed meanwhile raises
    ``FileNotFoundError``, for the caller to decide."""
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file() and not f.is_symlink())


def size_text(n: int) -> str:
    """``n`` bytes for a log line or a message, in GiB, MiB or (something small) KiB."""
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _fsync_dir(path: Path) -> None:
    """Persist a rename/creation in ``path`` (best effort: not all platforms allow it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (tmp file in the same dir, fsync, ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        # mkstemp's 0600 would hide results.json or an exported model.safetensors from the rest of a
        # shared cluster's team: the mode an ordinary open() gives under the umask
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode(encoding))


def to_jsonable(obj: Any) -> Any:
    """Convert numpy/torch scalars and arrays, tuples, sets and paths to plain JSON types;
    non-finite floats (nan, inf) become ``None`` so the output is strict JSON."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [to_jsonable(v) for v in sorted(obj, key=repr)]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # numpy arrays/scalars, torch tensors
        return to_jsonable(obj.tolist())
    if hasattr(obj, "item"):
        return to_jsonable(obj.item())
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return to_jsonable(dataclasses.asdict(obj))
    raise TypeError(f"cannot convert {type(obj).__name__} to JSON")


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as strict JSON (see :func:`to_jsonable`) atomically, with a final newline."""
    text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False, sort_keys=False)
    return atomic_write_text(path, text + "\n")


def _leftovers(final: Path, kind: str) -> list[Path]:
    return sorted(final.parent.glob(f".{final.name}.{kind}-*"))


def recover_dir(final_path: str | os.PathLike) -> bool:
    """Restore ``final_path`` from a ``.<name>.old-*`` left by a crash between the two renames of
    :func:`atomic_dir`. Returns True if something was restored."""
    final = Path(final_path)
    olds = _leftovers(final, "old")
    if final.exists() or not olds:
        return False
    os.rename(olds[-1], final)
    _fsync_dir(final.parent)
    return True


def current_umask() -> int:
    """The process's umask, read from /proc where it can be (reading it with ``os.umask`` means setting
    it for a moment, process-wide: another thread creating a file then would get the wrong mode)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and put back at once
    os.umask(mask)
    return mask


def _readable(root: Path) -> None:
    """Add the read (and, for directories, search) bits the umask allows to everything under ``root``:
    writers that go through a temporary file (transformers' ``model.safetensors``) leave 0600."""
    mask = current_umask()
    for d, dirs, files in os.walk(root):
        for name in dirs:
            p = os.path.join(d, name)
            os.chmod(p, os.stat(p).st_mode & 0o7777 | (0o555 & ~mask))
        for name in files:
            p = os.path.join(d, name)
            os.chmod(p, os.stat(p).st_mode & 0o7777 | (0o444 & ~mask))


@contextmanager
def atomic_dir(final_path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name and move it to ``final_path`` on success.

    ``with atomic_dir(run / "checkpoint-100") as d: save(d)``. On success an existing
    ``final_path`` is replaced (renamed away, new one renamed in, old one deleted). On an
    exception the temporary directory is deleted and ``final_path`` is left as it was.
    """
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide a shared cluster's exported model from the team
    try:
        yield tmp
        _readable(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old: Path | None = None
    try:
        if final.exists() or final.is_symlink():
            old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
            os.rmdir(old)  # only reserve a unique name; rename needs the target absent
            os.rename(final, old)
        os.rename(tmp, final)
    except BaseException:
        if old is not None and not final.exists():
            os.rename(old, final)
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(final.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


RUN_CONFIG = "config.yaml"  # a training run's resolved config (pipeline.run writes it when training starts)


def run_config_section(run_dir: str | os.PathLike, section: str) -> dict | None:
    """Section ``section`` of the ``config.yaml`` a training run wrote in ``run_dir`` (unresolved, as
    written); None when the directory has none (evaluation-only runs do not write one)."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path).get(section) or {}, resolve=False)
