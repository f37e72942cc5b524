"""What a job tells its user: a short summary on stdout at the end of a train or eval job (also when
a finished run is reused), one log line on what trains (method, tau, teacher, weights, lr, steps,
trainable set), and why forget_quality is null."""

import json

from pipeline.eval.report import run_summary
from tests.helpers import launch
from tests.helpers.tiny import build, train_overrides


def _tofu(fq, tr_key="answer"):
    return {"method": "asu_kl", "tau": 2.0, "steps": 4, "forget_split": "forget",
            "evaluation": {"truth_ratio_key": {"forget": tr_key}, "retain_reference": {"source": None}},
            "metrics": {"forget_quality": fq, "model_utility": 0.5, "forget_fact_recall": 0.25,
                        "retain_fact_recall": 1.0, "forget_rouge_l": 0.3, "retain_rouge_l": 0.9,
                        "forget_entropy": 2.0}}


def test_the_summary_names_files_settings_and_headline_metrics(tmp_path):
    (tmp_path / "report.md").write_text("#")
    text = run_summary(_tofu(None), tmp_path)
    lines = text.splitlines()
    assert len(lines) == 5 and lines[0] == f"run: {tmp_path}"
    assert lines[1] == f"results: {tmp_path / 'results.json'}; report: {tmp_path / 'report.md'}"
    assert lines[2] == "method asu_kl, tau 2.000, 4 steps"
    assert "forget_fact_recall 0.2500" in lines[3] and "model_utility 0.5000" in lines[3]
    assert "forget_entropy" not in text  # headline metrics only
    assert lines[4] == "forget_quality: null (no eval.retain_model or eval.retain_reference)"
    assert "forget_quality: null (split 'forget' has no truth ratios)" in run_summary(_tofu(None, None), tmp_path)
    assert "forget_quality: 0.0123" in run_summary(_tofu(0.0123), tmp_path, reused=True)
    assert "(finished already: its results reused)" in run_summary(_tofu(0.0123), tmp_path, reused=True)
    wmdp = run_summary({"method": "asu_wmdp", "tau": 2.0, "metrics": {"wmdp_bio_accuracy": 0.25}}, tmp_path)
    assert "wmdp_bio_accuracy 0.2500" in wmdp and "forget_quality" not in wmdp
    assert "metrics: none (eval.enabled=false)" in run_summary({"method": "rmu", "tau": None, "metrics": {}}, tmp_path)


def test_train_and_eval_print_a_summary_and_the_log_says_what_trains(tmp_path):
    """Before, stdout stayed empty after a train or eval job, a fixed tau, the teacher and the trainable
    set were never logged, and forget_quality: null came without a word when no retain model was set."""
    model_dir, data_dir = build(tmp_path)
    args = train_overrides(model_dir, data_dir, tmp_path / "runs", "asu", steps=2) + [
        "method=asu_kl", "method.tau=2.0", "trainer.save_every=2", "eval.probe_rows=0"]
    run = tmp_path / "runs" / "asu"
    tr = launch.run(args)
    assert tr.returncode == 0, tr.stderr[-3000:]
    out = tr.stdout.splitlines()
    assert out[0] == f"run: {run}" and out[1] == f"results: {run / 'results.json'}; report: {run / 'report.md'}"
    assert out[2] == "method asu_kl, tau 2.000, 2 steps"
    assert out[3].startswith("metrics: forget_fact_recall ") and "model_utility" in out[3]
    assert out[4] == "forget_quality: null (no eval.retain_model or eval.retain_reference)"
    assert json.loads((run / "results.json").read_text())["metrics"]["forget_quality"] is None
    # one line before training says what trains; the null forget quality is explained once
    assert tr.stderr.count("method asu_kl: tau=2.0, teacher_layers=all, teacher live, gamma=0.1, alpha=1.0; "
                           "lr 0.001, 2 steps; trainable: ") == 1, tr.stderr[-3000:]
    assert "params (all)" in tr.stderr
    assert tr.stderr.count("metric forget_quality skipped: no retain-model reference") == 1
    assert (run / "config.yaml").exists()

    again = launch.run(args)  # finished: its results reused, and said so on stdout
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.splitlines()[0] == f"run: {run} (finished already: its results reused)"
    assert "forget_quality: null" in again.stdout

    exported = [a for a in train_overrides(run / "model", data_dir, tmp_path / "runs", "asu_eval")
                if not a.startswith("trainer.")]
    ev = launch.run(exported, script="launchers/eval.py")
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert ev.stdout.splitlines()[0] == f"run: {tmp_path / 'runs' / 'asu_eval'}"
    assert "metrics: forget_fact_recall" in ev.stdout and "forget_quality: null" in ev.stdout


def test_the_log_names_the_layers_rmu_trains(tmp_path):
    model_dir, data_dir = build(tmp_path)
    args = train_overrides(model_dir, data_dir, tmp_path / "runs", "rmu", steps=1) + [
        "method=rmu", "method.layer=1", "eval.enabled=false"]
    tr = launch.run(args)
    assert tr.returncode == 0, tr.stderr[-3000:]
    assert tr.stderr.count("method rmu: layer=1, gamma=1.0, alpha=1200.0; lr 0.001, 1 step; trainable: ") == 1
    assert "params (mlp.down_proj of layers 0,1)" in tr.stderr and "tau=" not in tr.stderr
    assert "metrics: none (eval.enabled=false)" in tr.stdout and "method rmu" in tr.stdout
