"""A hub model pinned with ``model.revision`` is read at that snapshot everywhere: its weights, its
tokenizer (and chat template), its evaluation copy and its context length. Before, only the preflight
and the training model followed the revision: with only the pinned snapshot downloaded (offline) the
tokenizer failed to load after the data, and online it came from main."""

from __future__ import annotations

import json
import shutil

from tests.helpers.launch import run
from tests.helpers.tiny import build, train_overrides

SNAPSHOT = "c" * 40


def _pinned_hub_cache(tmp_path):
    """A hub cache holding ``org/tiny`` only as its pinned download leaves it: refs/v1, no refs/main."""
    model_dir, data_dir = build(tmp_path / "src")
    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(model_dir, repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir()
    (repo / "refs" / "v1").write_text(SNAPSHOT)
    return data_dir


def test_a_pinned_hub_model_trains_and_evaluates_at_its_revision(tmp_path):
    data_dir = _pinned_hub_cache(tmp_path)
    hub = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    args = [a for a in train_overrides(tmp_path / "src" / "model", data_dir, tmp_path / "runs", "r", steps=1)
            if not a.startswith("model.path=")]
    pinned = ["model.path=org/tiny", "model.revision=v1", "data.max_length=128"]
    done = run(args + pinned + ["method=grad_diff"], timeout=240, **hub)
    assert done.returncode == 0, done.stderr[-3000:]
    # the context comes from the pinned snapshot's config.json (64 positions), not only a local directory's
    assert "data.max_length=128 exceeds the model's context (64 tokens)" in done.stderr
    results = json.loads((tmp_path / "runs" / "r" / "results.json").read_text())
    assert results["steps"] == 1
    # an evaluation-only job scores the pinned hub model itself
    evaluated = run(args + pinned + ["run_name=e", "eval.max_length=100"], script="launchers/eval.py", timeout=240,
                    **hub)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "evaluation model org/tiny" in evaluated.stderr
    # evaluation is capped at the context too (positions past 64 are out of the model's range)
    assert "eval.max_length=100 exceeds the model's context (64 tokens)" in evaluated.stderr
    evaluation = json.loads((tmp_path / "runs" / "e" / "results.json").read_text())["evaluation"]
    assert evaluation["max_length"] == 64


def test_a_hub_model_with_pickled_weights_only_names_our_setting(tmp_path):
    """transformers' refusal named its own use_safetensors argument, which the user never set."""
    import os
    import subprocess
    import sys

    _pinned_hub_cache(tmp_path)
    snap = tmp_path / "hub" / "models--org--tiny" / "snapshots" / SNAPSHOT
    code = ("import torch, safetensors.torch as st, sys; d = sys.argv[1]; "
            "torch.save(st.load_file(d + '/model.safetensors'), d + '/pytorch_model.bin')")
    subprocess.run([sys.executable, "-c", code, str(snap)], check=True)
    (snap / "model.safetensors").unlink()
    probe = ("from pipeline.models.loading import load_causal_lm, ModelLoadError\n"
             "try:\n    load_causal_lm('org/tiny', revision='v1')\nexcept ModelLoadError as e:\n    print(e)\n"
             "load_causal_lm('org/tiny', revision='v1', allow_pickle=True)\nprint('loaded with allow_pickle')\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    first, second = out.stdout.strip().splitlines()[-2:]
    assert "model.allow_pickle=true" in first and "use_safetensors" not in first
    assert second == "loaded with allow_pickle"


def test_a_cached_hub_model_without_weights_is_not_told_to_allow_pickles(tmp_path):
    """A snapshot with config.json only (a download cut short) got the allow_pickle hint, then another error."""
    import os
    import subprocess
    import sys

    _pinned_hub_cache(tmp_path)
    snap = tmp_path / "hub" / "models--org--tiny" / "snapshots" / SNAPSHOT
    (snap / "model.safetensors").unlink()
    probe = ("from pipeline.models.loading import load_causal_lm, ModelLoadError\n"
             "try:\n    load_causal_lm('org/tiny', revision='v1')\nexcept ModelLoadError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    line = out.stdout.strip().splitlines()[-1]
    assert "no other weight files in the hub cache" in line and "allow_pickle" not in line, out.stdout + out.stderr


def test_a_cached_hub_model_without_usable_weights_is_refused_by_the_dry_run_as_by_the_launch(tmp_path):
    """A dry run of a cached hub id read only its config.json: a snapshot without weights, or with pickled
    ones only, passed it (exit 0) and the launch stopped on it once the model loaded. Now both stop
    before anything loads, naming the hub id and our setting."""
    import subprocess
    import sys

    data_dir = _pinned_hub_cache(tmp_path)
    snap = tmp_path / "hub" / "models--org--tiny" / "snapshots" / SNAPSHOT
    hub = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    args = [a for a in train_overrides(tmp_path / "src" / "model", data_dir, tmp_path / "runs", "r", steps=1)
            if not a.startswith("model.path=")] + ["model.path=org/tiny", "model.revision=v1"]
    code = ("import torch, safetensors.torch as st, sys; d = sys.argv[1]; "
            "torch.save(st.load_file(d + '/model.safetensors'), d + '/pytorch_model.bin')")
    subprocess.run([sys.executable, "-c", code, str(snap)], check=True)
    (snap / "model.safetensors").unlink()
    what = "error (ModelLoadError, rank 0): model.path=org/tiny (its snapshot in the hub cache at revision v1) has "
    for extra in (["trainer.dry_run=true"], []):
        out = run(args + extra, timeout=240, **hub)
        last = out.stderr.strip().splitlines()[-1]
        assert out.returncode == 2 and last.startswith(what + "only pickle weights (.bin/.pt)"), out.stderr[-2000:]
        assert "model.allow_pickle=true" in last and not (tmp_path / "runs" / "r").exists()
    (snap / "pytorch_model.bin").unlink()  # config.json and tokenizer only: a download cut short
    out = run(args + ["trainer.dry_run=true"], timeout=240, **hub)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == what + "no weights (*.safetensors)", \
        out.stderr[-2000:]


def test_an_online_run_leaves_a_cached_snapshots_files_to_the_hub(tmp_path, monkeypatch):
    """With the network allowed (ASU_ALLOW_NETWORK=1) the hub supplies what the cache lacks (safetensors
    beside a cached .bin, a newer main): only an offline run checks the cached snapshot's files."""
    from huggingface_hub import constants

    from pipeline.models.loading import cached_snapshot

    _pinned_hub_cache(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read at import: the env is too late
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    snap = tmp_path / "hub" / "models--org--tiny" / "snapshots" / SNAPSHOT
    assert cached_snapshot("org/tiny", "v1") == snap and cached_snapshot("org/other", "v1") is None
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert cached_snapshot("org/tiny", "v1") is None
