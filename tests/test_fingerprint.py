"""model_fingerprint of a hub id follows ``model.revision`` (the snapshot the model is loaded at), in
the teacher-cache key and the finished-job key alike."""

from __future__ import annotations

import json
from pathlib import Path
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

    inputs = SimpleNamespace(data=SimpleNamespace(forget=[], retain=[], eval={}),
                             paths=SimpleNamespace(model="org/m", retain_model=None),
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


# --- content, not mtimes: a model re-staged to scratch is the same model, new weights are not ------


def _restage(model_dir):
    """``cp -r`` of the model to the same path, as a requeued SLURM job stages it to node-local scratch:
    the same bytes, new mtimes (shutil.copyfile keeps none; pushed an hour ahead to be sure)."""
    import os
    import shutil
    import time

    away = model_dir.with_name(model_dir.name + ".orig")
    model_dir.rename(away)
    shutil.copytree(away, model_dir, copy_function=shutil.copyfile)
    for f in model_dir.iterdir():
        os.utime(f, (time.time() + 3600,) * 2)
    return away


def _tensor(path, name):
    """(absolute byte offset, length) of tensor ``name``'s data in a safetensors file."""
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        begin, end = json.loads(f.read(n))[name]["data_offsets"]
    return 8 + n + begin, end - begin


def _composed():
    from hydra import compose, initialize_config_dir

    from pipeline.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return compose("config")


@pytest.fixture
def tiny_model(tmp_path):
    from tests.helpers.tiny import build

    return build(tmp_path)[0]


def test_a_copy_of_the_model_at_the_same_path_is_the_same_model(tiny_model):
    """Before, the fingerprint held every file's mtime: a model copied back to its path (cp -r to
    scratch in each requeued job) was another model for the checkpoint meta, the teacher cache, the
    evaluation parts, the retain reference and the finished-run record."""
    before = model_fingerprint(tiny_model)
    away = _restage(tiny_model)
    st = (tiny_model / "model.safetensors").stat().st_mtime_ns, (away / "model.safetensors").stat().st_mtime_ns
    assert st[0] != st[1]
    assert model_fingerprint(tiny_model) == before
    from pipeline.models.fingerprint import content_fingerprint

    # elsewhere: the same content (the checkpoint meta's model.content_sha256), another path (the caches')
    other = model_fingerprint(away)
    assert content_fingerprint(other) == content_fingerprint(before) and other["path"] != before["path"]


def test_one_tensor_rewritten_in_place_changes_the_fingerprint(tiny_model):
    """Same file, same size, same header: only q_proj of one layer changed (a LoRA merged into it)."""
    f = tiny_model / "model.safetensors"
    before = model_fingerprint(tiny_model)
    start, length = _tensor(f, "model.layers.1.self_attn.q_proj.weight")
    with open(f, "r+b") as fh:
        fh.seek(start)
        data = fh.read(length)
        fh.seek(start)
        fh.write(bytes(b ^ 0x01 for b in data))
    after = model_fingerprint(tiny_model)
    entry = {e["name"]: e for e in before["files"]}["model.safetensors"]
    new = {e["name"]: e for e in after["files"]}["model.safetensors"]
    assert new["size"] == entry["size"] and new["header_sha256"] == entry["header_sha256"]
    assert after != before


def test_a_remote_code_models_edited_modeling_file_changes_the_fingerprint(tiny_model):
    """A trust_remote_code model's modeling_*.py computes its logits: edited in place, the teacher cache,
    evaluation parts and finished-run records keyed on the fingerprint matched the old code's entries."""
    code = tiny_model / "modeling_custom.py"
    code.write_text("SCALE = 1.0\n")
    plain = model_fingerprint(tiny_model)  # no auto_map: a stray script, no part of the model
    assert "modeling_custom.py" not in {e["name"] for e in plain["files"]}
    config = json.loads((tiny_model / "config.json").read_text())
    (tiny_model / "config.json").write_text(json.dumps({**config, "auto_map": {
        "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}}))
    before = model_fingerprint(tiny_model)
    assert "modeling_custom.py" in {e["name"] for e in before["files"]}
    code.write_text("SCALE = 2.0\n")  # same size: only the content tells
    assert model_fingerprint(tiny_model) != before


def test_a_checkpoint_written_before_the_code_was_fingerprinted_still_resumes(tmp_path):
    """The code's digest is a meta field of its own (model.code_sha256), compared only where a checkpoint
    has it: model.content_sha256 stays the weights' as before, so a remote-code model's earlier
    checkpoints resume, and an edited modeling file refuses a checkpoint that recorded the code."""
    from pipeline.engine.checkpoint import CheckpointError, check_compatible
    from pipeline.run import _resume_meta

    files = [{"name": "model.safetensors", "size": 8, "sample_sha256": "a"}]
    key = {"model": {"path": "/m", "files": files}, "rows.forget": "f", "rows.retain": "r"}
    cfg = _composed()
    dist = SimpleNamespace(world_size=1, device="cpu")
    before = _resume_meta(cfg, dist, key)
    assert "model.code_sha256" not in before
    code = {"name": "modeling_x.py", "size": 3, "sha256": "c1"}
    now = _resume_meta(cfg, dist, {**key, "model": {"path": "/m", "files": files + [code]}})
    assert now["model.content_sha256"] == before["model.content_sha256"] and "model.code_sha256" in now
    check_compatible(before, now, tmp_path)  # an earlier checkpoint: the code was not recorded
    edited = _resume_meta(cfg, dist, {**key, "model": {"path": "/m", "files": files + [{**code, "sha256": "c2"}]}})
    with pytest.raises(CheckpointError, match="model.code_sha256"):
        check_compatible(now, edited, tmp_path)


def test_a_large_tensor_is_sampled_at_its_start_middle_and_end(tmp_path):
    """A tensor larger than its slices: a change in any of them is seen (the weights are not read in full)."""
    import struct

    from pipeline.models.fingerprint import SLICE

    n = 100_000
    header = json.dumps({"w": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
    data = bytearray(range(256)) * (n // 256) + bytearray(n % 256)
    f = tmp_path / "model.safetensors"

    def write(d):
        f.write_bytes(struct.pack("<Q", len(header)) + header + bytes(d))
        return model_fingerprint(tmp_path)

    base = write(data)
    for at in (0, n // 2, n - 1):
        changed = bytearray(data)
        changed[at] ^= 0xFF
        assert write(changed) != base, at
    assert write(data) == base
    changed = bytearray(data)
    changed[4 * SLICE] ^= 0xFF  # between the slices: not sampled (the cost of not reading the weights)
    assert write(changed) == base


def test_a_pickled_weight_file_is_sampled_not_timed(tmp_path):
    """.bin / .pt have no index of their tensors: evenly spaced blocks of the file, and its size."""
    import os
    import random

    f = tmp_path / "pytorch_model.bin"
    data = random.Random(0).randbytes(1 << 20)
    f.write_bytes(data)
    base = model_fingerprint(tmp_path)
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))  # touched: the same model
    assert model_fingerprint(tmp_path) == base
    f.write_bytes(bytes(b ^ 0x01 for b in data))  # other weights, same size
    assert model_fingerprint(tmp_path) != base


def test_a_checkpoint_with_the_retired_mtime_fingerprint_still_resumes(tmp_path):
    """Checkpoints written before the content fingerprint hold model.files_sha256 (it hashed mtimes)
    and no model.content_sha256: a resume after the upgrade is not refused for the format change;
    the new field is compared from the checkpoints that have it."""
    from pipeline.engine.checkpoint import CheckpointError, check_compatible

    common = {"model": "pretrained:/m:base", "seed": 0, "step": 2, "tag": "step_00000002"}
    old = {**common, "model.files_sha256": "0123456789abcdef"}
    check_compatible(old, {**common, "model.content_sha256": "fedcba9876543210"}, tmp_path)
    new = {**common, "model.content_sha256": "fedcba9876543210"}
    check_compatible(new, new, tmp_path)
    with pytest.raises(CheckpointError, match=r"model.content_sha256: checkpoint='fedcba9876543210' now='0000"):
        check_compatible(new, {**common, "model.content_sha256": "0000000000000000"}, tmp_path)
