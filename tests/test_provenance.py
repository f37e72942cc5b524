"""results.json's provenance: the code that ran, only this checkout's own commit."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from pipeline import provenance


@pytest.fixture
def fresh_record():
    provenance.code_record.cache_clear()
    yield
    provenance.code_record.cache_clear()


def test_this_checkouts_commit_and_sources_are_recorded(fresh_record):
    rec = provenance.code_record()
    top = subprocess.run(["git", "-C", str(provenance._ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if top.returncode != 0:
        pytest.skip("not a git checkout")
    assert rec["git_commit"] == top.stdout.strip() and isinstance(rec["git_dirty"], bool)
    assert len(rec["sources_sha256"]) == 16
    line = provenance.provenance_line(7)
    assert line.startswith(f"code {rec['git_commit'][:12]}") and line.endswith("seed 7")


def test_an_installed_copy_inside_another_repository_records_no_commit(tmp_path, monkeypatch, fresh_record):
    """A copy in site-packages of a .venv inside some other clone reported that clone's HEAD, clean."""
    if shutil.which("git") is None:
        pytest.skip("no git")
    repo = tmp_path / "other"
    site = repo / "venv" / "site"
    shutil.copytree(provenance._ROOT / "pipeline", site / "pipeline")
    shutil.copytree(provenance._ROOT / "kernels", site / "kernels")
    (repo / ".gitignore").write_text("venv/\n")
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", ".gitignore"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    monkeypatch.setattr(provenance, "_ROOT", site)
    rec = provenance.code_record()
    assert rec["git_commit"] is None and rec["git_dirty"] is None and len(rec["sources_sha256"]) == 16
    assert provenance.provenance_line(0).startswith("code not a git checkout")
