"""Per-position loss arithmetic: masked reductions, KL values, scattering selected positions back.

No model in here (:mod:`pipeline.methods.passes` runs the models, :mod:`pipeline.methods.losses`
builds the methods' terms); both use these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from pipeline.data.formatting import IGNORE_INDEX


@dataclass(frozen=True)
class StepTokens:
    """One row group's token counts over a whole optimizer step (every micro-batch on every rank),
    divided by micro-batches x ranks: the denominator that makes a ``token_mean`` term one mean over
    the step's tokens once DeepSpeed averages the micro-batches' gradients over both.

    Without it each micro-batch would be its own token mean, so the same effective batch on another
    number of GPUs (or another ``grad_accum``) would weigh tokens differently when rows differ in
    length (transformers' Trainer passes ``num_items_in_batch`` for the same reason).
    """

    loss: float  # loss positions: labels[1:] != -100 (NLL and KL terms)
    after_first: float  # the same without each row's first loss position (KL terms with skip_first)
    labelled: float  # labelled, attended tokens (hidden-state terms' token_mask)

    @staticmethod
    def counts(inputs: dict) -> list[float]:
        """[loss, after_first, labelled] of one encoded group (right-padded ``labels``, ``attention_mask``)."""
        labels = inputs["labels"]
        loss = labels[:, 1:] != IGNORE_INDEX
        labelled = labels != IGNORE_INDEX
        if "attention_mask" in inputs:
            labelled = labelled & inputs["attention_mask"].bool()
        n_loss = int(loss.sum())
        return [float(n_loss), float(n_loss - int(loss.any(1).sum())), float(labelled.sum())]


def scatter(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,) values at ``mask``'s positions (row-major) -> a (B, T-1) tensor, zero elsewhere."""
    return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(mask, values)


def reduce(values: torch.Tensor, mask: torch.Tensor, reduction: str, tokens: Optional[float] = None) -> torch.Tensor:
    """Reduce per-position ``values`` (B, T-1) over ``mask``.

    ``sequence_mean``: mean over each row's loss tokens, then mean over rows that have any;
    ``token_mean``: one mean over all loss tokens (``tokens``: divide by that instead of ``mask``'s
    count — the step's :class:`StepTokens`); ``sum``: plain sum.
    """
    m = mask.to(values.dtype)
    if reduction == "sum":
        return (values * m).sum()
    if reduction == "token_mean":
        return (values * m).sum() / (m.sum().clamp_min(1.0) if tokens is None else (float(tokens) or 1.0))
    if reduction == "sequence_mean":
        per_row = m.sum(1)
        has = per_row > 0
        row_mean = (values * m).sum(1) / per_row.clamp_min(1.0)
        return row_mean[has].sum() / has.sum().clamp_min(1)
    raise ValueError(f"unknown reduction {reduction!r}")


def kl_values(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher || p_student) = sum_v p_t (log p_t - log p_s) per position (logits (..., V) -> (...))."""
    lt = torch.log_softmax(teacher_logits.float(), dim=-1)
    ls = torch.log_softmax(student_logits.float(), dim=-1)
    return (lt.exp() * (lt - ls)).sum(-1)


def cache_kl_values(student_logits: torch.Tensor, teacher: dict) -> torch.Tensor:
    """KL(p_teacher || p_student) per position against a *cached* teacher, on (N, V) student logits.

    ``teacher`` holds rows aligned with the N positions (the trainer takes them from the cache with
    :meth:`TeacherCache.selected`):

    * full rows: ``{"logprobs": (N, V)}`` — the exact KL (same formula as :func:`kl_values`);
    * top-k: ``{"logprobs": (N, k), "ids": (N, k), "tail": (N,)}`` with ``tail`` the teacher's
      log-mass outside its top k. The KL is taken over k + 1 buckets (the k kept tokens and one tail
      bucket); the student's tail mass is ``1 - sum_k p_s(ids)``, computed as a log-sum-exp over the
      other tokens (stable when it is tiny). Coarse-graining never increases a KL, so this is a
      lower bound of the full KL that tightens monotonically as k grows.
    """
    ls = torch.log_softmax(student_logits.float(), dim=-1)
    lt = teacher["logprobs"].to(ls.device, torch.float32)
    if "ids" not in teacher:
        if lt.shape != ls.shape:
            raise ValueError(f"cached teacher rows have shape {tuple(lt.shape)}, student log-probs {tuple(ls.shape)}")
        return (lt.exp() * (lt - ls)).sum(-1)
    ids = teacher["ids"].to(ls.device, torch.long)
    tail_t = teacher["tail"].to(ls.device, torch.float32)
    kl = (lt.exp() * (lt - ls.gather(-1, ids))).sum(-1)
    if ids.shape[-1] < ls.shape[-1]:  # k = V leaves no tail bucket
        # log of the student's mass outside the teacher's top k (exact, no 1 - sum cancellation)
        tail_s = ls.scatter(-1, ids, float("-inf")).logsumexp(-1)
        p_tail = tail_t.exp()
        safe = torch.where(p_tail > 0, tail_t, torch.zeros_like(tail_t))  # 0 * log 0 = 0, no NaN grads
        kl = kl + p_tail * (safe - tail_s)
    return kl
