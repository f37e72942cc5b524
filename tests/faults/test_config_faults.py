"""Config faults through the real CLI: stop at compose/validate time, name the key and range,
and leave no output behind."""

import shutil
from pathlib import Path

import pytest

from tests.helpers import launch
from tests.helpers.tiny import train_overrides

# Found once the model is loaded (its number of layers), or once the job knows its rank's device
# (a sweep may be checked on a submit host without GPUs); every other case is found before Hydra
# creates the run directory, so not even .hydra/ or the job log is written.
AFTER_LOADING = ("method.teacher_layers=[0,5]", "eval.device=cuda")


@pytest.mark.parametrize(
    "override,expect",
    [
        ("trainer.lr_typo=1", ["'trainer.lr_typo'", "not in 'TrainerConfig'"]),  # unknown key (Hydra, at compose time)
        ("trainer.max_steps=many", ["max_steps=many", "could not be converted to Integer"]),  # wrong type
        ("method=grad_dif", ["'method/grad_dif'", "available: ", "grad_diff"]),  # unknown group option
        ("trainer.lr=[1,2", ["'[1,2'"]),  # malformed override
        ("model.source=synthetic", ["model.path", "does not read it"]),  # a path that would be ignored
        ("method.tau=-2", ["method.tau", "must be > 0"]),  # out of range
        ("trainer.lr=0", ["trainer.lr", "must be > 0"]),
        ("method.teacher_layers=[0,5]", ["method.teacher_layers", "allowed 0..1"]),  # tiny model: 2 layers
        ("eval.batch_size=0", ["eval.batch_size", "must be >= 1"]),  # was a traceback after training
        ("eval.dtype=fp8", ["eval.dtype", "allowed values: auto, float32, bfloat16, float16"]),
        ("eval.device=cuda", ["eval.device=cuda, but this rank has no CUDA device"]),  # before training, not after
        # model paths: before, a traceback from transformers (exit 1) once the job had started
        ("model.path=/nonexistent/model", ["ModelLoadError", "model.path=/nonexistent/model: no such directory"]),
        ("model.path=someone/missing-7b", ["model.path=someone/missing-7b", "not in the hub cache",
                                           "HF_HUB_OFFLINE=1", "hf download someone/missing-7b"]),
        ("eval.retain_model=/nonexistent/retain", ["eval.retain_model=/nonexistent/retain: no such directory"]),
        # was: "split 'forget' not found at /nonexistent/data/forget.jsonl; available splits: []", run dir made
        ("data.path=/nonexistent/data", ["DataError", "data.path=/nonexistent/data: no such directory"]),
        # non-finite values passed every range check: a traceback once loaded, or an infinite tau trained on
        ("trainer.weight_decay=nan", ["trainer.weight_decay", "must be a finite number, got nan"]),
        ("method.tau=inf", ["method.tau", "must be a finite number, got inf"]),
        ("deepspeed.timeout_minutes=inf", ["deepspeed.timeout_minutes", "must be a finite number"]),
        ("trainer.max_steps=0", ["trainer.max_steps", "or -1 to train trainer.epochs epochs"]),  # was: epochs, silently
        ("trainer.max_grad_norm=-1", ["trainer.max_grad_norm", "must be >= 0"]),
        ("data.name=synthetic", ["data.path", "data.name=synthetic", "does not read it"]),  # was: the embedded data
        ("output_dir=", ["output_dir", "empty"]),  # was: the run written at the filesystem root
        ("continual.requests=[forget]", ["continual.requests", "launchers/continual.py"]),  # was: ignored
    ],
)
def test_bad_config_stops_with_key_and_range(tiny, override, expect):
    root, model_dir, data_dir = tiny
    name = f"cfgfault-{abs(hash(override))}"  # its own directory: an AFTER_LOADING case leaves its config.yaml
    out = launch.run(train_overrides(model_dir, data_dir, root / "runs", name) + [override])
    # bad input: one line naming the key, exit code 2, no traceback (Hydra's own report is a block
    # of text and exit code 1)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error (")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    for word in expect:
        assert word in errors[0], errors[0]
    assert "schema_" not in errors[0]  # the typed schemas registered in a group are not options
    run = root / "runs" / name
    assert override in AFTER_LOADING or not run.exists(), sorted(run.rglob("*"))
    assert not (run / "model").exists() and not (run / "results.json").exists()
    assert not (run / "checkpoints").exists()
    assert not (Path("/") / name).exists()  # output_dir= empty


@pytest.mark.distributed
@pytest.mark.parametrize("override", ["trainer.lr_typo=1", "method.tau=-2"])
def test_on_two_ranks_a_bad_config_is_one_line_and_exit_2(tiny, override):
    """Every rank meets it alike (one Hydra cannot compose; one our validation refuses): rank 0 prints
    it, the other rank is ended by the launcher before it repeats it (before: one line per rank)."""
    root, model_dir, data_dir = tiny
    out = launch.run(train_overrides(model_dir, data_dir, root / "runs", "cfgfault-2ranks") + [override],
                     ranks=2, launcher="deepspeed")
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error (")]
    assert len(errors) == 1 and ", rank 0): " in errors[0], out.stderr[-3000:]
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("sweep,expect", [
    ("method.tau=2.0,3.0,-1", ["sweep job 3 of 3 (", "method.tau=-1", "must be > 0"]),  # our validation
    ("trainer.lr=1e-3,1e-4,hot", ["sweep job 3 of 3 (", "trainer.lr=hot", "could not be converted"]),  # type
    ("eval.retain_model=null,/nonexistent/retain", ["sweep job 2 of 2 (", "no such directory"]),  # a model path
])
def test_a_sweep_checks_every_job_before_the_first_runs(tiny, sweep, expect):
    """``-m``: a bad value in the last job stops the sweep before any job runs, naming the job, and
    writes nothing (not even the sweep directory's multirun.yaml)."""
    root, model_dir, data_dir = tiny
    out = launch.run(["-m", *train_overrides(model_dir, data_dir, root / "sweep", "sw"), sweep])
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error (")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "Callback EarlyChecks" not in out.stderr  # reported by us, not as Hydra's warning about a raising callback
    for word in expect:
        assert word in errors[0], errors[0]
    assert "Launching" not in out.stderr and not (root / "sweep").exists()  # no job ran, nothing written


def test_sweep_points_that_would_share_a_run_directory_are_refused(tiny):
    """data.path is left out of the directory name (a path would nest it): two points differing only
    there shared one run directory, the second resumed the first's checkpoint, trained nothing and the
    report listed one model for two points. Refused before anything runs; naming the points works."""
    root, model_dir, data_dir = tiny
    other = root / "data_copy"
    if not other.exists():
        shutil.copytree(data_dir, other)
    args = [a for a in train_overrides(model_dir, data_dir, root / "sweep_dirs", "sd") if not a.startswith("data.path=")]
    out = launch.run(["-m", *args, f"data.path={data_dir},{other}"])
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error (")]
    assert len(errors) == 1 and "sweep job 2 of 2 (" in errors[0] and "the same run directory as sweep job 1" in errors[0]
    assert "hydra.sweep.subdir=job_\\${hydra.job.num}" in errors[0]  # shell-quoted
    assert not (root / "sweep_dirs").exists()


def test_a_local_sweep_runs_the_jobs_after_one_that_fails(tiny):
    """Hydra's local launcher runs the jobs in this process: a job's user error exited the process and
    the later jobs never ran. Now the error is reported (stderr and the job's log, where the sweep report
    finds it), the next job runs, and the sweep exits 2 naming the failed job."""
    root, model_dir, data_dir = tiny
    bad = root / "data_without_forget"
    if not bad.exists():
        shutil.copytree(data_dir, bad)
        (bad / "forget.jsonl").unlink()
    args = [a for a in train_overrides(model_dir, data_dir, root / "sweep_fail", "sf", steps=1)
            if not a.startswith("data.path=")]
    out = launch.run(["-m", *args, f"data.path={bad},{data_dir}", "hydra.sweep.subdir=job_${hydra.job.num}",
                      "eval.enabled=false", "trainer.export=false"])
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error (")]
    assert len(errors) == 2 and "DataError" in errors[0] and "forget" in errors[0], errors
    assert errors[1].startswith("error (SweepError, rank 0): 1 sweep job(s) stopped") and "job_0" in errors[1]
    sweep = root / "sweep_fail" / "sweeps"
    done = list(sweep.rglob("job_1/results.json"))
    assert done, sorted(p.relative_to(sweep) for p in sweep.rglob("*"))[:20]
    logs = list(sweep.rglob("job_0/*.log"))
    assert logs and "error (DataError" in logs[0].read_text()
    assert "Traceback" not in out.stderr


def test_hf_hub_offline_0_from_the_shell_does_not_turn_the_network_on(tiny):
    """Only ASU_ALLOW_NETWORK=1 allows hub access at run time; an HF_HUB_OFFLINE=0 left in a shell
    profile is overridden (and said so). Before, it turned the network on and skipped the early
    hub-cache check: a traceback from transformers trying to connect, exit 1."""
    root, model_dir, data_dir = tiny
    out = launch.run(train_overrides(model_dir, data_dir, root / "runs", "offline0") + ["model.path=someone/missing-7b"],
                     HF_HUB_OFFLINE="0")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "note: HF_HUB_OFFLINE=0 from the environment ignored: runs stay offline" in out.stderr
    assert "not in the hub cache" in out.stderr and "Traceback" not in out.stderr
