"""Continual unlearning: the synthetic request splits, the sequence logic, and a 2-request run end to end."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from pipeline.data.synthetic import (
    CONTINUAL_PARTS,
    CONTINUAL_RETAIN_OF,
    SyntheticConfig,
    build_benchmark,
    continual_authors,
    forget_authors,
)
from tests.helpers.launch import run

SMALL = SyntheticConfig(seed=3, n_authors=20, qa_per_author=4, n_world_facts=4, n_real_authors=2,
                        preamble_len=4, n_preambles=2)


@pytest.mark.parametrize("n_authors", [20, 50, 100])
def test_continual_parts_are_disjoint_halves_of_forget10(n_authors):
    cfg = SyntheticConfig(n_authors=n_authors)
    parts = continual_authors(cfg)
    whole = forget_authors(cfg)["forget10"]
    p1, p2 = parts["forget10_part1"], parts["forget10_part2"]
    assert p1 and p2 and not set(p1) & set(p2)
    assert p1 + p2 == whole and len(p1) - len(p2) in (0, 1)
    splits = build_benchmark(cfg)
    for part, rsplit in CONTINUAL_RETAIN_OF.items():
        assert rsplit == "retain90"
        assert {r["author"] for r in splits[part]} == set(parts[part])
        assert not {r["question"] for r in splits[part]} & {r["question"] for r in splits[rsplit]}
    assert splits["forget10_part1"] + splits["forget10_part2"] == splits["forget10"]


def test_existing_splits_unchanged_by_the_continual_parts():
    splits = build_benchmark(SMALL)
    assert set(CONTINUAL_PARTS) <= set(splits)
    # forget10 = the last 2 of 20 authors; the parts hold one each
    assert [len({r["author"] for r in splits[p]}) for p in CONTINUAL_PARTS] == [1, 1]
    assert len(splits["forget10"]) + len(splits["retain90"]) == len(splits["full"])


def _cfg(**over):
    from hydra import compose, initialize_config_dir

    from pipeline.config import register_configs

    register_configs()
    args = [f"{k}={v}" for k, v in over.items()]
    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return compose("config", overrides=["+exp=tofu_tiny", *args])


def test_request_checks_and_eval_splits():
    from pipeline.config import ConfigError
    from pipeline.continual import check_requests, eval_splits

    with pytest.raises(ConfigError, match="continual.requests"):
        check_requests(_cfg())
    with pytest.raises(ConfigError, match="repeated"):
        check_requests(_cfg(**{"continual.requests": "[forget10_part1,forget10_part1]"}))
    with pytest.raises(ConfigError, match="retain split"):
        check_requests(_cfg(**{"continual.requests": "[forget10_part1,retain90]"}))
    with pytest.raises(ConfigError, match="trainer.export"):
        check_requests(_cfg(**{"continual.requests": "[forget10_part1]", "trainer.export": "false"}))
    cfg = _cfg(**{"continual.requests": "[forget10_part1,forget10_part2]"})
    reqs = check_requests(cfg)
    # the config's own forget split (forget10) is replaced by the requests
    assert eval_splits(cfg, reqs) == ["forget10_part1", "forget10_part2", "retain90", "real_authors", "world_facts"]
    cfg = _cfg(**{"continual.requests": "[forget10_part1]", "continual.eval_splits": "[forget10_part1]"})
    assert eval_splits(cfg, ["forget10_part1"]) == ["forget10_part1", "retain90"]


def test_request_config_starts_from_the_given_model(tmp_path):
    from pipeline.continual import request_config

    cfg = _cfg(**{"continual.requests": "[forget10_part1,forget10_part2]", "run_name": "c"})
    base = {"model.path": "/m0", "model.tokenizer_path": "/tok", "data": {"name": "json", "path": "/d"},
            "retain_model": "/retain"}
    c = request_config(cfg, base, 1, "forget10_part2", "/prev/model", ["forget10_part1", "forget10_part2", "retain90"])
    assert (c.model.source, c.model.path, c.model.tokenizer_path) == ("pretrained", "/prev/model", None)
    assert (c.data.name, c.data.path, c.data.forget_split, c.data.retain_split) == ("json", "/d", "forget10_part2",
                                                                                    "retain90")
    assert list(c.data.eval_splits) == ["forget10_part1", "forget10_part2", "retain90"]
    assert c.eval.retain_model == "/retain" and c.run_name == "c/r2_forget10_part2"
    assert list(c.continual.requests) == [] and OmegaConf.get_type(c.trainer).__name__ == "TrainerConfig"
    c0 = request_config(cfg, base, 0, "forget10_part1", "/m0", ["forget10_part1"])
    assert (c0.model.path, c0.model.tokenizer_path) == ("/m0", "/tok")


def test_default_run_name():
    from pipeline.continual import default_run_name

    default = "run_name=${exp_name}/continual_${method.name}"
    assert default_run_name(["x.py", "a=1"]) == ["x.py", default, "a=1"]
    assert default_run_name(["x.py", "run_name=foo"]) == ["x.py", "run_name=foo"]
    # among the overrides, wherever Hydra's flags are (first, "--cfg job a=1" split the overrides for
    # argparse; last, "a=1 --cfg job" and "--info" took it as a flag's value); none in a sweep, whose
    # jobs' directories are the sweep's (it joined every job's name, with a '/')
    assert default_run_name(["x.py", "--cfg", "job", "a=1"]) == ["x.py", "--cfg", "job", default, "a=1"]
    assert default_run_name(["x.py", "a=1", "--cfg", "job"]) == ["x.py", default, "a=1", "--cfg", "job"]
    assert default_run_name(["x.py", "--info"]) == ["x.py", default, "--info"]
    assert default_run_name(["x.py", "-m", "a=1,2"]) == ["x.py", "-m", "a=1,2"]


# A minuscule synthetic benchmark (20 authors -> forget10 = 2 authors, one per request) and model.
TINY = [
    "data.synthetic.n_authors=20", "data.synthetic.qa_per_author=2", "data.synthetic.n_world_facts=2",
    "data.synthetic.n_real_authors=1", "data.synthetic.preamble_len=2", "data.synthetic.n_preambles=1",
    "model.tiny.hidden_size=16", "model.tiny.num_hidden_layers=1", "model.tiny.num_attention_heads=2",
    "model.tiny.num_key_value_heads=2", "model.tiny.intermediate_size=32", "model.tiny.steps=5",
    "model.tiny.batch_size=8", "model.tiny.warmup=1",
    "trainer.max_steps=2", "trainer.batch_size=1", "trainer.retain_batch_size=1", "logging=none",
    "eval.max_new_tokens=8",
]


@pytest.mark.distributed
def test_continual_two_requests_end_to_end(tmp_path):
    t0 = time.time()
    args = ["+exp=tofu_tiny", "continual.requests=[forget10_part1,forget10_part2]", *TINY,
            f"output_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}", "run_name=seq"]
    p = run(args, script="launchers/continual.py", timeout=240)
    assert p.returncode == 0, p.stderr[-4000:]
    root = tmp_path / "runs" / "seq"
    out = json.loads((root / "continual.json").read_text())
    assert out["requests"] == ["forget10_part1", "forget10_part2"] and out["retain_split"] == "retain90"
    rows = out["rows"]
    assert [r["request"] for r in rows] == [0, 1, 2]  # 0 = the starting model, evaluated before any request
    assert [r["forget_split"] for r in rows] == [None, "forget10_part1", "forget10_part2"]
    for r in rows:
        assert set(r["forget"]) == {"forget10_part1", "forget10_part2"}
        for e in r["forget"].values():
            assert {"requested", "fact_recall", "rouge_l", "truth_ratio", "forget_quality"} <= set(e)
            assert e["forget_quality"] is not None  # the retain model's references were cached by the requests
        assert {"retain_fact_recall", "model_utility"} <= set(r["retain"])
    assert [rows[k]["forget"]["forget10_part2"]["requested"] for k in range(3)] == [False, False, True]
    assert rows[1]["forget"]["forget10_part1"]["requested"] and "forget_fact_recall" in rows[1]["metrics"]
    # request 2 started from request 1's exported model; request 1 from the benchmark's target model
    r1, r2 = root / "r1_forget10_part1", root / "r2_forget10_part2"
    assert rows[2]["init_model"] == rows[1]["model"] == str(r1 / "model")
    assert Path(rows[1]["init_model"]).name == "target"
    c2 = yaml.safe_load((r2 / "config.yaml").read_text())
    assert c2["model"]["path"] == str(r1 / "model") and c2["data"]["forget_split"] == "forget10_part2"
    assert (r2 / "model" / "model.safetensors").exists() and (r2 / "results.json").exists()
    md = (root / "continual.md").read_text()
    assert "forget10_part1" in md and md.count("\n| 2 |") == 2 and "requests done" not in md
    # the starting model's row: labelled and filled as in the stdout summary (its forget set is request 1's)
    row0 = next(line for line in md.splitlines() if line.startswith("| 0 | forget10_part1 (starting model) | "))
    from pipeline.continual import _fmt

    assert row0.split(" | ")[2:4] == [_fmt(rows[0]["metrics"][k]) for k in ("forget_fact_recall", "forget_quality")]
    assert json.loads((root / "continual.json").read_text())["requests_done"] == 2
    # a sequence stopped after request 1 (its table is rewritten after every request) says so
    from pipeline.continual import render_md

    partial = render_md(rows[:2], ["forget10_part1", "forget10_part2"])
    assert "**1 of 2 requests done**: the sequence is running or stopped" in partial and "\n| 2 |" not in partial
    # one summary of the whole sequence after the last step: stdout (after each job's own) and a JSON
    from pipeline.eval.report import headline_keys

    summary = json.loads((root / "continual_summary.json").read_text())
    assert [(s["step"], s["forget_split"], s["reused"], s["steps"]) for s in summary["rows"]] == [
        (0, None, False, None), (1, "forget10_part1", False, 2), (2, "forget10_part2", False, 2)]
    assert summary["rows"][2]["run_dir"] == str(r2) and summary["rows"][2]["results"] == str(r2 / "results.json")
    assert list(summary["rows"][2]["metrics"]) == headline_keys(rows[2]["metrics"]) + ["forget_quality"]
    text = p.stdout[p.stdout.index("continual run: "):]
    assert [line.split()[:3] for line in text.splitlines()[4:6]] == [["1", "forget10_part1", "2"],
                                                                     ["2", "forget10_part2", "2"]]
    assert "r2_forget10_part2" in text and str(root / "continual_summary.json") in text
    # re-running the same command finds every step finished and only rebuilds the summary
    p = run(args, script="launchers/continual.py", timeout=120)
    assert p.returncode == 0, p.stderr[-4000:]
    assert p.stderr.count("already finished") == 2
    summary = json.loads((root / "continual_summary.json").read_text())
    assert [s["reused"] for s in summary["rows"]] == [True, True, True]
    assert p.stdout.startswith("continual run: ") and p.stdout.count(" reused ") == 3, p.stdout
    assert time.time() - t0 < 150
    # a second launch while one runs the sequence (its lock held here, as that launch holds it): refused
    # before Hydra rewrites the sequence's .hydra/ (before: it re-evaluated the starting model into the
    # same r0_initial/ and was refused only at request 1's own directory)
    from pipeline.engine.run_lock import run_dir_lock

    hydra_record = {f.name: f.read_bytes() for f in (root / ".hydra").iterdir()}
    with run_dir_lock(root):
        busy = run(args + ["trainer.lr=5e-4"], script="launchers/continual.py", timeout=120)
    assert busy.returncode == 2 and "error (RunDirInUseError, rank 0): run directory " in busy.stderr, \
        busy.stderr[-2000:]
    assert {f.name: f.read_bytes() for f in (root / ".hydra").iterdir()} == hydra_record
    # a request name that is no split: one line before anything is written (before: the whole
    # benchmark was copied into the run directory, and the error named that copy)
    typo = [a for a in args if not a.startswith(("continual.requests=", "run_name="))] + [
        "continual.requests=[forget10_part1,forget10_typo]", "run_name=typo"]
    bad = run(typo, script="launchers/continual.py", timeout=120)
    assert bad.returncode == 2 and "['forget10_typo'] is not a split of the embedded benchmark" in bad.stderr, \
        bad.stderr[-2000:]
    assert not (tmp_path / "runs" / "typo" / "data").exists()


def test_a_step_is_finished_only_with_the_same_settings_and_starting_model(tmp_path):
    """A step's record holds its configuration's and starting model's digest: other settings, a
    starting model that changed (an earlier step ran again) or trainer.resume=never run it again.
    Before, the request and the starting model's *path* were compared: a re-run with another lr
    reported the old runs as finished, and later steps kept models trained from a replaced one."""
    from omegaconf import OmegaConf

    from pipeline.continual import STEP_FILE, _earlier_record, _finished, step_record
    from tests.helpers.tiny import build

    model = build(tmp_path / "m")[0]
    cfg = OmegaConf.create({"trainer": {"lr": 1e-3, "resume": "auto"}, "output_dir": "a"})
    rec = step_record("f1", str(model), cfg)
    step = tmp_path / "r1_f1"
    (step / "model").mkdir(parents=True)
    (step / "model" / "config.json").write_text("{}")
    (step / STEP_FILE).write_text(json.dumps(rec))
    assert _finished(step, _earlier_record(step), rec, need_model=True, resume="auto")
    assert step_record("f1", str(model), OmegaConf.create({**cfg, "output_dir": "b"})) == rec  # not a result
    assert step_record("f1", str(model), OmegaConf.create({**cfg, "trainer": {"lr": 5e-3, "resume": "auto"}})) != rec
    assert not _finished(step, _earlier_record(step), rec, need_model=True, resume="never")
    (model / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes() + b" ")  # retrained
    assert step_record("f1", str(model), cfg) != rec


def test_the_step_record_separates_training_inputs_from_evaluation_settings(tmp_path):
    """An added request or another evaluation setting keeps the train_key (the step's checkpoints
    stay valid: it re-evaluates); another lr or starting model changes it, and the step then trains
    from the start. Before, such a step resumed its old checkpoint (a replaced starting model: stale
    weights reported as new) or stopped on the checkpoint's other lr (exit 2, its results set aside)."""
    from omegaconf import OmegaConf

    from pipeline.continual import (
        STEP_FILE,
        _earlier_record,
        _finished,
        _trained_with_other_inputs,
        step_record,
    )
    from tests.helpers.tiny import build

    model = build(tmp_path / "m")[0]
    cfg = OmegaConf.create({"trainer": {"lr": 1e-3}, "data": {"eval_splits": ["a"]}, "eval": {"max_new_tokens": 8}})
    rec = step_record("f1", str(model), cfg)
    step = tmp_path / "r1_f1"
    step.mkdir()
    (step / STEP_FILE).write_text(json.dumps(rec))
    for change in ({"data": {"eval_splits": ["a", "b"]}}, {"eval": {"max_new_tokens": 6}}):
        other = step_record("f1", str(model), OmegaConf.merge(cfg, change))
        assert other["key"] != rec["key"] and other["train_key"] == rec["train_key"], change
        assert not _trained_with_other_inputs(_earlier_record(step), other)
    other_lr = step_record("f1", str(model), OmegaConf.merge(cfg, {"trainer": {"lr": 5e-3}}))
    assert _trained_with_other_inputs(_earlier_record(step), other_lr)
    # the starting model's evaluation (r0_initial) depends on no training setting: another lr or method
    # setting re-evaluated it unchanged; an evaluation setting still does
    initial = step_record("initial", str(model), cfg, evaluation_only=True)
    for change, same in (({"trainer": {"lr": 5e-3}}, True), ({"method": {"tau": 3.0}}, True),
                         ({"eval": {"max_new_tokens": 6}}, False)):
        other = step_record("initial", str(model), OmegaConf.merge(cfg, change), evaluation_only=True)
        assert (other["key"] == initial["key"]) is same, change
    (model / "config.json").write_text((model / "config.json").read_text() + " ")  # another starting model
    assert _trained_with_other_inputs(_earlier_record(step), step_record("f1", str(model), cfg))
    # a marker from before train_key was kept still counts as this step, finished
    (step / "model").mkdir()
    (step / "model" / "config.json").write_text("{}")
    (step / STEP_FILE).write_text(json.dumps({k: v for k, v in rec.items() if k != "train_key"}))
    earlier = _earlier_record(step)
    assert _finished(step, earlier, rec, need_model=True, resume="auto") and not _trained_with_other_inputs(earlier, rec)


@pytest.mark.distributed
def test_another_lr_in_a_checkpointed_sequence_trains_the_step_again(tmp_path):
    args = ["+exp=tofu_tiny", "continual.requests=[forget10_part1]", "continual.eval_initial=false", *TINY,
            "trainer.save_every=1", f"output_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}", "run_name=seq"]
    first = run(args, script="launchers/continual.py", timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    # the new lr's first attempt stops before its first checkpoint (a NaN loss at step 1: nan_policy=stop);
    # the re-run must still train from the start: before, it resumed the old lr's checkpoint (refused, exit 2)
    stopped = run(args + ["trainer.lr=5e-4"], script="launchers/continual.py", timeout=240, ASU_INJECT="nan_loss@1")
    assert stopped.returncode != 0 and "non-finite" in stopped.stderr.lower(), stopped.stderr[-3000:]
    assert ("its training settings, forget / retain rows or starting model changed since it ran: training it from the start"
            in stopped.stderr)
    assert not (tmp_path / "runs" / "seq" / "r1_forget10_part1" / "checkpoints").exists()
    again = run(args + ["trainer.lr=5e-4"], script="launchers/continual.py", timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]  # was: CheckpointError (the checkpoint's other lr), exit 2
    assert "trained 2 steps" in again.stderr and "resumed from" not in again.stderr
    step = tmp_path / "runs" / "seq" / "r1_forget10_part1"
    assert yaml.safe_load((step / "config.yaml").read_text())["trainer"]["lr"] == 5e-4
    assert json.loads((step / "results.json").read_text())["steps"] == 2


def test_the_sequence_summary_shows_each_step_with_run_summarys_headline_metrics(tmp_path):
    """After the last request one table of every step (forget split, steps trained or "reused", the
    headline metrics a job's own stdout summary picks, its run directory) goes to stdout and
    ``continual_summary.json``. Before, only each job's own summary was printed (none at all when
    every step was found finished) and nothing gathered them."""
    from pipeline.continual import SUMMARY_FILE, render_sequence_summary, sequence_summary
    from pipeline.eval.report import run_summary

    metrics = {"forget_fact_recall": 0.25, "forget_entropy": 3.5, "model_utility": 0.5, "wmdp_bio_accuracy": 0.3,
               "forget_quality": None}
    rows = [{"request": 0, "forget_split": None, "run_dir": str(tmp_path / "r0_initial"), "steps": None,
             "metrics": dict(metrics)},
            {"request": 1, "forget_split": "f1", "run_dir": str(tmp_path / "r1_f1"), "steps": 3, "metrics": dict(metrics)},
            {"request": 2, "forget_split": "f2", "run_dir": str(tmp_path / "r2_f2"), "steps": 3,
             "resumed_from": {"checkpoint": "step_00000002", "step": 2, "kernels": None},
             "metrics": {**metrics, "forget_fact_recall": 0.125}}]
    (tmp_path / "r2_f2").mkdir()
    (tmp_path / "r2_f2" / "report.md").write_text("#")
    summary = sequence_summary(rows, {str(tmp_path / "r1_f1")}, tmp_path)
    assert summary["requests"] == ["f1", "f2"]
    assert [(r["step"], r["forget_split"], r["reused"], r["steps"]) for r in summary["rows"]] == [
        (0, None, False, None), (1, "f1", True, 3), (2, "f2", False, 3)]
    last = summary["rows"][2]
    assert (last["results"], last["report"]) == (str(tmp_path / "r2_f2" / "results.json"),
                                                 str(tmp_path / "r2_f2" / "report.md"))
    # the metrics run_summary's "metrics:" line shows, then forget quality (its own line there)
    shown = run_summary({"metrics": metrics}, tmp_path).split("metrics: ")[1].splitlines()[0]
    assert [kv.split()[0] for kv in shown.split("; ")] == list(last["metrics"])[:-1] == [
        "forget_fact_recall", "model_utility", "wmdp_bio_accuracy"]
    assert list(last["metrics"])[-1] == "forget_quality" and last["metrics"]["forget_quality"] is None
    text = render_sequence_summary(summary)
    lines = text.splitlines()
    assert lines[0] == f"continual run: {tmp_path} (2 requests: f1, f2)"
    assert lines[1].split() == ["step", "forget", "set", "trained", "forget_fact_recall", "model_utility",
                                "wmdp_bio_accuracy", "forget_quality", "run", "dir"]
    # the starting model's forget_* metrics are on request 1's forget split, and its row says so
    assert lines[3].split() == ["0", "f1", "(starting", "model)", "evaluated", "0.2500", "0.5000", "0.3000", "-",
                                "r0_initial"]
    assert lines[4].split() == ["1", "f1", "reused", "0.2500", "0.5000", "0.3000", "-", "r1_f1"]
    # a step that continued from its checkpoint says so (it read "3 steps" as if trained in one go)
    assert lines[5].split() == ["2", "f2", "3", "steps", "(resumed", "at", "step", "2)", "0.1250", "0.5000",
                                "0.3000", "-", "r2_f2"]
    assert summary["rows"][2]["resumed_from"]["step"] == 2 and summary["rows"][1]["resumed_from"] is None
    assert "forget_entropy" not in text and str(tmp_path / SUMMARY_FILE) in text and "results.json" in text
