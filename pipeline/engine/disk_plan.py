"""What a run writes into its run directory: its checkpoints and the exported model, planned from the
architecture and the config alone. The dry run prints it per GPU count; a launch with
``trainer.preflight`` logs it and refuses to start when the run directory's filesystem cannot hold it (before,
a 7B run learnt it at its first save, an hour in: ~75 GiB per ZeRO-3 checkpoint, one more on disk
while each is written).

Bytes per weight, measured with DeepSpeed 0.19 on CPU ranks (a 2.6 M-parameter Llama, fp32 and bf16,
stage 0 and ZeRO-3, every weight or RMU's few trained; every file of the checkpoint directory counted,
tests/test_disk_plan.py):

* ZeRO-3, any precision: 12 per trained weight — its fp32 copy (the master in 16-bit training, the
  weight itself in fp32) and Adam's two moments, in the ranks' ``optim_states`` files — and the
  frozen weights' partitions in the training dtype (``model_states``: RMU's untrained layers; the
  trained weights' 16-bit partitions are not saved).
* stage 0: every weight of the module in its training dtype (4 bytes fp32, 2 bf16 / fp16) in
  ``model_states``, plus Adam's moments (8 per trained weight) and in 16-bit training the fp32 master
  (4 more).
* LoRA: the adapters alone (the frozen base is left out of checkpoints).

``model/`` holds every weight in the training dtype; a LoRA run's merged model is float32 unless
``model.peft.merged_dtype=model``, and its ``adapter/`` comes beside it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pipeline.engine.checkpoint import complete_checkpoints
from pipeline.engine.preflight import ArchSpec, GiB, PreflightError, lora_param_count, method_footprint
from pipeline.io import nearest_existing, size_text, tree_bytes

ZERO3_PER_TRAINED = 12  # fp32 weight / master + Adam's exp_avg and exp_avg_sq
ADAM_MOMENTS = 8
FP32_MASTER = 4


def _dtype_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


@dataclass(frozen=True)
class DiskPlan:
    """Bytes of one checkpoint (every rank's files) and of the export (``model/``, with LoRA
    ``adapter/`` too); the saves still to come (None: not known before the data is) with
    ``trainer.keep_checkpoints`` (0: none pruned) and the complete checkpoints already there."""

    checkpoint: int
    export: int
    zero_stage: int
    saves: Optional[int]
    keep: int
    existing: int = 0

    def counts(self) -> tuple[Optional[int], Optional[int]]:
        """(checkpoints on disk while one is written, at its peak; checkpoints left beside the export).
        A save is published before the oldest is pruned (the first one beside every existing one);
        None: every one is kept and their number is not known yet."""
        if self.saves == 0:
            return 0, self.existing
        if self.keep <= 0:
            total = None if self.saves is None else self.existing + self.saves
            return total, total
        if self.saves is None:
            return max(self.existing + 1, self.keep + 1), self.keep
        total = self.existing + self.saves
        return max(self.existing + 1, min(self.keep + 1, total)), min(self.keep, total)

    @property
    def peak(self) -> Optional[int]:
        """The run directory's largest size: while a checkpoint is written, or once the export is
        beside the kept ones (the last save's prune comes before the export)."""
        during, after = self.counts()
        if during is None or after is None:
            return None
        return max(during * self.checkpoint, after * self.checkpoint + self.export)

    def describe(self) -> str:
        """One line: the peak and what makes it up."""
        during, _ = self.counts()
        size = f"~{size_text(self.checkpoint)} (stage {self.zero_stage})"
        if self.saves == 0:
            what = f"no checkpoint to write (one a preemption would write: {size})"
        elif self.keep <= 0:
            what = (f"checkpoints of {size}, " + (f"all {during} kept" if during is not None else "every one kept")
                    + " (trainer.keep_checkpoints=0)")
        else:
            what = f"checkpoints of {size}, {during} at once while one is written"
        what += f", and model/ ~{size_text(self.export)}" if self.export else ""
        total = f"~{size_text(self.peak)}" if self.peak is not None else "unknown until the step count is (every save kept)"
        return f"run directory on disk: {total}: {what}"


def saves_to_come(save_every: int, total: Optional[int], start: int = 0) -> Optional[int]:
    """Checkpoints written from step ``start`` to ``total`` (None: not known yet): at every multiple of
    ``save_every`` after ``start`` (a resume from a preemption's checkpoint is off the grid) and at the
    last step; none without ``save_every`` (only a preemption notice's or a Ctrl-C's, not planned)."""
    if save_every <= 0 or (total is not None and total <= start):
        return 0
    if total is None or total < 0:
        return None
    return total // save_every - start // save_every + (1 if total % save_every else 0)


def plan_disk(cfg: Any, arch: ArchSpec, zero_stage: int, precision: str, total: Optional[int], start: int = 0,
              existing: int = 0) -> DiskPlan:
    """The run directory's checkpoints and export for ``cfg`` at ``zero_stage`` in ``precision``
    (``fp32`` / ``bf16`` / ``fp16``, as resolved), training from step ``start`` to ``total`` (None:
    ``trainer.max_steps`` when set) beside ``existing`` complete checkpoints."""
    tr = cfg.trainer
    lora = lora_param_count(arch, cfg.model)
    trained = lora or method_footprint(cfg, arch).trainable_params
    width = _dtype_bytes(precision)
    optimizer = ADAM_MOMENTS + (FP32_MASTER if width == 2 else 0)  # stage 0, per trained weight
    if lora:  # the adapters alone: the frozen base is left out
        ckpt = (ZERO3_PER_TRAINED if zero_stage == 3 else width + optimizer) * lora
    elif zero_stage == 3:  # DeepSpeed saves the frozen weights' 16-bit partitions too (RMU's other layers)
        ckpt = ZERO3_PER_TRAINED * trained + width * (arch.n_params - trained)
    else:
        ckpt = width * arch.n_params + optimizer * trained
    export = 0
    if tr.export:
        merged = width  # a full model's weights as DeepSpeed trained them (16-bit casts whatever was loaded)
        if lora:  # float32, or with merged_dtype=model the dtype the base was loaded in (model.dtype on GPUs)
            model_dtype = 4 if width == 4 or str(cfg.model.dtype) == "float32" else 2
            merged = model_dtype if str(cfg.model.peft.merged_dtype) == "model" else 4
        export = merged * arch.n_params + 4 * lora
    if total is None and int(tr.max_steps) > 0:
        total = int(tr.max_steps)
    return DiskPlan(ckpt, export, zero_stage, saves_to_come(int(tr.save_every), total, start),
                    int(tr.keep_checkpoints), existing)


def check_disk(plan: DiskPlan, run_dir: Path) -> str:
    """Log line of ``plan`` for ``run_dir``; raises :class:`PreflightError` when its filesystem's free
    space is less than what the run still adds (the checkpoints already there count as written)."""
    line = plan.describe()
    if plan.peak is None:
        return line
    # the complete checkpoints already there are part of the peak (a crashed save's .partial is not:
    # the next save removes it); an earlier model/ is not either (replaced once the new one is written)
    need = plan.peak - sum(tree_bytes(p) for p in complete_checkpoints(run_dir / "checkpoints"))
    free = shutil.disk_usage(nearest_existing(run_dir)).free
    if need > free:
        raise PreflightError(
            f"disk preflight: {line}; {run_dir}'s filesystem has {size_text(free)} free, ~{size_text(need - free)} short: "
            f"a save would fail. Free space, lower trainer.keep_checkpoints (or raise trainer.save_every), set "
            f"output_dir on a larger filesystem, or trainer.preflight=false to run anyway")
    return f"{line}; {size_text(free)} free"


def run_disk_preflight(cfg: Any, world_size: int, cuda: bool, model_path: Optional[str], run_dir: Path,
                       total: int, start: int = 0) -> None:
    """A launch's disk check (collective): rank 0 plans this run's directory for its optimizer steps
    from ``start`` (a resume's checkpoint) to ``total`` beside the checkpoints already there, logs
    it, and every rank raises the refusal (:func:`check_disk`) when rank 0's filesystem (the run
    directory's, shared) cannot hold it. A plan that fails for another reason is skipped, with a warning."""
    import logging

    from pipeline.engine.distributed import broadcast_object, is_main_process
    from pipeline.engine.ds_config import resolve_precision
    from pipeline.engine.preflight import resolve_arch
    from pipeline.engine.zero_stage import resolve_zero_stage

    log = logging.getLogger(__name__)
    problem = None
    if is_main_process():
        try:
            plan = plan_disk(cfg, resolve_arch(cfg.model, model_path), resolve_zero_stage(cfg.deepspeed, world_size).stage,
                             resolve_precision(cfg.deepspeed, cuda), total, start,
                             existing=len(complete_checkpoints(run_dir / "checkpoints")))
            log.info(check_disk(plan, run_dir))
        except PreflightError as exc:
            problem = str(exc)
        except Exception as exc:  # noqa: BLE001  (never a hang: the other ranks wait in the broadcast)
            log.warning("disk preflight skipped: %s: %s", type(exc).__name__, exc)
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
