"""SimNPO (Fan et al. 2024, "Simplicity Prevails"): reference-free, length-normalised NPO.

L_F = -(2/beta) * mean_i log sigmoid(beta * (-(1/|y_i|) log p_theta(y_i|x_i) - delta))
as open-unlearning's ``SimNPO`` (``src/trainer/unlearn/simnpo.py``): the per-sequence NLL summed
over answer tokens is divided by the number of answer tokens, delta is subtracted *inside* the
beta scaling. This is :func:`npo_loss` with the length-normalised log-prob as the policy term and
the constant ``-delta`` in place of the reference log-prob. Retain: NLL (token mean), as there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from pipeline.config_base import require
from pipeline.methods import losses
from pipeline.methods.base import ForgetRetainConfig, UnlearningMethod, register_method
from pipeline.methods.npo import npo_loss
from pipeline.methods.passes import LOGITS, StepOutputs, StepPlan


@dataclass
class SimNPOConfig(ForgetRetainConfig):
    name: str = "simnpo"
    beta: float = 4.5
    delta: float = 0.0
    gamma: float = 0.125
    alpha: float = 1.0
    retain_loss: str = "nll"
    reduction: str = "token_mean"  # a retain KL's reduction (retain_reduction=auto); the retain NLL is the token mean


@register_method("simnpo")
class SimNPO(UnlearningMethod):
    forget_reduction = "per-sequence mean log-prob, mean over sequences"
    config_cls = SimNPOConfig

    @classmethod
    def validate_config(cls, mcfg: Any, n_layers: Optional[int]) -> None:
        super().validate_config(mcfg, n_layers)
        require(mcfg.beta > 0, "method.beta", f"must be > 0, got {mcfg.beta}")

    def plan_forget(self, plan: StepPlan, batch: dict) -> None:
        plan.need_student("forget", LOGITS)

    def forget_loss(self, out: StepOutputs) -> torch.Tensor:
        avg_logp = losses.mean_token_logprob(out.student["forget"])
        return npo_loss(avg_logp, torch.full_like(avg_logp, -float(self.cfg.delta)), float(self.cfg.beta))
