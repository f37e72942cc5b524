"""``make demo`` / ``make demo-real``'s launchers: bad input is one line and exit code 2 before anything
runs, a child's exit code is passed on, a Ctrl-C stops cleanly, and the table holds this run's rows only.
Cheap: argument checks, config composition and the process helpers with tiny stand-in children."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pipeline.demo as pdemo
from pipeline.config import ConfigError
from tests.helpers.launch import run_group

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
sys.path.insert(0, str(ROOT / "launchers"))
demo = importlib.import_module("demo")


@pytest.fixture(autouse=True)
def _fresh_hydra():
    """compose_job initialises Hydra's global state once per process (the demo composes many jobs);
    cleared after each test so that other tests' ``initialize_config_dir`` still works."""
    yield
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()


def _launch(script: str, *args: str, cwd: Path = ROOT, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return run_group([sys.executable, f"launchers/{script}", *args], timeout, cwd=cwd, env=env)


# --- 1. overrides every row gets, and misspelt rows -------------------------------------------

def test_an_override_a_row_cannot_take_is_one_config_error_naming_the_row():
    (asu, gd) = pdemo.plan_jobs(["asu_kl", "grad_diff"], "demo", CONF, references=())
    assert pdemo.compose_job(CONF, ["+exp=tofu_tiny", "method.tau=3.0"], asu).method.tau == 3.0
    with pytest.raises(ConfigError) as e:
        pdemo.compose_job(CONF, ["+exp=tofu_tiny", "method.tau=3.0"], gd)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("demo row grad_diff:") and "method.tau" in msg
    # the documented example reaches every row
    for job in pdemo.plan_jobs(["asu_kl", "grad_diff", "npo"], "demo", CONF):
        assert pdemo.compose_job(CONF, ["+exp=tofu_tiny", "trainer.max_steps=20"], job).trainer.max_steps == 20


def test_a_method_key_every_training_row_has_reaches_them_and_not_the_steps_without_a_method():
    """`--methods npo -- method.beta=0.5`: every training row has beta, but the benchmark's preparation
    and the target / retain evaluations (composed with the default ASU method) stopped the demo at its
    first step: "Could not override 'method.beta' ... Key 'beta' not in 'ASUConfig'"."""
    (target, npo) = pdemo.plan_jobs(["npo"], "demo", CONF, references=("target",))
    common = ["+exp=tofu_tiny", "method.beta=0.5", "trainer.max_steps=3"]
    assert pdemo.compose_job(CONF, common, npo).method.beta == 0.5
    assert pdemo.compose_job(CONF, common, target).trainer.max_steps == 3
    assert pdemo.without_method_keys(["+method.x=1", "method=npo", "methods=2", "trainer.lr=1"]) == ["methods=2",
                                                                                                    "trainer.lr=1"]


def test_an_unknown_method_inside_the_launch_is_one_config_error_with_the_options():
    (job,) = pdemo.plan_jobs(["asu_kll"], "demo", CONF, references=())
    with pytest.raises(ConfigError, match=r"demo row asu_kll: .*available: .*asu_kl"):
        pdemo.compose_job(CONF, ["+exp=tofu_tiny"], job)


def test_method_names_are_checked_against_conf_method():
    pdemo.check_rows(["asu_kl", "asu_kl_rna", "asu_kl_lora", "grad_diff", "npo", "rmu", "asu_gd"], CONF)
    with pytest.raises(ValueError, match="unknown method.s. asu_kll; choose from .*asu_kl_rna"):
        pdemo.check_rows(["asu_kl", "asu_kll"], CONF)


@pytest.mark.parametrize("args", [["--methods", "asu_kl,asu_kll"], ["--extra-methods", "simnpoo"],
                                  ["--procs", "0"], ["--procs", "-1"], ["--ranks", "0"], ["--ranks", "two"],
                                  ["--port", "99999"], ["--port", "0"]])
def test_demo_refuses_bad_arguments_in_one_line_before_preparing(tmp_path, args):
    p = _launch("demo.py", "--out", str(tmp_path / "d"), *args)
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("error ("), p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "d").exists()


@pytest.mark.parametrize("args,row", [(["--methods", "asu_kl", "--extra-methods", "npo", "--", "method.tau=2.0"], "npo"),
                                      (["--", "trainer.lr=-1"], "target")])
def test_a_row_a_later_launch_would_refuse_stops_the_demo_before_anything_runs(tmp_path, args, row):
    """Before, the rows were composed inside each launch: ``--extra-methods npo -- method.tau=2.0`` prepared
    the benchmark and trained asu_kl on 2 ranks before the single-rank launch refused npo's row."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "summary.md").write_text("the previous run's table")
    p = _launch("demo.py", "--out", str(tmp_path / "d"), *args)
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith(f"error (ConfigError, rank 0): demo row {row}: "), p.stderr
    assert sorted(os.listdir(tmp_path / "d")) == ["summary.md"]  # nothing prepared, trained, nor cleared
    assert p.stdout == ""


@pytest.mark.parametrize("args", [["--eval-rows", "0"], ["--eval-rows", "-1"], ["--ranks", "0"],
                                  ["--steps", "0"], ["--methods", "asu_gdd"], ["--port", "70000"]])
def test_demo_real_refuses_bad_arguments_in_one_line_before_converting(tmp_path, args):
    p = _launch("demo_real.py", "--out", str(tmp_path / "d"), *args)
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("error ("), p.stderr
    assert not (tmp_path / "d").exists()  # no cut data files, nothing converted


@pytest.mark.parametrize("script", ["demo.py", "demo_real.py"])
def test_an_out_that_is_a_file_is_a_usage_error(tmp_path, script):
    """--out naming a file was a NotADirectoryError traceback from the clean-up of earlier summaries."""
    (tmp_path / "f").write_text("kept")
    p = _launch(script, "--out", str(tmp_path / "f"))
    assert p.returncode == 2 and p.stderr.strip() == f"error (usage, {script}): --out {tmp_path / 'f'}: " \
        f"{tmp_path / 'f'} is a file, not a directory", p.stderr
    assert (tmp_path / "f").read_text() == "kept"
    p = _launch(script, "--out", str(tmp_path / "f" / "sub"))  # under a file
    assert p.returncode == 2 and p.stderr.strip() == f"error (usage, {script}): --out {tmp_path / 'f' / 'sub'}: " \
        f"{tmp_path / 'f'} is a file, not a directory", p.stderr


# --- 2. no resume across demo runs ---------------------------------------------------------------

def test_demo_training_starts_afresh_unless_the_user_asks_to_resume():
    target, asu = pdemo.plan_jobs(["asu_kl"], "demo", CONF, references=("target",))
    assert pdemo.compose_job(CONF, ["+exp=tofu_tiny"], asu).trainer.resume == "never"
    assert pdemo.compose_job(CONF, ["+exp=tofu_tiny", "trainer.resume=auto"], asu).trainer.resume == "auto"
    assert pdemo.compose_job(CONF, ["+exp=tofu_tiny"], target).trainer.resume == "auto"  # eval jobs: untouched


# --- 3./4./8. the process helper: exit codes, error lines, every failure, Ctrl-C -----------------

def _child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_bad_input_child_exit_2_is_passed_on_with_its_error_line_only(tmp_path, capsys):
    bad = ("import sys; print('loading...'); print('error (ConfigError, rank 0): trainer.lr: must be > 0', "
           "file=sys.stderr); sys.exit(2)")
    with pytest.raises(SystemExit) as e:
        demo.run([_child(bad)], dict(os.environ), [tmp_path / "a.log"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "error (ConfigError, rank 0): trainer.lr: must be > 0"


def test_every_failed_process_is_reported_and_the_first_code_passed_on(tmp_path, capsys):
    cmds = [_child("import sys; print('first went wrong'); sys.exit(3)"), _child("print('fine')"),
            _child("import sys; print('second went wrong'); sys.exit(1)")]
    logs = [tmp_path / f"{i}.log" for i in range(3)]
    with pytest.raises(SystemExit) as e:
        demo.run(cmds, dict(os.environ), logs)
    assert e.value.code == 3
    err = capsys.readouterr().err
    assert "first went wrong" in err and "second went wrong" in err
    assert f"step failed (exit 3); full log: {logs[0]}" in err and f"step failed (exit 1); full log: {logs[2]}" in err


WRAPPER = """
import sys, time
sys.path.insert(0, {launchers!r})
import demo
demo.STOP_GRACE_S = {grace}
child = {child!r}
demo.run([[sys.executable, "-c", child]], None, [__import__("pathlib").Path({log!r})])
"""
# stops on SIGINT like a training job: writes its last line a moment later, exits 130
POLITE = ("import signal, sys, time\n"
          "def stop(*_):\n    time.sleep(0.5); print('last line: stop checkpoint written', flush=True); sys.exit(130)\n"
          "signal.signal(signal.SIGINT, stop)\nprint('ready', flush=True)\ntime.sleep(60)\n")
STUBBORN = ("import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nprint('ready', flush=True)\n"
            "time.sleep(60)\n")


@pytest.mark.parametrize("child", [POLITE, STUBBORN], ids=["stops", "ignores_sigint"])
def test_ctrl_c_waits_for_the_children_keeps_their_last_lines_and_exits_130(tmp_path, child):
    log = tmp_path / "child.log"
    script = WRAPPER.format(launchers=str(ROOT / "launchers"), grace=1.0, child=child, log=str(log))
    # a session of its own: the SIGINT goes to the whole process group, as a terminal's Ctrl-C does
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 30
    while not (log.exists() and "ready" in log.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and err.startswith("interrupted (Ctrl-C)")
    if child is POLITE:
        assert "last line: stop checkpoint written" in log.read_text()
    with pytest.raises(ProcessLookupError):  # no child left behind
        os.killpg(p.pid, 0)


# --- 8. headings and stale summaries ---------------------------------------------------------------

def test_the_heading_says_which_zero_stage_runs():
    assert demo.zero_words(2, []) == "DeepSpeed ZeRO-3"
    assert demo.zero_words(1, []) == "DeepSpeed ZeRO stage 0"
    assert demo.zero_words(1, ["deepspeed.zero_stage=3"]) == "DeepSpeed ZeRO-3"
    assert demo.zero_words(1, ["deepspeed.offload_optimizer=cpu"]) == "DeepSpeed ZeRO-3"


def test_a_failed_demo_leaves_no_earlier_table_and_passes_on_the_child_error(tmp_path):
    out = tmp_path / "d"
    (out / "logs").mkdir(parents=True)
    for f in ("summary.md", "summary.json", "timings.json", "logs/timings_main.json"):
        (out / f).write_text("{}")
    # a split the benchmark lacks: composes, so only the launch's first job meets it, after the benchmark step
    # (which builds the embedded benchmark on a fresh clone, minutes; the later tests reuse it)
    p = _launch("demo.py", "--out", str(out), "--ranks", "1", "--methods", "asu_kl", "--", "data.forget_split=forget99",
                timeout=900)
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "split 'forget99' not found" in p.stderr, p.stderr
    assert sorted(f.name for f in out.rglob("*.json")) == [] and not (out / "summary.md").exists()


# --- 6. demo_real: earlier rows only with --reuse-before and the same settings ---------------------

def _run(root: Path, name: str, rows: int, data_path: str | None = "fixture") -> None:
    d = root / name
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({"metrics": {}, "evaluation": {
        "max_new_tokens": 24, "rows": {"forget": rows}, "reused_splits": []}}))
    if data_path is not None:
        (d / "config.yaml").write_text(f"data:\n  path: {data_path}\n")


def test_demo_real_adds_earlier_rows_only_with_reuse_before_and_matching_settings(tmp_path, capsys):
    demo_real = importlib.import_module("demo_real")
    _run(tmp_path, "target", 8, None)  # evaluation-only runs write no config.yaml
    _run(tmp_path, "asu_gd", 8)
    _run(tmp_path, "npo", 8)  # an earlier launch, same settings
    _run(tmp_path, "simnpo", 4)  # an earlier launch with --eval-rows 4
    _run(tmp_path, "rmu", 8, "elsewhere")  # other data
    assert demo_real.earlier_rows(tmp_path, ["asu_gd"], reuse_before=False) == []
    assert "left out earlier run(s)" in capsys.readouterr().out
    assert demo_real.earlier_rows(tmp_path, ["asu_gd"], reuse_before=True) == ["npo"]
    assert "other data or evaluation settings: rmu, simnpo" in capsys.readouterr().out


def test_a_row_without_results_keeps_the_markdown_table_whole(tmp_path):
    from pipeline.eval.summary import summarise_demo, summarise_real

    for text in (summarise_demo(tmp_path, ["target", "asu_kl"]), summarise_real(tmp_path, ["target", "asu_gd"])):
        table = [ln for ln in text.splitlines() if ln.startswith("|")]
        assert len(table) == 4 and len({ln.count("|") for ln in table}) == 1, table
        assert "| asu" in table[-1] and "(no results)" in table[-1]


def test_a_tiny_method_configs_own_name_is_a_row_and_offload_groups_name_zero3():
    from pipeline.demo import check_rows

    check_rows(["asu_kl_tiny", "asu_kl", "rmu_tiny"], ROOT / "conf")  # refused before: only stems without _tiny
    assert demo.zero_words(1, ["deepspeed=zero3_offload_all"]) == "DeepSpeed ZeRO-3"
    assert demo.zero_words(1, []) == "DeepSpeed ZeRO stage 0"


# --- 9. the ASU checks: counted after the table, a failed one is exit 1 -------------------------------

def _results(root: Path, name: str, forget: float, retain: float, utility: float, fq: float | None) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "results.json").write_text(json.dumps({"forget_split": "forget10", "metrics": {
        "forget_fact_recall": forget, "retain_fact_recall": retain, "model_utility": utility, "forget_quality": fq}}))


# forget quality on the embedded benchmark (this host, docs in pipeline/eval/summary.py): the target
# 2.94e-17 (KS 0.9 on 40 forget rows), 2 steps of asu_kl 5.59e-15 (KS 0.85), the default demo 4.31e-12
# (KS 0.775)
@pytest.mark.parametrize("fq, ok", [(4.31e-12, True), (5.39e-13, True), (5.91e-14, True), (5.59e-15, False),
                                    (2.94e-17, False), (None, False)],
                         ids=["default_demo", "ks_0.8", "ks_0.825", "two_steps", "as_target", "none"])
def test_the_forget_quality_check_needs_far_more_than_any_change_from_the_target(tmp_path, fq, ok):
    from pipeline.eval.summary import summarise_demo

    _results(tmp_path, "target", 1.0, 1.0, 0.740, 2.94e-17)
    _results(tmp_path, "retain", 0.025, 1.0, 0.739, 1.0)
    _results(tmp_path, "asu_kl", 0.325, 1.0, 0.724, fq)
    summarise_demo(tmp_path, ["target", "retain", "asu_kl"])
    checks = json.loads((tmp_path / "summary.json").read_text())["checks"]
    (check,) = [c for c in checks if "forget quality" in c["check"]]
    assert check["ok"] is ok, check
    assert [c["ok"] for c in checks if c is not check] == [True, True, True]


def test_a_forget_quality_at_tofus_bar_passes_whatever_the_target():
    from pipeline.eval.summary import forget_quality_bar

    assert forget_quality_bar(2.94e-17) == pytest.approx(2.94e-14)
    assert forget_quality_bar(1e-3) == 0.05 and forget_quality_bar(None) is None


CHECKS = [{"check": "asu_kl: forget fact recall closes >= 60% of the target->retain gap", "ok": False, "value": "0.000"},
          {"check": "asu_kl: model utility >= 0.95x target", "ok": True, "value": "0.738 vs 0.703"}]


def test_a_failed_check_is_counted_named_in_one_line_and_exit_1(capsys):
    assert demo.report_checks(CHECKS, []) == 1
    out, err = capsys.readouterr()
    assert out == "ASU checks: 1/2 passed\n"
    assert err == ("ASU check(s) failed, exit 1: asu_kl: forget fact recall closes >= 60% of the target->retain "
                   "gap (0.000)\n")


def test_with_overrides_a_failed_check_still_exits_1_and_says_the_checks_are_for_the_defaults(capsys):
    assert demo.report_checks(CHECKS, ["trainer.max_steps=2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ASU check(s) failed, exit 1 (the checks were designed for the default settings; "
                          "overrides given: trainer.max_steps=2): asu_kl: forget fact recall"), err


def test_passed_checks_are_counted_and_exit_0_and_no_checks_say_nothing(capsys):
    assert demo.report_checks([{**CHECKS[1]}], ["trainer.max_steps=2"]) == 0
    assert capsys.readouterr() == ("ASU checks: 1/1 passed\n", "")
    assert demo.report_checks([], []) == 0  # no checked row (e.g. --methods grad_diff)
    assert capsys.readouterr() == ("", "")
