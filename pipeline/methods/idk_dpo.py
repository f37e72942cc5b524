"""IdkDPO: DPO with a refusal ("I don't know") as the preferred answer and the true forget answer as
the dispreferred one; the reference is the frozen original model; plus the retain term (NLL).

L_F = -(2/beta) * mean_i log sigmoid(beta * [(log p_theta(idk_i) - log p_ref(idk_i))
                                            - (log p_theta(y_i) - log p_ref(y_i))])
with sequence log-probs summed over answer tokens — open-unlearning's ``compute_dpo_loss`` (note
its 2/beta scale, as in NPO). The refusal answers come from a list (built-in, ``idk_answers`` or
``idk_answers_file``); ``idk_draw=per_question`` picks one per row by a stable hash of the question,
``per_use`` draws one each time a row is trained (open-unlearning's ``QAwithIdkDataset``), keyed by
(seed, the draw's forget-stream position, row) so every rank, every split of a step into
micro-batches and every resumed attempt draws the same. They reach the loss
as the forget view ``forget_idk`` (:class:`IdkViews`, shared with ``asu_idk``).
"""

from __future__ import annotations

import logging
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
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
log = logging.getLogger(__name__)

IDK_DRAWS = ("per_question", "per_use")


@dataclass
class IdkFields:
    """The refusal settings of the methods that train on the ``forget_idk`` view."""

    idk_answers: Optional[list[str]] = None  # null: idk_answers_file's lines, else the built-in refusal list
    idk_answers_file: Optional[str] = None  # one refusal per line (TOFU's / open-unlearning's idk file)
    idk_draw: str = "per_question"  # per_question: one fixed refusal per question; per_use: a new draw each use


def pick_refusal(question: str, answers: tuple[str, ...] | list[str]) -> str:
    """The refusal for one row: deterministic in the question text (crc32, not Python's salted hash)."""
    return answers[zlib.crc32(str(question).encode("utf-8")) % len(answers)]


def read_refusals(path: str | Path) -> tuple[str, ...]:
    """Non-empty, stripped lines of a refusal file (open-unlearning reads its idk file line by line)."""
    return tuple(line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip())


class DrawnRefusalView:
    """The ``forget_idk`` view with ``idk_draw=per_use``: the forget row drawn at position ``pos`` of
    the forget stream (:class:`pipeline.engine.batching.BatchPlan`) gets refusal
    ``random.Random((seed, pos, row))``'s pick, so a row sees other refusals in other epochs while
    ranks, world sizes, micro-batch splits and resumed attempts draw alike. Rows are encoded when
    first drawn (rows x refusals encodings up front would be ~40 k for TOFU forget10)."""

    def __init__(self, tokenizer: Any, rows: list[dict], answers: tuple[str, ...], max_length: int, template: Any,
                 seed: int) -> None:
        self.tokenizer, self.rows, self.answers = tokenizer, rows, answers
        self.max_length, self.template, self.seed = max_length, template, seed
        self._encoded: dict[tuple[int, int], dict] = {}

    def choice(self, pos: int, i: int) -> int:
        """Index into ``answers`` of row ``i``'s refusal when drawn at forget-stream position ``pos``."""
        return random.Random(f"{self.seed}:{pos}:{i}").randrange(len(self.answers))

    def for_draws(self, positions: list[int], idx: list[int]) -> list[dict]:
        """The encoded view rows ``idx``, drawn at forget-stream positions ``positions``."""
        out = []
        for pos, i in zip(positions, idx, strict=True):
            key = (i, self.choice(pos, i))
            if key not in self._encoded:
                enc = encode_qa(self.tokenizer, self.rows[i]["question"], self.answers[key[1]], self.max_length,
                                template=self.template)
                self._encoded[key] = {"input_ids": enc.input_ids, "labels": enc.labels, "index": i}
            out.append(self._encoded[key])
        return out


class IdkViews:
    """Mixin: builds the ``forget_idk`` view (each forget question with a refusal answer) and fetches
    it from a batch. Config fields used: :class:`IdkFields`."""

    cfg: Any

    def refusals(self) -> tuple[str, ...]:
        custom = getattr(self.cfg, "idk_answers", None)
        if custom:
            return tuple(custom)
        path = getattr(self.cfg, "idk_answers_file", None)
        return read_refusals(path) if path else REFUSALS

    def forget_views(self, tokenizer: Any, rows: list[dict], max_length: int,
                     prompt_format: Any = None, seed: int = 0) -> dict[str, Any]:
        answers = self.refusals()
        template = prompt_format if prompt_format is not None else PROMPT_TEMPLATE
        draw = getattr(self.cfg, "idk_draw", "per_question")
        source = ("method.idk_answers" if getattr(self.cfg, "idk_answers", None)
                  else getattr(self.cfg, "idk_answers_file", None) or "built-in")
        log.info("refusal answers (forget_idk): %d from %s, drawn %s", len(answers), source,
                 "anew each time a row trains" if draw == "per_use" else "once per question")
        if draw == "per_use":
            return {IDK_VIEW: DrawnRefusalView(tokenizer, rows, answers, max_length, template, seed)}
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
        path = getattr(mcfg, "idk_answers_file", None)
        if path:
            require(answers is None, "method.idk_answers_file", "set together with method.idk_answers: use one of them")
            require(Path(path).is_file(), "method.idk_answers_file", f"{path} is not a file")
            try:
                n = len(read_refusals(path))
            except (OSError, UnicodeDecodeError) as exc:
                n, why = 0, f"cannot read {path}: {exc}"
            else:
                why = f"{path} has no non-empty line"
            require(n > 0, "method.idk_answers_file", why)
        draw = getattr(mcfg, "idk_draw", "per_question")
        require(draw in IDK_DRAWS, "method.idk_draw", f"got {draw!r}; allowed values: {', '.join(IDK_DRAWS)}")


def dpo_loss(win_theta: torch.Tensor, win_ref: torch.Tensor, lose_theta: torch.Tensor, lose_ref: torch.Tensor,
             beta: float) -> torch.Tensor:
    """-(2/beta) mean log sigmoid(beta * (win log-ratio - lose log-ratio)) from per-sequence log-probs."""
    return -(2.0 / beta) * F.logsigmoid(beta * ((win_theta - win_ref) - (lose_theta - lose_ref))).mean()


@dataclass
class IdkDPOConfig(IdkFields, ForgetRetainConfig):
    name: str = "idk_dpo"
    beta: float = 0.1
    gamma: float = 1.0
    alpha: float = 1.0
    retain_loss: str = "nll"
    reduction: str = "token_mean"  # a retain KL's reduction (retain_reduction=auto); the retain NLL is the token mean


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
