"""What ZeRO-3 actually partitioned: per-engine statistics, logged and recorded in ``results.json``.

DeepSpeed keeps a parameter whole on every rank (``ds_persist``) when it has at most
``stage3_param_persistence_threshold`` elements. A test model whose tensors all fall below the
threshold therefore never exercises the gather paths (``GatheredParameters``, module hooks on a
sharded weight) even on many ranks. ``ASU_REQUIRE_PARTITIONED=1`` (set by the test helpers) turns
"some weight is not partitioned on a multi-rank ZeRO-3 run" into an error, so every distributed test
proves it ran with sharded weights.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)

REQUIRE_ENV = "ASU_REQUIRE_PARTITIONED"


class NotPartitionedError(RuntimeError):
    """A multi-rank ZeRO-3 run was required to partition every weight but kept some whole."""


def partition_stats(module: torch.nn.Module) -> dict[str, Any]:
    """Count the parameters of ``module`` and how many are partitioned on this rank.

    A parameter counts as partitioned when DeepSpeed does not keep it whole (``ds_persist`` false)
    and this rank's partition (``ds_tensor``) holds fewer elements than the full tensor
    (``ds_numel``). Without ZeRO-3 attributes nothing is partitioned. ``local_elements``: what
    this rank keeps between steps, its shard of each partitioned parameter and all of each whole one.
    """
    params = list(module.named_parameters())
    whole: list[str] = []
    local = full = 0
    for name, p in params:
        n = int(getattr(p, "ds_numel", p.numel()))
        part = getattr(p, "ds_tensor", None)
        k = int(part.numel()) if part is not None else n
        full += n
        if getattr(p, "ds_persist", True) or part is None or k >= n:
            whole.append(name)
            k = n  # a persistent parameter is whole on every rank (DeepSpeed keeps its shard as well)
        local += k
    return {"params": len(params), "partitioned": len(params) - len(whole), "whole": whole,
            "local_elements": local, "full_elements": full}


def record(engines: dict[str, Any], world_size: int, zero_stage: int, notes: Optional[dict[str, str]] = None
           ) -> dict[str, dict]:
    """Log (and return, for ``results.json``) the partition statistics of each named engine
    (``notes``: a remark for an engine's log line).

    Raises :class:`NotPartitionedError` when ``ASU_REQUIRE_PARTITIONED=1``, the run is ZeRO-3 on
    more than one rank and some parameter is whole.
    """
    out: dict[str, dict] = {}
    for what, engine in engines.items():
        if engine is None:
            continue
        s = partition_stats(engine.module if hasattr(engine, "module") else engine)
        log.info("ZeRO-%d %s: %d of %d parameters partitioned; this rank holds %d of %d elements%s", zero_stage,
                 what, s["partitioned"], s["params"], s["local_elements"], s["full_elements"],
                 f" ({notes[what]})" if notes and what in notes else "")
        out[what] = {k: v for k, v in s.items() if k != "whole"}
        out[what]["whole"] = s["whole"][:20]  # names of the first few whole ones, for the log reader
        if os.environ.get(REQUIRE_ENV) == "1" and zero_stage == 3 and world_size > 1 and s["whole"]:
            raise NotPartitionedError(
                f"{REQUIRE_ENV}=1: {len(s['whole'])} of {s['params']} {what} parameters are not partitioned "
                f"across {world_size} ranks (e.g. {s['whole'][0]}); set deepspeed.param_persistence_threshold=0")
    return out


class _BaseWeights:
    """A LoRA student's frozen view (:class:`pipeline.models.peft_student.FrozenBaseView`) as the
    partition record counts it: the base weights it computes with. Its modules also hold the adapters,
    but those are the student's trained weights, switched off in the view."""

    def __init__(self, view: Any) -> None:
        from pipeline.models.peft_student import adapter_parameters

        self._module = view.module
        self._adapters = {id(p) for _, p in adapter_parameters(self._module)}

    def named_parameters(self) -> list[tuple[str, Any]]:
        return [(n, p) for n, p in self._module.named_parameters() if id(p) not in self._adapters]


def record_models(engine: Any, reference: Any, world_size: int, zero_stage: int) -> dict:
    """What ZeRO partitioned, per model, for results.json (``zero3_partition``): the student engine and
    the frozen model. A LoRA student's frozen model is its own base with the adapters off (no second
    copy): counted as those base weights, the adapters left out, and marked ``shared_with: student``
    (counting the adapters there recorded weights the frozen model never uses)."""
    from pipeline.models.peft_student import FrozenBaseView

    lora_base = isinstance(reference, FrozenBaseView)
    out = record({"student": engine, "reference": _BaseWeights(reference) if lora_base else reference},
                 world_size, zero_stage,
                 {"reference": "the LoRA student's own base weights, adapters off: no second copy"} if lora_base else None)
    if lora_base:
        out["reference"]["shared_with"] = "student"
    return out
