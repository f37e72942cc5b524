"""The launchers' own guards hold for a sweep's every job as for a single run, and a launcher's default
override does not break Hydra's usual argument order (flags first)."""

import subprocess
import sys
from pathlib import Path

from tests.helpers.launch import ROOT, env


def _launch(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"launchers/{script}", *args], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=180)


def test_train_multirun_refuses_continual_requests_as_a_single_run_does(tmp_path):
    """train.py -m with continual.requests ran plain forget-split jobs (only a single run was refused)."""
    out = _launch("train.py", "-m", "+exp=tofu_tiny", "continual.requests=[forget10_part1]", "method.tau=2.0,3.0",
                  f"output_dir={tmp_path / 'runs'}", "trainer.dry_run=true")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
    assert lines[0].startswith("error (ConfigError, rank 0): sweep job 1 of 2 (") and "is read by launchers/continual.py" in lines[0]


def test_eval_multirun_into_a_training_sweep_is_refused(tmp_path):
    """eval.py -m aimed at a training sweep replaced every point's results.json with the evaluation's."""
    point = tmp_path / "runs" / "sweeps" / "tofu_tiny" / "tau_2.0"
    point.mkdir(parents=True)
    (point / "train_history.json").write_text("[]")
    out = _launch("eval.py", "-m", "+exp=tofu_tiny", "method.tau=2.0", "hydra.sweep.subdir=tau_${method.tau}",
                  f"output_dir={tmp_path / 'runs'}")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
    assert f"{point} holds a training run (train_history.json)" in lines[0]
    assert (point / "train_history.json").read_text() == "[]" and not (point / "results.json").exists()
    # a failed re-train set its history aside with its results: its config.yaml still says what it is
    (point / "train_history.json").rename(point / "train_history.previous.json")
    (point / "config.yaml").write_text("seed: 0\n")
    out = _launch("eval.py", "-m", "+exp=tofu_tiny", "method.tau=2.0", "hydra.sweep.subdir=tau_${method.tau}",
                  f"output_dir={tmp_path / 'runs'}")
    assert out.returncode == 2 and f"{point} holds a training run (config.yaml)" in out.stderr, out.stderr[-2000:]


def test_continual_with_a_hydra_flag_before_or_after_the_overrides_composes():
    """continual.py --cfg job +exp=... (and +exp=... --cfg job): the default run_name, put first or last,
    split the overrides or became a flag's value (argparse usage, exit 2)."""
    overrides = ["+exp=tofu_tiny", "continual.requests=[forget10_part1]"]
    for args in (["--cfg", "job", *overrides], [*overrides, "--cfg", "job"]):
        out = _launch("continual.py", *args)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "run_name: ${exp_name}/continual_${method.name}" in out.stdout


def test_a_run_directory_hydra_cannot_set_up_is_one_line_and_exit_2(tmp_path):
    """A run directory whose job log cannot be opened (another user's run, not writable; here a directory
    in its place) was logging.config's ValueError traceback, exit 1, before any of our checks ran."""
    (tmp_path / "runs" / "r" / "train.log").mkdir(parents=True)
    out = _launch("train.py", "+exp=tofu_tiny", f"output_dir={tmp_path / 'runs'}", "run_name=r")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
    assert lines[0].startswith("error (IsADirectoryError, rank 0): cannot open the run's log file: ") and "train.log" in lines[0]


def test_an_empty_run_directory_or_the_models_own_is_refused(tmp_path):
    """hydra.run.dir= (an unset shell variable) wrote results.json, model/ and checkpoints/ into the working
    directory, the repository from its root; hydra.run.dir=<model.path> mixed them into the model's folder."""
    from tests.helpers.tiny import build, train_overrides

    model_dir, data_dir = build(tmp_path / "b")
    args = train_overrides(model_dir, data_dir, tmp_path / "runs", "r") + ["trainer.max_steps=1"]
    work = tmp_path / "work"
    work.mkdir()
    before = sorted(p.name for p in model_dir.iterdir())
    for run_dir, why in (("", "empty: name the run directory"), (str(model_dir), "is model.path's directory")):
        out = subprocess.run([sys.executable, str(ROOT / "launchers" / "train.py"), *args, f"hydra.run.dir={run_dir}"],
                             cwd=work, env=env(), capture_output=True, text=True, timeout=180)
        lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error (")]
        assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
        assert lines[0].startswith("error (ConfigError, rank 0): config error at 'hydra.run.dir': ") and why in lines[0]
        assert not any(work.iterdir()) and sorted(p.name for p in model_dir.iterdir()) == before
        assert not (tmp_path / "runs").exists()


_SUBMITIT_TASK = """
import sys
sys.argv = ["x"]
import launchers._bootstrap as b
from pipeline.engine.checkpoint import CheckpointError
from pipeline.errors import SweepJobFailed
from pipeline.models.loading import ModelLoadError

fault = {"bug": RuntimeError("CUDA out of memory (one rank)"), "one": CheckpointError("rank 1's shard is unreadable"),
         "alike": ModelLoadError("no weights at model.path")}[sys.argv_fault]
def fn():
    raise fault
try:
    b.run_main(fn)
except SweepJobFailed:
    print("recorded for Hydra")  # Hydra's run_job catches it: the task exits 0 with a result
except RuntimeError:
    print("raised to Hydra")
"""


def _submitit_task(fault: str, tasks: int, folder: Path) -> subprocess.CompletedProcess:
    """Task 0 of submitit job 41 (``tasks`` tasks, results in ``folder``) meeting ``fault``."""
    code = _SUBMITIT_TASK.replace("sys.argv_fault", repr(fault))
    folder.mkdir()
    e = {**env(), "SUBMITIT_EXECUTOR": "slurm", "SUBMITIT_FOLDER": str(folder), "SLURM_JOB_ID": "41",
         "SLURM_NTASKS": str(tasks), "SLURM_PROCID": "0"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=e, capture_output=True, text=True, timeout=120)


def _results(folder: Path) -> dict:
    import pickle

    return {p.name: pickle.loads(p.read_bytes()) for p in sorted(folder.glob("*_result.pkl"))}


def test_a_rank_of_a_multi_rank_submitit_job_that_fails_alone_ends_the_job(tmp_path):
    """Hydra's run_job records a job's exception as its outcome and the task exited 0: in a SLURM job of
    several ranks, an out-of-memory error or a user error on one rank left the others waiting in their
    next collective for deepspeed.timeout_minutes (60). The failing rank now exits non-zero (srun's
    SLURM_KILL_BAD_EXIT ends the step) after recording the error as every task's submitit result (the
    launcher reads task 0's first, and without SLURM accounting would wait forever for one). An error
    every rank meets alike is still recorded for Hydra, and a one-rank job is as before."""
    bug = _submitit_task("bug", 2, tmp_path / "bug")
    assert bug.returncode == 1 and "RuntimeError: CUDA out of memory (one rank)" in bug.stderr, bug.stderr[-2000:]
    results = _results(tmp_path / "bug")
    assert sorted(results) == ["41_0_result.pkl", "41_1_result.pkl"], results
    assert all(r[0] == "error" and "RuntimeError: CUDA out of memory (one rank)" in r[1] for r in results.values())
    one = _submitit_task("one", 2, tmp_path / "one")
    line = "error (CheckpointError, rank 0): rank 1's shard is unreadable"
    assert one.returncode == 2 and one.stderr.strip().splitlines()[-1] == line, one.stderr[-2000:]
    assert list(_results(tmp_path / "one").values()) == [("error", line)] * 2
    alike = _submitit_task("alike", 2, tmp_path / "alike")
    assert alike.returncode == 0 and alike.stdout.strip() == "recorded for Hydra", alike.stderr[-2000:]
    for fault, said in (("bug", "raised to Hydra"), ("one", "recorded for Hydra")):
        single = _submitit_task(fault, 1, tmp_path / f"single_{fault}")
        assert single.returncode == 0 and single.stdout.strip() == said, single.stderr[-2000:]
    assert not _results(tmp_path / "alike") and not list(tmp_path.glob("single_*/*_result.pkl"))  # submitit's own


# --- a SLURM sweep: what its jobs would meet only on their nodes, refused before sbatch ------------------

def _slurm_sweep(tmp_path: Path, *overrides: str, sbatch_error: str = "") -> tuple[subprocess.CompletedProcess, Path]:
    """``train.py -m`` on the SLURM launcher with an ``sbatch`` on PATH that records its call and refuses
    the submission as sbatch does (its error on stderr, exit 1): the stand-in is the cluster, not the
    code under test (submitit writes the real batch script and runs the command it finds)."""
    bin_dir, called = tmp_path / "bin", tmp_path / "sbatch_called"
    bin_dir.mkdir(exist_ok=True)
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f"#!/bin/sh\ntouch {called}\necho 'sbatch: error: {sbatch_error or 'refused'}' >&2\nexit 1\n")
    sbatch.chmod(0o755)
    out = subprocess.run([sys.executable, "launchers/train.py", "-m", "+exp=tofu_tiny", "method.tau=1.5,2.0",
                          "hydra/launcher=slurm", f"output_dir={tmp_path / 'runs'}", *overrides], cwd=ROOT,
                         env=env(PATH=f"{bin_dir}:{env()['PATH']}"), capture_output=True, text=True, timeout=180)
    return out, called


def test_a_slurm_sweep_with_more_ranks_than_gpus_per_node_is_refused_before_it_is_submitted(tmp_path):
    """8 tasks per node on 4 GPUs went to sbatch; every job stopped only on its node, after its wait in the
    queue (``8 ranks on a node with 4 GPUs``). Fewer tasks than GPUs runs, warned once (GPUs idle)."""
    out, called = _slurm_sweep(tmp_path, "hydra.launcher.gpus_per_node=4")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and not called.exists(), out.stderr[-2000:]
    assert lines[-1].startswith("error (ConfigError, rank 0): sweep job 1 of 2 (") and lines[-1].endswith(
        "config error at 'hydra.launcher.tasks_per_node': 8 ranks per node on 4 GPUs per node "
        "(hydra.launcher.gpus_per_node): every job would stop on its node once it starts (two ranks on one GPU); "
        "one rank per GPU: hydra.launcher.tasks_per_node=4"), lines[-1]
    out, called = _slurm_sweep(tmp_path, "hydra.launcher.gpus_per_node=8", "hydra.launcher.tasks_per_node=4")
    assert called.exists() and out.returncode == 2, out.stderr[-2000:]  # submitted (and refused by the stand-in)
    assert out.stderr.count("warning: 4 ranks per node on 8 GPUs per node: 4 GPUs of each node are allocated and "
                            "idle") == 1, out.stderr[-2000:]


def test_a_slurm_sweep_with_an_lm_eval_task_lm_eval_does_not_know_is_refused_before_it_is_submitted(tmp_path):
    """The job's start checks the task names, on its node: before, every job of the sweep stopped there."""
    tasks = ROOT / "tests" / "fixtures" / "lm_eval_tasks"
    out, called = _slurm_sweep(tmp_path, "eval.lm_eval=true", "eval.lm_eval_tasks=[wmdp_locl]",
                               "eval.lm_eval_include_defaults=false", f"eval.lm_eval_include_path={tasks}")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and not called.exists(), out.stderr[-2000:]
    assert lines[-1].startswith("error (LmEvalError, rank 0): sweep job 1 of 2 (") and lines[-1].endswith(
        f"eval.lm_eval_tasks: lm-eval knows no task or group ['wmdp_locl'] (searched {tasks}); wmdp_locl: did you "
        f"mean wmdp_local?"), lines[-1]


def test_a_submission_sbatch_refuses_says_no_job_was_submitted_and_leaves_the_sweep_directory_as_it_was(tmp_path):
    """sbatch refusing the sweep's job array (a partition the cluster lacks, no controller) ended with
    'a job failed (...); jobs still queued or running go on (squeue)': nothing was queued. And it left
    Hydra's multirun.yaml naming the refused sweep's points (the sweep report listed them as not
    started, in place of the earlier sweep's) and submitit's batch script and pickles."""
    sweep_dir = tmp_path / "runs" / "sweeps" / "tofu_tiny"
    out, called = _slurm_sweep(tmp_path, "hydra.launcher.partition=nope",
                               sbatch_error="invalid partition specified: nope")
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2 and called.exists() and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert last == (f"error (SweepError, rank 0): SLURM sweep into {sweep_dir}: sbatch refused the submission "
                    "(sbatch: error: invalid partition specified: nope): no job was submitted (the sweep directory "
                    "it created is removed); the same command submits the sweep once that is fixed"), last
    assert not (tmp_path / "runs").exists()
    # an earlier sweep's directory: its record and its jobs' submitit folders stay as they were
    (sweep_dir / ".submitit" / "155_0").mkdir(parents=True)
    (sweep_dir / ".submitit" / "155_0" / "155_0_0_log.out").write_text("earlier job")
    (sweep_dir / "tau_1.5").mkdir()
    (sweep_dir / "multirun.yaml").write_bytes(b"earlier sweep\n")
    before = sorted((str(p.relative_to(sweep_dir)), p.is_file() and p.read_bytes()) for p in sweep_dir.rglob("*"))
    out, _ = _slurm_sweep(tmp_path, "hydra.launcher.partition=nope", sbatch_error="invalid partition specified: nope")
    assert out.returncode == 2 and "no job was submitted (the sweep directory is as it was before this launch)" in \
        out.stderr.strip().splitlines()[-1], out.stderr[-2000:]
    assert sorted((str(p.relative_to(sweep_dir)), p.is_file() and p.read_bytes()) for p in sweep_dir.rglob("*")) == before


def test_a_dry_run_under_the_slurm_launcher_is_refused_before_anything_is_submitted(tmp_path):
    """`-m ... hydra/launcher=slurm trainer.dry_run=true` (the docs' "check a command with its dry run"
    on the README's SLURM sweep) queued one 8-GPU job per point to print its plan into a SLURM log."""
    out, called = _slurm_sweep(tmp_path, "trainer.dry_run=true")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and not called.exists() and not (tmp_path / "runs").exists(), out.stderr[-2000:]
    assert lines[-1].startswith("error (ConfigError, rank 0): sweep job 1 of 2 (") and lines[-1].endswith(
        "config error at 'trainer.dry_run': a dry run under hydra/launcher=slurm would submit a SLURM job per sweep "
        "point to print its plan; drop hydra/launcher=slurm: the dry run then checks and plans every point here, on "
        "this host"), lines[-1]
