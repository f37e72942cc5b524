"""IdkDPO: DPO with a refusal ("I don't know") as the preferred answer and the true forget answer as
the dispreferred one; the reference is the frozen original model; plus the retain term (NLL).

L_F = -(2/beta) * mean_i log sigmoid(beta * [(log p_theta(idk_i) - log p_ref(idk_i))
                                            - (log p_theta(y_i) - log p_ref(y_i))])
with sequence log-probs summed over answer tokens — open-unlearning's ``compute_dpo_loss`` (note
its 2/beta scale, as in NPO). The refusal answers come from a fixed list, one picked per row by a
stable hash of the question (same choice on every rank and every run); they reach the loss as the
forget view ``forget_idk`` (:class:`IdkViews`, shared with ``asu_idk``).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from pipeline.config_base import require

# REFUSALS lives with the data code (the embedded tokenizer must know its words); re-exported here.
from pipeline.data.formatting import PROMPT_TEMPLATE, REFUSALS, encode_qa
from pipeline.methods import losses
from pipeline.methods.base import ForgetRetainConfig, UnlearningMethod, register_method
from pipeline.methods.passes import LOGITS, StepOutputs, StepPlan

IDK_VIEW = "forget_idk"

def pick_refusal(question: str, answers: tuple[str, ...] | list[str]) -> str:
    """The refusal for one row: deterministic in the question text (crc32, not Python's salted hash)."""
    return answers[zlib.crc32(str(question).encode("utf-8")) % len(answers)]


class IdkViews:
    """Mixin: builds the ``forget_idk`` view (each forget question with a refusal answer) and fetches
    it from a batch. Config fields used: ``idk_answers`` (None: :data:`REFUSALS`)."""

    cfg: Any

    def refusals(self) -> tuple[str, ...]:
        custom = getattr(self.cfg, "idk_answers", None)
        return tuple(custom) if custom else REFUSALS

    def forget_views(self, tokenizer: Any, rows: list[dict], max_length: int,
                     prompt_format: Any = None) -> dict[str, list[dict]]:
        answers = self.refusals()
        template = prompt_format if prompt_format is not None else PROMPT_TEMPLATE
        out = []
        for i, r in enumerate(rows):
            enc = encode_qa(tokenizer, r["question"], pick_refusal(r["question"], answers), max_length,
                            template=template)
            out.append({"input_ids": enc.input_ids, "labels": enc.labels, "index": i})
        return {IDK_VIEW: out}

    @staticmethod
    def idk_batch(batch: dict) -> dict:
        if IDK_VIEW not in batch:
            raise KeyError(f"batch has no {IDK_VIEW!r} view: the trainer must set "
                           f"trainer.views = method.forget_views(...) (have: {sorted(batch)})")
        return batch[IDK_VIEW]

    @classmethod
    def validate_idk(cls, mcfg: Any) -> None:
        answers = getattr(mcfg, "idk_answers", None)
        if answers is not None:
            require(len(answers) > 0 and all(str(a).strip() for a in answers), "method.idk_answers",
                    "must be null (built-in refusals) or a non-empty list of non-empty strings")


def dpo_loss(win_theta: torch.Tensor, win_ref: torch.Tensor, lose_theta: torch.Tensor, lose_ref: torch.Tensor,
             beta: float) -> torch.Tensor:
    """-(2/beta) mean log sigmoid(beta * (win log-ratio - lose log-ratio)) from per-sequence log-probs."""
    return -(2.0 / beta) * F.logsigmoid(beta * ((win_theta - win_ref) - (lose_theta - lose_ref))).mean()


@dataclass
class IdkDPOConfig(ForgetRetainConfig):
    name: str = "idk_dpo"
    beta: float = 0.1
    gamma: float = 1.0
    alpha: float = 1.0
    retain_loss: str = "nll"
    reduction: str = "token_mean"  # a retain KL's reduction (retain_reduction=auto); the retain NLL is the token mean
    idk_answers: Optional[list[str]] = None  # null: the built-in refusal list


@register_method("idk_dpo")
class IdkDPO(IdkViews, UnlearningMethod):
    forget_reduction = "per-sequence log-prob ratios, mean over sequences"
    config_cls = IdkDPOConfig
    needs_reference = True

    @classmethod
    def validate_config(cls, mcfg: Any, n_layers: Optional[int]) -> None:
        super().validate_config(mcfg, n_layers)
        require(mcfg.beta > 0, "method.beta", f"must be > 0, got {mcfg.beta}")
        cls.validate_idk(mcfg)

    def plan_forget(self, plan: StepPlan, batch: dict) -> None:
        self.idk_batch(batch)  # a clear error when the trainer did not attach the view
        for group in ("forget", IDK_VIEW):
            plan.need_student(group, LOGITS).need_frozen(group, LOGITS)

    def forget_loss(self, out: StepOutputs) -> torch.Tensor:
        lp = losses.sequence_logprob
        return dpo_loss(lp(out.student[IDK_VIEW]), lp(out.frozen[IDK_VIEW]),
                        lp(out.student["forget"]), lp(out.frozen["forget"]), float(self.cfg.beta))
