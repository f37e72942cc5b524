"""ASU for WMDP (``asu_wmdp``): attention smoothing as *representation* distillation (DESIGN §3).

L_F = MSE(h_theta^l(x_f), h_tau^l(x_f)): the student's output hidden state at decoder layer l
(default 7) is pulled towards the hidden state of the frozen original run with tempered attention
(``softmax(QK^T/(tau*sqrt d))`` in ``teacher_layers``, all by default — only layers <= l matter).
L_R = MSE(h_theta^l(x_r), h_0^l(x_r)) with the frozen original *untempered* (RMU's retain term).
Total = gamma * L_F + alpha * L_R. As in RMU only ``update_module`` (MLP down-proj) of
``update_layers`` (default l-2..l, i.e. 5-7) is trained; layer selection, validation and the retain
MSE are shared with RMU (:class:`~pipeline.methods.rmu.LayerwiseMethod`).

The released reference code for this variant does not run; this follows the paper's description.
Choices (see docs/methods.md): same MSE reduction as RMU (mean over the hidden dimension, per-
sequence mean over labelled tokens, mean over sequences); the teacher is the frozen reference (no
extra copy); the hidden state is the decoder layer's output (before the final norm).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from pipeline.config_base import require
from pipeline.methods import losses
from pipeline.methods.asu import ASU, ASUConfig
from pipeline.methods.base import register_method
from pipeline.methods.passes import HIDDEN, StepOutputs, StepPlan
from pipeline.methods.rmu import LayerSelectionConfig, LayerwiseMethod


@dataclass
class ASUWMDPConfig(LayerSelectionConfig, ASUConfig):
    # lr: RMU's 5e-5 is a reasonable start (trainer.lr); gamma/alpha/tau are untuned defaults.
    name: str = "asu_wmdp"
    tau: Any = 2.0  # a number; typed Any only so that tau=auto gets validate_config's reason, not a type error
    layer: int = 7
    retain_loss: str = "mse"
    gamma: float = 1.0
    alpha: float = 1.0


@register_method("asu_wmdp")
class ASUWMDP(LayerwiseMethod, ASU):
    config_cls = ASUWMDPConfig
    forget_kl = False  # its forget term matches hidden states (MSE), not logits

    @classmethod
    def validate_config(cls, mcfg: Any, n_layers: Optional[int]) -> None:
        require(mcfg.tau != "auto", "method.tau",
                "asu_wmdp takes a number, not 'auto': tau=auto's signal scores next-token predictions, which "
                "its hidden-state loss does not use (docs/sweeps.md, section 3)")
        super().validate_config(mcfg, n_layers)
        layers = mcfg.teacher_layers
        # only layers <= method.layer shape the hidden state the loss reads: tempering none of them
        # makes the teacher the untempered model, a forget loss of exactly 0 whatever tau is
        require(layers is None or any(int(i) <= int(mcfg.layer) for i in layers), "method.teacher_layers",
                f"{list(layers or [])} are all above method.layer={mcfg.layer}: they cannot change the hidden state "
                f"it matches (the forget loss would be 0 for every tau); temper layers 0..{mcfg.layer}")

    def plan_forget(self, plan: StepPlan, batch: dict) -> None:
        plan.need_student("forget", HIDDEN).need_frozen("forget", HIDDEN, float(self.cfg.tau))

    def forget_loss(self, out: StepOutputs) -> torch.Tensor:
        s, t = out.student["forget"], out.frozen["forget"]
        return losses.hidden_mse(s.hidden, t.hidden, s.token_mask, self.cfg.reduction, s.token_count("labelled"))
