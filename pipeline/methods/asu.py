"""Attention Smoothing Unlearning (ASU; ICLR 2026, arXiv 2603.01285).

L_F = KL(p_teacher || p_student) on forget answers, where the teacher is the frozen original model
with attention logits divided by ``tau`` in ``teacher_layers`` (all layers by default).
L_R = NLL on retain (``asu_gd``) or KL(p_original || p_student) on retain with the original
untempered (``asu_kl``). Total = gamma * L_F + alpha * L_R.

Reductions, each term its own: the forget KL uses ``reduction`` (per-sequence mean, as the authors);
the retain term ``retain_reduction`` (auto: the token mean for ``asu_gd``'s NLL, as the authors' code
and HF's loss; the same masked per-sequence mean for ``asu_kl``'s KL, like the authors'
open-unlearning trainer — their standalone TOFU script used ``batchmean`` over all positions
including padding, which we do not reproduce).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from pipeline.config_base import require
from pipeline.methods.base import ForgetRetainConfig, UnlearningMethod, register_method
from pipeline.methods.passes import KLTerm, StepOutputs, StepPlan

# Defaults of tau=auto's knobs (the rule itself is pipeline/engine/tau_auto.py, which reads these).
# The paper's 7B models use tau 2.0-2.8, the embedded benchmark's best grid points are 5-8
# (docs/sweeps.md): 8 leaves room above both without spending probes on ever flatter teachers.
TAU_MAX = 8.0
# The chosen tau: the smallest whose tempered teacher has forgotten 90% of the share of its known
# forget facts that it forgets at tau_max (docs/sweeps.md, "method.tau=auto": why 0.9, measured on
# both benchmarks).
FACT_TARGET = 0.9
# Fallback without known facts: the largest tau that keeps 95% of the answers' non-fact top-1 predictions.
FORM_TARGET = 0.95


@dataclass
class ASUConfig(ForgetRetainConfig):
    name: str = "asu_kl"
    tau: Any = 2.3  # a float > 0, or "auto" (chosen before training: pipeline/engine/tau_auto.py)
    # tau=auto only: the search range's upper end; the fraction of what it forgets at tau_max that the
    # tempered teacher must have forgotten of its known forget facts (the rule: the smallest tau that
    # reaches it); without known facts, the share of the answers' non-fact top-1 predictions it must
    # keep (the largest tau that keeps it).
    tau_max: float = TAU_MAX
    tau_fact_target: float = FACT_TARGET
    tau_form_target: float = FORM_TARGET
    teacher_layers: Optional[list[int]] = None  # None: every layer is tempered
    retain_loss: str = "kl"
    gamma: float = 0.1
    alpha: float = 1.0
    # ASU+IDK: the first answer token is excluded from the distillation term.
    skip_first_answer_token: bool = False
    # Teacher of the forget KL: "live" runs the tempered reference every step; "cached" computes its
    # distributions on the forget set once (pipeline/engine/teacher_cache.py) and streams them in.
    teacher: str = "live"
    # cached teacher only: 0 = full log-prob rows (exact; only sensible for small vocabularies),
    # k > 0 = top-k log-probs + the tail mass (KL over k + 1 buckets, a lower bound of the full KL).
    cache_topk: int = 0


@register_method("asu", "asu_kl")
class ASU(UnlearningMethod):
    config_cls = ASUConfig
    needs_reference = True

    @classmethod
    def validate_config(cls, mcfg: Any, n_layers: Optional[int]) -> None:
        super().validate_config(mcfg, n_layers)
        tau = mcfg.tau
        if isinstance(tau, str) and tau == "auto":
            require(float(mcfg.tau_max) > 1.0, "method.tau_max",
                    f"must be > 1 (tau=auto searches [1, tau_max]), got {mcfg.tau_max}")
            require(0.0 < float(mcfg.tau_form_target) <= 1.0, "method.tau_form_target",
                    f"must be in (0, 1] (a share of top-1 predictions kept), got {mcfg.tau_form_target}")
            require(0.0 < float(mcfg.tau_fact_target) <= 1.0, "method.tau_fact_target",
                    f"must be in (0, 1] (a share of the known facts forgotten), got {mcfg.tau_fact_target}")
        else:
            try:
                if isinstance(tau, bool):  # method.tau=true parses as a bool, which float() reads as 1.0
                    raise TypeError
                tau = float(tau)
            except (TypeError, ValueError):
                require(False, "method.tau", f"must be a number > 0 or 'auto', got {mcfg.tau!r}")
            require(tau > 0, "method.tau", f"must be > 0 (ASU smooths attention with tau > 1), got {mcfg.tau}")
        layers = mcfg.teacher_layers
        if layers is not None:
            require(len(layers) > 0, "method.teacher_layers", "empty list: use null for all layers")
            if n_layers is not None:
                bad = [i for i in layers if not 0 <= int(i) < n_layers]
                require(not bad, "method.teacher_layers",
                        f"layer indices {bad} out of range: the model has {n_layers} layers (allowed 0..{n_layers - 1})")
        teacher = getattr(mcfg, "teacher", "live")
        require(teacher in ("live", "cached"), "method.teacher", f"got {teacher!r}; allowed: live, cached")
        topk = getattr(mcfg, "cache_topk", 0)
        require(isinstance(topk, int) and topk >= 0, "method.cache_topk",
                f"must be an integer >= 0 (0 = full rows, k = top-k + tail mass), got {topk!r}")
        if teacher == "cached":
            require(cls.forget_loss is ASU.forget_loss, "method.teacher",
                    f"teacher=cached caches next-token distributions; {mcfg.name} has another forget loss "
                    f"(use method.teacher=live)")

    @classmethod
    def config_cautions(cls, mcfg: Any) -> list[str]:
        tau = mcfg.tau  # a number (validate_config checked it) or "auto", which searches [1, tau_max]
        if tau != "auto" and float(tau) < 1.0:
            return [f"method.tau={tau} < 1 sharpens the teacher's attention instead of smoothing it (ASU's teacher "
                    f"uses tau > 1; tau = 1 is the model itself): meant for an ablation only"]
        return []

    @property
    def cached_teacher(self) -> bool:
        return getattr(self.cfg, "teacher", "live") == "cached"

    @property
    def uses_reference(self) -> bool:
        """With a cached teacher only the retain KL (``retain_loss=kl``) needs the reference model."""
        if self.cached_teacher:
            return getattr(self.cfg, "retain_loss", None) == "kl"
        return True

    @property
    def teacher_layers(self) -> Optional[list[int]]:
        return list(self.cfg.teacher_layers) if self.cfg.teacher_layers is not None else None

    forget_kl = True

    def plan_forget(self, plan: StepPlan, batch: dict) -> None:
        if self.cached_teacher and "forget_teacher" not in batch:
            raise ValueError("method.teacher=cached: the batch has no 'forget_teacher' rows (the trainer "
                             "attaches them from pipeline/engine/teacher_cache.py)")
        plan.need_kl("forget", KLTerm(float(self.cfg.tau), self.cfg.reduction,
                                      bool(self.cfg.skip_first_answer_token), cached=self.cached_teacher))

    def forget_loss(self, out: StepOutputs) -> torch.Tensor:
        return out.kl["forget"]


@dataclass
class ASUGDConfig(ASUConfig):
    name: str = "asu_gd"
    retain_loss: str = "nll"


@register_method("asu_gd")
class ASUGD(ASU):
    """ASU with NLL (gradient descent) on the retain set."""

    config_cls = ASUGDConfig
