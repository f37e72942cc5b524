"""The run directory's disk plan (pipeline/engine/disk_plan.py): its bytes per weight against real
checkpoints and exports of real DeepSpeed runs (stage 0 in bf16, ZeRO-3 in fp32, each file counted),
how many checkpoints coexist, and the launch's refusal when the filesystem cannot hold the run."""

import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from pipeline.config import register_configs
from pipeline.engine.disk_plan import DiskPlan, check_disk, plan_disk, saves_to_come
from pipeline.engine.preflight import PreflightError, resolve_arch
from tests.helpers import launch
from tests.helpers.tiny import build, build_wider, train_overrides

ROOT = Path(__file__).resolve().parents[1]


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def wider(tmp_path_factory):
    """The tiny fixture's tokenizer and data with a 2.6 M-parameter model: weights, not a checkpoint's
    fixed few KB of names and RNG states, make up its files."""
    root = tmp_path_factory.mktemp("disk")
    model_dir, data_dir = build(root / "tiny")
    return root, build_wider(model_dir, root / "model"), data_dir


@pytest.mark.parametrize("stage,precision,method", [(0, "bf16", "grad_diff"), (3, "fp32", "grad_diff"),
                                                    (3, "fp32", "rmu")])
def test_the_plan_is_what_a_run_writes(wider, stage, precision, method):
    """RMU trains three layers' down_proj: under ZeRO-3 DeepSpeed saves the frozen weights' partitions too."""
    root, model_dir, data_dir = wider
    name = f"s{stage}_{precision}_{method}"
    args = train_overrides(model_dir, data_dir, root / "runs", name, steps=3) + [
        f"method={method}", "eval.enabled=false", "trainer.save_every=1", "trainer.keep_checkpoints=2", "trainer.lr=1e-5",
        f"deepspeed.zero_stage={stage}", f"deepspeed.precision={precision}"] + (["method.layer=2"] if method == "rmu" else [])
    out = launch.run(args)
    assert out.returncode == 0, out.stderr[-2000:]
    run = root / "runs" / name
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=args)
    plan = plan_disk(cfg, resolve_arch(cfg.model, str(model_dir)), stage, precision, None)
    ckpts = sorted(p for p in (run / "checkpoints").glob("step_*"))
    assert len(ckpts) == 2 and plan.counts() == (3, 2)  # two kept; the third exists while written, before the prune
    for c in ckpts:
        assert abs(_bytes(c) - plan.checkpoint) <= 0.01 * plan.checkpoint, (_bytes(c), plan.checkpoint)
    assert abs(_bytes(run / "model") - plan.export) <= 0.01 * plan.export, (_bytes(run / "model"), plan.export)
    assert "[pipeline.engine.disk_plan][INFO] - run directory on disk: ~" in out.stderr
    assert f"checkpoints of ~{plan.checkpoint / 1024**2:.1f} MiB (stage {stage}), 3 at once" in out.stderr


def test_checkpoints_at_once_follow_save_every_keep_the_steps_left_and_those_there():
    assert saves_to_come(0, 100) == 0 and saves_to_come(10, 0) == 0 and saves_to_come(10, None) is None
    assert saves_to_come(10, 25) == 3  # at 10, 20 and the last step
    # resumed from a preemption's step 8: saves at 10, 15, 20 and the last step (21), not ceil(13 / 5)
    assert saves_to_come(5, 21, start=8) == 4 and saves_to_come(5, 20, start=20) == 0

    def counts(saves, keep, existing=0):
        return DiskPlan(1, 0, 3, saves, keep, existing).counts()

    assert counts(10, 2) == (3, 2) and counts(None, 2) == (3, 2) and counts(2, 5) == (2, 2)
    assert counts(3, 0) == (3, 3) and counts(None, 0) == (None, None)
    assert counts(0, 2) == (0, 0)  # no save_every: nothing planned (a preemption's checkpoint is not)
    # a resume: the first save is written beside every checkpoint there, pruned only then
    assert counts(4, 2, existing=2) == (3, 2) and counts(4, 1, existing=3) == (4, 1)
    # resumed at the last step (only the export is left): its checkpoints stay, no save is planned
    resumed = DiskPlan(10, 7, 3, 0, 2, existing=2)
    assert resumed.counts() == (0, 2) and resumed.peak == 2 * 10 + 7


def test_a_filesystem_that_cannot_hold_the_run_is_refused_and_the_checkpoints_there_count(tmp_path, monkeypatch):
    """The filesystem's free space is fixed here (the other test worker writes and prunes checkpoints
    on the same disk): 10 GiB."""
    from types import SimpleNamespace

    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=10 * 2**30))
    run = tmp_path / "run"
    # one save beside one kept: 2 checkpoints of 5 GiB + 1 MiB at once
    too_big = DiskPlan(checkpoint=5 * 2**30 + 2**20, export=2**20, zero_stage=3, saves=1, keep=1, existing=1)
    with pytest.raises(PreflightError, match=rf"disk preflight: run directory on disk: ~10.0 GiB: .*; {run}'s filesystem "
                                             r"has 10.0 GiB free, ~2.0 MiB short: a save would fail\. .*"
                                             r"trainer.preflight=false"):
        check_disk(too_big, run)
    # a resumed run's checkpoints are part of its peak already: with 64 MiB of them there, the same plan fits
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "checkpoints" / "step_00000002" / "optim_states.pt").write_bytes(b"\1" * 2**26)
    with pytest.raises(PreflightError):  # not published yet (no meta.json): a crashed save's, removed by the next
        check_disk(too_big, run)
    (run / "checkpoints" / "step_00000002" / "meta.json").write_text('{"step": 2}')
    assert check_disk(too_big, run).endswith("; 10.0 GiB free")
