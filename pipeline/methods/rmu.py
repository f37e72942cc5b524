"""RMU — Representation Misdirection for Unlearning (Li et al. 2024, the WMDP paper).

L_F = MSE(h_theta^l(x_f), c * u) on forget tokens: the student's output hidden state at decoder layer
l is pushed towards a fixed random direction u (entries ~ U[0,1), normalised, seeded) scaled by the
steering coefficient c. L_R = MSE(h_theta^l(x_r), h_0^l(x_r)) on retain tokens, h_0 the frozen
original. Total = gamma * L_F + alpha * L_R (WMDP's Zephyr-7B settings: l=7, c=6.5, alpha=1200,
lr 5e-5). Only the MLP down-projections of layers l-2..l are trained (``update_layers``).

MSE = mean over the hidden dimension, then ``reduction`` over the labelled tokens
(``sequence_mean``: per-sequence token mean, then mean over sequences — open-unlearning's masked
activation loss; the WMDP script averages over every position of its left-padded batches, ``<bos>``
and padding included).

With ``retain_loss=mse`` nothing above layer l enters the loss, so each step's forwards stop after it
(:func:`~pipeline.methods.model_io.stopped_after`, chosen in :mod:`pipeline.methods.passes`); with
``nll``/``kl`` the student (and for ``kl`` the frozen model) runs to its logits.

:class:`LayerSelectionConfig` / :class:`LayerwiseMethod` (layer validation, trainable-parameter
selection, the hidden-state retain MSE) are shared with ``asu_wmdp`` (asu_repr.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from pipeline.config_base import ConfigError, require
from pipeline.methods import losses
from pipeline.methods.base import ForgetRetainConfig, UnlearningMethod, register_method
from pipeline.methods.passes import HIDDEN, StepOutputs, StepPlan
from pipeline.models.peft_student import is_peft_model


@dataclass
class LayerSelectionConfig:
    """Fields of the layer-wise representation methods (RMU, asu_wmdp)."""

    layer: int = 7  # decoder layer (0-based) whose output hidden state is matched
    # layers whose ``update_module`` is trained; null: layer-2 .. layer (WMDP's 5,6,7 for layer 7)
    update_layers: Optional[list[int]] = None
    update_module: str = "mlp.down_proj"  # submodule of a decoder layer (Llama naming)
    retain_loss: str = "mse"  # mse (hidden state at `layer` vs the frozen original) | nll | kl | none


def update_layer_indices(layer: int, update_layers: Optional[list[int]]) -> list[int]:
    if update_layers is None:
        return list(range(max(0, int(layer) - 2), int(layer) + 1))
    return sorted({int(i) for i in update_layers})


class LayerwiseMethod(UnlearningMethod):
    """Base for methods matching hidden states at ``cfg.layer`` and training a few modules only."""

    RETAIN_LOSSES = ("mse", "nll", "kl", "none")  # mse: the hidden state at `layer` vs the frozen original's

    @classmethod
    def validate_config(cls, mcfg: Any, n_layers: Optional[int]) -> None:
        super().validate_config(mcfg, n_layers)  # retain_loss among RETAIN_LOSSES, which adds "mse"
        layer = int(mcfg.layer)
        require(layer >= 0, "method.layer", f"must be >= 0, got {layer}")
        if n_layers is not None:
            require(layer < n_layers, "method.layer", f"{layer} out of range: the model has {n_layers} layers "
                    f"(allowed 0..{n_layers - 1}); set method.layer for this model")
        ups = mcfg.update_layers
        require(ups is None or len(ups) > 0, "method.update_layers", "empty list: use null for layer-2..layer")
        bad = [i for i in update_layer_indices(layer, ups) if not 0 <= i <= layer]
        require(not bad, "method.update_layers",
                f"layers {bad} out of range: allowed 0..{layer} (method.layer; later layers cannot change "
                f"the hidden state at method.layer)")
        require(bool(str(mcfg.update_module).strip()), "method.update_module", "must name a decoder-layer submodule")
        if mcfg.retain_loss == "mse" and float(getattr(mcfg, "rna_noise", 0) or 0) > 0:
            # the retain pass stops after method.layer (its hidden state is all the MSE reads): noise added
            # above it would never be applied, and the run would train without RNA while logging it on
            require(int(mcfg.rna_layer) <= layer, "method.rna_layer",
                    f"{mcfg.rna_layer} is above method.layer={layer}, whose hidden state the retain loss "
                    f"(retain_loss=mse) reads: the noise would never reach it; set method.rna_layer <= {layer}")

    @property
    def uses_reference(self) -> bool:
        return self.needs_reference or self.cfg.retain_loss in ("mse", "kl")

    @property
    def update_layers(self) -> list[int]:
        return update_layer_indices(self.cfg.layer, self.cfg.update_layers)

    def select_trainable(self, model: nn.Module) -> None:
        """Freeze everything but ``update_module`` of ``update_layers`` (before DeepSpeed wraps)."""
        losses.check_layer(model, self.cfg.layer, "method.layer")
        chosen = []
        for i in self.update_layers:
            block = losses.check_layer(model, i, "method.update_layers")
            try:
                chosen.append(block.get_submodule(str(self.cfg.update_module)))
            except AttributeError as exc:
                raise ValueError(f"method.update_module={self.cfg.update_module!r}: decoder layer {i} "
                                 f"({type(block).__name__}) has no such submodule") from exc
        losses.unwrap(model).requires_grad_(False)
        if is_peft_model(model):
            # LoRA student (model.peft): the update maps onto the adapters inside the chosen modules.
            picked = [p for mod in chosen for n, p in mod.named_parameters() if "lora_" in n]
            if not picked:
                raise ConfigError(
                    f"config error at 'model.peft.target_modules': {self.cfg.name} trains "
                    f"{self.cfg.update_module} of layers {self.update_layers}, but model.peft puts no adapter "
                    f"there; include {str(self.cfg.update_module).rsplit('.', 1)[-1]!r} in model.peft.target_modules "
                    f"and those layers in model.peft.layers")
            for p in picked:
                p.requires_grad_(True)
            return
        for mod in chosen:
            mod.requires_grad_(True)

    @property
    def hidden_layer(self) -> int:
        return int(self.cfg.layer)

    def plan_retain(self, plan: StepPlan) -> None:
        if self.cfg.retain_loss != "mse":
            return super().plan_retain(plan)
        plan.need_student("retain", HIDDEN).need_frozen("retain", HIDDEN)

    def retain_objective(self, out: StepOutputs) -> torch.Tensor:
        if self.cfg.retain_loss != "mse":
            return super().retain_objective(out)
        s, t = out.student["retain"], out.frozen["retain"]
        return losses.hidden_mse(s.hidden, t.hidden, s.token_mask, self.retain_reduction(), s.token_count("labelled"))


@dataclass
class RMUConfig(LayerSelectionConfig, ForgetRetainConfig):
    # lr 5e-5 (WMDP) is a trainer setting: trainer.lr=5e-5
    name: str = "rmu"
    steering_coeff: float = 6.5  # c
    control_seed: int = 0  # seed of the random direction u (same on every rank)
    gamma: float = 1.0
    alpha: float = 1200.0
    retain_loss: str = "mse"


def control_vector(dim: int, seed: int) -> torch.Tensor:
    """u: entries ~ U[0, 1) from a private seeded generator, normalised to unit length (WMDP)."""
    g = torch.Generator().manual_seed(int(seed))
    u = torch.rand(dim, generator=g, dtype=torch.float32)
    return u / u.norm()


@register_method("rmu")
class RMU(LayerwiseMethod):
    config_cls = RMUConfig

    def __init__(self, cfg: Any, kl_impl: str = "naive", joint_pass: bool = True) -> None:
        super().__init__(cfg, kl_impl, joint_pass)
        self._u: Optional[torch.Tensor] = None

    @classmethod
    def validate_config(cls, mcfg: Any, n_layers: Optional[int]) -> None:
        super().validate_config(mcfg, n_layers)
        require(mcfg.steering_coeff > 0, "method.steering_coeff", f"must be > 0, got {mcfg.steering_coeff}")

    def steering(self, dim: int, device: torch.device) -> torch.Tensor:
        if self._u is None or self._u.shape[0] != dim:
            self._u = control_vector(dim, self.cfg.control_seed)
        return float(self.cfg.steering_coeff) * self._u.to(device)

    def plan_forget(self, plan: StepPlan, batch: dict) -> None:
        plan.need_student("forget", HIDDEN)

    def forget_loss(self, out: StepOutputs) -> torch.Tensor:
        s = out.student["forget"]
        return losses.hidden_mse(s.hidden, self.steering(s.hidden.shape[-1], s.hidden.device), s.token_mask,
                                 self.cfg.reduction, s.token_count("labelled"))
