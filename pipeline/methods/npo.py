"""Negative Preference Optimization (NPO; Zhang et al. 2024).

L_F = -(2/beta) * mean_i log sigmoid(-beta * (log p_theta(y_i|x_i) - log p_ref(y_i|x_i)))
with sequence log-probs summed over answer tokens (as open-unlearning's ``compute_batch_nll``),
plus the retain term (NLL by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from pipeline.config_base import require
from pipeline.methods import losses
from pipeline.methods.base import ForgetRetainConfig, UnlearningMethod, register_method
from pipeline.methods.passes import LOGITS, StepOutputs, StepPlan


@dataclass
class NPOConfig(ForgetRetainConfig):
    name: str = "npo"
    beta: float = 0.1
    retain_loss: str = "nll"
    reduction: str = "token_mean"  # a retain KL's reduction (retain_reduction=auto); the retain NLL is the token mean


def npo_loss(logp_theta: torch.Tensor, logp_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO forget loss from per-sequence log-probs of the policy and the frozen reference."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp_theta - logp_ref)).mean()


@register_method("npo")
class NPO(UnlearningMethod):
    forget_reduction = "per-sequence log-prob ratio, mean over sequences"
    config_cls = NPOConfig
    needs_reference = True

    @classmethod
    def validate_config(cls, mcfg: Any, n_layers: Optional[int]) -> None:
        super().validate_config(mcfg, n_layers)
        require(mcfg.beta > 0, "method.beta", f"must be > 0, got {mcfg.beta}")

    def plan_forget(self, plan: StepPlan, batch: dict) -> None:
        plan.need_student("forget", LOGITS).need_frozen("forget", LOGITS)

    def forget_loss(self, out: StepOutputs) -> torch.Tensor:
        ref = losses.sequence_logprob(out.frozen["forget"])
        return npo_loss(losses.sequence_logprob(out.student["forget"]), ref, float(self.cfg.beta))
