"""What a run writes into its run directory: its checkpoints and the exported model, planned from the
architecture and the config alone. The dry run prints it per GPU count; a launch with
``trainer.preflight`` logs it and refuses to start when the run directory's filesystem cannot hold it (before,
a 7B run learnt it at its first save, an hour in: ~75 GiB per ZeRO-3 checkpoint, one more on disk
while each is written).

Bytes per weight, measured with DeepSpeed 0.19 on CPU ranks (a 2.6 M-parameter Llama, fp32 and bf16,
stage 0 and ZeRO-3; every file of the checkpoint directory counted):

* ZeRO-3, any precision: 12 per trained weight — its fp32 copy (the master in 16-bit training, the
  weight itself in fp32) and Adam's two moments, in the ranks' ``optim_states`` files. The
  partitioned module weights are not saved (``model_states`` is a few KB).
* stage 0: every weight of the module in its training dtype (4 bytes fp32, 2 bf16 / fp16) in
  ``model_states``, plus Adam's moments (8 per trained weight) and in 16-bit training the fp32 master
  (4 more).
* LoRA: the adapters alone (the frozen base is left out of checkpoints).

``model/`` holds every weight in the training dtype; a LoRA run's merged model is float32 unless
``model.peft.merged_dtype=model``, and its ``adapter/`` comes beside it.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pipeline.engine.preflight import ArchSpec, PreflightError, lora_param_count, method_footprint

GiB = 1024**3
ZERO3_PER_TRAINED = 12  # fp32 weight / master + Adam's exp_avg and exp_avg_sq
ADAM_MOMENTS = 8
FP32_MASTER = 4


def _dtype_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


@dataclass(frozen=True)
class DiskPlan:
    """Bytes of one checkpoint (every rank's files), how many are on disk at once at the peak (the
    kept ones and the one being written; None: every one is kept and their number is not known
    before the data is), and the export (``model/``, with LoRA ``adapter/`` too)."""

    checkpoint: int
    at_once: Optional[int]
    export: int
    zero_stage: int
    keep_all: bool = False  # trainer.keep_checkpoints=0: none pruned

    @property
    def peak(self) -> Optional[int]:
        """The run directory's largest size: the checkpoints at once, then the export beside them."""
        return None if self.at_once is None else self.checkpoint * self.at_once + self.export

    def describe(self) -> str:
        """One line: the peak and what makes it up."""
        if self.at_once == 0:
            what = f"no checkpoints (trainer.save_every=0; one a preemption writes: ~{_gib(self.checkpoint)})"
        else:
            count = (f"{self.at_once} at once while one is written" if not self.keep_all
                     else "every one kept (trainer.keep_checkpoints=0)" if self.at_once is None
                     else f"all {self.at_once} kept (trainer.keep_checkpoints=0)")
            what = f"checkpoints of ~{_gib(self.checkpoint)} (stage {self.zero_stage}), {count}"
        what += f", and model/ ~{_gib(self.export)}" if self.export else ""
        total = f"~{_gib(self.peak)}" if self.peak is not None else "more than one checkpoint per save"
        return f"run directory on disk: {total}: {what}"


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / 1024**2:.1f} MiB"


def checkpoints_at_once(save_every: int, keep: int, steps: Optional[int]) -> Optional[int]:
    """Checkpoints on disk at the peak for ``steps`` optimizer steps (None: not known yet). None
    without ``save_every``. Otherwise the ``keep`` newest and
    the one being written (it is published before the oldest is pruned), at most one per save; with
    ``keep`` 0 every save's."""
    if save_every <= 0:  # only a preemption notice's or a Ctrl-C's: planned for, not counted
        return 0
    saves = None if not steps or steps <= 0 else math.ceil(steps / save_every)  # the last step's included
    if keep <= 0:
        return saves
    return keep + 1 if saves is None else min(keep + 1, saves)


def plan_disk(cfg: Any, arch: ArchSpec, zero_stage: int, precision: str, steps: Optional[int]) -> DiskPlan:
    """The run directory's checkpoints and export for ``cfg`` at ``zero_stage`` in ``precision``
    (``fp32`` / ``bf16`` / ``fp16``, as resolved), over ``steps`` optimizer steps (None: from
    ``trainer.max_steps`` when set)."""
    tr = cfg.trainer
    lora = lora_param_count(arch, cfg.model)
    trained = lora or method_footprint(cfg, arch).trainable_params
    held = lora or arch.n_params  # the weights a checkpoint's module state holds at stage 0
    width = _dtype_bytes(precision)
    if zero_stage == 3:
        ckpt = ZERO3_PER_TRAINED * trained
    else:
        ckpt = width * held + (ADAM_MOMENTS + (FP32_MASTER if width == 2 else 0)) * trained
    export = 0
    if tr.export:
        merged = 4 if lora and str(cfg.model.peft.merged_dtype) != "model" else width
        export = merged * arch.n_params + 4 * lora
    if steps is None and int(tr.max_steps) > 0:
        steps = int(tr.max_steps)
    return DiskPlan(ckpt, checkpoints_at_once(int(tr.save_every), int(tr.keep_checkpoints), steps), export, zero_stage,
                    keep_all=int(tr.keep_checkpoints) <= 0)


def _bytes_under(path: Path) -> int:
    """Bytes of the files under ``path`` (0 when there is none)."""
    total = 0
    for p in path.rglob("*") if path.is_dir() else ():
        try:
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
        except OSError:  # pruned meanwhile
            pass
    return total


def check_disk(plan: DiskPlan, run_dir: Path) -> str:
    """Log line of ``plan`` for ``run_dir``; raises :class:`PreflightError` when its filesystem's free
    space is less than what the run still adds (the checkpoints already there count as written)."""
    from pipeline.io import nearest_existing

    line = plan.describe()
    if plan.peak is None:
        return line
    # the checkpoints already there are part of the peak; an earlier model/ is not (it is replaced by
    # a rename once the new export is written beside it)
    need = plan.peak - _bytes_under(run_dir / "checkpoints")
    free = shutil.disk_usage(nearest_existing(run_dir)).free
    if need > free:
        raise PreflightError(
            f"disk preflight: {line}; {run_dir}'s filesystem has {_gib(free)} free, ~{_gib(need - free)} short: "
            f"a save would fail. Free space, lower trainer.keep_checkpoints (or raise trainer.save_every), set "
            f"output_dir on a larger filesystem, or trainer.preflight=false to run anyway")
    return f"{line}; {_gib(free)} free"


def run_disk_preflight(cfg: Any, world_size: int, cuda: bool, model_path: Optional[str], run_dir: Path,
                       steps: int) -> None:
    """A launch's disk check (collective): rank 0 plans this run's directory and logs it; every rank
    raises the refusal (:func:`check_disk`) when its filesystem cannot hold it."""
    import logging

    from pipeline.engine.distributed import broadcast_object, is_main_process
    from pipeline.engine.ds_config import resolve_precision
    from pipeline.engine.preflight import resolve_arch
    from pipeline.engine.zero_stage import resolve_zero_stage

    problem = None
    if is_main_process():
        plan = plan_disk(cfg, resolve_arch(cfg.model, model_path), resolve_zero_stage(cfg.deepspeed, world_size).stage,
                         resolve_precision(cfg.deepspeed, cuda), steps)
        try:
            logging.getLogger(__name__).info(check_disk(plan, run_dir))
        except PreflightError as exc:
            problem = str(exc)
    problem = broadcast_object(problem)
    if problem:
        raise PreflightError(problem, every_rank=True)  # decided by rank 0 for all


def dry_run_disk(cfg: Any, model_path: Optional[str], gpus: tuple[int, ...]) -> str:
    """The dry run's disk rows, as a launch on GPUs would write: the run directory's peak per GPU
    count (the ZeRO stage that count runs decides a checkpoint's size), then what makes it up."""
    from pipeline.engine.ds_config import resolve_precision
    from pipeline.engine.preflight import plan_row, resolve_arch
    from pipeline.engine.zero_stage import resolve_zero_stage

    arch = resolve_arch(cfg.model, model_path)
    plans = [plan_disk(cfg, arch, resolve_zero_stage(cfg.deepspeed, n).stage, resolve_precision(cfg.deepspeed, True),
                       None) for n in gpus]
    lines = [plan_row("run directory on disk (peak)",
                      [f"{p.peak / GiB:.1f} GiB" if p.peak is not None else "see below" for p in plans])]
    return "\n".join(lines + list(dict.fromkeys(f"({p.describe()})" for p in plans)))
