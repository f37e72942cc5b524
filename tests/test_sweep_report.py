"""Sweep reports (pipeline/eval/sweep.py, launchers/report.py): table, Pareto plot, best setting."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.eval import sweep
from tests.helpers.tiny import build, train_overrides

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# tau -> (forget_quality, model_utility, forget_fact_recall); hand-made
POINTS = {
    "1.5": (1e-4, 0.62, 0.80),
    "2.0": (0.02, 0.585, 0.55),  # dominated by 3.5 (lower fact recall and higher utility)
    "2.5": (0.30, 0.58, 0.30),  # best forget quality above 0.95 x target 0.61, but below 0.95 x 0.62
    "3.0": (0.60, 0.40, 0.10),  # best forget quality overall, but utility collapsed
    "3.5": (0.10, 0.59, 0.35),
}


def _write_point(root: Path, tau: str, fq, mu, fr, hydra=True, results=True):
    d = root / f"method.tau={tau},trainer.max_steps=2"
    d.mkdir(parents=True)
    if hydra:
        (d / ".hydra").mkdir()
        (d / ".hydra" / "overrides.yaml").write_text(f"- method.tau={tau}\n- trainer.max_steps=2\n")
    if results:
        (d / "results.json").write_text(json.dumps({
            "schema": 1, "method": "asu_kl", "tau": float(tau),
            "metrics": {"forget_quality": fq, "model_utility": mu, "forget_fact_recall": fr,
                        "retain_fact_recall": 0.9, "forget_rouge_l": 0.5}}))
    return d


@pytest.fixture
def fake_sweep(tmp_path):
    root = tmp_path / "sweeps" / "exp"
    for tau, (fq, mu, fr) in POINTS.items():
        _write_point(root, tau, fq, mu, fr)
    _write_point(root, "4.0", 0, 0, 0, results=False)  # still running / killed
    bad = _write_point(root, "5.0", 0, 0, 0, results=False)  # failed job
    (bad / "train.log").write_text("[..][pipeline.run][INFO] - start\nTraceback (most recent call last):\n  boom\n")
    (root / ".submitit" / "123").mkdir(parents=True)  # ignored
    return root


def test_parse_rule_and_override_dirname():
    r = sweep.parse_rule(sweep.DEFAULT_RULE)
    assert (r.objective, r.direction, r.constraint, r.factor) == ("forget_quality", "up", "model_utility", 0.95)
    assert sweep.parse_rule("forget_fact_recall").direction == "down"  # METRIC_INFO: lower is better
    assert sweep.parse_rule("max:forget_fact_recall").direction == "up"
    # MUSE and WMDP metrics have their directions (before: every metric the table did not know was
    # maximised, so a rule on them chose the run that forgot least), and split names hold '-'
    assert sweep.parse_rule("verbmem_forget").direction == "down"
    assert sweep.parse_rule("knowmem_forget,knowmem_retain>=0.9").direction == "down"
    assert sweep.parse_rule("privleak").direction == "0" and sweep.parse_rule("zero:privleak").text == "zero:privleak"
    r = sweep.parse_rule("wmdp-bio_accuracy,mmlu_accuracy>=0.95")
    assert (r.objective, r.direction, r.constraint) == ("wmdp-bio_accuracy", "down", "mmlu_accuracy")
    with pytest.raises(ValueError, match="cannot parse rule"):
        sweep.parse_rule("utility >> 3")
    assert sweep.parse_override_dirname("method.tau=1.5,trainer.max_steps=2,data.eval_splits=[a,b]") == {
        "method.tau": "1.5", "trainer.max_steps": "2", "data.eval_splits": "[a,b]"}


def test_report_table_choice_png_and_partial(fake_sweep):
    rep = sweep.build_report(fake_sweep)
    assert rep["swept"] == ["method.tau"] and rep["fixed"] == {"trainer.max_steps": "2"}
    assert rep["counts"] == {"total": 7, "ok": 5, "missing": 1, "failed": 1}
    # no --target: reference utility = best point's 0.62; threshold 0.589 keeps 1.5 and 3.5;
    # the best forget quality among them is tau=3.5 (0.10)
    c = rep["chosen"]
    assert c["name"] == "method.tau=3.5,trainer.max_steps=2" and c["tau"] == 3.5
    assert c["reference_source"] == "best point of the sweep" and abs(c["threshold"] - 0.95 * 0.62) < 1e-12
    assert rep["x"] == "forget_fact_recall"
    # Pareto on (fact recall down, utility up): 2.0 is dominated by 3.5
    front = {n.split(",")[0] for n in rep["pareto_front"]}
    assert front == {"method.tau=1.5", "method.tau=3.5", "method.tau=2.5", "method.tau=3.0"}
    md = (fake_sweep / "report.md").read_text()
    assert "| method.tau |" in md and "forget_quality" in md and "model_utility" in md
    for tau in ["1.5", "2.0", "2.5", "3.0", "3.5", "4.0", "5.0"]:
        assert f"| {tau} |" in md
    assert "missing" in md and "failed" in md and "Traceback" in md and "(chosen)" in md
    assert "**Chosen: `method.tau=3.5`**" in md
    js = json.loads((fake_sweep / "report.json").read_text())
    status = {p["overrides"]["method.tau"]: p["status"] for p in js["points"]}
    assert status["4.0"] == "missing" and status["5.0"] == "failed" and status["2.5"] == "ok"
    png = (fake_sweep / "pareto.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 2000
    assert "method.tau" in rep["console"].splitlines()[0]
    assert not list(fake_sweep.glob(".*.tmp-*"))  # atomic writes left nothing behind


def test_target_reference_and_custom_rule(fake_sweep, tmp_path):
    target = tmp_path / "target.json"
    target.write_text(json.dumps({"schema": 1, "method": "target", "tau": None,
                                  "metrics": {"model_utility": 0.61, "forget_quality": 1e-6, "forget_fact_recall": 1.0}}))
    # 0.95 x 0.61 = 0.5795: now tau=2.5 (utility 0.58, fq 0.30) qualifies and wins
    rep = sweep.build_report(fake_sweep, target=target, out=tmp_path / "out")
    assert rep["chosen"]["name"].startswith("method.tau=2.5") and rep["chosen"]["reference_source"] == "target"
    assert (tmp_path / "out" / "pareto.png").read_bytes()[:8] == PNG_MAGIC
    # lowest fact recall with utility >= 0.5 x best: tau=3.0
    rep = sweep.build_report(fake_sweep, rule="forget_fact_recall,model_utility>=0.5", out=tmp_path / "o2")
    assert rep["chosen"]["name"].startswith("method.tau=3.0")
    # nothing qualifies: reported, not crashed
    rep = sweep.build_report(fake_sweep, rule="forget_quality,model_utility>=2", out=tmp_path / "o3")
    assert rep["chosen"]["name"] is None and "No setting chosen" in (tmp_path / "o3" / "report.md").read_text()


def test_points_or_a_target_evaluated_with_other_settings_are_named_in_the_notes(fake_sweep, tmp_path):
    """Points kept from an earlier launch after the config's eval.* changed (200 new tokens on 360 rows
    against 24 on 120) were compared as they were, and could be chosen, without a word."""
    def evaluation(d: Path, **record):
        r = json.loads((d / "results.json").read_text())
        r["evaluation"] = {"max_new_tokens": 24, "rows": {"forget": 40, "retain": 120}, "device": "cpu",
                           "reused_splits": [], **record}
        (d / "results.json").write_text(json.dumps(r))

    points = sorted(p for p in fake_sweep.iterdir() if (p / "results.json").exists())
    for d in points:
        evaluation(d, device="cuda:0" if "2.0" in d.name else "cpu")  # where it ran does not count
    assert sweep.build_report(fake_sweep)["chosen"]["notes"] == []
    evaluation(points[-1], max_new_tokens=200, rows={"forget": 40, "retain": 360})  # tau=3.5
    rep = sweep.build_report(fake_sweep)
    assert rep["chosen"]["notes"] == ["tau=3.5: evaluated with other settings than most points (max_new_tokens, "
                                      "rows.retain): the numbers may not compare"]
    assert "- tau=3.5: evaluated with other settings than most points" in (fake_sweep / "report.md").read_text()
    target = tmp_path / "target.json"
    target.write_text(json.dumps({"metrics": {"model_utility": 0.61}, "evaluation": {
        "max_new_tokens": 200, "rows": {"forget": 40, "retain": 360}}}))
    notes = sweep.build_report(fake_sweep, target=target, out=tmp_path / "o")["chosen"]["notes"]
    assert notes == ["tau=1.5, tau=2.0, tau=2.5, tau=3.0: evaluated with other settings than the target "
                     "(max_new_tokens, rows.retain): the numbers may not compare"]
    target.write_text(json.dumps({"metrics": {"model_utility": 0.61}, "evaluation": {"max_new_tokens": 48}}))
    notes = sweep.build_report(fake_sweep, target=target, out=tmp_path / "o")["chosen"]["notes"]
    assert notes[-1] == "the target was evaluated with other settings than the points (max_new_tokens, rows): " \
                        "its values may not compare"
    # what a swept key changes on purpose is no note: eval.<field> that field, data.* the rows
    ok = [p for p in sweep.gather(fake_sweep) if p.status == "ok"]
    (note,) = sweep.settings_notes(ok, None, ["method.tau", "eval.max_new_tokens"])
    assert note.startswith("tau=3.5,") and "than most points (rows.retain): the numbers may not compare" in note
    assert sweep.settings_notes(ok, None, ["method.tau", "eval.max_new_tokens", "data.forget_split"]) == []
    # a target that is no run's results.json is one error, not an AttributeError
    for bad in ({"metrics": None}, [1, 2]):
        target.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=r"--target .*target.json: not a run's results.json \(no 'metrics' object\)"):
            sweep.build_report(fake_sweep, target=target, out=tmp_path / "o")


def test_unevaluated_point_is_listed_not_chosen(fake_sweep):
    """A run with eval.enabled=false has a results.json with empty metrics: it is reported as
    completed but not evaluated, and cannot be chosen."""
    d = _write_point(fake_sweep, "6.0", 0, 0, 0, results=False)
    (d / "results.json").write_text(json.dumps({"schema": 1, "method": "asu_kl", "tau": 6.0, "metrics": {}}))
    rep = sweep.build_report(fake_sweep)
    assert rep["counts"]["ok"] == 6 and rep["chosen"]["tau"] == 3.5
    assert "| 6.0 |" in (fake_sweep / "report.md").read_text()
    assert "ok (not evaluated)" in (fake_sweep / "report.md").read_text()
    assert "method.tau=6.0" not in " ".join(rep["pareto_front"])


def test_damaged_values_in_a_results_file_mark_the_point_not_the_report(fake_sweep):
    """A 400-digit metric (OverflowError in math.isfinite) and a file nested past json's depth
    (RecursionError) stopped the report with a traceback."""
    big = _write_point(fake_sweep, "6.0", 0, 0, 0, results=False)
    (big / "results.json").write_text('{"schema": 1, "tau": 6.0, "metrics": {"forget_quality": ' + "9" * 400 + "}}")
    deep = _write_point(fake_sweep, "7.0", 0, 0, 0, results=False)
    (deep / "results.json").write_text("[" * 100000 + "]" * 100000)
    rep = sweep.build_report(fake_sweep)
    assert rep["chosen"]["tau"] == 3.5
    points = {p.name: p for p in sweep.gather(fake_sweep)}
    assert points[big.name].metric("forget_quality") is None
    assert points[deep.name].status == "failed" and points[deep.name].note.startswith("unreadable results.json: ")


def test_objective_missing_falls_back_and_empty_sweep(tmp_path):
    root = tmp_path / "s"
    _write_point(root, "1.0", None, 0.5, 0.9)
    _write_point(root, "2.0", None, 0.49, 0.4)
    rep = sweep.build_report(root)
    assert rep["chosen"]["objective"] == "forget_fact_recall" and rep["chosen"]["name"].startswith("method.tau=2.0")
    assert rep["chosen"]["notes"]
    empty = tmp_path / "empty"  # nothing to report: an error, and no report files written into it
    empty.mkdir()
    with pytest.raises(ValueError, match="no sweep points under"):
        sweep.build_report(empty)
    assert not list(empty.iterdir())
    pending = tmp_path / "pending"  # a sweep submitted, no job started: its expected points are reported
    pending.mkdir()
    _multirun_yaml(pending, "1.0,2.0")
    rep = sweep.build_report(pending)
    assert rep["counts"]["total"] == 2 and rep["counts"]["missing"] == 2
    assert (pending / "pareto.png").read_bytes()[:8] == PNG_MAGIC


def _multirun_yaml(root: Path, taus: str) -> None:
    """What Hydra's basic sweeper writes at the start of ``-m method.tau=<taus> trainer.max_steps=2``."""
    (root / "multirun.yaml").write_text(
        "hydra:\n  sweeper:\n    _target_: hydra._internal.core_plugins.basic_sweeper.BasicSweeper\n"
        "    max_batch_size: null\n    params: null\n  overrides:\n    task:\n"
        f"    - method.tau={taus}\n    - trainer.max_steps=2\n")


def _slurm_submission(root: Path, job_id: str, num: int, overrides: list, stderr: str) -> None:
    """``.submitit/<job_id>/`` as hydra-submitit-launcher leaves it: the pickled call with the job's
    overrides and number (``job_id_for_<num>``), and the job's stderr."""
    import cloudpickle
    from submitit.helpers import DelayedSubmission

    d = root / ".submitit" / job_id
    d.mkdir(parents=True)
    call = DelayedSubmission(print, overrides, "hydra.sweep.dir", num, f"job_id_for_{num}", {})
    (d / f"{job_id}_submitted.pkl").write_bytes(cloudpickle.dumps(call))
    (d / f"{job_id}_0_log.err").write_text(stderr)


def test_jobs_never_started_or_failed_on_slurm_before_their_log(fake_sweep):
    """The latest sweep's jobs come from multirun.yaml: one without a directory is listed (not
    started, or failed on SLURM with its stderr's error line); a directory whose job died before
    Hydra's log is placed by the job number in its submitit pickle (never unpickled)."""
    _multirun_yaml(fake_sweep, "1.5,4.0,7.0,8.0")  # 4.0: a directory without results (fixture)
    traceback = ("submitit INFO (2026) - Starting with JobEnvironment\nTraceback (most recent call last):\n"
                 "  File \"x.py\", line 1, in <module>\nModuleNotFoundError: No module named '_bootstrap'\n"
                 "srun: error: vm: task 0: Exited with exit code 1\n")
    _slurm_submission(fake_sweep, "41_1", 1, ["method.tau=4.0", "trainer.max_steps=2"], traceback)
    _slurm_submission(fake_sweep, "41_2", 2, ["method.tau=7.0", "trainer.max_steps=2"],
                      "slurmstepd: error: *** JOB 41 ON vm CANCELLED AT 2026-12-04T10:00:00 DUE TO TIME LIMIT ***\n")
    # an earlier sweep's job 3 (other overrides) says nothing about this sweep's job 3
    _slurm_submission(fake_sweep, "7_3", 3, ["method.tau=9.0", "trainer.max_steps=2"], "ValueError: old\n")
    rep = sweep.build_report(fake_sweep)
    by_tau = {p["overrides"]["method.tau"]: p for p in rep["points"]}
    assert by_tau["4.0"]["status"] == "failed"
    assert by_tau["4.0"]["note"] == ("SLURM job 41_1: ModuleNotFoundError: No module named '_bootstrap' "
                                     "(.submitit/41_1/41_1_0_log.err)")
    assert by_tau["7.0"]["status"] == "failed" and "DUE TO TIME LIMIT" in by_tau["7.0"]["note"]
    assert by_tau["7.0"]["name"] == "job 2 (method.tau=7.0)"
    assert by_tau["8.0"]["status"] == "missing" and "not started" in by_tau["8.0"]["note"]
    assert by_tau["1.5"]["status"] == "ok" and by_tau["5.0"]["status"] == "failed"  # earlier points stay
    assert rep["counts"] == {"total": 9, "ok": 5, "missing": 1, "failed": 3}
    assert "`job 3 (method.tau=8.0)`: **missing**" in (fake_sweep / "report.md").read_text()
    # which points are the latest sweep's jobs (the launcher's failure report lists only those)
    jobs = {p.overrides["method.tau"]: p.job for p in sweep.gather(fake_sweep)}
    assert (jobs["1.5"], jobs["4.0"], jobs["7.0"], jobs["8.0"], jobs["2.0"], jobs["5.0"]) == (0, 1, 2, 3, None, None)


def test_a_requeued_slurm_job_is_not_failed_until_a_later_attempt_fails(fake_sweep):
    """A point requeued by submitit (a preemption, a time limit with timeouts left) was reported failed with
    srun's 'Exited with exit code 255' while it waited for its next attempt; only that attempt's lines count."""
    _multirun_yaml(fake_sweep, "1.5,4.0,8.0")
    attempt = ("submitit INFO (2026) - Starting with JobEnvironment(job_id=41_{n})\n"
               "submitit WARNING (2026) - Caught signal SIGUSR2 on vm: this job is timed-out.\n"
               "submitit INFO (2026) - Requeued job 41_{n} (2 remaining timeouts)\n"
               "slurmstepd: error: *** JOB 41 ON vm CANCELLED AT 2026-12-04T10:00:00 DUE TO JOB REQUEUE ***\n"
               "srun: error: vm: task 0: Exited with exit code 255\n")
    _slurm_submission(fake_sweep, "41_1", 1, ["method.tau=4.0", "trainer.max_steps=2"], attempt.format(n=1))
    # requeued, started again, and that attempt failed: its own error
    _slurm_submission(fake_sweep, "41_2", 2, ["method.tau=8.0", "trainer.max_steps=2"], attempt.format(n=2) +
                      "submitit INFO (2026) - Starting with JobEnvironment(job_id=41_2)\nValueError: boom\n")
    by_tau = {p["overrides"]["method.tau"]: p for p in sweep.build_report(fake_sweep)["points"]}
    assert by_tau["4.0"]["status"] == "missing" and "still running" in by_tau["4.0"]["note"], by_tau["4.0"]
    assert by_tau["8.0"]["status"] == "failed" and by_tau["8.0"]["note"].startswith("SLURM job 41_2: ValueError: boom")


def test_a_point_whose_rerun_set_its_results_aside_is_not_counted(fake_sweep):
    """A re-run moves an earlier results.json aside (pipeline.finished); until it writes its own
    the point is not complete, and the report says where the earlier results are."""
    d = fake_sweep / "method.tau=2.0,trainer.max_steps=2"
    (d / "results.json").rename(d / "results.previous.json")
    (d / "train.log").write_text("[..][pipeline][ERROR] - error (CheckpointError, rank 0): disk full\n")
    p = next(p for p in sweep.gather(fake_sweep) if p.overrides["method.tau"] == "2.0")
    assert p.status == "failed" and p.note.startswith("train.log: error (CheckpointError, rank 0): disk full")
    assert p.note.endswith("an earlier run's results are kept in results.previous.json")


def test_a_points_settings_are_those_its_results_recorded(fake_sweep):
    """A later launch into a point's directory rewrites .hydra/ before its checks, also one that is
    refused (another trainer.max_steps than the checkpoint's): the report listed the point with the
    refused launch's settings next to the earlier run's numbers."""
    d = fake_sweep / "method.tau=2.0,trainer.max_steps=2"
    res = json.loads((d / "results.json").read_text())
    res["provenance"] = {"overrides": ["method.tau=2.0", "trainer.max_steps=2"]}
    (d / "results.json").write_text(json.dumps(res))
    (d / ".hydra" / "overrides.yaml").write_text("- method.tau=2.0\n- trainer.max_steps=20\n")
    p = next(p for p in sweep.gather(fake_sweep) if p.path == d)
    assert p.overrides == {"method.tau": "2.0", "trainer.max_steps": "2"} and p.status == "ok"


def test_a_relaunch_reusing_a_finished_point_with_an_extra_key_is_that_job_not_a_missing_one(tmp_path):
    """`-m ... trainer.resume=auto` over a finished sweep returns each point's results as they were; their
    recorded overrides lack the new key, and matching by them listed every job as never started."""
    root = tmp_path / "sweep"
    d = _write_point(root, "2.0", 0.1, 0.6, 0.3)
    res = json.loads((d / "results.json").read_text())
    res["provenance"] = {"overrides": ["method.tau=2.0", "trainer.max_steps=2"]}
    (d / "results.json").write_text(json.dumps(res))
    (d / ".hydra" / "overrides.yaml").write_text("- method.tau=2.0\n- trainer.max_steps=2\n- trainer.resume=auto\n")
    (root / "multirun.yaml").write_text(
        "hydra:\n  sweeper:\n    _target_: hydra._internal.core_plugins.basic_sweeper.BasicSweeper\n"
        "    max_batch_size: null\n    params: null\n  overrides:\n    task:\n"
        "    - method.tau=2.0\n    - trainer.max_steps=2\n    - trainer.resume=auto\n")
    (point,) = sweep.gather(root)
    assert point.job == 0 and point.status == "ok"
    assert point.overrides == {"method.tau": "2.0", "trainer.max_steps": "2"}  # what its results ran with


def test_report_cli(fake_sweep):
    out = subprocess.run([sys.executable, "launchers/report.py", str(fake_sweep), "--rule", "forget_quality"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "chosen method.tau=3.0" in out.stdout and "1 missing, 1 failed" in out.stdout
    bad = subprocess.run([sys.executable, "launchers/report.py", str(fake_sweep / "nope")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    # a misspelled metric: one line naming the flag and the likely metric, exit 2 (before: exit 0, the
    # constraint ignored with a note, or an empty plot for --x)
    for args, flag, hint in ((["--rule", "forget_quality,model_utlity>=0.9"], "--rule", "model_utility"),
                             (["--rule", "max:forget_qualty"], "--rule", "forget_quality"),
                             (["--x", "bogus"], "--x", None),
                             (["--rule", "forget_quality,mlu_accuracy>=0.9"], "--rule", None)):  # a split's typo
        typo = subprocess.run([sys.executable, "launchers/report.py", str(fake_sweep), *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        lines = typo.stderr.strip().splitlines()
        assert typo.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error (ValueError, rank 0): {flag}: "), typo.stderr
        assert hint is None or f"did you mean {hint!r}" in lines[0], lines[0]
    missing = subprocess.run([sys.executable, "launchers/report.py", str(fake_sweep), "--target", str(fake_sweep / "t.json")],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "--target" in missing.stderr and "Errno" not in missing.stderr


def test_report_cli_without_points_or_with_an_unwritable_out_is_one_line(tmp_path, fake_sweep):
    """An empty directory printed '(no sweep points found)' and wrote report.md/pareto.png into it, with
    no error line; --out under a file was a NotADirectoryError traceback."""
    def report(*args):
        done = subprocess.run([sys.executable, "launchers/report.py", *map(str, args)], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error ("), done.stderr
        return lines[0]

    (tmp_path / "empty").mkdir()
    assert "no sweep points under" in report(tmp_path / "empty") and not list((tmp_path / "empty").iterdir())
    (tmp_path / "afile").write_text("x")
    assert "is not a directory" in report(tmp_path / "afile")
    assert report(fake_sweep, "--out", tmp_path / "afile" / "sub") == \
        f"error (usage, report.py): --out {tmp_path / 'afile' / 'sub'}: {tmp_path / 'afile'} is a file, not a directory"
    assert report(fake_sweep, "--out", tmp_path / "afile") == \
        f"error (usage, report.py): --out {tmp_path / 'afile'}: {tmp_path / 'afile'} is a file, not a directory"
    (tmp_path / "alink").symlink_to(tmp_path / "gone")
    assert report(fake_sweep, "--out", tmp_path / "alink" / "sub") == \
        f"error (usage, report.py): --out {tmp_path / 'alink' / 'sub'}: {tmp_path / 'alink'} is a link to nothing " \
        "(or a loop of links)"
    # one run's directory: refused, its own report.md kept (a sweep report replaced it); --out elsewhere is fine
    run = next(d for d in fake_sweep.iterdir() if (d / "results.json").is_file())
    (run / "report.md").write_text("# the run's own report\n")
    assert "is a run directory (it has its own results.json)" in report(run) and (run / "report.md").read_text() == "# the run's own report\n"
    rep = sweep.build_report(run, out=tmp_path / "one")
    assert rep["counts"]["total"] == 1 and (run / "report.md").read_text() == "# the run's own report\n"


@pytest.mark.distributed
def test_real_local_sweep_then_report(tmp_path):
    """Hydra multirun (basic launcher, sequential in one process) on the tiny model, then the report."""
    model_dir, data_dir = build(tmp_path)
    args = [a for a in train_overrides(model_dir, data_dir, tmp_path / "runs", "unused", steps=2)
            if not a.startswith(("run_name=", "trainer.max_steps="))]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="offline")
    t0 = time.time()
    out = subprocess.run([sys.executable, "launchers/train.py", "-m", *args, "exp_name=tsweep", "method=asu_kl",
                          "method.tau=1.5,3.0", "trainer.max_steps=2",
                          # this many overrides (with '/' in paths) would make override_dirname nest and
                          # exceed 255 characters: name the points by tau (see docs/sweeps.md)
                          "hydra.sweep.subdir=tau_${method.tau}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    sweep_dir = tmp_path / "runs" / "sweeps" / "tsweep"
    results = sorted(sweep_dir.glob("tau_*/results.json"))
    assert len(results) == 2, list(sweep_dir.iterdir())
    for r in results:  # each point's settings, code and seed, as its job ran
        prov = json.loads(r.read_text())["provenance"]
        assert f"method.tau={r.parent.name[4:]}" in prov["overrides"] and "trainer.max_steps=2" in prov["overrides"]
        assert prov["seed"] == 0 and prov["versions"]["torch"] and len(prov["code"]["sources_sha256"]) == 16
    rep = subprocess.run([sys.executable, "launchers/report.py", str(sweep_dir)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr
    js = json.loads((sweep_dir / "report.json").read_text())
    assert js["swept"] == ["method.tau"] and js["counts"]["ok"] == 2
    assert {p["tau"] for p in js["points"]} == {1.5, 3.0}
    assert js["chosen"]["name"] is not None
    assert (sweep_dir / "pareto.png").read_bytes()[:8] == PNG_MAGIC
    assert "method.tau" in (sweep_dir / "report.md").read_text()
    print(f"local 2-point sweep + report: {time.time() - t0:.1f}s")


def _write_family_point(root: Path, tau: str, metrics: dict) -> None:
    d = root / f"method.tau={tau}"
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(f"- method.tau={tau}\n")
    (d / "results.json").write_text(json.dumps({"schema": 1, "method": "asu_kl", "tau": float(tau), "metrics": metrics}))


def test_muse_and_wmdp_sweeps_choose_by_their_own_metrics(tmp_path):
    """A MUSE or WMDP sweep has no model_utility: the default rule and axes are the benchmark's
    (before: "No setting chosen" and an empty plot; a rule on its metrics maximised forgetting's opposite)."""
    muse = tmp_path / "muse"
    # tau -> (verbmem_forget, knowmem_forget, knowmem_retain, privleak)
    for tau, (vm, kf, kr, pl) in {"1.5": (0.60, 0.55, 0.50, -90.0), "2.0": (0.30, 0.35, 0.47, -40.0),
                                  "2.5": (0.10, 0.10, 0.30, 20.0), "3.0": (0.20, 0.20, 0.48, 5.0)}.items():
        _write_family_point(muse, tau, {"verbmem_forget": vm, "knowmem_forget": kf, "knowmem_retain": kr,
                                        "privleak": pl, "privleak_auc": 0.5})
    rep = sweep.build_report(muse)
    # knowmem_retain >= 0.95 x 0.50 keeps 1.5 and 3.0; the lower VerbMem is 3.0's (2.0 is dominated by it)
    assert (rep["rule"], rep["x"], rep["y"]) == ("min:verbmem_forget,knowmem_retain>=0.95", "verbmem_forget",
                                                 "knowmem_retain")
    assert rep["chosen"]["tau"] == 3.0
    assert {n for n in rep["pareto_front"]} == {"method.tau=1.5", "method.tau=2.5", "method.tau=3.0"}
    assert sweep.build_report(muse, rule="privleak,knowmem_retain>=0.9", out=tmp_path / "o1")["chosen"]["tau"] == 3.0
    md = (muse / "report.md").read_text()
    assert "x: `verbmem_forget` (lower is better), y: `knowmem_retain` (higher is better)" in md
    wmdp = tmp_path / "wmdp"
    for tau, (bio, mmlu) in {"1.5": (0.60, 0.58), "2.0": (0.40, 0.57), "2.5": (0.26, 0.45)}.items():
        _write_family_point(wmdp, tau, {"wmdp-bio_accuracy": bio, "mmlu_accuracy": mmlu})
    rep = sweep.build_report(wmdp)
    assert (rep["rule"], rep["x"], rep["y"]) == ("min:wmdp-bio_accuracy,mmlu_accuracy>=0.95", "wmdp-bio_accuracy",
                                                 "mmlu_accuracy")
    assert rep["chosen"]["tau"] == 2.0  # 2.5 forgets more but loses MMLU (0.45 < 0.95 x 0.58)
    # MMLU scored on subjects only (data.eval_splits=[wmdp-bio, mmlu-anatomy]): that subject is the utility
    # (before: "--rule: no point of this sweep has a metric named 'mmlu_accuracy'", a flag never passed)
    subjects = tmp_path / "wmdp_subjects"
    for tau, (bio, anatomy) in {"1.5": (0.60, 0.58), "2.0": (0.40, 0.57), "2.5": (0.26, 0.45)}.items():
        _write_family_point(subjects, tau, {"wmdp-bio_accuracy": bio, "mmlu-anatomy_accuracy": anatomy})
    rep = sweep.build_report(subjects)
    assert (rep["rule"], rep["y"]) == ("min:wmdp-bio_accuracy,mmlu-anatomy_accuracy>=0.95", "mmlu-anatomy_accuracy")
    assert rep["chosen"]["tau"] == 2.0


def test_a_muse_or_wmdp_report_explains_its_own_metrics():
    """report.md's table gives MUSE's and WMDP's metrics their direction and meaning, and its reading
    notes are the run's benchmark's (before: blank columns and TOFU's notes for every run)."""
    from pipeline.eval.report import render_report_md

    md = render_report_md({"method": "asu_kl", "tau": 2.0, "metrics": {"verbmem_forget": 0.2, "privleak": -12.0}})
    assert "| `privleak` | -12.0000 | →0 |" in md and "| `verbmem_forget` | 0.2000 | ↓ |" in md
    assert "**PrivLeak**" in md and "Forget quality" not in md
    md = render_report_md({"method": "rmu", "tau": None,
                           "metrics": {"wmdp-bio_accuracy": 0.3, "mmlu_accuracy": 0.55}})
    assert "| `wmdp-bio_accuracy` | 0.3000 | ↓ |" in md and "| `mmlu_accuracy` | 0.5500 | ↑ |" in md
    assert "Multiple-choice accuracy" in md and "Forget quality" not in md


def test_a_point_running_again_after_a_failed_attempt_is_not_reported_failed(fake_sweep):
    """Hydra appends each attempt's lines to the job's log: an earlier attempt's traceback made a point
    that runs again now (a re-launched sweep, a requeue) read as failed. Only lines after the last
    attempt's start line count."""
    log = next(fake_sweep.glob("method.tau=5.0*")) / "train.log"
    log.write_text(log.read_text() + f"[..][pipeline][INFO] - {sweep.ATTEMPT_STARTED}\n"
                   "[..][pipeline.engine.trainer][INFO] - resumed from checkpoints/step_00000040 at step 40/100\n")
    status = {p.overrides["method.tau"]: (p.status, p.note) for p in sweep.gather(fake_sweep)}
    assert status["5.0"][0] == "missing", status["5.0"]
    # a second launch refused while that attempt runs (the directory is in use): says nothing of the point
    refused = (f"[..][pipeline][INFO] - {sweep.ATTEMPT_STARTED}\n[..][pipeline][ERROR] - error (RunDirInUseError, "
               f"rank 0): run directory x is in use by another launch (pid 7 on vm)\n")
    log.write_text(log.read_text() + refused)
    status = {p.overrides["method.tau"]: (p.status, p.note) for p in sweep.gather(fake_sweep)}
    assert status["5.0"][0] == "missing", status["5.0"]
    log.write_text(log.read_text() + "[..][pipeline][ERROR] - error (DataError, rank 0): bad row 3\n")
    status = {p.overrides["method.tau"]: (p.status, p.note) for p in sweep.gather(fake_sweep)}
    assert status["5.0"] == ("failed", "train.log: error (DataError, rank 0): bad row 3"), status["5.0"]


def test_a_dry_run_of_the_sweep_leaves_no_points_and_no_job_list(fake_sweep):
    """`-m method.tau=... trainer.dry_run=true` makes a directory per point (.hydra/, a log) and
    replaces multirun.yaml: its points were listed as missing, and the report expected its jobs."""
    for tau in ("1.5", "9.0"):
        d = fake_sweep / f"method.tau={tau},trainer.dry_run=true,trainer.max_steps=2"
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(f"- method.tau={tau}\n- trainer.dry_run=true\n"
                                                     "- trainer.max_steps=2\n")
        (d / "train.log").write_text("[..][pipeline.run][INFO] - dry run\n")
    (fake_sweep / "multirun.yaml").write_text(
        "hydra:\n  sweeper:\n    _target_: hydra._internal.core_plugins.basic_sweeper.BasicSweeper\n"
        "    max_batch_size: null\n    params: null\n  overrides:\n    task:\n"
        "    - method.tau=1.5,9.0\n    - trainer.dry_run=true\n    - trainer.max_steps=2\n")
    rep = sweep.build_report(fake_sweep)
    assert not any("dry_run" in p["name"] for p in rep["points"])
    assert rep["counts"] == {"total": 7, "ok": 5, "missing": 1, "failed": 1}  # the fixture's points only


def test_points_are_in_numeric_order_and_ties_go_to_the_smaller_value(tmp_path):
    """Directories sorted as strings put method.tau=10.0 before 2.0: the table's rows, and a tie between
    them went to 10.0 as "the earlier point"."""
    root = tmp_path / "s"
    for tau in ("10.0", "2.0", "1.5"):
        _write_point(root, tau, 0.5, 0.8 if tau != "1.5" else 0.1, 0.3)
    points = sweep.gather(root)
    assert [p.overrides["method.tau"] for p in points] == ["1.5", "2.0", "10.0"]
    assert sweep.build_report(root, "forget_quality")["chosen"]["name"].startswith("method.tau=2.0")


def test_a_failures_note_starts_at_its_error_line_whatever_its_message_holds(tmp_path):
    """The note began at the latest "error (" in the log, which an error's own message may hold: a rank's
    "error (RuntimeError, rank 1): lost a row (error (x))" was reported as "error (x))"."""
    (tmp_path / "train.log").write_text(f"[..][pipeline][INFO] - {sweep.ATTEMPT_STARTED}\n"
                                        "[..][pipeline][ERROR][rank 1] - error (RuntimeError, rank 1): lost a row "
                                        "(error (x)) in step 3\n")
    assert sweep._failed(tmp_path) == "train.log: error (RuntimeError, rank 1): lost a row (error (x)) in step 3"
    # a progress bar's carriage return before it on the same line (a log captured from stderr)
    (tmp_path / "train.log").write_text("step 3/10\r[x][ERROR] - error (RuntimeError, rank 1): boom\n")
    assert sweep._failed(tmp_path) == "train.log: error (RuntimeError, rank 1): boom"


def test_a_sweep_without_a_completed_point_says_so_and_nothing_else(tmp_path):
    """Before: "no setting satisfies it", then notes that no point has forget_quality (chose by another
    metric instead) and no point has model_utility (constraint ignored) — of a sweep where no point ran."""
    points = [sweep.SweepPoint(f"method.tau={t}", tmp_path / f"method.tau={t}", "missing", {"method.tau": t})
              for t in ("1.5", "2.0")]
    choice = sweep.choose(points, sweep.parse_rule(sweep.DEFAULT_RULE), fallback_objective="forget_fact_recall")
    assert choice["name"] is None and choice["completed"] == 0 and choice["notes"] == []
    points[0].status, points[0].results = "ok", {"metrics": {"forget_fact_recall": 0.5}}
    choice = sweep.choose(points, sweep.parse_rule(sweep.DEFAULT_RULE), fallback_objective="forget_fact_recall")
    assert choice["completed"] == 1 and choice["notes"] == [
        "no point has forget_quality; chose by forget_fact_recall instead", "no point has model_utility: constraint ignored"]


def test_a_point_that_did_not_set_a_swept_key_shows_the_value_it_ran_with(tmp_path):
    """A tau sweep, then a tau x lr sweep into the same directory: the first points ran at the config's
    lr, which the table and the chosen setting showed as "-" (it read their command lines only). Where
    the points wrote (output_dir, cache_dir) is no "fixed setting"."""
    root = tmp_path / "sweeps" / "exp"
    for tau, (fq, mu, fr) in list(POINTS.items())[:2]:
        d = _write_point(root, tau, fq, mu, fr)
        # an earlier sweep: its own output_dir (none given) and lr (the config's)
        (d / ".hydra" / "overrides.yaml").write_text(f"- method.tau={tau}\n- trainer.max_steps=2\n")
        (d / "config.yaml").write_text("trainer:\n  lr: 0.0003\n  max_steps: 2\nmethod:\n  name: asu_kl\n"
                                       "  tau: " + tau + "\n")
    d = root / "method.tau=2.5,trainer.lr=0.001,trainer.max_steps=2"
    d.mkdir(parents=True)
    (d / ".hydra").mkdir()
    (d / ".hydra" / "overrides.yaml").write_text(f"- method.tau=2.5\n- trainer.lr=0.001\n- trainer.max_steps=2\n"
                                                 f"- output_dir={tmp_path}\n")
    (d / "results.json").write_text(json.dumps({"schema": 1, "method": "asu_kl", "tau": 2.5, "metrics": {
        "forget_quality": 0.9, "model_utility": 0.1, "forget_fact_recall": 0.9}}))
    rep = sweep.build_report(root)
    assert rep["swept"] == ["method.tau", "trainer.lr"] and rep["fixed"] == {"trainer.max_steps": "2"}
    md = (root / "report.md").read_text()
    assert "| 1.5 | 0.0003 (default) |" in md and "| 2.0 | 0.0003 (default) |" in md and "| 2.5 | 0.001 |" in md
    assert "**Chosen: `method.tau=1.5`, `trainer.lr=0.0003` (default)**" in md  # the code span copies as an override
    first = sweep.SweepPoint("x", next(root.glob("method.tau=1.5*")), "ok", {"method.tau": "1.5"})
    assert first.setting("method") == "asu_kl (default)"  # a config group by its name, not its whole node
    (first.path / "config.yaml").write_text("trainer: [unclosed\n")  # damaged: the report goes on
    assert sweep.SweepPoint("y", first.path, "ok", {}).setting("trainer.lr") == "-"
