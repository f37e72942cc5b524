"""Process-group discovery: deepspeed/torchrun launchers, SLURM (srun), or a plain single process.

Must run before ``import deepspeed`` (``DS_ACCELERATOR`` is read at import time).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import socket
import sys
from dataclasses import dataclass
from typing import NoReturn

from pipeline.config_base import ConfigError
from pipeline.messages import first_line


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: str  # "cuda" | "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Remove ``--local_rank=N`` (added by the deepspeed launcher) so Hydra does not see it."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a.startswith("--local_rank=") or a.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
        else:
            out.append(a)
    return out


def with_default_override(argv: list[str], key: str, value: str) -> list[str]:
    """``argv`` with ``key=value`` added to its overrides unless the user gave ``key`` (in any of
    Hydra's forms: ``key=``, ``+key=``, ``++key=``, ``~key``) or launches a sweep (``-m``: each job's
    directory is the sweep's, and the value would join every job's directory name). Inserted just
    before the first override as Hydra's parser finds them (the overrides are one positional list:
    put first, ``--cfg job a=1`` split them in two; put last, ``a=1 --cfg job`` and ``--info`` took it
    as a flag's value)."""
    from hydra._internal.utils import get_args_parser

    if any(a.split("=", 1)[0].lstrip("+~") == key for a in argv[1:]):
        return argv
    try:  # quietly: --version, --help or a malformed line print (and exit) in Hydra's own parse, once
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            args, _ = get_args_parser().parse_known_args(argv[1:])
    except SystemExit:
        return argv
    if args.multirun:
        return argv
    at = argv.index(args.overrides[0], 1) if args.overrides else 1
    return [*argv[:at], f"{key}={value}", *argv[at:]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The variables setup_environment set itself for a CPU-only host (comma-separated names), so that a
# process that inherits them on another host decides again.
AUTO_SET = "ASU_AUTO_SET"


def setup_environment() -> None:
    """Offline/CPU-safe defaults and rank variables for whichever launcher started us. Raises
    :class:`ConfigError` for a launch no rank can run (more ranks on a node than its GPUs)."""
    # Safe by default: no hub access at run time unless the user opts in with ASU_ALLOW_NETWORK=1. An
    # HF_HUB_OFFLINE=0 left in a shell profile is not that opt-in: it is overridden, and said so once.
    if os.environ.get("ASU_ALLOW_NETWORK", "0") != "1":
        lifted = [k for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
                  if os.environ.get(k, "1").strip().lower() in ("0", "false", "no", "off", "")]
        for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            os.environ[k] = "1"
        if lifted and os.environ.get("RANK", "0") == "0":
            print(f"note: {' and '.join(f'{k}=0' for k in lifted)} from the environment ignored: runs stay offline "
                  "(no hub access at run time); ASU_ALLOW_NETWORK=1 allows it", file=sys.stderr, flush=True)
    if not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import warnings

    # torch.distributed's deprecation notices fire on every ZeRO-3 collective; they are not ours to fix.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")
    # peft reads transformers' deprecated property whenever it wraps a model (LoRA runs printed it 3×
    # per rank); likewise not ours to fix
    warnings.filterwarnings("ignore", category=FutureWarning, message=r"`is_gradient_checkpointing` is deprecated")

    import torch

    # What an earlier process set below for its own CPU-only host is not this host's choice: a sweep
    # submitted from a GPU-less login node exports its environment into the SLURM jobs (sbatch
    # --export=ALL), and its DS_ACCELERATOR=cpu trained the GPU nodes' jobs on their CPUs.
    for k in filter(None, os.environ.pop(AUTO_SET, "").split(",")):
        os.environ.pop(k, None)
    if not torch.cuda.is_available():
        defaults = {"DS_ACCELERATOR": "cpu",
                    "TORCH_EXTENSIONS_DIR": os.path.join(os.getcwd(), ".cache", "torch_extensions")}
        mine = [k for k in defaults if k not in os.environ]
        os.environ.update({k: defaults[k] for k in mine})
        if mine:
            os.environ[AUTO_SET] = ",".join(mine)

    # srun without a DeepSpeed/torchrun launcher: map SLURM's variables. A RANK we set ourselves for
    # a single process (ASU_AUTO_RANK) may have been exported into the job by sbatch: ignore it.
    if os.environ.get("ASU_AUTO_RANK") == "1" and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ASU_AUTO_RANK"):
            os.environ.pop(k, None)
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        # Ranks per node (the preflight sizes host memory per node with it) and the node index, as
        # torchrun would set them; without these a 2-node x 1-task job was planned as 2 ranks per node.
        os.environ["LOCAL_WORLD_SIZE"] = str(_slurm_tasks_on_this_node())
        os.environ["NODE_RANK"] = os.environ.get("SLURM_NODEID", "0")
        if "MASTER_ADDR" not in os.environ:
            nodes = os.environ.get("SLURM_JOB_NODELIST", os.environ.get("SLURM_NODELIST", "127.0.0.1"))
            os.environ["MASTER_ADDR"] = _first_slurm_host(nodes)
        # one port per job (train.sbatch sets the same): jobs sharing a node rendezvous apart; 15000-29999
        # stays below Linux's ephemeral ports, and only job ids 15000 apart share one
        os.environ.setdefault("MASTER_PORT", str(15000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 15000))

    # Plain `python launchers/train.py`: a world of one (DeepSpeed would otherwise try mpi4py).
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", ASU_AUTO_RANK="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    _fit_local_rank_to_visible_gpus()
    if os.environ["RANK"] != "0":
        # transformers' and huggingface_hub's own bars (loading weights, writing shards) on rank 0
        # only: every other rank would draw its copy into rank 0's lines (read at their import)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _slurm_tasks_on_this_node() -> int:
    """Tasks of this job step on this node: SLURM_NTASKS_PER_NODE, else this node's entry of
    SLURM_TASKS_PER_NODE (``2(x3),1`` = 2 on nodes 0-2, 1 on node 3), else all tasks."""
    if os.environ.get("SLURM_NTASKS_PER_NODE"):
        return int(os.environ["SLURM_NTASKS_PER_NODE"])
    spec = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE")
    node = int(os.environ.get("SLURM_NODEID", "0"))
    if spec:
        per_node: list[int] = []
        for part in spec.split(","):
            count, _, rep = part.partition("(x")
            per_node += [int(count)] * (int(rep.rstrip(")")) if rep else 1)
        if node < len(per_node):
            return per_node[node]
    return int(os.environ.get("SLURM_NTASKS", "1"))


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist such as ``node[01-04],gpu7`` or ``rack[1-2]-n[01-02]`` (every
    bracket its first value, the text around them kept) without needing scontrol."""
    depth, end = 0, len(nodelist)
    for i, c in enumerate(nodelist):  # the first host group ends at a comma outside brackets
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            end = i
            break
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], nodelist[:end])


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce op.

    DeepSpeed's CPU backend builds ``deepspeed_shm_comm`` (a C++ extension) the first time a process
    group is set up on a machine: about a minute on 2 cores, i.e. a sixth of the embedded demo. The op
    only speeds up ``all_reduce``; ZeRO-3's traffic is all-gather and reduce-scatter, which go through
    gloo either way, and all-reduce falls back to gloo. ``ASU_DS_SHM_COMM=1`` builds and uses it.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _fit_local_rank_to_visible_gpus() -> None:
    """A rank whose LOCAL_RANK is no visible GPU's index (SLURM's ``--gpus-per-task=1`` / GPU binding,
    or CUDA_VISIBLE_DEVICES per process: each task sees one GPU as cuda:0) takes ``LOCAL_RANK mod
    device count``; DeepSpeed and our ``set_device`` index the device by it."""
    import torch

    if not cuda_ranks():
        return
    local, n = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
    per_node = ranks_per_node(0)
    if n > 1 and per_node > n and os.environ.get("SLURM_GPUS_ON_NODE", str(n)) == str(n):
        # every rank sees all of the node's GPUs and there are more ranks than GPUs: remapped, two ranks
        # would share a GPU and NCCL stop later ("Duplicate GPU detected"). Decided alike on every rank.
        # (Bound tasks that each see a subset of the node's GPUs, --gpu-bind, keep the remap below.)
        # every rank meets it alike; the launcher turns it into one line
        raise ConfigError(f"{per_node} ranks on a node with {n} GPUs: more ranks per node than GPUs (set "
                          f"hydra.launcher.tasks_per_node / --ntasks-per-node / --num_gpus to {n})")
    if n and local >= n:
        os.environ[NODE_LOCAL_RANK] = str(local)  # the rank on its node still (one error line per node)
        os.environ["LOCAL_RANK"] = str(local % n)
        # before logging is configured (Hydra has not run yet): straight to stderr, once per rank
        sys.stderr.write(f"[rank {os.environ.get('RANK', '?')}] LOCAL_RANK {local} but {n} visible GPU(s): "
                         f"using cuda:{local % n}\n")


# LOCAL_RANK as the launcher set it, where it is remapped to a visible GPU above (a task bound to one GPU)
NODE_LOCAL_RANK = "ASU_NODE_LOCAL_RANK"


def node_local_rank() -> int:
    """This rank's index among its node's ranks, as the launcher numbered them."""
    return int(os.environ.get(NODE_LOCAL_RANK, os.environ.get("LOCAL_RANK", "0")) or 0)


def ranks_per_node(default: int) -> int:
    """Ranks per node: LOCAL_WORLD_SIZE (torchrun, our SLURM mapping) or LOCAL_SIZE (the deepspeed
    launcher sets only that one); ``default`` without either."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or default)


def cuda_ranks() -> bool:
    """Whether this job's ranks run on CUDA: a GPU is visible and ``DS_ACCELERATOR`` does not pin
    DeepSpeed to the CPU (``make demo`` / ``make test`` set it on any machine). Deciding by
    ``torch.cuda.is_available()`` alone chose nccl for a CPU-accelerator DeepSpeed on a GPU machine,
    whose CPU tensors nccl cannot carry."""
    import torch

    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


def init_distributed(timeout_minutes: float = 60.0) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU), collectives timing
    out after ``timeout_minutes`` (``deepspeed.timeout_minutes``); a no-op when already initialised."""
    from datetime import timedelta

    import deepspeed
    import torch

    cuda = cuda_ranks()
    if not cuda and os.environ.get("ASU_DS_SHM_COMM", "0") != "1":
        skip_shm_comm_build()
    if not cuda:
        from pipeline.engine.host_memory import tune_host_allocator

        tune_host_allocator()  # model states live in host memory on CPU ranks: keep freed pages returned
        # (the threshold is set again for the model's size once it is loaded: pipeline/run.py)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False,
                               timeout=timedelta(minutes=float(timeout_minutes)))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    info = DistInfo(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        local_rank=local_rank,
        device="cuda" if cuda else "cpu",
    )
    return info


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def leave_together(wait_s: float = 60.0) -> None:
    """End a process of a launch of several ranks that finished well: wait for every rank, run the
    exit handlers (the job log's last lines, wandb, Hydra's callbacks), and exit 0 without the
    interpreter's teardown.
    Tearing down with gloo's and DeepSpeed's threads still running aborted a finished rank now and
    then ("terminate called without an active exception", exit -6, after "run ... finished": 2 CI runs
    of 10, two different tests; ``destroy_process_group()`` first did not prevent it), and the
    launcher reported a failed launch of a run whose files were all written. A peer that has not come
    within ``wait_s`` (it failed after the last collective) is not waited for. One rank, or no process
    group: nothing to do (a normal exit)."""
    from datetime import timedelta

    import torch.distributed as dist

    if not _one_of_several_ranks():
        return
    if dist.get_backend() == "gloo":  # (the aborts were gloo's; nccl ranks leave as they did)
        try:  # leave together, but not wait long for a peer that failed after the last collective
            dist.monitored_barrier(timeout=timedelta(seconds=wait_s))
        except RuntimeError as e:
            print(f"note: not every rank reached the end of the launch ({first_line(e, 200)}); this rank's work is "
                  f"done", file=sys.stderr, flush=True)
    _exit_without_teardown(0)


def leave_alone(code: object) -> None:
    """A rank of several ending with ``sys.exit(code)`` (a refusal's 2, a preemption's 124, a Ctrl-C's
    130): the exit handlers, then that exit code without the interpreter's teardown, which could
    abort it as :func:`leave_together` says (exit -6 in place of the code a requeue reads). No wait
    for the other ranks: they may be anywhere. Returns without a process group of several ranks."""
    if not _one_of_several_ranks():
        return
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit's own rule: a message is printed, the code is 1
        print(code, file=sys.stderr, flush=True)
        code = 1
    _exit_without_teardown(code)


def _one_of_several_ranks() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _exit_without_teardown(code: int) -> NoReturn:
    import atexit

    # the private function a normal exit calls before the teardown: the job log's last lines, wandb,
    # Hydra's callbacks (CPython's, stable since 3.0; public atexit has no "run them now"). Not joined,
    # as a normal exit would: non-daemon threads (the pipeline starts none; a library's would be cut off)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe must not cost the exit code
            stream.flush()
    os._exit(code)


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_true(flag: bool) -> bool:
    """True on every rank iff ``flag`` is True on every rank (used for NaN checks)."""
    return all_reduce_sum([0.0 if flag else 1.0])[0] == 0.0


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over ranks (float64), on the device the process group's backend
    carries (nccl: CUDA tensors only); ``values`` unchanged without a process group or with one rank."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()


def gather_objects(obj):
    """all_gather_object for any picklable object; returns the per-rank list."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def argv_for_hydra() -> list[str]:
    return strip_launcher_args(sys.argv)


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Average scalar logs over ranks (same keys on every rank), so logged losses are global."""
    import torch.distributed as dist

    if not values or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    world = dist.get_world_size()
    return {k: v / world for k, v in zip(keys, all_reduce_sum([float(values[k]) for k in keys]))}
