"""Which code and libraries produced a run's results: ``results.json["provenance"]`` and one log line
at a job's start. Two runs of the same command a few commits apart otherwise look alike; the
finished-job key holds the evaluation code's digest only."""

from __future__ import annotations

import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from pipeline.code_digest import code_sha256

_ROOT = Path(__file__).resolve().parent.parent  # the checkout: pipeline/ and kernels/ below it
_LIBRARIES = ("torch", "transformers", "deepspeed", "peft", "datasets", "lm_eval")


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git on the node
        return None
    return out.stdout if out.returncode == 0 else None


@lru_cache(maxsize=1)
def code_record() -> dict[str, Any]:
    """The checkout's commit and whether it had uncommitted changes (None outside a git checkout), and
    one SHA-256 over the package's sources (``pipeline/``, ``kernels/``): it tells apart an installed
    copy or a dirty tree that the commit alone does not."""
    # only this checkout's own commit: an installed copy inside another repository (a .venv in a clone)
    # would report that repository's HEAD; a checkout git refuses to read (another owner) has none
    top, _, head = (_git("rev-parse", "--show-toplevel", "HEAD") or "").strip().partition("\n")
    commit = head if top and Path(top).resolve() == _ROOT.resolve() else None
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None  # tracked files changed
    files = sorted(p for d in ("pipeline", "kernels") for p in (_ROOT / d).rglob("*.py"))
    return {"git_commit": commit.strip() if commit else None,
            "git_dirty": bool(status.strip()) if status is not None else None,
            "sources_sha256": code_sha256(files, extra=[(str(p.relative_to(_ROOT)), "") for p in files])[:16]}


@lru_cache(maxsize=1)
def library_versions() -> dict[str, Optional[str]]:
    """Python's and the libraries' versions that compute or score a run (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Optional[str]] = {"python": sys.version.split()[0]}
    for name in _LIBRARIES:
        try:
            out[name] = version(name.replace("_", "-") if name == "lm_eval" else name)
        except PackageNotFoundError:
            out[name] = None
    return out


def command_line_overrides() -> Optional[list[str]]:
    """This job's command-line overrides as Hydra parsed them; None outside a Hydra launch (a test
    calling a job function)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return None


def provenance(seed: int, overrides: Optional[list[str]]) -> dict[str, Any]:
    """``results.json["provenance"]``: the code, the libraries, the seed and the job's command-line
    overrides (a sweep report reads a point's settings here: Hydra's ``.hydra/`` is rewritten by any
    later launch into the directory, also one that is refused)."""
    return {"code": code_record(), "versions": library_versions(), "seed": int(seed), "overrides": overrides}


def provenance_line(seed: int) -> str:
    """One log line: ``code <commit>[ +uncommitted changes] (sources <sha>), torch X, ..., seed N``."""
    code, versions = code_record(), library_versions()
    commit = (code["git_commit"] or "")[:12] or "not a git checkout"
    dirty = " +uncommitted changes" if code["git_dirty"] else ""
    libs = ", ".join(f"{k} {v}" for k, v in versions.items() if v and k in ("torch", "transformers", "deepspeed"))
    return f"code {commit}{dirty} (sources {code['sources_sha256']}), {libs}, seed {int(seed)}"
