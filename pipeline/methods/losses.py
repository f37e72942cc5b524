"""Loss building blocks shared by all methods (next-token log-probs, masked reductions, KL).

Conventions: ``inputs`` holds ``input_ids``, ``attention_mask`` and ``labels`` (-100 = no loss);
position t predicts token t+1, so logits[:, :-1] are scored against labels[:, 1:].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from pipeline.data.formatting import IGNORE_INDEX
from pipeline.methods.model_io import logits_of, shifted_mask, tempered, unwrap  # noqa: F401  (re-exported)


def reduce(values: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce per-position ``values`` (B, T-1) over ``mask``.

    ``sequence_mean``: mean over each row's loss tokens, then mean over rows that have any;
    ``token_mean``: one mean over all loss tokens; ``sum``: plain sum.
    """
    m = mask.to(values.dtype)
    if reduction == "sum":
        return (values * m).sum()
    if reduction == "token_mean":
        return (values * m).sum() / m.sum().clamp_min(1.0)
    if reduction == "sequence_mean":
        per_row = m.sum(1)
        has = per_row > 0
        row_mean = (values * m).sum(1) / per_row.clamp_min(1.0)
        return row_mean[has].sum() / has.sum().clamp_min(1)
    raise ValueError(f"unknown reduction {reduction!r}")


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each next token (B, T-1) and its loss mask."""
    lg = logits[:, :-1].float()
    tgt = labels[:, 1:]
    mask = tgt != IGNORE_INDEX
    lp = torch.log_softmax(lg, dim=-1).gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return lp * mask, mask


def nll(model: nn.Module, inputs: dict, reduction: str = "sequence_mean") -> torch.Tensor:
    """Negative log-likelihood of the labelled tokens."""
    lp, mask = token_logprobs(logits_of(model, inputs), inputs["labels"])
    return reduce(-lp, mask, reduction)


def sequence_logprob(model: nn.Module, inputs: dict) -> torch.Tensor:
    """Sum of labelled-token log-probs per sequence, shape (B,)."""
    lp, _ = token_logprobs(logits_of(model, inputs), inputs["labels"])
    return lp.sum(1)


def kl_from_logits(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    reduction: str = "sequence_mean",
    skip_first: bool = False,
) -> torch.Tensor:
    """KL(p_teacher || p_student) = sum_v p_t (log p_t - log p_s) at labelled positions."""
    mask = shifted_mask(labels, skip_first)
    lt = torch.log_softmax(teacher_logits[:, :-1].float(), dim=-1)
    ls = torch.log_softmax(student_logits[:, :-1].float(), dim=-1)
    kl = (lt.exp() * (lt - ls)).sum(-1)
    return reduce(kl, mask, reduction)


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

    ``kl_impl="fused"`` streams over vocabulary chunks from the last hidden states and the lm_head
    weights (kernels/fused_kl.py) instead of materialising two B×T×V logit tensors.
    """
    if teacher is None:
        raise ValueError("distill_kl needs a teacher/reference model")
    if kl_impl == "fused":
        from pipeline.methods.fused import fused_distill_kl

        return fused_distill_kl(student, teacher, inputs, reduction, tau, layers, skip_first)
    with torch.no_grad(), tempered(teacher, tau, layers):
        t_logits = logits_of(teacher, inputs)
    s_logits = logits_of(student, inputs)
    return kl_from_logits(t_logits, s_logits, inputs["labels"], reduction, skip_first)


def mean_token_logprob(model: nn.Module, inputs: dict) -> torch.Tensor:
    """Length-normalised sequence log-prob (mean over labelled tokens), shape (B,).

    Rows without labelled tokens give 0 (not NaN)."""
    lp, mask = token_logprobs(logits_of(model, inputs), inputs["labels"])
    return lp.sum(1) / mask.sum(1).clamp_min(1)


# -- hidden states (representation methods: RMU, ASU-WMDP; RNA noise) --------------------------------


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM, found generically: ``model.model.layers`` (Llama, Mistral,
    Qwen, Gemma, ...) or ``model.layers`` (a bare decoder). Anything else raises a clear error."""
    m = unwrap(model)
    for owner in (getattr(m, "model", None), m):
        layers = getattr(owner, "layers", None) if owner is not None else None
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise ValueError(
        f"{type(m).__name__}: cannot find the decoder layers (expected a Llama-like model with "
        f"`model.model.layers`); layer-wise methods (RMU, asu_wmdp, RNA) need one")


def check_layer(model: nn.Module, layer: int, key: str) -> nn.Module:
    """Decoder layer ``layer`` of ``model``; a clear error naming ``key`` when out of range."""
    layers = decoder_layers(model)
    if not 0 <= int(layer) < len(layers):
        raise ValueError(f"{key}={layer} out of range: the model has {len(layers)} layers "
                         f"(allowed 0..{len(layers) - 1})")
    return layers[int(layer)]


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def hidden_state_at(model: nn.Module, inputs: dict, layer: int) -> torch.Tensor:
    """Output hidden state (B, T, d) of decoder layer ``layer`` (0-based) on ``inputs``.

    Captured with a forward hook on that layer during one normal forward pass (with grad when the
    caller has grad enabled). Equivalent to ``output_hidden_states=True``'s ``hidden_states[layer+1]``
    for every layer but the last (where transformers substitutes the final-norm output), without
    keeping every layer's states. The hook only sees an activation, so it works under ZeRO-3 (the
    parameters are gathered by DeepSpeed's own module hooks), and it is removed before backward so a
    gradient-checkpointing recompute does not fire it again.
    """
    block = check_layer(model, layer, "layer")
    cache: list[torch.Tensor] = []
    handle = block.register_forward_hook(lambda _m, _i, out: cache.append(_first(out)))
    try:
        logits_of(model, inputs)
    finally:
        handle.remove()
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


def hidden_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, reduction: str = "sequence_mean") -> torch.Tensor:
    """Squared error averaged over the hidden dimension at each token, then reduced over ``mask``
    with :func:`reduce` (``sequence_mean``: per-sequence token mean, then mean over sequences —
    open-unlearning's RMU activation loss). ``b`` broadcasts (e.g. a steering vector (d,))."""
    per_token = (a.float() - b.float()).pow(2).mean(-1)
    return reduce(per_token, mask, reduction)


# -- cached teacher (method.teacher=cached: pipeline/engine/teacher_cache.py) -------------------------


def kl_from_cache(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher: dict,
    reduction: str = "sequence_mean",
    skip_first: bool = False,
) -> torch.Tensor:
    """KL(p_teacher || p_student) at labelled positions against a *cached* teacher.

    ``teacher`` holds tensors aligned with the shifted positions (B, T-1, ...) — the trainer builds
    them from the cache with :meth:`TeacherCache.batch`; positions outside the loss mask are ignored:

    * full rows: ``{"logprobs": (B, T-1, V)}`` — the exact KL (same formula as :func:`kl_from_logits`);
    * top-k: ``{"logprobs": (B, T-1, k), "ids": (B, T-1, k), "tail": (B, T-1)}`` with ``tail`` the
      teacher's log-mass outside its top k. The KL is taken over k + 1 buckets (the k kept tokens and
      one tail bucket); the student's tail mass is ``1 - sum_k p_s(ids)``, computed as a log-sum-exp
      over the other tokens (stable when it is tiny). Coarse-graining never increases a KL, so this
      is a lower bound of the full KL that tightens monotonically as k grows.

    Same reductions as :func:`kl_from_logits` (``sequence_mean`` / ``token_mean``, ``skip_first``).
    """
    mask = shifted_mask(labels, skip_first)
    ls = torch.log_softmax(student_logits[:, :-1].float(), dim=-1)
    lt = teacher["logprobs"].to(ls.device, torch.float32)
    if "ids" not in teacher:
        if lt.shape != ls.shape:
            raise ValueError(f"cached teacher rows have shape {tuple(lt.shape)}, student log-probs {tuple(ls.shape)}")
        kl = (lt.exp() * (lt - ls)).sum(-1)
    else:
        ids = teacher["ids"].to(ls.device, torch.long)
        tail_t = teacher["tail"].to(ls.device, torch.float32)
        ls_k = ls.gather(-1, ids)
        kl = (lt.exp() * (lt - ls_k)).sum(-1)
        if ids.shape[-1] < ls.shape[-1]:  # k = V leaves no tail bucket
            # log of the student's mass outside the teacher's top k (exact, no 1 - sum cancellation)
            tail_s = ls.scatter(-1, ids, float("-inf")).logsumexp(-1)
            p_tail = tail_t.exp()
            safe = torch.where(p_tail > 0, tail_t, torch.zeros_like(tail_t))  # 0 * log 0 = 0, no NaN grads
            kl = kl + p_tail * (safe - tail_s)
    kl = torch.where(mask, kl, torch.zeros_like(kl))  # padding slots of the cache are not scored
    return reduce(kl, mask, reduction)


def cached_distill_kl(
    student: nn.Module,
    inputs: dict,
    teacher: dict,
    reduction: str = "sequence_mean",
    skip_first: bool = False,
) -> torch.Tensor:
    """:func:`distill_kl` with the teacher's distributions read from the cache: no teacher forward."""
    return kl_from_cache(logits_of(student, inputs), inputs["labels"], teacher, reduction, skip_first)
