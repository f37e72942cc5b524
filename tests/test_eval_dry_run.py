"""``launchers/eval.py ... trainer.dry_run=true``: the checks an evaluation makes before loading the
model, then nothing evaluated or written (before: the flag was ignored and a full evaluation ran)."""

from tests.helpers.launch import run
from tests.helpers.tiny import build, train_overrides


def test_an_evaluation_dry_run_checks_and_evaluates_nothing(tmp_path):
    model_dir, data_dir = build(tmp_path)
    args = train_overrides(model_dir, data_dir, tmp_path / "runs", "e", steps=1) + ["trainer.dry_run=true"]
    done = run(args, script="launchers/eval.py", timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dry run: evaluation of" in done.stderr and "nothing evaluated or written" in done.stderr
    run_dir = tmp_path / "runs" / "e"
    assert not (run_dir / "results.json").exists() and not (run_dir / "eval_parts").exists()
    # a split that is not there is the launch's one line, exit 2
    bad = run([*args, "data.eval_splits=[nope]"], script="launchers/eval.py", timeout=180)
    lines = [ln for ln in bad.stderr.splitlines() if ln.startswith("error (")]
    assert bad.returncode == 2 and len(lines) == 1 and "split 'nope' not found" in lines[0], bad.stderr[-2000:]


def test_an_evaluation_dry_run_of_the_embedded_benchmark_builds_nothing(tmp_path):
    """resolve_paths would build the benchmark (data and two trained tiny models) into cache_dir."""
    done = run(["+exp=tofu_tiny", "trainer.dry_run=true", f"output_dir={tmp_path / 'runs'}", "run_name=e",
                f"cache_dir={tmp_path / 'cache'}", "logging=none"], script="launchers/eval.py", timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dry run: evaluation of the embedded benchmark" in done.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs" / "e" / "results.json").exists()
