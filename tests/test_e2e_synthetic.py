"""End to end on the embedded benchmark (minuscule settings so CI stays fast): prepare the
synthetic data and the target/retain models, evaluate them, and unlearn with 2 ranks under ZeRO-3."""

import json

import pytest

from tests.helpers import launch
from tests.helpers.tiny import SYNTHETIC_MINI

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


def test_prepare_eval_and_two_rank_zero3_unlearning(out):
    common = SYNTHETIC_MINI + [f"cache_dir={out / 'cache'}", f"output_dir={out / 'runs'}"]
    prep = launch.run(common, script="launchers/prepare.py")
    assert prep.returncode == 0, prep.stderr[-3000:]
    assert "data:" in prep.stdout and "retain:" in prep.stdout

    ev = launch.run(common + ["model.variant=retain", "run_name=mini/retain"], script="launchers/eval.py")
    assert ev.returncode == 0, ev.stderr[-3000:]
    retain = json.loads((out / "runs" / "mini" / "retain" / "results.json").read_text())
    assert retain["method"] == "retain"
    # a progress bar per evaluated split, in batches (pipeline/progress.py)
    for split in retain["evaluation"]["rows"]:
        assert f"eval[{split}]" in ev.stderr and "batch" in ev.stderr, split

    tr = launch.run(common + ["run_name=mini/asu", "trainer.max_steps=3", "trainer.batch_size=2",
                              "trainer.retain_batch_size=2"], ranks=2, launcher="deepspeed")  # the README's command
    assert tr.returncode == 0, tr.stderr[-3000:]
    run = out / "runs" / "mini" / "asu"
    res = json.loads((run / "results.json").read_text())
    assert res["method"] == "asu_kl" and res["world_size"] == 2 and res["steps"] == 3
    for k in ("forget_quality", "model_utility", "forget_rouge_l", "retain_rouge_l", "forget_fact_recall",
              "retain_fact_recall", "forget_repetition"):
        assert k in res["metrics"], k
    assert res["metrics"]["forget_quality"] is not None  # the retain model's reference was used
    assert (run / "report.md").read_text().startswith("#")
    assert (run / "model" / "model.safetensors").exists()
    # both ranks write train.log and the console; only rank 0 logs info lines (pipeline.logging.RankFilter)
    for text in ((run / "train.log").read_text(errors="replace"), tr.stderr):
        assert text.count("deepspeed.zero_stage=auto -> 3 (2 ranks)") == 1
        assert text.count(" finished in ") == 1
        assert "[INFO][rank 1]" not in text

    # the README's evaluation of an exported run: the embedded benchmark's data and retain reference
    # (before, "dataset 'synthetic' needs its prepared data directory"); into the training run's own
    # directory it is refused, which would lose the run's results.json (before, replaced silently)
    exported = ["model.source=pretrained", f"model.path={run / 'model'}"]
    again = launch.run(common + exported + ["run_name=mini/asu"], script="launchers/eval.py")
    assert again.returncode == 2 and "holds a training run (train_history.json)" in again.stderr, again.stderr[-2000:]
    assert json.loads((run / "results.json").read_text()) == res
    ev2 = launch.run(common + exported + ["run_name=mini/asu_eval"], script="launchers/eval.py")
    assert ev2.returncode == 0, ev2.stderr[-3000:]
    ours = json.loads((out / "runs" / "mini" / "asu_eval" / "results.json").read_text())["metrics"]
    assert ours["forget_quality"] is not None and abs(ours["model_utility"] - res["metrics"]["model_utility"]) < 1e-6


def test_demo_runs_every_job_and_tabulates_them(out):
    """``launchers/demo.py`` (what ``make demo`` runs) on the minuscule benchmark: prepare, one
    2-rank ZeRO-3 launch (asu_kl and npo), two single-rank processes side by side (target and retain
    evaluations, then the extra rows idk_dpo and rmu with the same global batch), then the table.
    Tiny-tuned configs are used where they exist (asu_kl_tiny, rmu_tiny). Two training steps on the
    minuscule benchmark cannot pass the ASU checks (made for the default demo), so the demo ends with exit
    code 1 and a line naming the failed checks, after writing every row and the table."""
    import subprocess
    import sys

    from omegaconf import OmegaConf

    main, extra = ["asu_kl", "npo"], ["idk_dpo", "rmu"]
    demo = out / "runs" / "demo"
    # the demo adds +exp=tofu_tiny itself; 3 layers: rmu_tiny steers layer 2
    mini = [a if a != "model.tiny.num_hidden_layers=2" else "model.tiny.num_hidden_layers=3"
            for a in SYNTHETIC_MINI if a != "+exp=tofu_tiny"]
    cmd = [sys.executable, "launchers/demo.py", "--out", str(demo), "--methods", ",".join(main),
           "--extra-methods", ",".join(extra), "--port", str(launch.free_port()), "--", *mini,
           f"cache_dir={out / 'cache'}", "trainer.max_steps=2", "trainer.batch_size=2", "trainer.retain_batch_size=2"]
    p = subprocess.run(cmd, cwd=launch.ROOT, env=launch.env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 1, (p.stdout[-3000:], p.stderr[-3000:])
    assert "[demo] 2/2 npo done" in p.stdout and "[demo] 2/2 rmu done" in p.stdout  # progress reaches the terminal
    summary = json.loads((demo / "summary.json").read_text())
    assert [r["name"] for r in summary["rows"]] == ["target", "retain", *main, *extra]
    # target and retain are evaluated by the single-rank processes, beside the extra rows
    assert [r["world_size"] for r in summary["rows"]] == [1, 1, 2, 2, 1, 1]
    timings = json.loads((demo / "timings.json").read_text())
    assert sorted(t["name"] for t in timings) == sorted(["target", "retain", *main, *extra])
    for m in main + extra:
        res = json.loads((demo / m / "results.json").read_text())
        assert res["steps"] == 2
        assert res["metrics"]["probe_fact_recall_drop"] is not None  # robustness probe on every run
        batch = OmegaConf.load(demo / m / "config.yaml").trainer.batch_size
        assert batch == (2 if m in main else 4), (m, batch)  # one rank carries the 2-rank global batch
    assert OmegaConf.load(demo / "rmu" / "config.yaml").method.layer == 2  # conf/method/rmu_tiny.yaml
    assert "| asu_kl | 2 |" in (demo / "summary.md").read_text()
    # the ASU checks (asu_kl's row only): counted after the table, the failed ones named in one line
    checks = summary["checks"]
    assert len(checks) == 4 and all(c["check"].startswith("asu_kl: ") for c in checks), checks
    failed = [c for c in checks if not c["ok"]]
    assert failed, checks
    assert p.stdout.rstrip().splitlines()[-1] == f"ASU checks: {4 - len(failed)}/4 passed", p.stdout[-500:]
    (line,) = [ln for ln in p.stderr.splitlines() if ln.startswith("ASU check(s) failed, exit 1")]
    assert "designed for the default settings" in line and "trainer.max_steps=2" in line, line
    assert all(c["check"] in line for c in failed) and not any(c["check"] in line for c in checks if c["ok"]), line


def test_demo_refuses_a_bad_override_before_any_job_runs(out):
    import subprocess
    import sys

    demo = out / "runs" / "demo_bad"
    mini = [a for a in SYNTHETIC_MINI if a != "+exp=tofu_tiny"]
    cmd = [sys.executable, "launchers/demo.py", "--out", str(demo), "--methods", "asu_kl", "--extra-methods", "",
           "--ranks", "1", "--",
           *mini, f"cache_dir={out / 'cache'}", "trainer.lrr=1"]
    p = subprocess.run(cmd, cwd=launch.ROOT, env=launch.env(), capture_output=True, text=True, timeout=600)
    assert p.returncode != 0
    assert "trainer.lrr" in p.stdout + p.stderr
    assert not (demo / "target" / "results.json").exists()
