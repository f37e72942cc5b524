"""model_fingerprint of a hub id follows ``model.revision`` (the snapshot the model is loaded at), in
the teacher-cache key and the finished-job key alike."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from pipeline.models.fingerprint import model_fingerprint

A, B = "a" * 40, "b" * 40


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A local HF hub cache holding two snapshots of ``org/m`` (refs/main -> A), as a download of
    main and one of a pinned revision leave it."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--org--m"
    for rev, size in ((A, 10), (B, 20)):
        d = repo / "snapshots" / rev
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": size}))
        (d / "pytorch_model.bin").write_bytes(b"x" * size)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(A)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read at import: the env alone is too late
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo


def _sizes(fp: dict) -> list[int]:
    return [f["size"] for f in fp["files"]]


def test_a_hub_ids_fingerprint_is_the_revisions_snapshot(hub):
    """Before, every revision got refs/main's snapshot: two revisions shared one identity."""
    main, pinned = model_fingerprint("org/m"), model_fingerprint("org/m", revision=B)
    assert main["revision"] == A and pinned["revision"] == B
    assert _sizes(pinned) != _sizes(main)
    assert model_fingerprint("org/m", revision=A) == main
    # only the pinned revision downloaded (no refs/main): its files, not the name alone
    (hub / "refs" / "main").unlink()
    assert model_fingerprint("org/m", revision=B) == pinned
    assert model_fingerprint("org/m") == {"path": "hub:org/m", "revision": None}
    # not cached at all: the name and the revision asked for
    assert model_fingerprint("org/other", revision="v2") == {"path": "hub:org/other", "revision": "v2"}


def test_a_local_directory_ignores_the_revision(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert model_fingerprint(tmp_path, revision=B) == model_fingerprint(tmp_path)


def test_the_teacher_cache_key_holds_the_revision(hub):
    from pipeline.engine import teacher_cache as tc

    rows = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}]

    def key(revision):
        return tc.cache_key(tc.cache_fields("org/m", 2.0, None, "forget", 64, 5, rows, "float32",
                                            revision=revision))

    assert key(None) == key(A) != key(B)


def test_the_finished_job_key_holds_the_revisions_files(hub, monkeypatch):
    """A finished job at revision A was taken for the same job at revision B (and the checkpoint meta's
    model.files_sha256, computed from this key, matched too)."""
    from pipeline import finished

    inputs = SimpleNamespace(data=SimpleNamespace(forget=[], retain=[]), paths=SimpleNamespace(model="org/m"),
                             tokenizer=SimpleNamespace(name_or_path="org/m"))

    def model_key(revision):
        cfg = OmegaConf.create({"model": {"path": "org/m", "revision": revision}})
        return finished.job_key(cfg, 1, inputs)["model"]

    assert model_key(B)["revision"] == B and model_key(None)["revision"] == A
    assert model_key(B)["files"] != model_key(A)["files"]


def test_a_continual_steps_record_holds_the_revision_it_starts_from(hub):
    """The first continual step starts from model.path at model.revision: a branch that moved to
    another snapshot is another starting model (the step runs again), not a finished step (before,
    refs/main's snapshot was fingerprinted whatever the revision)."""
    from pipeline.continual import step_record

    def record():
        cfg = OmegaConf.create({"model": {"path": "org/m", "revision": "dev"}, "method": {"name": "asu_kl"}})
        return step_record("forget01", "org/m", cfg)

    (hub / "refs" / "dev").write_text(A)
    before = record()
    (hub / "refs" / "dev").write_text(B)
    assert record()["train_key"] != before["train_key"]
