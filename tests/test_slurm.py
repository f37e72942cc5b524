"""Real SLURM on this machine (``sudo .ci/slurm_setup.sh`` starts a one-node cluster, partition
``debug``): plain sbatch with 2 ranks, a submitit sweep, preemption → requeue → resume (the
script's SIGUSR1 and submitit's SIGUSR2), and a plain ``scancel`` that is not requeued.

Skipped with the reason when ``sbatch`` is missing or no SLURM controller answers. ~3-4 min.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.tiny import build, train_overrides

ROOT = Path(__file__).resolve().parents[1]
PARTITION = os.environ.get("ASU_SLURM_PARTITION", "debug")


def _slurm_reason() -> str:
    if shutil.which("sbatch") is None:
        return "sbatch not on PATH (install and start a test cluster with: sudo .ci/slurm_setup.sh)"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"scontrol ping failed: {exc}"
    if "UP" not in ping.stdout:
        return f"no SLURM controller answers (scontrol ping: {ping.stdout.strip() or ping.stderr.strip()}); run .ci/slurm_setup.sh"
    info = subprocess.run(["sinfo", "-h", "-p", PARTITION, "-o", "%T"], capture_output=True, text=True, timeout=15)
    states = info.stdout.split()
    if not any(s.startswith(("idle", "mixed", "alloc")) for s in states):
        return f"partition {PARTITION!r} has no usable node (sinfo states: {states or info.stderr.strip()})"
    return ""


_REASON = _slurm_reason()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(bool(_REASON), reason=_REASON or "ok")]


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ASU_AUTO_RANK")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="offline",
               HF_HUB_OFFLINE="1", PY=sys.executable, ASU_REQUIRE_PARTITIONED="1")
    return env


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    model_dir, data_dir = build(root)
    return root, model_dir, data_dir


def _sbatch(args, root: Path, name: str, ntasks: int = 2) -> str:
    cmd = ["sbatch", "--parsable", f"--partition={PARTITION}", f"--job-name={name}", "--nodes=1",
           f"--ntasks-per-node={ntasks}", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
           f"--output={root}/{name}-%j.out", "launchers/slurm/train.sbatch", *args]  # the script appends
    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def _job_state(job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    fields = {}
    for tok in out.stdout.split():
        k, _, v = tok.partition("=")
        fields[k] = v
    return fields


def _wait(pred, timeout: float, what: str, job: str = "", log: Path | None = None, poll: float = 0.5):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return time.time() - t0
        st = _job_state(job).get("JobState") if job else None
        if st in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"):
            break
        time.sleep(poll)
    tail = ""
    for p in sorted(log.parent.glob(log.name)) if log else []:
        tail += p.read_text(errors="replace")[-3000:]
    pytest.fail(f"timed out / job ended waiting for {what} (job {job}: {_job_state(job) if job else ''})\n{tail}")


def _common(tiny, run_name: str, steps: int, extra=()):
    root, model_dir, data_dir = tiny
    return train_overrides(model_dir, data_dir, root / "runs", run_name, steps=steps) + [
        "method=asu_kl", "method.tau=2.0", *extra]


def test_sbatch_two_ranks(tiny):
    """launchers/slurm/train.sbatch with 2 tasks on CPU: ranks from SLURM_*, results.json written."""
    root = tiny[0]
    t0 = time.time()
    job = _sbatch(_common(tiny, "sb2", steps=3), root, "asu-sb2")
    res = root / "runs" / "sb2" / "results.json"
    _wait(res.exists, 150, "results.json of the 2-rank sbatch job", job, root / f"asu-sb2-{job}.out")
    r = json.loads(res.read_text())
    assert r["world_size"] == 2 and r["steps"] == 3
    _wait(lambda: _job_state(job).get("JobState") == "COMPLETED", 60, "job completion", job)
    print(f"\nsbatch 2 ranks: {time.time() - t0:.1f}s")


def test_submitit_sweep(tiny):
    """A 2-point Hydra sweep through the submitit SLURM launcher (one job per point), then the report."""
    t0 = time.time()
    out, sweep_dir = _slurm_sweep(tiny, "slurm_sweep")
    assert out.returncode == 0, out.stderr[-4000:]
    found = sorted(p.parent.name for p in sweep_dir.glob("*/results.json"))
    assert found == ["tau_1.5", "tau_3.0"], list(sweep_dir.iterdir())
    taus = sorted(json.loads((sweep_dir / d / "results.json").read_text())["tau"] for d in found)
    assert taus == [1.5, 3.0]
    # requeueable as train.sbatch: submitit's requeue after a preemption checkpoint needs it on clusters
    # with JobRequeue=0
    scripts = list(sweep_dir.glob(".submitit/*/*_submission.sh"))
    assert scripts and all("#SBATCH --requeue" in f.read_text().splitlines() for f in scripts), scripts
    rep = subprocess.run([sys.executable, "launchers/report.py", str(sweep_dir)], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=60)
    assert rep.returncode == 0 and (sweep_dir / "pareto.png").exists(), rep.stderr
    print(f"\nsubmitit 2-point sweep: {time.time() - t0:.1f}s")


def _slurm_sweep(tiny, exp: str, extra=(), env=None, taus: str = "1.5,3.0", tasks: int = 1):
    root, model_dir, data_dir = tiny
    args = [a for a in train_overrides(model_dir, data_dir, root / "runs", "x", steps=2)
            if not a.startswith(("run_name=", "trainer.max_steps="))]
    out = subprocess.run(
        [sys.executable, "launchers/train.py", "-m", *args, f"exp_name={exp}", "method=asu_kl", f"method.tau={taus}",
         "trainer.max_steps=2", "hydra.sweep.subdir=tau_${method.tau}", "hydra/launcher=slurm",
         f"hydra.launcher.partition={PARTITION}", "hydra.launcher.gpus_per_node=0",
         f"hydra.launcher.tasks_per_node={tasks}", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=20",
         *extra],
        cwd=ROOT, env={**_env(), **(env or {})}, capture_output=True, text=True, timeout=240)
    return out, root / "runs" / "sweeps" / exp


def test_failed_sweep_jobs_end_the_launcher_with_their_error_lines(tiny):
    """A job's user error inside a SLURM job, and a job that dies before its Hydra log (its Python
    environment): the launcher ends with exit code 2, each failed job's own error line and no
    traceback; it used to wait forever for the first (the job exited, leaving submitit no result,
    and this cluster has no accounting) and print submitit's traceback for the second."""
    out, sweep_dir = _slurm_sweep(tiny, "slurm_user_error", ["trainer.save_every=1"],
                                  env={"ASU_INJECT": "enospc_in_save@1"})  # every job: a failed checkpoint write
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    for tau in ("1.5", "3.0"):
        assert f"sweep tau_{tau}: train.log: error (CheckpointError, rank 0): could not write checkpoint" in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error (SweepError, rank 0): SLURM sweep into") and "2 job(s) failed" in last, last

    setup = ('hydra.launcher.setup=["export PYTHONPATH=$SLURM_SUBMIT_DIR/launchers:$SLURM_SUBMIT_DIR:$PYTHONPATH",'
             '"unset RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT ASU_AUTO_RANK",'
             '"if [ $SLURM_ARRAY_TASK_ID = 1 ]; then export PYTHONPATH=/nonexistent; fi"]')  # job 1 cannot start
    out, sweep_dir = _slurm_sweep(tiny, "slurm_early_death", [setup])
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "sweep job 1 (method.tau=3.0): SLURM job " in out.stderr
    assert "ModuleNotFoundError: No module named '_bootstrap'" in out.stderr
    rep = subprocess.run([sys.executable, "launchers/report.py", str(sweep_dir)], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=60)
    assert rep.returncode == 0, rep.stderr
    points = {p["overrides"]["method.tau"]: p for p in json.loads((sweep_dir / "report.json").read_text())["points"]}
    assert points["1.5"]["status"] == "ok" and points["3.0"]["status"] == "failed"
    assert "No module named '_bootstrap'" in points["3.0"]["note"]


def test_a_partition_the_cluster_lacks_is_refused_by_sbatch_and_said_so(tiny):
    """The real sbatch's refusal (test_launcher_guards.py has the same with an sbatch stand-in): nothing
    was queued, and the line says so instead of pointing at squeue; the new sweep directory is removed."""
    root, model_dir, data_dir = tiny
    args = [a for a in train_overrides(model_dir, data_dir, root / "refused", "x", steps=2) if not a.startswith("run_name=")]
    out = subprocess.run(
        [sys.executable, "launchers/train.py", "-m", *args, "exp_name=refused", "method.tau=1.5,3.0",
         "hydra.sweep.subdir=tau_${method.tau}",
         "hydra/launcher=slurm", "hydra.launcher.partition=asu_no_such_partition", "hydra.launcher.gpus_per_node=0",
         "hydra.launcher.tasks_per_node=1", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=5"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert re.fullmatch(r"error \(SweepError, rank 0\): SLURM sweep into .*/refused/sweeps/refused: sbatch refused the "
                        r"submission \(sbatch: error: .*\): no job was submitted \(the sweep directory it created is "
                        r"removed\); the same command submits the sweep once that is fixed", last), last
    assert not (root / "refused").exists()


def test_a_rank_failing_alone_ends_its_two_rank_job_and_the_launcher(tiny):
    """Rank 1 of a 2-rank submitit job fails at its first step (an injected error, as an out-of-memory
    error on one GPU) while rank 0 goes on into the step's collectives. Before, Hydra recorded the error
    and rank 1 exited 0: rank 0 waited out deepspeed.timeout_minutes (here 10, past this test's 4-minute
    limit) and the launcher with it. Now rank 1 records the error as both tasks' submitit results and
    exits, srun ends rank 0, and the launcher stops with the error named, exit 2."""
    out, sweep_dir = _slurm_sweep(tiny, "slurm_one_rank", ["deepspeed.timeout_minutes=10"], taus="1.5", tasks=2,
                                  env={"ASU_INJECT": "error_in_step@1:1"})
    assert out.returncode == 2, out.stderr[-3000:]
    # the cause, rank 1's line (rank 0's "Connection reset by peer" that followed is kept out of the job log)
    assert "sweep tau_1.5: train.log: error (RuntimeError, rank 1): injected failure: error_in_step@1 on rank 1" \
        in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error (SweepError, rank 0): SLURM sweep into") and "failed" in last, last
    assert not (sweep_dir / "tau_1.5" / "results.json").exists()


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "model" / "model.safetensors"))


def test_preemption_requeue_resume_matches_uninterrupted(tiny):
    """`scancel -b --signal=USR1` mid-run: every rank checkpoints and exits 124, the script requeues
    the job, the second attempt resumes and ends with the same metrics and weights as a run that
    was never interrupted (both 2 ranks, started together)."""
    root = tiny[0]
    steps = 120
    extra = ["trainer.save_every=20", "trainer.keep_checkpoints=2"]
    t0 = time.time()
    ref_job = _sbatch(_common(tiny, "ref", steps, extra), root, "asu-ref")
    pre_job = _sbatch(_common(tiny, "pre", steps, extra), root, "asu-pre")
    pre = root / "runs" / "pre"
    log = root / f"asu-pre-{pre_job}.out"
    # wait for the first periodic checkpoint, i.e. training is under way, then preempt
    _wait(lambda: (pre / "checkpoints" / "latest").exists(), 150, "the first checkpoint", pre_job, log, poll=0.2)
    assert not (pre / "results.json").exists()
    sig = subprocess.run(["scancel", "-b", "--signal=USR1", pre_job], capture_output=True, text=True, timeout=30)
    assert sig.returncode == 0, sig.stderr
    t_sig = time.time()
    _wait(lambda: int(_job_state(pre_job).get("Restarts", "0")) >= 1, 180, "the requeue", pre_job, log)
    _wait((pre / "results.json").exists, 300, "results.json after the requeue", pre_job, log)
    t_done = time.time()
    ref = root / "runs" / "ref"
    _wait((ref / "results.json").exists, 300, "the uninterrupted run", ref_job, root / f"asu-ref-{ref_job}.out")
    # Two ranks write progress bars into one job log; a multi-byte character can be split.
    text = log.read_text(errors="replace")
    assert "preempted: requeueing job" in text, text[-3000:]
    assert "resumed from" in (pre / "train.log").read_text(errors="replace") or "resumed from" in text
    # same trajectory end: final metrics, final losses, exported weights
    a, b = json.loads((pre / "results.json").read_text()), json.loads((ref / "results.json").read_text())
    for k, v in b["metrics"].items():
        if isinstance(v, float):
            assert a["metrics"][k] == pytest.approx(v, abs=1e-6), k
    assert a["final_train"]["step"] == b["final_train"]["step"] == steps
    assert a["final_train"]["loss"] == pytest.approx(b["final_train"]["loss"], abs=1e-6)
    wa, wb = _weights(pre), _weights(ref)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
    print(f"\npreemption: signal after {t_sig - t0:.1f}s, requeued run done {t_done - t_sig:.1f}s later "
          f"(total {time.time() - t0:.1f}s)")


def test_scancel_checkpoints_and_is_not_requeued(tiny):
    """A plain `scancel` (SIGTERM to the script and the ranks): the ranks checkpoint and the job stays
    cancelled. Before, the script trapped TERM like its own USR1 and requeued the job the user had
    cancelled."""
    root = tiny[0]
    job = _sbatch(_common(tiny, "cancel", 2000, ["trainer.save_every=50", "eval.enabled=false"]), root, "asu-cancel")
    run = root / "runs" / "cancel"
    log = root / f"asu-cancel-{job}.out"
    _wait(lambda: (run / "checkpoints" / "latest").exists(), 150, "the first checkpoint", job, log, poll=0.2)
    assert subprocess.run(["scancel", job], capture_output=True, text=True, timeout=30).returncode == 0
    t0 = time.time()
    while time.time() - t0 < 90 and "terminated (SIGTERM" not in log.read_text(errors="replace"):
        time.sleep(0.5)
    time.sleep(5)  # time for a (wrong) requeue to show
    text = log.read_text(errors="replace")
    state = _job_state(job)
    assert "terminated (SIGTERM: scancel or a preemption): checkpointed, not requeueing" in text, text[-3000:]
    assert "requeueing job" not in text and state.get("Restarts", "0") == "0", state
    assert state.get("JobState") == "CANCELLED", state
    assert "preempted at step" in text or "preempted at step" in (run / "train.log").read_text(errors="replace")


def test_submitit_preemption_checkpoints_before_submitit_requeues(tiny):
    """The submitit launcher's preemption signal (SIGUSR2, `signal_delay_s` before the limit): every rank
    writes the stop checkpoint at the next step boundary, then submitit's own handler requeues the job,
    and the requeued attempt resumes from that step (before: submitit requeued on arrival and the
    steps since the last periodic checkpoint were trained again)."""
    root, model_dir, data_dir = tiny
    args = [a for a in train_overrides(model_dir, data_dir, root / "runs", "x", steps=400)
            if not a.startswith("run_name=")]
    sweep = root / "runs" / "sweeps" / "slurm_usr2"
    proc = subprocess.Popen(
        [sys.executable, "launchers/train.py", "-m", *args, "exp_name=slurm_usr2", "method=asu_kl", "method.tau=2.0",
         "trainer.save_every=100", "eval.enabled=false", "hydra.sweep.subdir=only",
         "hydra/launcher=slurm", f"hydra.launcher.partition={PARTITION}", "hydra.launcher.gpus_per_node=0",
         "hydra.launcher.tasks_per_node=1", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=20"],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = sweep / "only"
    try:
        _wait(lambda: (run / "checkpoints" / "latest").exists() or proc.poll() is not None, 200, "the first checkpoint",
              poll=0.2)
        jobs = sorted(p.name for p in (sweep / ".submitit").glob("[0-9]*"))
        assert proc.poll() is None and len(jobs) == 1, (jobs, proc.poll())
        assert subprocess.run(["scancel", "--signal=USR2", jobs[0]], capture_output=True, text=True,
                              timeout=30).returncode == 0
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    logs = "".join(p.read_text(errors="replace") for p in sorted((sweep / ".submitit").rglob("*_log.*")))
    stopped = [int(m) for m in re.findall(r"preempted at step (\d+):", logs)]
    assert len(stopped) == 1 and 0 < stopped[0] < 400, logs[-4000:]
    assert "passing signal 12 on to the handler installed before training" in logs, logs[-4000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{stopped[0]:08d}'} at step {stopped[0]}/400" in logs
    hist = json.loads((run / "train_history.json").read_text())
    assert [h["step"] for h in hist] == list(range(1, 401))
    assert int(_job_state(jobs[0]).get("Restarts", "0")) >= 1
