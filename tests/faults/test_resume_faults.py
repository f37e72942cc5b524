"""Kill-and-resume: a run SIGKILLed mid-training and resumed ends with the same weights as an
uninterrupted run; a checkpoint from another configuration is refused with the fields named."""

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
    other = subprocess.run(_cmd(_args(tiny, "cfgA", ["trainer.max_steps=20", "method.tau=3.0"])), cwd=ROOT,
                           env=_env(), capture_output=True, text=True, timeout=300)
    assert other.returncode == 2
    assert "different configuration" in other.stderr and "method" in other.stderr and "tau" in other.stderr
