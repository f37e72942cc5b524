"""ASU+IDK (DESIGN §3): ASU's tempered self-distillation on the forget answers *plus* an NLL on
refusal answers ("I don't know") for the forget questions.

Total = gamma * KL(p_teacher_tau || p_student)[forget, first answer token excluded]
        + idk_weight * NLL(refusal | forget question)
        + alpha * L_R.
The first answer token is left out of the KL (``skip_first_answer_token=True``) so the distillation
term does not fight the refusal's first token. The refusals are the ``forget_idk`` view shared with
``idk_dpo`` (:class:`~pipeline.methods.idk_dpo.IdkViews`); the IDK NLL uses ``reduction``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from pipeline.config_base import require
from pipeline.methods import losses
from pipeline.methods.asu import ASU, ASUConfig
from pipeline.methods.base import LossOutput, register_method
from pipeline.methods.idk_dpo import IDK_VIEW, IdkFields, IdkViews
from pipeline.methods.passes import LOGITS, StepOutputs, StepPlan


@dataclass
class ASUIdkConfig(IdkFields, ASUConfig):
    name: str = "asu_idk"
    skip_first_answer_token: bool = True
    idk_weight: float = 1.0  # weight of the refusal NLL (not scaled by gamma)


@register_method("asu_idk")
class ASUIdk(IdkViews, ASU):
    config_cls = ASUIdkConfig

    @classmethod
    def validate_config(cls, mcfg: Any, n_layers: Optional[int]) -> None:
        super().validate_config(mcfg, n_layers)
        require(mcfg.idk_weight >= 0, "method.idk_weight", f"must be >= 0, got {mcfg.idk_weight}")
        cls.validate_idk(mcfg)

    def plan_forget(self, plan: StepPlan, batch: dict) -> None:
        super().plan_forget(plan, batch)
        self.idk_batch(batch)  # a clear error when the trainer did not attach the view
        plan.need_student(IDK_VIEW, LOGITS)

    def combine(self, out: StepOutputs, batch: dict) -> LossOutput:
        res = super().combine(out, batch)
        idk = losses.nll(out.student[IDK_VIEW], self.cfg.reduction)
        loss = res.loss + float(self.cfg.idk_weight) * idk
        return LossOutput(loss, {**res.logs, "idk_loss": float(idk.detach()), "loss": float(loss.detach())})
