"""``method.tau=auto``: choose ASU's attention temperature from a cheap teacher-side signal.

Before training, the frozen teacher (the original model) is run teacher-forced on a slice of the
forget set at a few temperatures; no student, no generation, no training. The teacher never
trains, so the slice needs no holding out.

What the student inherits is the tempered teacher's *top-1* prediction at each answer position:
on the embedded benchmark the student's forget fact recall after training matches the tempered
teacher's greedy fact recall (τ=2: 0.675 and 0.675; τ=3: 0.40 and 0.40; docs/sweeps.md). A
probability shift that leaves the argmax alone is not forgotten. So the signal counts argmax
changes, per probed τ, against the untempered teacher (τ=1):

* ``form_kept(τ)``: share of the answers' *non-fact* tokens (template words, ``<eos>``) where the
  tempered teacher's top-1 is still the untempered teacher's. It says whether the answers keep
  their shape — ASU's point is to remove facts while staying fluent.
* ``facts_forgotten(τ)``: share of the facts the untempered teacher reproduces (every token of
  the fact span is its top-1) that the tempered teacher no longer does (some token's top-1
  differs). The facts are the attribute values in the row's ``facts`` field, located in the
  answer's tokens. Evidence, not the stop criterion.

Rule: the **largest τ in [TAU_MIN, tau_max] whose teacher keeps the form** (``form_kept >=
form_target``), found by bisection; tau_max when the form holds there (``method.tau_max``, default
TAU_MAX; ``method.tau_form_target``, default FORM_TARGET). On the models measured the facts go
first and the form later as τ grows (a fact token depends on attending to the question's
specifics, the template much less), so this is the most smoothing — the most forgetting — the
teacher tolerates before its answers start to change shape. Rows without ``facts`` (or whose
facts cannot be found in the answer's tokens) count all their answer tokens as form, which only
makes the choice more cautious.

Collective safety (ZeRO-3): every rank probes the same rows at the same temperatures in the same
order (the slice is a deterministic function of the forget set), and the signal values are
averaged over ranks before any decision, so the ranks take the same branches and run the same
number of forwards (each forward is a set of parameter all-gathers).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any, Optional

import torch

from pipeline.data.collate import pad_batch
from pipeline.data.formatting import IGNORE_INDEX

log = logging.getLogger(__name__)

TAU_MIN = 1.0  # the untempered teacher: the reference of both signals
# Defaults of method.tau_max and method.tau_form_target. The paper's 7B models use tau 2.0-2.8; the
# embedded benchmark's best grid points are 5-8 (docs/sweeps.md) and its teacher keeps the form
# up to ~5.2. 8 leaves room above both without spending probes on ever flatter teachers.
TAU_MAX = 8.0
FORM_TARGET = 0.95  # the chosen tau keeps >= 95% of the answers' non-fact top-1 predictions
BISECT_STEPS = 7  # interval (TAU_MAX - TAU_MIN) / 2**7 ~ 0.055 with the default bounds
VAL_FRACTION = 0.25  # validation slice: a quarter of the forget rows ...
VAL_MIN_ROWS = 32  # ... at least 32 (all of a smaller set): the signal is a share, 8 rows are too noisy
VAL_MAX_ROWS = 128  # ... at most 128 (more rows add cost, not accuracy)
BATCH_ROWS = 8  # rows per forward


def validation_indices(n: int, fraction: float = VAL_FRACTION, min_rows: int = VAL_MIN_ROWS,
                       max_rows: int = VAL_MAX_ROWS) -> list[int]:
    """Deterministic, evenly spread slice of ``n`` forget rows (same on every rank and run)."""
    if n <= 0:
        return []
    k = min(n, max(min_rows, int(math.ceil(fraction * n))), max_rows)
    if k == n:
        return list(range(n))
    return sorted({int(round(i * (n - 1) / (k - 1))) for i in range(k)}) if k > 1 else [0]


def _find(seq: Sequence[int], sub: Sequence[int], start: int = 0) -> int:
    m = len(sub)
    for i in range(start, len(seq) - m + 1):
        if list(seq[i:i + m]) == list(sub):
            return i
    return -1


def fact_spans(tokenizer, encoded: dict, facts: Sequence[str]) -> list[list[int]]:
    """Per fact found in the answer: the indices (into ``input_ids``) of the tokens that spell it.

    Each fact is tokenised with and without a leading space (BPE vs word-level tokenizers) and
    searched among the labelled (answer) tokens; facts that are not found are left out."""
    ids = list(encoded["input_ids"])
    labels = list(encoded["labels"])
    answer_start = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), len(ids))
    spans: list[list[int]] = []
    for fact in facts or []:
        fact = str(fact).strip()
        if not fact:
            continue
        for text in (" " + fact, fact):
            sub = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            if not sub:
                continue
            at = _find(ids, sub, answer_start)
            if at >= 0:
                spans.append(list(range(at, at + len(sub))))
                break
    return spans


def _items(tokenizer, rows: Sequence[dict], encoded: Sequence[dict]) -> list[dict]:
    """Per validation row: its encoded ids and labels plus the token spans of its facts."""
    out = []
    for enc in encoded:
        row = rows[int(enc["index"])] if "index" in enc else {}
        out.append({"input_ids": list(enc["input_ids"]), "labels": list(enc["labels"]),
                    "spans": fact_spans(tokenizer, enc, row.get("facts") or [])})
    return out


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


@torch.no_grad()
def _answer_predictions(model: Any, items: Sequence[dict], pad_id: int) -> list[dict]:
    """Per row, at each answer token j (scored by the logits at j-1): the model's top-1 token and
    the log-prob of the true token, as ``{j: (top1, logprob)}``."""
    # lazy: pipeline.methods imports this module (asu.py's tau=auto defaults)
    from pipeline.methods.losses import token_logprobs

    device = _device(model)
    out: list[dict] = []
    for s in range(0, len(items), BATCH_ROWS):
        chunk = items[s:s + BATCH_ROWS]
        batch = pad_batch([{"input_ids": it["input_ids"], "labels": it["labels"]} for it in chunk], pad_id)
        ids = batch["input_ids"].to(device)
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
        top1 = logits[:, :-1].argmax(-1).cpu()
        tok_lp, answer = (t.cpu() for t in token_logprobs(logits, batch["labels"].to(device)))
        for r in range(len(chunk)):
            out.append({t + 1: (int(top1[r, t]), float(tok_lp[r, t])) for t in answer[r].nonzero().flatten().tolist()})
    return out


def _rank_mean(values: list[float]) -> list[float]:
    """Average over ranks (identical inputs give identical values; this makes it certain)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return (t / dist.get_world_size()).cpu().tolist()


def _share(hits: int, total: int) -> float:
    return hits / total if total else float("nan")


def _none_if_nan(v: float) -> Optional[float]:
    return None if math.isnan(v) else v


class _Prober:
    """Runs the teacher at one temperature and compares its top-1 predictions with tau=1's."""

    def __init__(self, teacher: Any, items: list[dict], pad_id: int, layers: Optional[list[int]],
                 form_target: float = FORM_TARGET) -> None:
        from pipeline.models.tempered_attention import temperature

        self._temperature = temperature
        self.teacher, self.items, self.pad_id, self.layers = teacher, items, pad_id, layers
        self.form_target = float(form_target)
        self.base: Optional[list[dict]] = None  # tau=1 predictions per row
        self.probes: list[dict] = []

    def predictions(self, tau: float) -> list[dict]:
        with self._temperature(self.teacher, float(tau), self.layers):
            return _answer_predictions(self.teacher, self.items, self.pad_id)

    def signal(self, preds: list[dict]) -> tuple[float, float, float]:
        """(form_kept, facts_forgotten, mean fact-token log-prob) of ``preds`` against tau=1."""
        assert self.base is not None
        kept = form = forgotten = known = 0
        fact_lp: list[float] = []
        for it, base, now in zip(self.items, self.base, preds):
            fact_tokens = {j for span in it["spans"] for j in span}
            for j, (top1, _) in now.items():
                if j not in fact_tokens:
                    form += 1
                    kept += int(top1 == base[j][0])
            for span in it["spans"]:
                span = [j for j in span if j in now]
                if not span:
                    continue
                fact_lp.extend(now[j][1] for j in span)
                label = it["input_ids"]
                if all(base[j][0] == label[j] for j in span):  # the untempered teacher reproduces it
                    known += 1
                    forgotten += int(any(now[j][0] != label[j] for j in span))
        lp = sum(fact_lp) / len(fact_lp) if fact_lp else float("nan")
        return _share(kept, form), _share(forgotten, known), lp

    def probe(self, tau: float) -> dict:
        """Signal at ``tau``; the first call must be the reference, ``tau == TAU_MIN``."""
        if self.base is None and float(tau) != TAU_MIN:
            raise ValueError(f"probe tau={TAU_MIN} first: it is the reference the other probes are compared with")
        preds = self.predictions(tau)
        if self.base is None:
            self.base = preds
        form_kept, facts_forgotten, fact_lp = _rank_mean(list(self.signal(preds)))
        rec = {
            "tau": round(float(tau), 4),
            "form_kept": _none_if_nan(form_kept),
            "facts_forgotten": _none_if_nan(facts_forgotten),
            "fact_logprob": _none_if_nan(fact_lp),
        }
        rec["form_ok"] = rec["form_kept"] is None or rec["form_kept"] >= self.form_target
        self.probes.append(rec)
        return rec


def select_tau(teacher: Any, tokenizer: Any, data: Any, forget_encoded: Sequence[dict], cfg: Any) -> dict:
    """Choose ASU's tau in [TAU_MIN, ``method.tau_max``] for ``cfg.method`` (see the module docstring).

    ``teacher``: the frozen reference (a DeepSpeed engine or a plain model) with the tempered
    attention implementation. ``data``: the run's ``UnlearningData`` (its ``forget`` rows give
    the ``facts``); ``forget_encoded``: the encoded forget rows (with ``index``). Returns a dict
    with ``tau`` and the evidence (every probed tau with its signal values)."""
    if teacher is None:
        raise ValueError("method.tau=auto needs the frozen reference model (the ASU teacher)")
    t0 = time.time()
    mcfg = cfg.method
    layers = getattr(mcfg, "teacher_layers", None)
    layers = [int(i) for i in layers] if layers is not None else None
    tau_max = float(getattr(mcfg, "tau_max", TAU_MAX))
    form_target = float(getattr(mcfg, "tau_form_target", FORM_TARGET))
    if not (tau_max > TAU_MIN and 0.0 < form_target <= 1.0):
        raise ValueError(f"method.tau=auto: needs method.tau_max > {TAU_MIN} and 0 < method.tau_form_target <= 1, "
                         f"got {tau_max} and {form_target}")
    rows = list(getattr(data, "forget", None) or [])
    idx = validation_indices(len(forget_encoded))
    if not idx:
        raise ValueError("method.tau=auto: the forget set is empty")
    items = _items(tokenizer, rows, [forget_encoded[i] for i in idx])
    with_facts = sum(1 for it in items if it["spans"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    was_training = bool(getattr(teacher, "training", False))
    teacher.eval()
    prober = _Prober(teacher, items, pad_id, layers, form_target)
    try:
        prober.probe(TAU_MIN)
        top = prober.probe(tau_max)
        if top["form_ok"]:
            tau, chosen = tau_max, top
            reason = f"the answers keep their form (form kept {_fmt(top['form_kept'])}) up to the upper bound"
        else:
            lo, hi = TAU_MIN, tau_max  # invariant: the form holds at lo and breaks at hi
            chosen = prober.probes[0]
            for _ in range(BISECT_STEPS):
                mid = 0.5 * (lo + hi)
                rec = prober.probe(mid)
                if rec["form_ok"]:
                    lo, chosen = mid, rec
                else:
                    hi = mid
            tau = lo
            reason = (f"largest tau whose teacher keeps >= {form_target} of the answers' non-fact top-1 "
                      f"predictions (form kept {_fmt(chosen['form_kept'])}; it breaks by tau={hi:.3f})")
    finally:
        if was_training:
            teacher.train()
    tau = round(float(min(tau_max, max(TAU_MIN, tau))), 3)
    if chosen["facts_forgotten"] is not None:
        reason += f"; facts forgotten by the teacher there: {chosen['facts_forgotten']:.3g}"
    out = {
        "tau": tau,
        "reason": reason,
        "signal": "teacher-forced top-1 agreement with the tau=1 teacher on the non-fact answer tokens",
        "form_target": form_target,
        "bounds": [TAU_MIN, tau_max],
        "teacher_layers": layers,
        "validation_rows": idx,
        "rows_with_facts": with_facts,
        "probes": sorted(prober.probes, key=lambda r: r["tau"]),
        "probe_order": [r["tau"] for r in prober.probes],
        "seconds": round(time.time() - t0, 3),
    }
    if tau == TAU_MIN:
        log.warning("tau=auto: the teacher's answers change form at every tau probed above 1, so tau=1 was chosen "
                    "and ASU's forget term will remove nothing; set method.tau by hand or lower "
                    "method.tau_form_target (now %s)", form_target)
    elif chosen["facts_forgotten"] is not None and chosen["facts_forgotten"] < 0.25:
        log.warning("tau=auto: at tau=%.3f the tempered teacher still reproduces %.0f%% of the facts it knows; "
                    "tempering %s may not remove much from this model", tau, 100 * (1 - chosen["facts_forgotten"]),
                    "all layers" if layers is None else f"layers {layers}")
    log.info("tau=auto: %s -> tau=%.3f (%d probes on %d rows, %.1fs)", reason, tau, len(prober.probes),
             len(idx), out["seconds"])
    return out


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3g}"
