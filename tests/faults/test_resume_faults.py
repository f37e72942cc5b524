"""Kill-and-resume: a run SIGKILLed mid-training and resumed ends with the same weights as an
uninterrupted run; a checkpoint from another configuration is refused with the fields named."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers.tiny import build, train_overrides

ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY = 60, 10


def _env():
    env = dict(os.environ)
    env.update(PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p), OMP_NUM_THREADS="1",
               DS_ACCELERATOR="cpu", WANDB_MODE="offline", HF_HUB_OFFLINE="1",
               ASU_REQUIRE_PARTITIONED="1")
    return env


def _cmd(args):
    return [sys.executable, "launchers/train.py", *args]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return (root, *build(root))


def _args(tiny, name, extra=()):
    root, model_dir, data_dir = tiny
    return train_overrides(model_dir, data_dir, root / "runs", name, steps=STEPS) + [
        "eval.enabled=false", "method=asu_kl", "method.tau=2.0", f"trainer.save_every={EVERY}",
        "trainer.keep_checkpoints=10", *extra]


@pytest.mark.distributed
def test_sigkill_then_resume_matches_uninterrupted(tiny):
    root = tiny[0]
    ref = subprocess.run(_cmd(_args(tiny, "full")), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]

    ckpts = root / "runs" / "killed" / "checkpoints"
    proc = subprocess.Popen(_cmd(_args(tiny, "killed")), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (ckpts / "latest").exists() and (ckpts / "latest").read_text().strip() >= f"step_{2 * EVERY:08d}":
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    rc = proc.wait(timeout=60)
    assert rc == -signal.SIGKILL, f"the run was not killed mid-training (rc={rc}); make STEPS larger"
    assert not (root / "runs" / "killed" / "model").exists()
    done_before = sorted(p.name for p in ckpts.glob("step_*") if not p.name.endswith(".partial"))
    assert done_before and int(done_before[-1].split("_")[1]) < STEPS

    res = subprocess.run(_cmd(_args(tiny, "killed")), cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr + res.stdout
    a = load_file(root / "runs" / "full" / "model" / "model.safetensors")
    b = load_file(root / "runs" / "killed" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst


@pytest.mark.distributed
def test_resume_refuses_checkpoint_from_other_config(tiny):
    first = subprocess.run(_cmd(_args(tiny, "cfgA", ["trainer.max_steps=10"])), cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tiny[0] / "runs" / "cfgA"
    config = run / "config.yaml"
    before = config.read_text()
    kept = {name: (run / name).read_bytes() for name in ("results.json", "finished.json") if (run / name).exists()}
    assert "results.json" in kept
    other = subprocess.run(_cmd(_args(tiny, "cfgA", ["trainer.max_steps=20", "method.tau=3.0"])), cwd=ROOT,
                           env=_env(), capture_output=True, text=True, timeout=300)
    assert other.returncode == 2
    assert "different configuration" in other.stderr and "method" in other.stderr and "tau" in other.stderr
    # the refused launch leaves the config.yaml of the run whose checkpoints and results are there, and
    # its results and finished record (before: set aside as results.previous.json before the refusal)
    assert config.read_text() == before
    assert {name: (run / name).read_bytes() for name in kept} == kept and not (run / "results.previous.json").exists()


@pytest.mark.distributed
def test_new_weights_at_the_model_path_are_not_resumed_from_the_old_training(tmp_path):
    """The checkpoint records its starting model's file fingerprint: new weights at the same
    model.path (a re-trained or re-downloaded model) refuse the resume, naming it. Before, the old
    training resumed silently and was reported as training from the new model."""
    root = tmp_path
    model_dir, data_dir = build(root)
    args = train_overrides(model_dir, data_dir, root / "runs", "m", steps=2) + [
        "eval.enabled=false", "method=grad_diff", "trainer.save_every=1", "trainer.export=false"]
    first = subprocess.run(_cmd(args), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    build(root, seed=1)  # other weights, same architecture, same path
    again = subprocess.run(_cmd(args), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 2, again.stderr[-3000:]
    assert "different configuration (model.content_sha256: checkpoint=" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.distributed
def test_the_same_weights_copied_back_to_the_model_path_resume(tmp_path):
    """A requeued SLURM job stages the model to node-local scratch at the same path (``cp -r``: the same
    bytes, new mtimes). Before, the checkpoint meta's model fingerprint held the files' mtimes: the
    preempted run's resume was refused ("different configuration (model.files_sha256 ...)") and its
    finished-run record missed, though the weights were byte-identical."""
    import shutil

    root = tmp_path
    model_dir, data_dir = build(root)
    run = root / "runs" / "m"
    args = train_overrides(model_dir, data_dir, root / "runs", "m", steps=2) + [
        "eval.enabled=false", "method=grad_diff", "trainer.save_every=1", "trainer.export=false"]
    first = subprocess.run(_cmd(args), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    model_dir.rename(root / "shared_model")  # the copy on shared storage; the job's scratch copy is gone
    shutil.copytree(root / "shared_model", model_dir, copy_function=shutil.copyfile)  # cp -r: new mtimes
    for f in model_dir.iterdir():
        os.utime(f, (time.time() + 3600,) * 2)
    again = subprocess.run(_cmd(args), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "finished already" in again.stderr, again.stderr[-3000:]  # the finished-run record matches
    (run / "finished.json").unlink()  # preempted before it finished: it resumes from its last checkpoint
    resumed = subprocess.run(_cmd(args), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "different configuration" not in resumed.stderr and "resumed at the last step (2/2)" in resumed.stderr


def test_pruning_keeps_the_checkpoint_just_written_when_another_run_left_later_steps(tmp_path):
    """trainer.resume=never in a used run directory: the old run's step_6 is later than the new run's
    step_2. Pruning by step number deleted the step just published (``latest`` then named nothing)."""
    import json as _json

    from pipeline.engine import checkpoint as ckpt

    for step in (1, 2, 6):
        d = tmp_path / f"step_{step:08d}"
        d.mkdir()
        (d / ckpt.META).write_text(_json.dumps({"step": step}))
    ckpt._prune(tmp_path, 1, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000006"]
    ckpt._prune(tmp_path, 2, 6)  # the old run's own later save keeps its newest before it too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000006"]


def test_a_resume_with_other_training_settings_is_refused_and_old_checkpoints_are_not(tmp_path):
    """lr, schedule, step count, batching, sequence length, prompt format and precision are in the
    checkpoint's meta: before, `trainer.lr=X` re-run in the same run directory silently resumed the old
    run (DeepSpeed restores the checkpoint's lr and schedule) while config.yaml said X."""
    from hydra import compose, initialize_config_dir

    from pipeline.config import register_configs
    from pipeline.engine.checkpoint import CheckpointError, check_compatible
    from pipeline.run import checkpoint_meta

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        meta = {over: checkpoint_meta(compose("config", overrides=[over] if over else []), 1)
                for over in ("", "trainer.lr=0.1", "trainer.max_steps=3", "data.max_length=64",
                             "deepspeed.precision=bf16", "logging.progress_bar=false", "trainer.grad_accum=2",
                             "method.rna_noise=0.05", "trainer.nan_policy=skip")}
    saved = {**meta[""], "step": 4, "tag": "step_00000004"}
    for over, key in (("trainer.lr=0.1", "training.trainer.lr"), ("trainer.max_steps=3", "training.trainer.max_steps"),
                      ("data.max_length=64", "training.data.max_length"),
                      ("deepspeed.precision=bf16", "training.precision")):
        with pytest.raises(CheckpointError, match=rf"different configuration \({key}: checkpoint="):
            check_compatible(saved, meta[over], tmp_path)
    check_compatible(saved, meta["logging.progress_bar=false"], tmp_path)  # not a training setting
    # a run a NaN stopped resumes with nan_policy=skip (it decides nothing about the checkpointed steps),
    # also from a checkpoint that recorded the policy
    check_compatible(saved, meta["trainer.nan_policy=skip"], tmp_path)
    check_compatible({**saved, "training.trainer.nan_policy": "stop"}, meta["trainer.nan_policy=skip"], tmp_path)
    with pytest.raises(CheckpointError, match=r"training.precision: checkpoint='fp32' now='bf16'"):
        check_compatible(saved, {**meta[""], "training.precision": "bf16"}, tmp_path)  # auto on a GPU node now
    old = {k: v for k, v in saved.items() if not k.startswith("training.")}  # written before they were recorded
    check_compatible(old, meta["trainer.lr=0.1"], tmp_path)
    # the rows' digests came later: compared when the checkpoint has them (other data under the same split
    # names resumed silently before), not for a checkpoint written without them
    with_rows = {**saved, "rows.forget": "a", "rows.retain": "b"}
    check_compatible(with_rows, {**meta[""], "rows.forget": "a", "rows.retain": "b"}, tmp_path)
    with pytest.raises(CheckpointError, match=r"rows.forget: checkpoint='a' now='c'"):
        check_compatible(with_rows, {**meta[""], "rows.forget": "c", "rows.retain": "b"}, tmp_path)
    check_compatible(saved, {**meta[""], "rows.forget": "c", "rows.retain": "b"}, tmp_path)
    # chat_template_kwargs came later: a checkpoint without it had none ({}), and a run that sets one differs
    before = {k: v for k, v in saved.items() if k != "training.model.chat_template_kwargs"}
    check_compatible(before, meta[""], tmp_path)
    with pytest.raises(CheckpointError, match=r"training.model.chat_template_kwargs: checkpoint=\{\} now="):
        check_compatible(before, {**meta[""], "training.model.chat_template_kwargs": {"date_string": "1 Jan 2025"}},
                         tmp_path)
    # rows drawn per optimizer step and RNA / per-use draws keyed by stream position (2026-12): a run that
    # draws differently now (grad_accum > 1, RNA noise) refuses its earlier checkpoint; one that does not resumes it
    assert "training.draws" not in meta[""]
    for over in ("trainer.grad_accum=2", "method.rna_noise=0.05"):
        earlier = {k: v for k, v in meta[over].items() if k != "training.draws"}
        with pytest.raises(CheckpointError, match=r"training.draws: checkpoint=None .* written by an earlier version"):
            check_compatible(earlier, meta[over], tmp_path)
        check_compatible(meta[over], meta[over], tmp_path)
        # written before training settings were recorded at all: still refused on the draws
        ancient = {k: v for k, v in meta[over].items() if not k.startswith("training.")}
        with pytest.raises(CheckpointError, match=r"training.draws: checkpoint=None"):
            check_compatible(ancient, meta[over], tmp_path)
    # a checkpoint of this version with grad_accum=1 resumed with grad_accum=2: the setting is named, no
    # claim of an earlier version
    with pytest.raises(CheckpointError, match=r"training.trainer.grad_accum: checkpoint=1 now=2") as refused:
        check_compatible(saved, meta["trainer.grad_accum=2"], tmp_path)
    assert "earlier version" not in str(refused.value)


def test_a_lora_run_resumes_under_another_merged_dtype_and_exports_again(tmp_path):
    """model.peft.merged_dtype decides only model/'s dtype, no training step: a finished LoRA run
    re-launched with merged_dtype=model to halve its disk was refused ("different configuration (peft:
    ...)"). It resumes at its last step, and the export record, which names the dtype, has it exported
    again; other LoRA settings (the rank) are still compared."""
    from types import SimpleNamespace

    from hydra import compose, initialize_config_dir

    from pipeline.config import register_configs
    from pipeline.engine.checkpoint import CheckpointError, check_compatible
    from pipeline.run import _export_record, _exported_already, checkpoint_meta

    register_configs()
    lora = ["model.peft.enabled=true"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        meta = {over: checkpoint_meta(compose("config", overrides=lora + ([over] if over else [])), 1)
                for over in ("", "model.peft.merged_dtype=model", "model.peft.r=4")}
    check_compatible(meta[""], meta["model.peft.merged_dtype=model"], tmp_path)
    # a checkpoint written before: its peft field holds merged_dtype as well
    legacy = {**meta[""], "peft": json.dumps({**json.loads(meta[""]["peft"]), "merged_dtype": "float32"},
                                             sort_keys=True)}
    check_compatible(legacy, meta["model.peft.merged_dtype=model"], tmp_path)
    with pytest.raises(CheckpointError, match=r"different configuration \(peft: "):
        check_compatible(legacy, meta["model.peft.r=4"], tmp_path)
    # the export of the last checkpoint is reused only when it was merged into the same dtype
    ckpt = tmp_path / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": 4, "info.save_id": "a" * 32}))
    (tmp_path / "model").mkdir()
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "exported_from.json").write_text(json.dumps(_export_record(ckpt, 4, "float32")))
    trainer = SimpleNamespace(resumed_from=ckpt, state=SimpleNamespace(step=4), start_step=4)
    assert _exported_already(tmp_path, tmp_path / "model", trainer, "float32")
    assert not _exported_already(tmp_path, tmp_path / "model", trainer, "bfloat16")
    (tmp_path / "exported_from.json").write_text(json.dumps(_export_record(ckpt, 4, None)))  # before: no dtype
    assert not _exported_already(tmp_path, tmp_path / "model", trainer, "float32")


def test_refusal_settings_at_their_defaults_leave_the_method_meta_as_before(tmp_path):
    """idk_answers_file / idk_draw came later: at their defaults they are not in the checkpoint's
    method record, so an earlier idk_dpo checkpoint still resumes; a per-use draw is refused by it."""
    import json

    from hydra import compose, initialize_config_dir

    from pipeline.config import register_configs
    from pipeline.engine.checkpoint import CheckpointError, check_compatible
    from pipeline.run import checkpoint_meta

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        plain = checkpoint_meta(compose("config", overrides=["method=idk_dpo"]), 1)
        drawn = checkpoint_meta(compose("config", overrides=["method=idk_dpo", "method.idk_draw=per_use"]), 1)
    method = json.loads(plain["method"])
    assert "idk_draw" not in method and "idk_answers_file" not in method and "idk_answers" in method
    assert json.loads(drawn["method"])["idk_draw"] == "per_use"
    with pytest.raises(CheckpointError, match="method"):
        check_compatible({**plain, "step": 2, "tag": "step_00000002"}, drawn, tmp_path)


def test_a_requeued_run_started_from_another_runs_checkpoint_continues_from_its_own(tmp_path):
    """trainer.resume=<another run's checkpoint>: the first attempt starts there; once this run has
    checkpoints of its own, a requeued attempt (same command) continues from its newest instead of
    going back to the path. A path inside this run's own checkpoints (a rollback) is taken as given."""
    import json as _json

    from pipeline.engine import checkpoint as ckpt

    def make(root, step):
        d = root / f"step_{step:08d}"
        d.mkdir(parents=True)
        (d / ckpt.META).write_text(_json.dumps({"step": step}))
        (root / "latest").write_text(d.name)
        return d

    other, own = tmp_path / "other" / "checkpoints", tmp_path / "run" / "checkpoints"
    start = make(other, 2)
    assert ckpt.resume_target(str(start), own) == start  # first attempt: nothing of its own yet
    assert ckpt.resume_target("never", own) is None and ckpt.resume_target("auto", own) is None
    make(own, 4)
    newest = make(own, 6)
    assert ckpt.resume_target(str(start), own) == newest
    assert ckpt.resume_target("auto", own) == newest
    rollback = own / "step_00000004"
    assert ckpt.resume_target(str(rollback), own) == rollback
    # a typo of never/auto was a path outside the run: it resumed the run's own newest, silently
    with pytest.raises(ckpt.CheckpointError, match="trainer.resume=nver: no such checkpoint directory"):
        ckpt.resume_target("nver", own)
    # the start pruned since, or a mistyped path (alike here): not guessed, the fix named
    import shutil

    shutil.rmtree(start)
    with pytest.raises(ckpt.CheckpointError, match="newest step_00000006.: trainer.resume=auto continues"):
        ckpt.resume_target(str(start), own)
    with pytest.raises(ckpt.CheckpointError, match=r"no such checkpoint directory \(allowed: auto, never, or the "
                                                   r"path of a checkpoint\)$"):  # nothing of its own
        ckpt.resume_target(str(start), tmp_path / "fresh" / "checkpoints")


@pytest.mark.distributed
def test_another_runs_checkpoint_needs_allow_pickle_and_a_damaged_one_is_one_line(tiny):
    """trainer.resume=<a checkpoint made elsewhere>: DeepSpeed unpickles its files (code in them would
    run), so it is refused before any model loads unless model.allow_pickle=true; a checkpoint file
    cut short is a CheckpointError naming it. Before: loaded as is (a crafted file ran its code), and
    a damaged one was a PytorchStreamReader traceback, exit 1."""
    import shutil

    made = subprocess.run(_cmd(_args(tiny, "source", ["trainer.max_steps=10"])), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    step = tiny[0] / "runs" / "source" / "checkpoints" / f"step_{EVERY:08d}"
    refused = subprocess.run(_cmd(_args(tiny, "foreign", ["trainer.max_steps=10", f"trainer.resume={step}"])),
                             cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines()[-1].startswith("error (CheckpointError, rank 0): trainer.resume=")
    assert "a checkpoint made outside this run" in refused.stderr and "model.allow_pickle=true" in refused.stderr
    assert "DeepSpeed student" not in refused.stderr  # refused before the engines were built

    damaged = tiny[0] / "damaged" / step.name
    shutil.copytree(step, damaged)
    states = next(damaged.rglob("*model_states.pt"))
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
    broken = subprocess.run(_cmd(_args(tiny, "from_damaged", ["trainer.max_steps=10", f"trainer.resume={damaged}",
                                                             "model.allow_pickle=true"])),
                            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert broken.returncode == 2 and "Traceback" not in broken.stderr, broken.stderr[-3000:]
    last = broken.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error (CheckpointError, rank 0): checkpoint {damaged} cannot be read"), last
    # a file left out of a copy, a meta.json cut short: named before any model loads (before: DeepSpeed's
    # AssertionError, a JSONDecodeError traceback); an RNG state cut short: one line (an OSError traceback)
    for name, damage, says in (
            ("lacking", lambda d: next(d.glob("*model_states.pt")).unlink(), "lacks 1 file(s) its 1 rank(s) wrote ("),
            ("bad_meta", lambda d: (d / "meta.json").write_text('{"step": 1,'), "meta.json is not readable JSON"),
            ("bad_rng", lambda d: (d / "rank_state_00000.pt").write_bytes(b"\x80"), "cannot be read")):
        copy = tiny[0] / name / step.name
        shutil.copytree(step, copy)
        damage(copy)
        out = subprocess.run(_cmd(_args(tiny, f"from_{name}", ["trainer.max_steps=10", f"trainer.resume={copy}",
                                                               "model.allow_pickle=true"])),
                             cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
        last = out.stderr.strip().splitlines()[-1]
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
        assert last.startswith("error (CheckpointError, rank 0): ") and says in last and str(copy) in last, last
        assert name == "bad_rng" or "DeepSpeed student" not in out.stderr


@pytest.mark.distributed
def test_a_requeued_rollback_within_the_run_continues_from_what_it_trained_since(tmp_path):
    """trainer.resume=<a checkpoint of this run> (a rollback): the first attempt rolls back there; its
    checkpoints record it, so a requeue (the same command) continues from the newest instead of
    rolling back again each time (and failing for good once keep_checkpoints pruned the path)."""
    from tests.helpers import launch

    model_dir, data_dir = build(tmp_path)
    ckpts = tmp_path / "runs" / "rb" / "checkpoints"
    args = train_overrides(model_dir, data_dir, tmp_path / "runs", "rb", steps=8) + [
        "method=grad_diff", "eval.enabled=false", "trainer.save_every=2", "trainer.keep_checkpoints=2"]
    first = launch.run(args, ASU_INJECT="kill_after_save@6")  # preempted after step 6's checkpoint
    assert first.returncode != 0 and (ckpts / "step_00000006").exists()
    rollback = args + [f"trainer.resume={ckpts / 'step_00000004'}"]
    second = launch.run(rollback, ASU_INJECT="kill_after_save@6")  # rolls back to 4, preempted after 6 again
    assert "resumed from" in second.stderr and "step_00000004 at step 4/8" in second.stderr, second.stderr[-3000:]
    third = launch.run(rollback)  # the requeue: same command
    assert third.returncode == 0, third.stderr[-3000:]
    assert "step_00000006 at step 6/8" in third.stderr and "rolled back there" in third.stderr, third.stderr[-3000:]


def test_a_checkpoint_moved_aside_by_a_cut_off_save_of_its_step_still_counts_and_comes_back(tmp_path):
    """Saving a published step again moves the old one aside until the new one is in place (it was
    deleted first: a kill in between left the run without the checkpoint `latest` names, and with
    keep_checkpoints=1 without any)."""
    import json as _json

    from pipeline.engine import checkpoint as ckpt

    root = tmp_path / "checkpoints"
    aside = root / (ckpt.REPLACED + "step_00000004")
    aside.mkdir(parents=True)
    (aside / ckpt.META).write_text(_json.dumps({"step": 4}))
    (root / "latest").write_text("step_00000004")
    assert ckpt.latest_checkpoint(root) == aside  # killed between moving it aside and the new one's rename
    ckpt._settle_replaced(root)  # the next save, first thing
    assert ckpt.latest_checkpoint(root) == root / "step_00000004" and not aside.exists()
    aside.mkdir()  # the new save was published, the old one not yet removed: it goes
    (aside / ckpt.META).write_text(_json.dumps({"step": 4}))
    ckpt._settle_replaced(root)
    assert not aside.exists() and (root / "step_00000004" / ckpt.META).exists()


def test_a_rollback_is_continued_by_its_own_jobs_requeue_and_repeated_by_a_new_submission(tmp_path, monkeypatch):
    import json as _json

    from pipeline.engine import checkpoint as ckpt

    root = tmp_path / "checkpoints"
    for step in (4, 6, 8):
        d = root / f"step_{step:08d}"
        d.mkdir(parents=True)
        meta = {"step": step}
        if step > 4:  # trained after rolling back to step 4 in SLURM job 41
            meta[ckpt.ROLLED_BACK] = {"tag": "step_00000004", "job": "41"}
        (d / ckpt.META).write_text(_json.dumps(meta))
    (root / "latest").write_text("step_00000008")
    monkeypatch.setenv("SLURM_JOB_ID", "41")  # its requeue
    assert ckpt.resume_target(str(root / "step_00000004"), root) == root / "step_00000008"
    monkeypatch.setenv("SLURM_JOB_ID", "57")  # a new submission rolls back again
    assert ckpt.resume_target(str(root / "step_00000004"), root) == root / "step_00000004"
    # pruned by keep_checkpoints since: the requeue still continues from its newest; a new submission
    # gets one line instead of a run from scratch
    import shutil

    shutil.rmtree(root / "step_00000004")
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    assert ckpt.resume_target(str(root / "step_00000004"), root) == root / "step_00000008"
    monkeypatch.setenv("SLURM_JOB_ID", "57")
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint directory"):
        ckpt.resume_target(str(root / "step_00000004"), root)
