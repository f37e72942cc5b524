"""Resumable evaluation (pipeline/eval/parts.py) and the export an earlier attempt left.

A re-run of a finished (or preempted-during-evaluation) job evaluates only the splits still
missing, loads no model when none is, keeps the model/ exported from the same final checkpoint,
and ends with the same metrics; a part from another model, other rows or settings is not reused.
"""

import json
import logging
import math
import re
from pathlib import Path

import pytest

from pipeline.eval.parts import SplitParts
from pipeline.eval.tofu import SplitResult
from tests.helpers import launch
from tests.helpers.tiny import resumable_job

ROWS = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]


def _result() -> SplitResult:
    return SplitResult(name="forget", indices=[0, 1], answer_prob=[0.5, 0.25], truth_ratio=[float("nan"), 1.5],
                       generation=["x", "y"], skipped=["truth_ratio: no column"])


def test_a_stored_split_comes_back_equal_nan_included(tmp_path):
    parts = SplitParts(tmp_path, {"model": "m"})
    parts.store("tofu", "forget", ROWS, _result(), {"device": "cpu", "dtype": "float32"})
    again = SplitParts(tmp_path, {"model": "m"})
    got = again.cached("tofu", "forget", ROWS, SplitResult)
    assert got is not None and got.answer_prob == [0.5, 0.25] and math.isnan(got.truth_ratio[0])
    assert got.generation == ["x", "y"] and again.reused == ["forget"] and again.ran_on["device"] == "cpu"


def test_another_model_other_rows_a_damaged_file_or_resume_off_is_evaluated_again(tmp_path, caplog):
    SplitParts(tmp_path, {"model": "m"}).store("tofu", "forget", ROWS, _result(), {"device": "cpu"})
    with caplog.at_level(logging.INFO):
        assert SplitParts(tmp_path, {"model": "other"}).cached("tofu", "forget", ROWS, SplitResult) is None
        assert SplitParts(tmp_path, {"model": "m"}).cached("tofu", "forget", ROWS[:1], SplitResult) is None
    assert "differs from this evaluation in model: evaluating 'forget' again" in caplog.text
    assert "differs from this evaluation in rows: evaluating 'forget' again" in caplog.text
    assert SplitParts(tmp_path, {"model": "m"}, reuse=False).cached("tofu", "forget", ROWS, SplitResult) is None
    (tmp_path / "tofu_forget.json").write_text('{"key": ')  # a write cut short by hand (ours are atomic)
    with caplog.at_level(logging.WARNING):
        assert SplitParts(tmp_path, {"model": "m"}).cached("tofu", "forget", ROWS, SplitResult) is None
    assert "is unreadable (JSONDecodeError)" in caplog.text


@pytest.mark.distributed
def test_a_rerun_reuses_the_export_and_the_finished_splits_and_ends_with_the_same_metrics(tmp_path):
    args, run = resumable_job(tmp_path)

    def go(*extra):
        out = launch.run(args + list(extra))
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stderr, json.loads((run / "results.json").read_text())

    _, first = go()
    exported = json.loads((run / "exported_from.json").read_text())
    assert exported == {"checkpoint": "step_00000004", "step": 4, "save_id": exported["save_id"]}
    assert len(exported["save_id"]) == 32
    splits = sorted(first["evaluation"]["rows"])
    assert sorted(p.name for p in (run / "eval_parts").iterdir()) == [f"tofu_{s}.json" for s in splits]
    model_mtime = (run / "model" / "model.safetensors").stat().st_mtime_ns

    # as if stopped after its results, before it recorded itself finished (test_finished_run.py: with
    # the record, a re-run loads nothing at all)
    (run / "finished.json").unlink()
    log, again = go()  # the same command: nothing to train, nothing to export, nothing to evaluate
    assert "nothing to train: resumed at the last step (4/4)" in log and "not exported again" in log
    assert "evaluation model" not in log  # no model loaded at all
    assert (run / "model" / "model.safetensors").stat().st_mtime_ns == model_mtime
    assert sorted(again["evaluation"]["reused_splits"]) == splits and again["evaluation"]["device"] == "cpu"
    assert again["metrics"] == first["metrics"]

    (run / "eval_parts" / "tofu_retain.json").unlink()  # as if stopped while evaluating 'retain'
    (run / "finished.json").unlink()
    log, third = go()
    assert sorted(third["evaluation"]["reused_splits"]) == [s for s in splits if s != "retain"]
    assert "evaluation model" in log and third["metrics"] == first["metrics"]

    _, fourth = go("eval.resume=false")
    assert fourth["evaluation"]["reused_splits"] == [] and fourth["metrics"] == first["metrics"]


def test_a_run_trained_again_and_stopped_before_its_export_exports_the_new_weights(tmp_path):
    """Trained again in its directory (``trainer.resume=never``, as the "different configuration" error
    advises) and killed after its last checkpoint, before its export: the next launch resumed at the last
    step and kept the first training's model/ as "the export of checkpoint step_00000004" (the tag names
    the step only), evaluated it and recorded the run finished with the other lr's weights."""
    import hashlib

    args, run = resumable_job(tmp_path)
    args += ["eval.enabled=false"]

    def weights(d: Path) -> str:
        return hashlib.sha256((d / "model" / "model.safetensors").read_bytes()).hexdigest()

    out = launch.run(args)
    assert out.returncode == 0, out.stderr[-3000:]
    # the losses reach the log (train.log, the console), not only wandb: the mean of the steps since the last
    # line, at trainer.log_every (10) and at the last step
    assert re.search(r"step 4/4: loss [0-9.e-]+, forget_loss [0-9.e-]+, retain_loss [0-9.e-]+ \(mean of steps 1-4\), "
                     r"lr ", out.stderr), out.stderr[-2000:]
    first = weights(run)
    killed = launch.run(args + ["trainer.lr=5e-3", "trainer.resume=never"], ASU_INJECT="kill_after_save@4")
    assert killed.returncode != 0 and weights(run) == first  # the new step-4 checkpoint is there, model/ is old
    out = launch.run(args + ["trainer.lr=5e-3"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stderr and "not exported again" not in out.stderr
    fresh = launch.run(args + ["trainer.lr=5e-3", "run_name=fresh"])
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert weights(run) == weights(run.parent / "fresh") != first


def test_a_lora_runs_deleted_adapter_is_exported_again(tmp_path):
    """Only model/ was looked at: the re-run resumed at the last step, logged "not exported again" and
    recorded the run finished with results.json pointing at the missing adapter/."""
    import shutil

    args, run = resumable_job(tmp_path)
    args += ["eval.enabled=false", "model.peft.enabled=true"]
    assert launch.run(args).returncode == 0
    shutil.rmtree(run / "adapter")
    out = launch.run(args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "not exported again" not in out.stderr and (run / "adapter" / "adapter_config.json").is_file()


def test_privleaks_retrain_auc_does_not_invalidate_the_stored_splits(tmp_path):
    """eval.retrain_auc only enters the PrivLeak formula over the stored Min-K% scores: setting it once
    the retrain model's AUC is known (the documented MUSE workflow) reuses every evaluated split."""
    import os

    from hydra import compose, initialize_config_dir

    from pipeline.config import register_configs
    from pipeline.eval.parts import parts_key
    from pipeline.models.loading import load_tokenizer
    from tests.helpers.tiny import build

    model_dir = build(tmp_path)[0]
    tokenizer = load_tokenizer(model_dir)
    register_configs()
    conf = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
    keys = []
    for extra in ([], ["eval.retrain_auc=0.52"], ["eval.max_new_tokens=7"]):
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            cfg = compose("config", overrides=["data=muse_news", *extra])
        keys.append(parts_key(cfg, model_dir, tokenizer, "float32", 1, "answer", False))
    assert keys[0] == keys[1] and keys[0] != keys[2]


def test_stored_splits_belong_to_the_model_revision_and_the_tokenizer(tmp_path):
    """A split evaluated at one ``model.revision`` of a hub model, or with another tokenizer (its chat
    template: the prompt text), is not reused for another: before, the key held the model's default
    snapshot only, so a re-run at a new revision reported the old revision's numbers."""
    import os
    import shutil

    from hydra import compose, initialize_config_dir

    from pipeline.config import register_configs
    from pipeline.eval.parts import parts_key
    from pipeline.models.loading import load_tokenizer
    from tests.helpers.tiny import build

    model_dir = build(tmp_path)[0]
    other = tmp_path / "other_tokenizer"
    shutil.copytree(model_dir, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<|{{ m.role }}|> {{ m.content }}{% endfor %}"
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    register_configs()
    conf = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")

    def key(path, tokenizer_dir, *extra):
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            cfg = compose("config", overrides=["data=muse_news", f"model.path={path}", *extra])
        return parts_key(cfg, path, load_tokenizer(tokenizer_dir), "float32", 1, "answer", False)

    assert key(model_dir, model_dir) == key(model_dir, model_dir)
    assert key(model_dir, model_dir) != key(model_dir, other)
    # the evaluation model runs the configured attention backend (another kernel, other rounding)
    assert key(model_dir, model_dir) != key(model_dir, model_dir, "kernels.attention=torch")
    # a hub id (not cached here): the revision it is loaded at is part of its identity
    assert key("org/not-cached", model_dir, "model.revision=v1") != key("org/not-cached", model_dir,
                                                                        "model.revision=v2")
