"""Faults during training: NaN loss, preemption signals, a rank killed while checkpointing, a full
disk, resuming with another world size, and run-to-run determinism. Real processes, real signals,
a real size-limited filesystem (tmpfs)."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import launch
from tests.helpers.tiny import train_overrides

pytestmark = pytest.mark.distributed


def _args(tiny, name, steps, extra=()):
    root, model_dir, data_dir = tiny
    return train_overrides(model_dir, data_dir, root / "runs", name, steps=steps) + [
        "method=asu_kl", "method.tau=2.0", *extra]


def _complete(ckpts: Path) -> list[str]:
    return sorted(p.name for p in ckpts.glob("step_*") if (p / "meta.json").exists() and "partial" not in p.name)


def test_nan_loss_stop_names_step_and_rows_and_saves_nothing(tiny):
    root = tiny[0]
    out = launch.run(_args(tiny, "nan_stop", 6, ["trainer.save_every=1"]), ASU_INJECT="nan_loss@3")
    assert out.returncode == 2
    assert "non-finite loss at step 3 (forget rows [" in out.stderr and "retain rows [" in out.stderr
    ckpts = root / "runs" / "nan_stop" / "checkpoints"
    assert _complete(ckpts) == ["step_00000001", "step_00000002"]  # nothing at or after the NaN
    assert (ckpts / "latest").read_text() == "step_00000002"
    assert not (root / "runs" / "nan_stop" / "model").exists()


def _optimizer_state(ckpt: Path, rank: int) -> dict:
    """This rank's ZeRO-3 partition of the fp32 weights, Adam's moments and step, and the LR schedule."""
    import torch

    o = torch.load(ckpt / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", map_location="cpu",
                   weights_only=False)["optimizer_state_dict"]
    sched = torch.load(ckpt / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)["lr_scheduler"]
    adam = o["optimizer_state_dict"]["state"][0]
    return {"weights": o["fp32_flat_groups"][0], "exp_avg": adam["exp_avg"], "exp_avg_sq": adam["exp_avg_sq"],
            "adam_step": adam["step"], "lr": torch.tensor(sched["_last_lr"]),
            "sched_epoch": torch.tensor(sched["last_epoch"])}


def test_skipped_steps_leave_weights_moments_and_schedule_unchanged(tiny):
    """nan_policy=skip on 2 ZeRO-3 ranks (partitioned weights): a non-finite loss (step 2) and a finite
    loss with non-finite gradients (step 4) are both real skips: every rank's weight partition, Adam
    exp_avg / exp_avg_sq / step and the (linear) LR schedule after the skipped step equal those before
    it, while the steps around them do change all of these."""
    import torch

    root = tiny[0]
    out = launch.run(_args(tiny, "nan_skip", 6, ["trainer.nan_policy=skip", "trainer.save_every=1",
                                                 "trainer.keep_checkpoints=10", "trainer.lr_scheduler=linear",
                                                 "trainer.export=false", "eval.enabled=false"]),
                     ranks=2, ASU_INJECT="nan_loss@2,nan_grad@4")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "non-finite loss at step 2" in out.stderr and "skipping the step" in out.stderr
    assert "non-finite gradient at step 4" in out.stderr
    res = json.loads((root / "runs" / "nan_skip" / "results.json").read_text())
    assert res["skipped_steps"] == [2, 4]
    ckpts = root / "runs" / "nan_skip" / "checkpoints"
    for rank in (0, 1):
        s = {i: _optimizer_state(ckpts / f"step_{i:08d}", rank) for i in range(1, 6)}
        for before, skipped in ((1, 2), (3, 4)):
            for k in s[before]:
                assert torch.equal(s[before][k], s[skipped][k]), (rank, skipped, k)
        for before, stepped in ((2, 3), (4, 5)):
            for k in s[before]:
                assert not torch.equal(s[before][k], s[stepped][k]), (rank, stepped, k)


def test_nan_gradient_stops_naming_step(tiny):
    root = tiny[0]
    out = launch.run(_args(tiny, "nan_grad", 5), ASU_INJECT="nan_grad@3")
    assert out.returncode == 2
    assert "non-finite gradient at step 3 (forget rows [" in out.stderr
    assert not (root / "runs" / "nan_grad" / "model").exists()


def test_non_finite_weights_are_never_checkpointed(tiny):
    root = tiny[0]
    out = launch.run(_args(tiny, "nan_w", 6, ["trainer.save_every=1"]), ASU_INJECT="nan_weights@3")
    assert out.returncode == 2
    assert "weights are non-finite at step 3: refusing to save a checkpoint" in out.stderr
    ckpts = root / "runs" / "nan_w" / "checkpoints"
    assert _complete(ckpts) == ["step_00000001", "step_00000002"]
    assert (ckpts / "latest").read_text() == "step_00000002"
    assert not list(ckpts.glob("*.partial")) and not (root / "runs" / "nan_w" / "model").exists()


def _signal_while_training(args: list[str], log: Path, sig: int) -> int:
    """Launch a run, send ``sig`` once its training bar is up, return its exit code."""
    with open(log, "w") as f:
        proc = subprocess.Popen(launch.command(args), cwd=launch.ROOT, env=launch.env(), stdout=f, stderr=f)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if "unlearn[asu_kl]:" in log.read_text(errors="replace"):  # read while written: may end mid-character
            time.sleep(0.5)
            proc.send_signal(sig)
            break
        time.sleep(0.1)
    return proc.wait(timeout=120)


def _resumes_from_the_one_checkpoint(tiny, args: list[str], name: str, steps: int) -> None:
    """One complete checkpoint inside the run; the same command resumes from it and the history
    covers every step exactly once."""
    ckpts = tiny[0] / "runs" / name / "checkpoints"
    done = _complete(ckpts)
    assert len(done) == 1 and 0 < int(done[0].split("_")[1]) < steps
    again = launch.run(args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed from {ckpts / done[0]}" in again.stderr
    hist = json.loads((tiny[0] / "runs" / name / "train_history.json").read_text())
    assert [h["step"] for h in hist] == list(range(1, steps + 1))


def test_a_second_launch_into_a_running_runs_directory_is_refused(tiny):
    """The same command again while the first still trained resumed from checkpoints the first was pruning
    (a FileNotFoundError traceback), or trained alongside it into the same checkpoints and model/."""
    args = _args(tiny, "busy", 100000, ["eval.enabled=false", "trainer.save_every=50"])
    run, log = tiny[0] / "runs" / "busy", tiny[0] / "busy.log"
    with open(log, "w") as f:
        first = subprocess.Popen(launch.command(args), cwd=launch.ROOT, env=launch.env(), stdout=f, stderr=f)
    try:
        deadline = time.time() + 120
        while "unlearn[asu_kl]:" not in log.read_text(errors="replace"):
            assert first.poll() is None and time.time() < deadline, log.read_text(errors="replace")[-2000:]
            time.sleep(0.1)
        hydra_record = {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()}
        second = launch.run(args + ["trainer.lr=5e-4"])
        assert second.returncode == 2, second.stderr[-2000:]
        lines = [ln for ln in second.stderr.splitlines() if ln.startswith("error (")]
        assert len(lines) == 1 and lines[0].startswith("error (RunDirInUseError, rank 0): run directory ") and \
            f"is in use by another launch (pid {first.pid} on " in lines[0], second.stderr[-2000:]
        assert "resumed from" not in second.stderr and "Traceback" not in second.stderr
        # refused before Hydra wrote anything there: the running run's .hydra/ is its own, its log has no
        # second attempt (Hydra replaced config.yaml and overrides.yaml with the refused launch's before)
        assert {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()} == hydra_record
        assert "RunDirInUseError" not in (run / "train.log").read_text()
        assert first.poll() is None  # the first goes on
    finally:
        first.kill()  # as a node that dies: the kernel releases the lock with the process
        first.wait(timeout=60)
    again = launch.run(_args(tiny, "busy", 2, ["eval.enabled=false", "trainer.resume=never"]))
    assert again.returncode == 0, again.stderr[-2000:]
    assert (run / ".run.lock").read_text().startswith("pid ")


def test_two_launches_at_the_same_instant_one_runs_and_the_other_writes_nothing_there(tiny):
    """Two launches started together both passed the look (the lock was taken seconds later, after the
    imports and the process group), and Hydra wrote the refused one's .hydra/ over the running one's.
    Rank 0 now takes the lock in the callback: the later one is refused before Hydra writes."""
    run = tiny[0] / "runs" / "same_instant"
    logs = [tiny[0] / f"same_instant_{i}.log" for i in (0, 1)]
    procs = []
    for i, log in enumerate(logs):  # lr tells whose .hydra/ is there
        with open(log, "w") as f:
            procs.append(subprocess.Popen(launch.command(_args(tiny, "same_instant", 30, [
                "eval.enabled=false", "trainer.export=false", f"trainer.lr={i + 1}e-4"])),
                cwd=launch.ROOT, env=launch.env(), stdout=f, stderr=f))
    codes = [p.wait(timeout=300) for p in procs]
    texts = [log.read_text(errors="replace") for log in logs]
    assert sorted(codes) == [0, 2], texts
    ran, refused = (0, 1) if codes[0] == 0 else (1, 0)
    assert "error (RunDirInUseError, rank 0): run directory " in texts[refused] and "Traceback" not in texts[refused]
    overrides = (run / ".hydra" / "overrides.yaml").read_text()
    assert f"trainer.lr={ran + 1}e-4" in overrides and f"trainer.lr={refused + 1}e-4" not in overrides
    assert "RunDirInUseError" not in (run / "train.log").read_text()


def test_a_held_run_directory_refuses_before_its_checkpoints_are_read(tiny):
    """The lock comes before the resume point is looked up: a launch beside a running one read the
    checkpoints that one was pruning and could stop on one it had just deleted, not on the lock. And
    before Hydra writes anything there, on one rank or two."""
    from pipeline.engine.run_lock import run_dir_lock

    run = tiny[0] / "runs" / "held"
    with run_dir_lock(run):  # as another launch training there (a lock on another open file: refused)
        out = launch.run(_args(tiny, "held", 2, ["trainer.resume=" + str(run / "checkpoints" / "step_00000009")]))
        # two ranks: rank 0 refuses; rank 1, which never looks, writes no .hydra/ and opens no job log
        two = launch.run(_args(tiny, "held", 2, []), ranks=2)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error (")]
    assert len(lines) == 1 and lines[0].startswith("error (RunDirInUseError, rank 0): "), out.stderr[-2000:]
    assert two.returncode != 0 and "error (RunDirInUseError, rank 0): " in two.stderr, two.stderr[-2000:]
    assert sorted(p.name for p in run.iterdir()) == [".run.lock"]  # no .hydra/, no job log


def test_sigterm_preemption_checkpoints_exits_124_and_resumes(tiny):
    args = _args(tiny, "preempt", 400, ["eval.enabled=false"])
    log = tiny[0] / "preempt.log"
    rc = _signal_while_training(args, log, signal.SIGTERM)
    assert rc == 124, log.read_text(errors="replace")[-2000:]
    _resumes_from_the_one_checkpoint(tiny, args, "preempt", 400)


def test_ctrl_c_checkpoints_exits_130_in_one_line_and_resumes(tiny):
    """A user's Ctrl-C (SIGINT) checkpoints at the next step boundary like a preemption, but exits
    130 (not 124, which SLURM would requeue) with a line saying how to resume, no traceback."""
    args = _args(tiny, "ctrlc", 300, ["eval.enabled=false"])
    log = tiny[0] / "ctrlc.log"
    rc = _signal_while_training(args, log, signal.SIGINT)
    text = log.read_text(errors="replace")
    assert rc == 130, text[-2000:]
    assert "Ctrl-C: will checkpoint at the next step boundary" in text
    assert "run the same command again to resume" in text and "Traceback" not in text
    _resumes_from_the_one_checkpoint(tiny, args, "ctrlc", 300)


def test_rank_killed_during_save_keeps_previous_checkpoint_and_resume_works(tiny):
    root = tiny[0]
    args = _args(tiny, "killsave", 6, ["trainer.save_every=2", "eval.enabled=false", "trainer.batch_size=1",
                                        "trainer.retain_batch_size=1", "trainer.keep_checkpoints=5"])
    out = launch.run(args, ranks=2, ASU_INJECT="kill_in_save@4:1")
    assert out.returncode != 0
    ckpts = root / "runs" / "killsave" / "checkpoints"
    assert _complete(ckpts) == ["step_00000002"]
    assert (ckpts / "latest").read_text() == "step_00000002"
    assert not (ckpts / "step_00000004").exists()  # only a .partial directory, never presented as complete
    again = launch.run(args, ranks=2)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stderr and "step_00000002" in again.stderr
    assert _complete(ckpts)[-1] == "step_00000006"


def test_one_ranks_failed_write_ends_every_rank_and_keeps_the_previous_checkpoint(tiny):
    """Rank 1 alone cannot write (a node-local quota): every rank stops within the launch's timeout
    instead of waiting at the next barrier for deepspeed.timeout_minutes, the failing rank names its
    error, and no half-written checkpoint is left."""
    root = tiny[0]
    args = _args(tiny, "enospc_rank1", 6, ["trainer.save_every=2", "eval.enabled=false", "trainer.batch_size=1",
                                            "trainer.retain_batch_size=1", "deepspeed.timeout_minutes=5"])
    out = launch.run(args, ranks=2, timeout=200, launcher="deepspeed", ASU_INJECT="enospc_in_save@4:1")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "error (CheckpointError, rank 1): could not write checkpoint step_00000004" in out.stderr
    assert "No space left on device" in out.stderr and "Traceback" not in out.stderr
    if "rank 0" in out.stderr:  # rank 0 may be killed by the launcher before it reports
        assert "another rank failed while writing it" in out.stderr
    ckpts = root / "runs" / "enospc_rank1" / "checkpoints"
    assert _complete(ckpts) == ["step_00000002"] and (ckpts / "latest").read_text() == "step_00000002"
    assert not list(ckpts.glob("*.partial"))


def test_resume_with_other_world_size_is_refused(tiny):
    base = _args(tiny, "worldsize", 2, ["trainer.save_every=2", "eval.enabled=false", "trainer.batch_size=1",
                                        "trainer.retain_batch_size=1"])
    first = launch.run(base)
    assert first.returncode == 0, first.stderr[-2000:]
    # every rank refuses alike: one line (rank 0's; the launcher ends rank 1 before it repeats it), exit 2
    second = launch.run(base + ["trainer.max_steps=4"], ranks=2, launcher="deepspeed")
    assert second.returncode == 2, second.stderr[-2000:]
    assert second.stderr.count("error (CheckpointError") == 1, second.stderr[-3000:]
    assert "error (CheckpointError, rank 0): " in second.stderr and "world_size: checkpoint=1 now=2" in second.stderr
    assert "Traceback" not in second.stderr
    # torchrun exits 1 with its own failure summary, which shows the line instead of "To enable traceback"
    third = launch.run(base + ["trainer.max_steps=4"], ranks=2)
    assert third.returncode == 1 and "To enable traceback" not in third.stderr, third.stderr[-3000:]
    assert "traceback : error (CheckpointError, rank 0): " in third.stderr, third.stderr[-3000:]


def test_disk_full_while_saving_keeps_previous_checkpoint(tiny, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=900k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a size-limited tmpfs here (needs root / CAP_SYS_ADMIN)")
    try:
        root, model_dir, data_dir = tiny
        args = train_overrides(model_dir, data_dir, mnt, "full", steps=8) + [
            "method=grad_diff", "trainer.save_every=1", "trainer.keep_checkpoints=0", "eval.enabled=false",
            "trainer.export=false", "trainer.preflight=false"]  # else its disk check refuses it at the start
        refused = launch.run(args[:-1])
        assert refused.returncode == 2 and "error (PreflightError, rank 0): disk preflight: run directory on disk: " \
            in refused.stderr and "all 8 kept (trainer.keep_checkpoints=0)" in refused.stderr, refused.stderr[-2000:]
        assert not (mnt / "full" / "checkpoints").exists()
        out = launch.run(args)
        assert out.returncode == 2, out.stderr[-2000:]
        assert "could not write checkpoint" in out.stderr and "No space left on device" in out.stderr
        ckpts = mnt / "full" / "checkpoints"
        done = _complete(ckpts)
        assert done and (ckpts / "latest").read_text() == done[-1]
        assert "is intact and remains the newest" in out.stderr
        assert not list(ckpts.glob("*.partial"))  # the half-written one was removed
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_preemption_notice_after_the_last_steps_look_checkpoints_and_exits_124(tiny):
    """A SIGTERM after the last step's look at the stop flag, before the end of training, set a flag
    nobody read: the run logged "will checkpoint ... and exit", exported, evaluated and exited 0 while
    the scheduler waited for it to stop. The last look now comes after the handlers are restored: the
    notice stops the run there, checkpointed (also with save_every=0, which writes no other), exit 124;
    the same command then finishes from that checkpoint without training again."""
    args = _args(tiny, "notice_after", 2, ["trainer.save_every=0"])
    run_dir = tiny[0] / "runs" / "notice_after"
    first = launch.run(args, ASU_INJECT="sigterm_after_training@2")
    assert first.returncode == 124, first.stderr[-3000:]
    assert "preempted at step 2: checkpoint saved, exiting with code 124" in first.stderr
    assert not (run_dir / "results.json").exists() and not (run_dir / "model").exists()
    # 2 ranks: each exits 124 itself (torchrun's summary; torchrun's own code is 1), not the teardown's -6
    two = launch.run(args + ["trainer.resume=never"], ranks=2, ASU_INJECT="sigterm_after_training@2")
    assert two.returncode == 1 and "exitcode  : 124" in two.stderr and "exitcode  : -6" not in two.stderr, \
        two.stderr[-3000:]
    again = launch.run(args, ranks=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to train: resumed at the last step (2/2)" in again.stderr
    assert (run_dir / "results.json").exists()


def test_a_preemption_notice_during_evaluation_says_so_and_exits_124(tiny):
    """SIGTERM after training (here: between evaluated splits) ended the process silently with 143:
    nothing in stderr or train.log. Now one line, exit 124 (what the SLURM scripts requeue on USR1),
    and the same command resumes: nothing trained again, the evaluated split reused. 2 ranks: each
    rank exits 124 itself."""
    args = _args(tiny, "notice_in_eval", 2, ["data.eval_splits=[eval_retain,forget]", "trainer.save_every=2"])
    run_dir = tiny[0] / "runs" / "notice_in_eval"
    first = launch.run(args, ASU_INJECT="sigterm_in_eval@1")
    assert first.returncode == 124, first.stderr[-3000:]
    line = ("received signal 15 (SIGTERM) while not training (a preemption or cancel, or the launcher ending this "
            "rank after another failed): stopping now, exit code 124; the same command again resumes from what "
            "was saved (checkpoints, the export, evaluated splits)")
    assert line in first.stderr and line in (run_dir / "train.log").read_text()
    assert "Traceback" not in first.stderr and not (run_dir / "results.json").exists()
    two = launch.run(args + ["run_name=notice_in_eval_2"], ranks=2, ASU_INJECT="sigterm_in_eval@1")
    assert two.returncode == 1 and two.stderr.count("exitcode  : 124") == 2, two.stderr[-3000:]
    again = launch.run(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to train: resumed at the last step (2/2)" in again.stderr
    assert "eval[eval_retain]: the result of an earlier attempt is reused" in again.stderr
    assert (run_dir / "results.json").exists()


def test_same_seed_same_metrics(tiny):
    root = tiny[0]
    a = launch.run(_args(tiny, "det_a", 3))
    b = launch.run(_args(tiny, "det_b", 3))
    assert a.returncode == 0 and b.returncode == 0, (a.stderr + b.stderr)[-2000:]
    ra = json.loads((root / "runs" / "det_a" / "results.json").read_text())
    rb = json.loads((root / "runs" / "det_b" / "results.json").read_text())
    assert ra["metrics"] == rb["metrics"]


def test_a_preemption_notice_during_a_save_does_not_save_twice_nor_train_on(tiny):
    """SIGTERM while a periodic checkpoint is written: that checkpoint is the stop checkpoint (before:
    the same step saved again, deleting the complete one first), exit 124. SIGTERM during the final
    save: exit 124 at once (before: export and evaluation ran, exit 0). The run that finishes reports
    the loop's time over all three attempts."""
    steps, name = 4, "notice_in_save"
    args = _args(tiny, name, steps, ["trainer.save_every=2", "eval.enabled=false"])
    run_dir = tiny[0] / "runs" / name
    first = launch.run(args, ASU_INJECT="sigterm_in_save@2")
    text = first.stderr + first.stdout
    assert first.returncode == 124, text[-3000:]
    assert text.count("checkpoint saved: ") == 1 and "step_00000002" in text, text[-3000:]
    second = launch.run(args, ASU_INJECT="sigterm_in_save@4")  # resumes at 2; the notice comes in the final save
    text = second.stderr + second.stdout
    assert second.returncode == 124, text[-3000:]
    assert text.count("checkpoint saved: ") == 1 and "preempted at step 4" in text
    assert not (run_dir / "model").exists()
    third = launch.run(args)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "nothing to train: resumed at the last step (4/4)" in third.stderr + third.stdout
    hist = json.loads((run_dir / "train_history.json").read_text())
    res = json.loads((run_dir / "results.json").read_text())
    assert [h["step"] for h in hist] == [1, 2, 3, 4]
    # the third attempt trained nothing: train_seconds is the first two attempts' loops
    assert sum(h["step_seconds"] for h in hist) <= res["train_seconds"] + 0.005  # results.json rounds to 0.01 s


def test_rank0s_failed_export_ends_every_rank_even_without_a_launcher_that_kills_them(tiny):
    """Rank 0 writes the export alone; when its write fails, the other ranks learn it (broadcast) and
    stop with the same one-line error. Before, they waited at the next barrier for the collective
    timeout (deepspeed.timeout_minutes) unless the launcher killed them: srun without
    --kill-on-bad-exit, or ranks started by hand, as here."""
    import sys

    root = tiny[0]
    args = _args(tiny, "enospc_export", 2, ["eval.enabled=false", "deepspeed.timeout_minutes=5"])
    port = str(launch.free_port())
    procs = [subprocess.Popen([sys.executable, "launchers/train.py", *args], cwd=launch.ROOT,
                              env={**launch.env(ASU_INJECT="enospc_in_export@0:0"), "RANK": str(r), "WORLD_SIZE": "2",
                                   "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": port},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        outs = [p.communicate(timeout=180) for p in procs]  # the old behaviour: rank 1 past 5 minutes
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [2, 2], outs[1][1][-2000:]
    assert "error (ExportError, rank 0): exporting to" in outs[0][1] and "No space left on device" in outs[0][1]
    assert "Traceback" not in outs[0][1] + outs[1][1]
    assert not (root / "runs" / "enospc_export" / "model").exists()
    assert not [p for p in (root / "runs" / "enospc_export").iterdir() if ".tmp" in p.name]  # nothing half-written
