"""Gradient Ascent (GA): maximise the NLL of the forget answers; no retain term."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.methods import losses
from pipeline.methods.base import ForgetRetainConfig, UnlearningMethod, register_method
from pipeline.methods.passes import LOGITS, StepOutputs, StepPlan


@dataclass
class GradAscentConfig(ForgetRetainConfig):
    name: str = "grad_ascent"
    retain_loss: str = "none"
    alpha: float = 0.0
    reduction: str = "token_mean"  # HF's default loss, as in open-unlearning


@register_method("grad_ascent")
class GradAscent(UnlearningMethod):
    config_cls = GradAscentConfig

    def plan_forget(self, plan: StepPlan, batch: dict) -> None:
        plan.need_student("forget", LOGITS)

    def forget_loss(self, out: StepOutputs) -> torch.Tensor:
        return -losses.nll(out.student["forget"], self.cfg.reduction)
