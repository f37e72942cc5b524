"""One pass per model per step: every row a step needs from a model goes through it in one forward.

A method says what it needs as a :class:`StepPlan`: which row groups of the batch (``forget``,
``retain``, views such as ``forget_idk``) the student must score (label log-probs at the loss
positions, or the hidden state at one decoder layer), which the frozen model must score and at which
attention temperature, and which KL(frozen at τ || student) terms to form. :func:`run_step` then

1. runs the frozen model **once** (no grad) on all its groups, padded to one length, with a
   **per-row temperature** (a (B, 1) τ: the teacher's forget rows at τ in ``teacher_layers``, the
   reference's rows at τ = 1; every attention backend honours it); under ZeRO-3 its token embeddings
   come from the table's shards when the step's tokens are fewer than the table's rows
   (pipeline/models/sharded_embedding.py), so the V×H table is not gathered for it;
2. runs the student **once** (one forward, one backward) on all its groups; RNA noise is added to
   the retain rows only;
3. applies the output head only at the loss positions (answer tokens + EOS), never at the B×T
   positions of the batch: through the model's own forward with the head's input narrowed (so
   architecture-specific logit post-processing — Gemma-2's soft-cap, Granite's scaling — still
   applies), or, with ``kernels.kl=fused``, by streaming the KL terms over chunks of those positions
   (kernels/fused_kl.py; live teacher from its hidden states, cached teacher from its log-probs).
   The final hidden states come from each model's own (root) forward with its head swapped for a
   pass-through, so DeepSpeed ZeRO-3's root hooks (its per-pass trace reset, hence prefetching) run.
4. stops a pass after decoder layer ``plan.layer`` when that layer's hidden state is all it must give
   (RMU and asu_wmdp with ``retain_loss=mse``): nothing above the layer can change the loss, so the
   layers above it and the head are not run (:func:`~pipeline.methods.model_io.stopped_after`).

Rows are right-padded, so a row's outputs at its own positions do not depend on how long the joint
batch is: each loss term equals the one from a pass over its own group (tests/test_one_pass.py).
``joint=False`` runs one pass per group and model instead — the step structure before this module,
kept for ``trainer.passes=per_group`` so benchmarks can compare both in one run.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.formatting import IGNORE_INDEX
from pipeline.methods.loss_math import StepTokens, cache_kl_values, kl_values, reduce, scatter
from pipeline.methods.model_io import (
    decoder_layers,
    layer_output,
    output_head,
    shifted_mask,
    stopped_after,
    tempered,
    unwrap,
    without_first,
)
from pipeline.models.sharded_embedding import embeddings_from_shards
from pipeline.models.submodules import swapped

log = logging.getLogger(__name__)
_LOGGED: set[tuple[str, int]] = set()

LOGITS, HIDDEN = "logits", "hidden"
LAST = "last"  # final-norm hidden states at the loss positions (the fused KL's teacher side)
# Logit post-processing some architectures apply after the head; the fused KL computes logits as
# h·Wᵀ + b itself, so it refuses these models rather than silently differ.
HEAD_POSTPROCESSING = ("final_logit_softcapping", "logits_scaling", "logit_scale")


@dataclass(frozen=True)
class KLTerm:
    """KL(p_frozen at ``tau`` || p_student) on one group's loss positions, reduced by ``reduction``.

    ``cached``: the teacher's distributions come from ``batch[f"{group}_teacher"]`` (the teacher
    cache, rows concatenated in loss-position order) instead of a frozen forward.
    """

    tau: float = 1.0
    reduction: str = "sequence_mean"
    skip_first: bool = False
    cached: bool = False


@dataclass
class StepPlan:
    """What one training step needs from each model (filled by the method, run by :func:`run_step`)."""

    student: dict[str, set[str]] = field(default_factory=dict)  # group -> {LOGITS, HIDDEN}
    frozen: dict[str, tuple[float, set[str]]] = field(default_factory=dict)  # group -> (tau, kinds)
    kl: dict[str, KLTerm] = field(default_factory=dict)
    layer: Optional[int] = None  # the decoder layer whose output HIDDEN captures
    teacher_layers: Optional[list[int]] = None  # where a frozen row's tau applies (None: every layer)
    rna: Optional[tuple[str, float, int]] = None  # (group, noise std, decoder layer): student only
    # a pass that needs only the ``layer`` hidden state stops after that layer (False: the full forward,
    # which gives the same loss and gradients; kept so tests and benchmarks can compare the two)
    stop_after_layer: bool = True

    def need_student(self, group: str, kind: str) -> StepPlan:
        self.student.setdefault(group, set()).add(kind)
        return self

    def need_frozen(self, group: str, kind: str, tau: float = 1.0) -> StepPlan:
        have = self.frozen.get(group)
        if have is not None and have[0] != float(tau):
            raise ValueError(f"the frozen model cannot score group {group!r} at two temperatures "
                             f"({have[0]} and {tau}) in one step")
        self.frozen.setdefault(group, (float(tau), set()))[1].add(kind)
        return self

    def need_kl(self, group: str, term: KLTerm) -> StepPlan:
        if group in self.kl:
            raise ValueError(f"two KL terms on group {group!r}")
        self.kl[group] = term
        return self


@dataclass
class Part:
    """One group's share of a pass: loss positions, label targets and what the pass produced."""

    mask: torch.Tensor  # (B_g, T-1) bool: positions whose next token carries loss
    targets: torch.Tensor  # (N_g,) the label at each of them, in row-major order
    # (B_g, T) labelled, attended tokens (hidden-state losses); with ``hidden``: T_g, the group's longest row
    token_mask: torch.Tensor
    logits: Optional[torch.Tensor] = None  # (N_g, V) at the loss positions
    hidden: Optional[torch.Tensor] = None  # (B_g, T_g, d) output of decoder layer ``plan.layer``
    last_hidden: Optional[torch.Tensor] = None  # (N_g, H) final-norm states at the loss positions (fused KL)
    # a training step's token counts for token_mean terms (batch["step_tokens"][group]); None: this
    # micro-batch's own counts (tests, evaluation, tau=auto)
    step_tokens: Optional[StepTokens] = None

    def token_count(self, kind: str) -> Optional[float]:
        """The step's ``kind`` count (a :class:`StepTokens` field) for a ``token_mean`` denominator, or None."""
        return None if self.step_tokens is None else getattr(self.step_tokens, kind)


@dataclass
class StepOutputs:
    student: dict[str, Part] = field(default_factory=dict)
    frozen: dict[str, Part] = field(default_factory=dict)
    kl: dict[str, torch.Tensor] = field(default_factory=dict)  # group -> reduced KL term


# -- joining groups into one batch ------------------------------------------------------------------


def _pad_to(t: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return t if t.shape[1] == length else F.pad(t, (0, length - t.shape[1]), value=value)


def join(batch: dict, groups: Sequence[str]) -> tuple[dict, dict[str, slice]]:
    """The groups' rows padded (right) to one length and stacked; and each group's row slice."""
    parts = [batch[g] for g in groups]
    length = max(p["input_ids"].shape[1] for p in parts)
    rows, start = {}, 0
    for g, p in zip(groups, parts):
        rows[g] = slice(start, start + p["input_ids"].shape[0])
        start = rows[g].stop
    if len(parts) == 1:
        p = parts[0]
        return {k: p[k] for k in ("input_ids", "attention_mask", "labels")}, rows
    # the pad id is irrelevant: padded positions are masked out of attention and carry no label
    joint = {
        "input_ids": torch.cat([_pad_to(p["input_ids"], length, 0) for p in parts]),
        "attention_mask": torch.cat([_pad_to(p["attention_mask"], length, 0) for p in parts]),
        "labels": torch.cat([_pad_to(p["labels"], length, IGNORE_INDEX) for p in parts]),
    }
    return joint, rows


def row_temperatures(taus: dict[str, float], rows: dict[str, slice], device: torch.device) -> float | torch.Tensor:
    """One float when every row runs at the same τ, else a (B, 1) per-row τ."""
    values = {float(t) for t in taus.values()}
    if len(values) == 1:
        return values.pop()
    out = torch.ones(max(s.stop for s in rows.values()), 1, dtype=torch.float32, device=device)
    for g, s in rows.items():
        out[s] = float(taus[g])
    return out


# -- the passes ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _head_input(head: nn.Module, replacement) -> Iterator[None]:
    """Temporarily replace ``head.forward`` (its ZeRO-3 hooks still gather / release its weights)."""
    own = "forward" in head.__dict__
    original = head.__dict__.get("forward")
    head.forward = replacement
    try:
        yield
    finally:
        if own:
            head.forward = original
        else:
            del head.forward


def gathered(params: list[nn.Parameter]):
    """ZeRO-3: gather ``params`` for the block (read-only); a no-op for whole parameters."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


class _HeadInput(nn.Module):
    """Stands in for the output head during one forward: keeps the hidden states the model hands its
    head and returns them unchanged. It has no parameters and no ZeRO-3 hooks, so nothing is gathered."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self.seen.append(hidden_states)
        return hidden_states


@contextlib.contextmanager
def _head_captured(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Inside the block the model's output head is a :class:`_HeadInput`; yields its list of captured inputs.

    The fused KL needs the final-norm hidden states, not logits. Taking them from the root model's own
    forward (rather than calling its inner decoder) keeps DeepSpeed ZeRO-3's root forward pre-hook,
    which resets the parameter coordinator's step (its module trace, hence prefetching) every pass."""
    m = unwrap(model)
    head = output_head(m)
    if head is None:
        raise ValueError(f"{type(m).__name__} exposes no separate output head (`get_output_embeddings`): "
                         f"kernels.kl=fused needs a causal LM with one (use kernels.kl=naive)")
    with swapped(m, head, _HeadInput()) as capture:
        yield capture.seen


def _final_hidden(model: nn.Module, joint: dict) -> torch.Tensor:
    """(B, T, H) final-norm hidden states from one forward of the root model, its head a pass-through.

    The model's output (``.logits``) is used, not the captured tensor: it is the same values (a view of
    them), and under ZeRO-3 it carries the root module's backward hook, as the logits do in the naive
    path. Checked to be that pass-through (same storage and shape), so a model that changed its head's
    output afterwards would be refused rather than give wrong hidden states."""
    check_fused_head(model)  # the known post-processing architectures: the fused KL's own clear error first
    with _head_captured(model) as seen:
        out = model(input_ids=joint["input_ids"], attention_mask=joint["attention_mask"], use_cache=False).logits
    if not (len(seen) == 1 and out.shape == seen[0].shape and out.data_ptr() == seen[0].data_ptr()
            and out.shape[:2] == joint["input_ids"].shape):
        raise RuntimeError(f"{type(unwrap(model)).__name__}'s forward did not return its output head's input at every "
                           f"position unchanged ({[tuple(t.shape) for t in seen]} -> {tuple(out.shape)}); "
                           f"use kernels.kl=naive")
    return out


def fused_head_problem(model: nn.Module) -> Optional[str]:
    """Why ``kernels.kl=fused`` cannot serve ``model`` (it forms logits as h·Wᵀ + b itself), or None."""
    if hasattr(output_head(model), "lora_A"):
        # peft's lora.Linear: .weight is the frozen base; the adapter would be left out of the logits
        # and get no gradient (measured: another forget loss, lm_head adapters untrained)
        return ("kernels.kl=fused computes logits from the output head's base weight, so a LoRA adapter on it "
                "(model.peft.target_modules names the head) would be ignored; use kernels.kl=naive or leave the "
                "head out of model.peft.target_modules")
    cfg = getattr(unwrap(model), "config", None)
    bad = [k for k in HEAD_POSTPROCESSING if getattr(cfg, k, None) not in (None, 0, 1, 1.0)]
    if not bad:
        return None
    return (f"kernels.kl=fused computes logits as h·Wᵀ + b, but {type(unwrap(model)).__name__} post-processes "
            f"its logits ({', '.join(bad)}); use kernels.kl=naive")


def check_fused_head(model: nn.Module) -> None:
    problem = fused_head_problem(model)
    if problem:
        raise ValueError(problem)


def _parts(joint: dict, rows: dict[str, slice], step_tokens: Optional[dict[str, StepTokens]] = None,
           ) -> tuple[torch.Tensor, dict[str, Part], dict[str, slice]]:
    """The joint loss mask and each group's :class:`Part` and slice of the selected positions."""
    mask = shifted_mask(joint["labels"])
    counts = mask.sum(1).tolist()
    parts, sel, pos = {}, {}, 0
    for g, s in rows.items():
        n = int(sum(counts[s]))
        m = mask[s]
        parts[g] = Part(mask=m, targets=joint["labels"][s, 1:][m],
                        token_mask=(joint["labels"][s] != IGNORE_INDEX) & joint["attention_mask"][s].bool(),
                        step_tokens=(step_tokens or {}).get(g))
        sel[g] = slice(pos, pos + n)
        pos += n
    return mask, parts, sel


def _select(mask: torch.Tensor, rows: dict[str, slice], groups: set[str]) -> torch.Tensor:
    """The loss mask restricted to ``groups``' rows (the head runs at these positions only)."""
    keep = torch.zeros_like(mask)
    for g in groups:
        keep[rows[g]] = mask[rows[g]]
    return keep


def _split(values: torch.Tensor, keep: torch.Tensor, rows: dict[str, slice],
           groups: set[str]) -> dict[str, torch.Tensor]:
    """Cut the (N_keep, ...) values at ``keep``'s positions into the groups' blocks."""
    counts = keep.sum(1).tolist()
    out, pos = {}, 0
    for g, s in rows.items():
        n = int(sum(counts[s]))
        if g in groups:
            out[g] = values[pos:pos + n]
        pos += n
    return out


def _log_stop(model: nn.Module, layer: int) -> None:
    n = len(decoder_layers(model))
    if (type(unwrap(model)).__name__, layer) not in _LOGGED:  # once per model type and layer
        _LOGGED.add((type(unwrap(model)).__name__, layer))
        skipped = f"layers {layer + 1}..{n - 1} and the output head are" if layer + 1 < n else "the output head is"
        log.info("step: the forward stops after decoder layer %d (of %d layers): the loss reads only its "
                 "hidden state, so %s not run", layer, n, skipped)


def _model_pass(model: nn.Module, joint: dict, rows: dict[str, slice], logit_groups: set[str],
                hidden_groups: set[str], last_groups: set[str], layer: Optional[int],
                fused_head=None, stop_after_layer: bool = False,
                step_tokens: Optional[dict[str, StepTokens]] = None) -> dict[str, Part]:
    """One forward of ``model`` over ``joint``; fills each group's Part with what was asked for.

    ``logit_groups``: logits at their loss positions; ``hidden_groups``: the layer-``layer`` state;
    ``last_groups``: final-norm hidden states at the loss positions (no head). ``fused_head``: the
    student's fused head forward (called with the selected hidden states of every group).
    ``stop_after_layer``: when the layer-``layer`` state is all that is asked for, run the decoder
    layers up to ``layer`` only. ``step_tokens``: the groups' token counts over the training step
    (``batch["step_tokens"]``), set on their Parts for the ``token_mean`` terms.
    """
    mask, parts, sel = _parts(joint, rows, step_tokens)
    captured: list[torch.Tensor] = []
    head = output_head(model)
    only_hidden = bool(hidden_groups) and not (logit_groups or last_groups) and fused_head is None
    with layer_output(model, layer, captured) if hidden_groups else contextlib.nullcontext():
        if stop_after_layer and only_hidden:
            with stopped_after(model, layer):
                model(input_ids=joint["input_ids"], attention_mask=joint["attention_mask"], use_cache=False)
            _log_stop(model, layer)
        elif last_groups or fused_head is not None:
            h = _final_hidden(model, joint)[:, :-1]
            if fused_head is not None:
                fused_head(h[mask], parts, sel)
            else:
                keep = _select(mask, rows, last_groups)
                for g, v in _split(h[keep], keep, rows, last_groups).items():
                    parts[g].last_hidden = v
                if logit_groups:
                    check_fused_head(model)
                    keep = _select(mask, rows, logit_groups)
                    for g, v in _split(head(h[keep]), keep, rows, logit_groups).items():
                        parts[g].logits = v
        else:
            keep = _select(mask, rows, logit_groups)
            if head is None:  # no separate output head: logits everywhere, then the loss positions
                logits = model(input_ids=joint["input_ids"], attention_mask=joint["attention_mask"],
                               use_cache=False).logits[:, :-1][keep]
            else:
                original = head.forward

                def narrowed(hs: torch.Tensor) -> torch.Tensor:
                    return original(hs[:, :-1][keep])

                with _head_input(head, narrowed):
                    logits = model(input_ids=joint["input_ids"], attention_mask=joint["attention_mask"],
                                   use_cache=False).logits
            for g, v in _split(logits, keep, rows, logit_groups).items():
                parts[g].logits = v
    if hidden_groups:
        if not captured:
            raise RuntimeError(f"decoder layer {layer} did not run during the forward pass")
        for g in hidden_groups:
            # cut to the group's own length (its rows are right-padded): the student's joint batch can be
            # longer than the frozen model's, and hidden-state losses compare the two position by position
            n = int(joint["attention_mask"][rows[g]].sum(1).max())
            parts[g].hidden = captured[0][rows[g], :n]
            parts[g].token_mask = parts[g].token_mask[:, :n]
    return parts


def _frozen_passes(plan: StepPlan, frozen: nn.Module, batch: dict, fused: bool,
                   joint_pass: bool) -> dict[str, Part]:
    spec: dict[str, tuple[float, set[str]]] = {g: (t, set(k)) for g, (t, k) in plan.frozen.items()}
    for g, term in plan.kl.items():
        if not term.cached:
            tau, kinds = spec.setdefault(g, (float(term.tau), set()))
            if tau != float(term.tau):
                raise ValueError(f"group {g!r}: the KL teacher's tau {term.tau} differs from another frozen use ({tau})")
            kinds.add(LAST if fused else LOGITS)
    out: dict[str, Part] = {}
    if not spec:
        return out
    if frozen is None:
        raise ValueError(f"this method needs the frozen reference model for {sorted(spec)}")
    for groups in ([list(spec)] if joint_pass else [[g] for g in spec]):
        joint, rows = join(batch, groups)
        taus = row_temperatures({g: spec[g][0] for g in groups}, rows, joint["input_ids"].device)
        kinds = {g: spec[g][1] for g in groups}
        with (torch.no_grad(), tempered(frozen, taus, plan.teacher_layers),
              embeddings_from_shards(unwrap(frozen), joint["input_ids"])):
            out.update(_model_pass(frozen, joint, rows, {g for g in groups if LOGITS in kinds[g]},
                                   {g for g in groups if HIDDEN in kinds[g]},
                                   {g for g in groups if LAST in kinds[g]}, plan.layer,
                                   stop_after_layer=plan.stop_after_layer))
    return out


def _kl_mask(part: Part, term: KLTerm) -> torch.Tensor:
    """The positions a KL term is reduced over: the loss mask, without each row's first loss token when asked."""
    return without_first(part.mask) if term.skip_first else part.mask


def _kl_tokens(part: Part, term: KLTerm) -> Optional[float]:
    """A KL term's ``token_mean`` denominator over the step (None: the micro-batch's own count)."""
    return part.token_count("after_first" if term.skip_first else "loss")


def _fused_head(plan: StepPlan, student: nn.Module, frozen: Optional[nn.Module], frozen_parts: dict[str, Part],
                batch: dict, logit_groups: set[str], kls: dict[str, torch.Tensor]):
    """The student's head step for kernels.kl=fused: the KL terms streamed over chunks of the loss
    positions (kernels/fused_kl.py), plus plain logits for the groups that need them (an NLL term).

    It runs *as the head module's forward* so that under ZeRO-3 DeepSpeed's own hooks gather the
    student's head weight for it, re-gather it for the backward and reduce-scatter its gradient; the
    frozen model's head (no gradient) is gathered with ``GatheredParameters``.
    """
    from kernels.fused_kl import fused_linear_kl

    check_fused_head(student)
    head_s = output_head(student)
    head_t = output_head(frozen) if frozen is not None else None
    shared = head_t is head_s  # a LoRA student's teacher is its own base: one head, already gathered

    def run(h_sel: torch.Tensor, parts: dict[str, Part], sel: dict[str, slice]) -> None:
        terms = [g for g in parts if g in plan.kl]
        live = any(not plan.kl[g].cached for g in terms)

        def forward(hs: torch.Tensor):
            values = []
            # the bias too: a vocab-sized one is partitioned at ZeRO-3 (over param_persistence_threshold)
            with (gathered([p for p in (head_t.weight, head_t.bias) if p is not None]) if live and not shared
                  else contextlib.nullcontext()):
                for g in terms:
                    term, part = plan.kl[g], parts[g]
                    keep = _kl_mask(part, term)[part.mask]
                    seq = torch.arange(part.mask.shape[0], device=hs.device)[:, None].expand_as(part.mask)[part.mask]
                    if term.cached:
                        teacher = batch[f"{g}_teacher"]
                        if "ids" in teacher:
                            raise ValueError("kernels.kl=fused streams full cached rows; a top-k teacher cache "
                                             "(method.cache_topk > 0) needs kernels.kl=naive")
                        h_t, w_t, b_t = teacher["logprobs"], None, None
                    else:
                        h_t = frozen_parts[g].last_hidden
                        w_t, b_t = (head_s.weight, head_s.bias) if shared else (head_t.weight, head_t.bias)
                    values.append(fused_linear_kl(hs[sel[g]], head_s.weight, h_t, w_t, mask=keep, seq_ids=seq,
                                                  reduction=term.reduction, b_s=head_s.bias, b_t=b_t,
                                                  tokens=_kl_tokens(part, term)))
            logits = None
            if logit_groups:
                idx = torch.cat([torch.arange(sel[g].start, sel[g].stop, device=hs.device)
                                 for g in parts if g in logit_groups])
                logits = F.linear(hs.index_select(0, idx), head_s.weight, head_s.bias)
            return (torch.stack(values) if values else hs.new_zeros(0)), logits

        with _head_input(head_s, forward):
            values, logits = head_s(h_sel)
        for i, g in enumerate(terms):
            kls[g] = values[i]
        pos = 0
        for g in parts:
            if g in logit_groups:
                n = sel[g].stop - sel[g].start
                parts[g].logits = logits[pos:pos + n]
                pos += n

    return run


def run_step(plan: StepPlan, student: nn.Module, frozen: Optional[nn.Module], batch: dict,
             kl_impl: str = "naive", joint_pass: bool = True, rna_seeds: Optional[torch.Tensor] = None) -> StepOutputs:
    """Run the frozen model and the student once each (``joint_pass``) over what ``plan`` asks for.

    Returns each group's :class:`Part` per model and the reduced KL terms. ``rna_seeds``: per-row
    seeds of the RNA noise for ``plan.rna``'s group (pipeline/methods/rna.py).
    """
    from pipeline.methods.rna import rows_noise

    fused = kl_impl == "fused"
    out = StepOutputs()
    out.frozen = _frozen_passes(plan, frozen, batch, fused, joint_pass)
    spec = {g: set(k) for g, k in plan.student.items()}
    for g in plan.kl:  # naive: the student's logits there; fused: the head step streams the KL
        kinds = spec.setdefault(g, set())
        if not fused:
            kinds.add(LOGITS)
    for groups in ([list(spec)] if joint_pass else [[g] for g in spec]) if spec else []:
        joint, rows = join(batch, groups)
        logit_groups = {g for g in groups if LOGITS in spec[g]}
        fused_groups = [g for g in groups if fused and g in plan.kl]
        head = _fused_head(plan, student, frozen, out.frozen, batch, logit_groups, out.kl) if fused_groups else None
        noise = contextlib.nullcontext()
        if plan.rna is not None and plan.rna[0] in rows:
            g, nu, layer = plan.rna
            noise = rows_noise(student, nu, layer, rows[g], rna_seeds)
        with noise:
            out.student.update(_model_pass(student, joint, rows, logit_groups,
                                           {g for g in groups if HIDDEN in spec[g]}, set(), plan.layer,
                                           fused_head=head, stop_after_layer=plan.stop_after_layer,
                                           step_tokens=batch.get("step_tokens")))
    if not fused:
        for g, term in plan.kl.items():
            s = out.student[g]
            if term.cached:
                vals = cache_kl_values(s.logits, batch[f"{g}_teacher"])
            else:
                vals = kl_values(out.frozen[g].logits, s.logits)
            out.kl[g] = reduce(scatter(vals, s.mask), _kl_mask(s, term), term.reduction, _kl_tokens(s, term))
    return out
