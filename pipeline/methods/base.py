"""Method interface: a method is a loss over a (forget, retain) batch; the engine owns the loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from hydra.core.config_store import ConfigStore
from torch import nn

from pipeline.config_base import MethodConfig, require
from pipeline.methods.passes import LOGITS, KLTerm, StepOutputs, StepPlan, run_step
from pipeline.registry import Registry


@dataclass
class LossOutput:
    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)


@dataclass
class ForgetRetainConfig(MethodConfig):
    """Common knobs of forget/retain objectives."""

    retain_loss: str = "nll"  # nll | kl (KL to the frozen original) | none
    # sequence_mean: mean over each sequence's loss tokens, then over sequences (ASU authors);
    # token_mean: one mean over all loss tokens of the optimizer step, every micro-batch on every rank
    # (HF's default loss with num_items_in_batch; the trainer's StepTokens give the denominator).
    reduction: str = "sequence_mean"
    # The retain term's own reduction. auto: token_mean for a retain NLL (HF's loss, used by all of the
    # ASU authors' code and by open-unlearning), the forget term's ``reduction`` for a retain KL/MSE.
    retain_reduction: str = "auto"
    # RNA add-on (any method): Gaussian noise N(0, rna_noise^2) on the output hidden state of decoder
    # layer ``rna_layer`` during the retain forward only (training only); 0 disables it. Typical 0.01-0.1.
    rna_noise: float = 0.0
    rna_layer: int = 7


class UnlearningMethod:
    """Base class. Subclasses set ``config_cls`` and implement :meth:`forget_loss`.

    ``needs_reference``: the engine builds a frozen copy of the original model (teacher/reference)
    beside the student, as a second ZeRO-3 engine without optimizer.
    """

    config_cls: ClassVar[type] = ForgetRetainConfig
    needs_reference: ClassVar[bool] = False
    # How the forget term is reduced when not by ``method.reduction`` (sequence-level losses: NPO, DPO).
    forget_reduction: ClassVar[Optional[str]] = None

    def __init__(self, cfg: Any, kl_impl: str = "naive", joint_pass: bool = True) -> None:
        self.cfg = cfg
        self.kl_impl = kl_impl
        # True: one pass per model per step (pipeline/methods/passes.py); False: one per row group
        # and model (trainer.passes=per_group, the earlier step, for side-by-side benchmarks).
        self.joint_pass = joint_pass

    # -- configuration ----------------------------------------------------------------------------
    RETAIN_LOSSES: tuple[str, ...] = ("nll", "kl", "none")  # method.retain_loss values this method takes

    @classmethod
    def validate_config(cls, mcfg: Any, n_layers: Optional[int]) -> None:
        require(mcfg.gamma >= 0, "method.gamma", f"must be >= 0, got {mcfg.gamma}")
        require(mcfg.alpha >= 0, "method.alpha", f"must be >= 0, got {mcfg.alpha}")
        if "retain_loss" in mcfg:
            require(mcfg.retain_loss in cls.RETAIN_LOSSES, "method.retain_loss",
                    f"got {mcfg.retain_loss!r}; allowed: {', '.join(cls.RETAIN_LOSSES)}")
        if "reduction" in mcfg:
            require(mcfg.reduction in ("sequence_mean", "token_mean"), "method.reduction",
                    f"got {mcfg.reduction!r}; allowed: sequence_mean, token_mean")
        if "retain_reduction" in mcfg:
            require(mcfg.retain_reduction in ("auto", "sequence_mean", "token_mean"), "method.retain_reduction",
                    f"got {mcfg.retain_reduction!r}; allowed: auto, sequence_mean, token_mean")
        if "rna_noise" in mcfg:
            require(mcfg.rna_noise >= 0, "method.rna_noise", f"must be >= 0 (typical 0.01-0.1), got {mcfg.rna_noise}")
            # RNA perturbs the retain rows: without a retain term the run would train without it while
            # its results and checkpoints record it on
            no_retain = mcfg.alpha == 0 or mcfg.get("retain_loss", "nll") == "none"
            require(mcfg.rna_noise == 0 or not no_retain, "method.rna_noise",
                    f"{mcfg.rna_noise} adds noise to the retain rows, but this method has no retain term (method.alpha="
                    f"{mcfg.alpha}, method.retain_loss={mcfg.get('retain_loss', 'nll')}): set method.rna_noise=0 or a "
                    f"retain term")
            if mcfg.rna_noise > 0 and n_layers is not None:
                require(0 <= mcfg.rna_layer < n_layers, "method.rna_layer",
                        f"{mcfg.rna_layer} out of range: the model has {n_layers} layers (allowed 0..{n_layers - 1})")

    @classmethod
    def config_cautions(cls, mcfg: Any) -> list[str]:
        """Settings that are valid but probably not what was meant, one sentence each: the job logs
        them as warnings at its start (a refusal would stop an ablation that means them)."""
        return []

    @property
    def uses_reference(self) -> bool:
        return self.needs_reference or getattr(self.cfg, "retain_loss", None) == "kl"

    def retain_reduction(self) -> str:
        """The retain term's reduction (``method.retain_reduction``; ``auto`` resolved by retain loss)."""
        red = getattr(self.cfg, "retain_reduction", "auto")
        if red != "auto":
            return red
        if getattr(self.cfg, "retain_loss", "nll") == "nll":
            return "token_mean"
        return getattr(self.cfg, "reduction", "sequence_mean")

    def reductions(self) -> dict[str, str]:
        """Which reduction each loss term uses (logged at start, recorded in results.json)."""
        out = {"forget": self.forget_reduction or getattr(self.cfg, "reduction", "token_mean")}
        if getattr(self.cfg, "retain_loss", "nll") != "none" and self.cfg.alpha > 0:
            out["retain"] = self.retain_reduction()
        return out

    # -- hooks the engine calls before training -----------------------------------------------------
    def select_trainable(self, model: nn.Module) -> None:
        """Freeze parameters the method must not update (e.g. RMU trains a few MLP layers only).
        Default: everything trainable. Called before DeepSpeed wraps the model."""

    def forget_views(self, tokenizer: Any, rows: list[dict], max_length: int,
                     prompt_format: Any = None, seed: int = 0) -> dict[str, Any]:
        """Extra encodings of the forget rows (same order), e.g. refusal answers for IdkDPO, in
        ``prompt_format`` (the run's model.prompt_format; None: plain).
        Each view ``name`` reaches the loss as ``batch[name]`` with the same rows as ``batch["forget"]``:
        a list of encoded rows, or an object whose ``for_draws(positions, idx)`` encodes them per draw
        (drawn anew at each forget-stream position, keyed by ``seed``)."""
        return {}

    # -- the step: what each model must compute, then the loss from it ----------------------------
    # A method fills a StepPlan (pipeline/methods/passes.py) with the rows and outputs its terms
    # need; the step runs the frozen model once and the student once over all of them; the terms
    # then read their own rows' outputs.
    hidden_layer: Optional[int] = None  # decoder layer whose output hidden-state terms read
    forget_kl: bool = False  # the forget term is a KL (ASU's distillation from the tempered teacher)
    teacher_layers: Optional[list[int]] = None  # layers where the frozen model's tau applies

    def plan_forget(self, plan: StepPlan, batch: dict) -> None:
        """Add what the forget term needs to ``plan``."""
        raise NotImplementedError

    def forget_loss(self, out: StepOutputs) -> torch.Tensor:
        """The forget term from the step's outputs."""
        raise NotImplementedError

    def plan_retain(self, plan: StepPlan) -> None:
        """Add what the retain term needs (``retain_loss``: nll, kl or none)."""
        kind = getattr(self.cfg, "retain_loss", "nll")
        if kind == "nll":
            plan.need_student("retain", LOGITS)
        elif kind == "kl":
            plan.need_kl("retain", KLTerm(1.0, self.retain_reduction()))

    def _plan_retain_with_noise(self, plan: StepPlan) -> None:
        self.plan_retain(plan)
        nu = float(getattr(self.cfg, "rna_noise", 0.0) or 0.0)
        if nu > 0:  # RNA: noise on the retain rows of the student's pass only
            plan.rna = ("retain", nu, int(getattr(self.cfg, "rna_layer", 7)))

    def retain_objective(self, out: StepOutputs) -> torch.Tensor:
        """The retain term from the step's outputs (subclasses with another retain loss override both)."""
        from pipeline.methods import losses

        kind = getattr(self.cfg, "retain_loss", "nll")
        if kind == "nll":
            return losses.nll(out.student["retain"], self.retain_reduction())
        if kind == "kl":
            return out.kl["retain"]
        return torch.zeros((), device=next(iter(out.student.values())).mask.device)

    def uses_kl(self) -> bool:
        """Whether a step has a KL term (ASU's forget term, ``retain_loss=kl``): ``kernels.kl`` applies
        only then."""
        return self.forget_kl or ("retain" in self.reductions() and getattr(self.cfg, "retain_loss", "nll") == "kl")

    def has_retain_term(self, batch: dict) -> bool:
        """Whether this step has a retain term (alpha > 0, a retain loss, retain rows in the batch)."""
        return self.cfg.alpha > 0 and getattr(self.cfg, "retain_loss", "nll") != "none" and "retain" in batch

    def _empty_plan(self) -> StepPlan:
        return StepPlan(layer=self.hidden_layer, teacher_layers=self.teacher_layers)

    def plan(self, batch: dict) -> StepPlan:
        """Everything this step needs from the student and the frozen model."""
        plan = self._empty_plan()
        self.plan_forget(plan, batch)
        if self.has_retain_term(batch):
            self._plan_retain_with_noise(plan)
        return plan

    def compute_loss(self, student: nn.Module, reference: Optional[nn.Module], batch: dict) -> LossOutput:
        """``gamma * L_forget + alpha * L_retain`` with both terms logged."""
        plan = self.plan(batch)
        seeds = batch["retain"].get("rna_seed") if "retain" in batch else None
        out = run_step(plan, student, reference, batch, self.kl_impl, self.joint_pass, rna_seeds=seeds)
        return self.combine(out, batch)

    def forget_term(self, student: nn.Module, reference: Optional[nn.Module], forget: dict,
                    views: Optional[dict] = None) -> torch.Tensor:
        """The forget term alone on ``forget`` rows (``views``: extra forget views, cached-teacher rows)."""
        batch = {"forget": forget, **(views or {})}
        plan = self._empty_plan()
        self.plan_forget(plan, batch)
        return self.forget_loss(run_step(plan, student, reference, batch, self.kl_impl, self.joint_pass))

    def retain_term(self, student: nn.Module, reference: Optional[nn.Module], retain: dict) -> torch.Tensor:
        """The retain term alone on ``retain`` rows (with the RNA noise when ``rna_noise > 0``)."""
        plan = self._empty_plan()
        self._plan_retain_with_noise(plan)
        out = run_step(plan, student, reference, {"retain": retain}, self.kl_impl, self.joint_pass,
                       rna_seeds=retain.get("rna_seed"))
        return self.retain_objective(out)

    def combine(self, out: StepOutputs, batch: dict) -> LossOutput:
        """The total from the step's outputs (methods with extra terms add them here, e.g. ASU+IDK)."""
        lf = self.forget_loss(out)
        logs = {"forget_loss": float(lf.detach())}
        total = self.cfg.gamma * lf
        if self.has_retain_term(batch):
            lr = self.retain_objective(out)
            logs["retain_loss"] = float(lr.detach())
            total = total + self.cfg.alpha * lr
        logs["loss"] = float(total.detach())
        return LossOutput(total, logs)


METHODS: Registry[type[UnlearningMethod]] = Registry("method")


def register_method(*names: str):
    """Register a method class under one or more names and store its config schema for Hydra."""

    def deco(cls: type[UnlearningMethod]) -> type[UnlearningMethod]:
        cs = ConfigStore.instance()
        for n in names:
            METHODS.register(n)(cls)
        # Stored outside the method group (conf/method/<name>.yaml includes it as
        # /method_schema_<Class>@_here_): a schema in the group would be listed as an option in --help.
        cs.store(name=f"method_schema_{cls.config_cls.__name__}", node=cls.config_cls)
        return cls

    return deco
