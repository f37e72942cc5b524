"""Two nodes on one machine: 2 nodes x 1 rank give what 1 node x 2 ranks gives.

Every weight is partitioned (``deepspeed.param_persistence_threshold=0``). One reference run on one
node with 2 ranks (``torchrun --nproc_per_node 2``), then

* ``torchrun --nnodes 2 --nproc_per_node 1`` twice, joined by a c10d rendezvous on 127.0.0.1
  (what two hosts run with ``--rdzv_endpoint=<head node>``);
* the per-task command of ``launchers/slurm/train.sbatch`` (``$PY launchers/train.py ...``) twice,
  with the environment ``srun`` gives each task of a 2-node allocation (SLURM_PROCID, SLURM_NODEID,
  SLURM_LOCALID=0, SLURM_NTASKS=2, SLURM_JOB_NODELIST, ...; no MASTER_ADDR: it comes from the node
  list). Node 1's process is SIGKILLed while it writes a checkpoint (``kill_in_save``, the fault
  suite's injection); node 0's process is then ended as ``srun --kill-on-bad-exit`` would; both
  tasks are relaunched and resume from the last complete checkpoint.

Both must end with the reference's weights, checkpoint layout and ``results.json`` (apart from
timings and the run name). Four two-process launches: 180 s measured with load average 13 on the
shared 2-core host (the other tests were 2-3x slower than usual then).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers.launch import ROOT, env, free_port
from tests.helpers.tiny import build, train_overrides

STEPS, EVERY, KILL_AT = 6, 2, 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    return (root, *build(root))


def _args(tiny, name: str) -> list[str]:
    root, model_dir, data_dir = tiny
    return train_overrides(model_dir, data_dir, root / "runs", name, steps=STEPS) + [
        "eval.enabled=false", "method=asu_kl", "method.tau=2.0", f"trainer.save_every={EVERY}",
        "trainer.keep_checkpoints=10", "deepspeed.param_persistence_threshold=0"]


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    out = []
    deadline = time.time() + timeout
    for p in procs:
        try:
            text, _ = p.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
        out.append((p.returncode, text))
    return out


def _torchrun() -> str:
    return shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"


def _torchrun_one_node(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([_torchrun(), "--nproc_per_node", "2", "--master_port", str(free_port()),
                           "launchers/train.py", *args], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=300)


def _torchrun_two_nodes(args: list[str]) -> list[tuple[int, str]]:
    torchrun = _torchrun()
    endpoint = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([torchrun, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                               "--rdzv_endpoint", endpoint, "--rdzv_id", "asu-two-nodes", "--max_restarts", "0",
                               "launchers/train.py", *args], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    return _wait_all(procs, 300)


def _slurm_task_env(node: int, port: int, **extra: str) -> dict:
    """What srun exports to task ``node`` of ``sbatch --nodes=2 --ntasks-per-node=1``, plus
    train.sbatch's MASTER_PORT (MASTER_ADDR is left to the pipeline's node-list parsing)."""
    e = env(**extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ASU_AUTO_RANK"):
        e.pop(k, None)
    e.update(SLURM_JOB_ID="4242", SLURM_JOBID="4242", SLURM_STEP_ID="0", SLURM_PROCID=str(node),
             SLURM_NTASKS="2", SLURM_NPROCS="2", SLURM_NODEID=str(node), SLURM_LOCALID="0",
             SLURM_NNODES="2", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="localhost,127.0.0.1",
             SLURM_NODELIST="localhost,127.0.0.1", SLURM_TASKS_PER_NODE="1(x2)", SLURM_NTASKS_PER_NODE="1",
             SLURMD_NODENAME=("localhost", "127.0.0.1")[node], SLURM_SUBMIT_DIR=str(ROOT), MASTER_PORT=str(port))
    return e


def _slurm_two_tasks(args: list[str], kill_node1_in_save: int | None = None) -> list[tuple[int, str]]:
    port = free_port()
    extra = {"ASU_INJECT": f"kill_in_save@{kill_node1_in_save}:1"} if kill_node1_in_save else {}
    procs = [subprocess.Popen([sys.executable, "launchers/train.py", *args], cwd=ROOT,
                              env=_slurm_task_env(node, port, **extra), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    if kill_node1_in_save:
        try:
            procs[1].wait(timeout=240)
        finally:
            time.sleep(2)  # srun --kill-on-bad-exit=1: the surviving task is killed once one task dies
            if procs[0].poll() is None:
                procs[0].send_signal(signal.SIGKILL)
    return _wait_all(procs, 300)


def _layout(run: Path) -> list[str]:
    ck = run / "checkpoints"
    return sorted(str(p.relative_to(ck)) for p in ck.rglob("*") if p.is_file())


def _results(run: Path) -> dict:
    r = json.loads((run / "results.json").read_text())
    for k in ("train_seconds", "job_seconds", "run_name"):
        r.pop(k)
    r["final_train"].pop("step_seconds")  # a timing too
    r.pop("resumed_from")  # which checkpoint this attempt started from: the killed run's resumed, the reference not
    # the job's own overrides name its run (the code, libraries and seed must be the same)
    r["provenance"]["overrides"] = [o for o in r["provenance"]["overrides"] if not o.startswith("run_name=")]
    return r


def _same_run(run: Path, ref: Path) -> None:
    a, b = load_file(run / "model" / "model.safetensors"), load_file(ref / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f"{run.name}: weights differ from 1 node x 2 ranks by {worst}"
    assert _layout(run) == _layout(ref), f"{run.name}: checkpoint layout differs"
    diffs = _diff(_results(run), _results(ref))
    assert not diffs, f"{run.name}: results.json differs from 1 node x 2 ranks at {diffs}"


def _diff(a, b, where: str = "") -> list[str]:
    """Paths where two JSON values differ (floats to 1e-6 relative: the loss history)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where} keys {sorted(a.keys() ^ b.keys())}"]
        return [d for k in a for d in _diff(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where} length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        return [] if a == pytest.approx(b, rel=1e-6, abs=1e-9) else [f"{where}: {a} != {b}"]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


@pytest.fixture
def clean_env():
    saved = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
              "ASU_AUTO_RANK"):
        os.environ.pop(k, None)
    for k in [k for k in os.environ if k.startswith("SLURM")]:
        os.environ.pop(k)
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("tasks_per_node,node,local,expect", [("1(x2)", 1, 0, 1), ("2(x3),1", 3, 0, 1),
                                                              ("2(x3),1", 1, 1, 2)])
def test_slurm_environment_maps_to_ranks(clean_env, tasks_per_node, node, local, expect):
    """What srun gives one task of a multi-node allocation becomes torchrun-style rank variables."""
    from pipeline.engine.distributed import setup_environment

    clean_env.update(SLURM_PROCID="5", SLURM_NTASKS="7", SLURM_NODEID=str(node), SLURM_LOCALID=str(local),
                     SLURM_JOB_NODELIST="gpu[07-09,11],cpu3", SLURM_TASKS_PER_NODE=tasks_per_node, SLURM_JOB_ID="1234")
    setup_environment()
    assert {k: clean_env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK",
                                      "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "5", "WORLD_SIZE": "7", "LOCAL_RANK": str(local), "LOCAL_WORLD_SIZE": str(expect),
        "NODE_RANK": str(node), "MASTER_ADDR": "gpu07", "MASTER_PORT": "16234"}
    assert "ASU_AUTO_RANK" not in clean_env


def test_a_task_that_sees_one_gpu_uses_it_whatever_its_local_rank(clean_env, monkeypatch, capfd):
    """srun --gpus-per-task=1 (or GPU binding): task 3 of a node sees its GPU as cuda:0; LOCAL_RANK,
    by which DeepSpeed and set_device pick the device, becomes 0. A CPU job keeps its LOCAL_RANK."""
    import torch

    from pipeline.engine.distributed import setup_environment

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    clean_env.update(SLURM_PROCID="3", SLURM_NTASKS="4", SLURM_NODEID="0", SLURM_LOCALID="3",
                     SLURM_JOB_NODELIST="gpu01", SLURM_TASKS_PER_NODE="4", SLURM_JOB_ID="1", DS_ACCELERATOR="cuda")
    setup_environment()
    assert clean_env["LOCAL_RANK"] == "0" and clean_env["LOCAL_WORLD_SIZE"] == "4"
    assert "[rank 3] LOCAL_RANK 3 but 1 visible GPU(s): using cuda:0" in capfd.readouterr().err
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        clean_env.pop(k)
    clean_env["DS_ACCELERATOR"] = "cpu"
    setup_environment()
    assert clean_env["LOCAL_RANK"] == "3"


def test_more_ranks_per_node_than_the_gpus_each_sees_is_one_line(clean_env, monkeypatch):
    """tasks_per_node 8 on a node whose tasks each see its 4 GPUs: LOCAL_RANK 4-7 were remapped to
    cuda:0-3, two ranks per GPU, and NCCL stopped later ("Duplicate GPU detected")."""
    import torch

    from pipeline.config_base import ConfigError
    from pipeline.engine.distributed import setup_environment

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    slurm = dict(SLURM_NTASKS="8", SLURM_NODEID="0", SLURM_JOB_NODELIST="gpu01", SLURM_TASKS_PER_NODE="8",
                 SLURM_JOB_ID="1", DS_ACCELERATOR="cuda", SLURM_GPUS_ON_NODE="4")
    message = "8 ranks on a node with 4 GPUs: more ranks per node than GPUs"
    for rank in ("0", "5"):  # every rank alike: rank 0 waiting in the rendezvous would hold the node for an hour
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            clean_env.pop(k, None)
        clean_env.update(slurm, SLURM_PROCID=rank, SLURM_LOCALID=rank)
        with pytest.raises(ConfigError, match=message):
            setup_environment()
    # what a launcher's preamble makes of it: one line, exit 2, before any library import or Hydra
    # (a real launcher process; torch told it has 4 GPUs before the preamble runs)
    preamble = ("import sys, torch\n"
                "torch.cuda.is_available = lambda: True\n"
                "torch.cuda.device_count = lambda: 4\n"
                f"sys.path.insert(0, {str(ROOT / 'launchers')!r})\n"
                "import _bootstrap\n"
                "print('started anyway')\n")
    launch_env = {k: v for k, v in clean_env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    launch_env.update(slurm, SLURM_PROCID="0", SLURM_LOCALID="0")
    out = subprocess.run([sys.executable, "-c", preamble], env=launch_env, cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stderr
    assert "started anyway" not in out.stdout and "Traceback" not in out.stderr, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error (")]
    assert len(lines) == 1 and message in lines[0] and "ConfigError, rank 0" in lines[0], out.stderr
    # bound tasks (--gpu-bind): each sees 4 of the node's 8 GPUs, and rank 5 takes its own cuda:1
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        clean_env.pop(k, None)
    clean_env.update(slurm, SLURM_PROCID="5", SLURM_LOCALID="5", SLURM_GPUS_ON_NODE="8")
    setup_environment()
    assert clean_env["LOCAL_RANK"] == "1"


def test_ranks_per_node_from_the_deepspeed_launchers_local_size(monkeypatch):
    """The deepspeed launcher exports LOCAL_SIZE, not LOCAL_WORLD_SIZE: 2 nodes x 8 GPUs are 8 per
    node, not 16 (the preflight multiplies host terms by it)."""
    from pipeline.engine.preflight import _local_world_size

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_SIZE", "8")
    assert _local_world_size(16) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert _local_world_size(16) == 4
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.delenv("LOCAL_SIZE")
    assert _local_world_size(16) == 16 and _local_world_size(1) == 1


def test_cuda_rng_state_is_this_ranks_device_and_old_checkpoints_still_resume(monkeypatch):
    """The saved CUDA RNG state is the rank's own device's (a resume may see another GPU count per
    process); a checkpoint that saved every device's list restores the current device's entry."""
    import torch

    from pipeline.engine import trainer

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: calls.append(int(s[0])))
    # CPU ranks on a GPU host (make test / make demo): no CUDA state saved or restored (reading it
    # would open a CUDA context on GPU 0 in every rank)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert "cuda" not in trainer.get_rng_states()
    trainer.set_rng_states({"cuda": torch.tensor([3], dtype=torch.uint8)})
    assert calls == []
    monkeypatch.delenv("DS_ACCELERATOR")
    assert int(trainer.get_rng_states()["cuda"][0]) == 7
    trainer.set_rng_states({"cuda": torch.tensor([7], dtype=torch.uint8)})
    trainer.set_rng_states({"cuda": [torch.tensor([4], dtype=torch.uint8), torch.tensor([5], dtype=torch.uint8)]})
    trainer.set_rng_states({"cuda": [torch.tensor([4], dtype=torch.uint8)]})  # device 1 not in it: left as is
    assert calls == [7, 5]


@pytest.mark.distributed
def test_two_nodes_match_one_node(tiny):
    root = tiny[0]
    runs = root / "runs"
    t0 = time.time()
    ref = _torchrun_one_node(_args(tiny, "one_node"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert json.loads((runs / "one_node" / "results.json").read_text())["world_size"] == 2
    t_ref = time.time()

    out = _torchrun_two_nodes(_args(tiny, "torchrun_2n"))
    for rc, text in out:
        assert rc == 0, text[-3000:]
    _same_run(runs / "torchrun_2n", runs / "one_node")
    t_tr = time.time()

    killed = _slurm_two_tasks(_args(tiny, "slurm_2n"), kill_node1_in_save=KILL_AT)
    assert killed[1][0] == -signal.SIGKILL, f"node 1 was not killed in its step-{KILL_AT} save: {killed[1][1][-3000:]}"
    assert killed[0][0] != 0
    ck = runs / "slurm_2n" / "checkpoints"
    assert (ck / "latest").read_text().strip() == f"step_{EVERY:08d}"
    assert not (ck / f"step_{KILL_AT:08d}").exists() and not (runs / "slurm_2n" / "model").exists()

    resumed = _slurm_two_tasks(_args(tiny, "slurm_2n"))
    for rc, text in resumed:
        assert rc == 0, text[-3000:]
    assert f"resumed from {ck / f'step_{EVERY:08d}'} at step {EVERY}/{STEPS}" in resumed[0][1] + resumed[1][1]
    _same_run(runs / "slurm_2n", runs / "one_node")
    print(f"\n1 node x 2 ranks {t_ref - t0:.1f}s; torchrun 2 nodes {t_tr - t_ref:.1f}s; "
          f"SLURM env 2 nodes, kill + resume {time.time() - t_tr:.1f}s")


def test_a_cpu_accelerator_set_for_a_gpu_less_submit_host_is_decided_again_on_a_gpu_node(clean_env, monkeypatch):
    """A SLURM sweep submitted from a login node without a GPU: the launcher set DS_ACCELERATOR=cpu there
    and sbatch exported it into the jobs, which trained on the GPU nodes' CPUs. What we set ourselves is
    marked and decided again; a DS_ACCELERATOR the user set stays."""
    import torch

    from pipeline.engine.distributed import setup_environment

    clean_env.pop("DS_ACCELERATOR", None)
    clean_env.pop("TORCH_EXTENSIONS_DIR", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    setup_environment()  # the login node
    assert clean_env["DS_ACCELERATOR"] == "cpu"
    submitted = dict(clean_env)
    clean_env.clear()
    clean_env.update({k: v for k, v in submitted.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                      "MASTER_ADDR", "MASTER_PORT", "ASU_AUTO_RANK")})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    setup_environment()  # the GPU node
    assert "DS_ACCELERATOR" not in clean_env and "TORCH_EXTENSIONS_DIR" not in clean_env
    clean_env["DS_ACCELERATOR"] = "cpu"  # the user's own choice
    setup_environment()
    assert clean_env["DS_ACCELERATOR"] == "cpu"


@pytest.mark.parametrize("nodelist,first", [("node[01-04],gpu7", "node01"), ("gpu[07-09,11],cpu3", "gpu07"),
                                            ("rack[1-2]-n[01-02]", "rack1-n01"), ("n[1-2]x", "n1x"),
                                            ("nid[001000,001002]", "nid001000"), ("solo", "solo")])
def test_the_first_host_of_a_slurm_nodelist_keeps_the_text_around_its_brackets(nodelist, first):
    """Under the submitit launcher (no MASTER_ADDR exported) ranks rendezvous on this host: text after
    a bracket was dropped (rack[1-2]-n[01-02] -> rack1, a host that does not exist)."""
    from pipeline.engine.distributed import _first_slurm_host

    assert _first_slurm_host(nodelist) == first
