"""Loss building blocks shared by all methods (next-token log-probs, masked reductions, KL).

Conventions: ``inputs`` holds ``input_ids``, ``attention_mask`` and ``labels`` (-100 = no loss);
position t predicts token t+1, so logits[:, :-1] are scored against labels[:, 1:].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from pipeline.data.formatting import IGNORE_INDEX
from pipeline.methods.loss_math import cache_kl_values, kl_values, reduce, scatter  # noqa: F401  (re-exported)
from pipeline.methods.model_io import (  # noqa: F401  (re-exported)
    check_layer,
    decoder_layers,
    layer_output,
    logits_of,
    shifted_mask,
    tempered,
    unwrap,
)

if TYPE_CHECKING:
    from pipeline.methods.passes import Part, StepPlan


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each next token (B, T-1) and its loss mask."""
    lg = logits[:, :-1].float()
    tgt = labels[:, 1:]
    mask = tgt != IGNORE_INDEX
    lp = torch.log_softmax(lg, dim=-1).gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return lp * mask, mask


def label_logprobs(part: Part) -> torch.Tensor:
    """Log-prob of each labelled next token from a pass's :class:`~pipeline.methods.passes.Part`,
    as a (B, T-1) tensor that is zero off the loss positions."""
    lp = torch.log_softmax(part.logits.float(), dim=-1).gather(-1, part.targets.unsqueeze(-1)).squeeze(-1)
    return scatter(lp, part.mask)


def nll(part: Part, reduction: str = "sequence_mean") -> torch.Tensor:
    """Negative log-likelihood of the labelled tokens of one group (``token_mean``: over the training
    step's tokens when the part carries them)."""
    return reduce(-label_logprobs(part), part.mask, reduction, part.token_count("loss"))


def sequence_logprob(part: Part) -> torch.Tensor:
    """Sum of labelled-token log-probs per sequence, shape (B,)."""
    return label_logprobs(part).sum(1)


def mean_token_logprob(part: Part) -> torch.Tensor:
    """Length-normalised sequence log-prob (mean over labelled tokens), shape (B,).

    Rows without labelled tokens give 0 (not NaN)."""
    return sequence_logprob(part) / part.mask.sum(1).clamp_min(1)


def kl_from_logits(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    reduction: str = "sequence_mean",
    skip_first: bool = False,
) -> torch.Tensor:
    """KL(p_teacher || p_student) at the labelled positions of (B, T, V) logits, reduced."""
    mask = shifted_mask(labels, skip_first)
    return reduce(kl_values(teacher_logits[:, :-1], student_logits[:, :-1]), mask, reduction)


def _one_group(plan: StepPlan, student: nn.Module, teacher: Optional[nn.Module], batch: dict,
               kl_impl: str) -> torch.Tensor:
    from pipeline.methods.passes import run_step

    return run_step(plan, student, teacher, batch, kl_impl).kl["x"]


def distill_kl(
    student: nn.Module,
    teacher: nn.Module,
    inputs: dict,
    reduction: str = "sequence_mean",
    tau: Optional[float] = None,
    layers: Optional[Sequence[int]] = None,
    skip_first: bool = False,
    kl_impl: str = "naive",
) -> torch.Tensor:
    """KL(teacher || student) on ``inputs``' labelled positions; the teacher runs with attention
    temperature ``tau`` in ``layers`` (untempered when ``tau`` is None or 1) and without grad.

    The training step's own code (:func:`~pipeline.methods.passes.run_step`) on one group:
    ``kl_impl="fused"`` streams over chunks of the loss positions from the last hidden states and
    the lm_head weights (kernels/fused_kl.py) instead of forming logits.
    """
    if teacher is None:
        raise ValueError("distill_kl needs a teacher/reference model")
    from pipeline.methods.passes import KLTerm, StepPlan

    plan = StepPlan(teacher_layers=list(layers) if layers is not None else None)
    plan.need_kl("x", KLTerm(1.0 if tau is None else float(tau), reduction, skip_first))
    return _one_group(plan, student, teacher, {"x": inputs}, kl_impl)


# -- hidden states (representation methods: RMU, ASU-WMDP; RNA noise) --------------------------------


def hidden_state_at(model: nn.Module, inputs: dict, layer: int) -> torch.Tensor:
    """Output hidden state (B, T, d) of decoder layer ``layer`` (0-based) on ``inputs``.

    Captured (:func:`~pipeline.methods.model_io.layer_output`) during one normal forward pass (with
    grad when the caller has grad enabled). Equivalent to ``output_hidden_states=True``'s
    ``hidden_states[layer+1]`` for every layer but the last (where transformers substitutes the
    final-norm output), without keeping every layer's states.
    """
    cache: list[torch.Tensor] = []
    with layer_output(model, layer, cache):
        logits_of(model, inputs)
    if not cache:
        raise RuntimeError(f"decoder layer {layer} did not run during the forward pass")
    return cache[0]


def token_mask(inputs: dict) -> torch.Tensor:
    """(B, T) bool mask of the tokens whose hidden states are compared: labelled tokens
    (answer tokens for QA, every token but <bos> for text) that are not padding."""
    mask = inputs["labels"] != IGNORE_INDEX
    if "attention_mask" in inputs:
        mask = mask & inputs["attention_mask"].bool()
    return mask


def hidden_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, reduction: str = "sequence_mean",
               tokens: Optional[float] = None) -> torch.Tensor:
    """Squared error averaged over the hidden dimension at each token, then reduced over ``mask``
    with :func:`reduce` (``sequence_mean``: per-sequence token mean, then mean over sequences —
    open-unlearning's RMU activation loss; ``tokens``: ``token_mean``'s step-wide denominator,
    ``Part.token_count("labelled")``). ``b`` broadcasts (e.g. a steering vector (d,))."""
    per_token = (a.float() - b.float()).pow(2).mean(-1)
    return reduce(per_token, mask, reduction, tokens)


# -- cached teacher (method.teacher=cached: pipeline/engine/teacher_cache.py) -------------------------


def kl_from_cache(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher: dict,
    reduction: str = "sequence_mean",
    skip_first: bool = False,
) -> torch.Tensor:
    """:func:`cache_kl_values` on (B, T, V) student logits with the teacher rows laid out (B, T-1, ...)
    (:meth:`TeacherCache.batch`; slots off the loss positions are ignored), reduced like
    :func:`kl_from_logits`."""
    mask = shifted_mask(labels)
    kl = cache_kl_values(student_logits[:, :-1][mask], {k: v[mask] for k, v in teacher.items()})
    return reduce(scatter(kl, mask), shifted_mask(labels, skip_first), reduction)


def cached_distill_kl(
    student: nn.Module,
    inputs: dict,
    teacher: dict,
    reduction: str = "sequence_mean",
    skip_first: bool = False,
    kl_impl: str = "naive",
) -> torch.Tensor:
    """:func:`distill_kl` with the teacher's distributions read from the cache (laid out (B, T-1, ...)
    as :meth:`TeacherCache.batch` gives them): no teacher forward; the training step's own code."""
    from pipeline.methods.passes import KLTerm, StepPlan

    mask = shifted_mask(inputs["labels"])
    plan = StepPlan().need_kl("x", KLTerm(reduction=reduction, skip_first=skip_first, cached=True))
    batch = {"x": inputs, "x_teacher": {k: v[mask] for k, v in teacher.items()}}
    return _one_group(plan, student, None, batch, kl_impl)
