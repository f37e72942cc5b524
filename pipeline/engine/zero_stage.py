"""Which DeepSpeed ZeRO stage a run uses: ``deepspeed.zero_stage=auto`` resolved from the world size
and the offload settings, an explicit 0..3 as given.

ZeRO-3 pays for partitioning with per-module hooks (gather before a module runs, release after,
reduce-scatter of its gradients). With one rank there is nothing to partition over, yet on the
embedded demo's model (one process, 8 + 8 rows, 1 thread) a GradDiff step takes 131 ms under
ZeRO-3 against 75 ms at stage 0 and 72 ms in a plain-torch loop (``benchmarks/bench_step.py
--one-process``, docs/performance.md). So ``auto`` picks:

* ZeRO-3 when the world has more than one rank (student and frozen model sharded), or when any
  offload is configured (parameter offload exists only in ZeRO-3; the pipeline's offload configs
  are all ZeRO-3, and the memory preflight plans them that way);
* stage 0 otherwise: one rank, no offload. The run still goes through the DeepSpeed engine
  (``engine.backward`` / ``engine.step`` / ``save_checkpoint``: one code path), with the same
  optimizer (``torch_adam``: ``torch.optim.AdamW`` in both stages), the same gradient clipping and the
  same learning-rate schedule, so the update equals ZeRO-3's (tests/test_zero_stage.py; in bf16 after
  :func:`prepare_stage0_engine` undoes DeepSpeed's start-up optimizer step).

The choice is logged as one line and recorded in ``results.json["zero_stage"]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

AUTO = "auto"


@dataclass(frozen=True)
class ZeroStageChoice:
    """The requested ``deepspeed.zero_stage`` (``auto`` or an int), the stage used and why."""

    requested: Any
    stage: int
    reason: str

    def describe(self) -> str:
        """The log line, e.g. ``deepspeed.zero_stage=auto -> 0 (1 rank, no offload)``."""
        if str(self.requested) == AUTO:
            return f"deepspeed.zero_stage=auto -> {self.stage} ({self.reason})"
        return f"deepspeed.zero_stage={self.stage} ({self.reason})"

    def record(self) -> dict:
        """What ``results.json["zero_stage"]`` holds."""
        return {"requested": str(self.requested) if str(self.requested) == AUTO else int(self.requested),
                "resolved": self.stage, "reason": self.reason}


def choose_zero_stage(requested: Any, world_size: int, offload_optimizer: str = "none",
                      offload_param: str = "none") -> ZeroStageChoice:
    """Resolve ``requested`` (``auto`` or 0..3) for ``world_size`` ranks and the offload settings."""
    if str(requested) != AUTO:
        return ZeroStageChoice(requested, int(requested), "set explicitly")
    offloads = [f"offload_{what}={dev}" for what, dev in (("optimizer", offload_optimizer), ("param", offload_param))
                if dev != "none"]
    if world_size > 1:
        return ZeroStageChoice(requested, 3, f"{world_size} ranks")
    if offloads:
        return ZeroStageChoice(requested, 3, f"1 rank, {', '.join(offloads)}: offload needs ZeRO-3 here")
    return ZeroStageChoice(requested, 0, "1 rank, no offload")


def resolve_zero_stage(ds_cfg: Any, world_size: int) -> ZeroStageChoice:
    """:func:`choose_zero_stage` for a ``deepspeed`` config node."""
    return choose_zero_stage(ds_cfg.zero_stage, world_size, str(ds_cfg.offload_optimizer), str(ds_cfg.offload_param))


def prepare_stage0_engine(engine: Any, world_size: int) -> list[str]:
    """Make a stage-0 student engine step like ZeRO-3 and drop work that one rank does not need.
    Returns what was changed (logged by the caller); nothing for other stages.

    * bf16/fp16: DeepSpeed wraps the optimizer in ``FP16_UnfusedOptimizer`` / ``FP16_Optimizer``,
      whose ``initialize_optimizer_states`` runs the optimizer once on zero gradients when it is
      built. For Adam that makes the first real step the second (its bias correction gives ~0.74x
      ZeRO-3's first update, which never takes that step) and AdamW's decoupled weight decay shrinks
      the fp32 master weights once before training. Undone here: the optimizer state is forgotten
      (torch's Adam / DeepSpeed's FusedAdam create it lazily at the first real step) and the fp32
      master weights are copied back from the model's weights they were cloned from.
    * one rank: DeepSpeed all-reduces every gradient after backward by flattening them into one
      buffer (up to 5e8 elements), reducing it and copying it back. Over one rank that is the
      identity (sum of one, divided by one) for an extra copy of the gradients and two passes over
      them per step; ``enable_backward_allreduce`` is the engine's own switch for it.
    """
    import torch

    stage = int(engine.zero_optimization_stage()) if hasattr(engine, "zero_optimization_stage") else -1
    if stage != 0:
        return []
    done = []
    opt, basic = getattr(engine, "optimizer", None), getattr(engine, "basic_optimizer", None)
    pairs = []
    if basic is not None and opt is not basic:
        if hasattr(opt, "fp32_groups") and hasattr(opt, "fp16_groups"):  # unfused: a master per parameter
            pairs = [(m, p) for ms, ps in zip(opt.fp32_groups, opt.fp16_groups) for m, p in zip(ms, ps)]
        elif hasattr(opt, "fp32_groups_flat") and hasattr(opt, "fp16_groups_flat"):  # fused: one flat master per group
            pairs = list(zip(opt.fp32_groups_flat, opt.fp16_groups_flat))
    if pairs:
        with torch.no_grad():
            for master, param in pairs:
                master.copy_(param)
        basic.state.clear()
        done.append(f"{type(opt).__name__}'s start-up optimizer step undone (Adam state reset, fp32 master weights "
                    f"re-copied)")
    if world_size == 1 and getattr(engine, "enable_backward_allreduce", False):
        engine.enable_backward_allreduce = False
        done.append("gradient all-reduce off (one rank)")
    return done
