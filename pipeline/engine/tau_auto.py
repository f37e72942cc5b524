"""``method.tau=auto``: choose ASU's attention temperature from a cheap teacher-side signal.

Before training, the frozen teacher (the original model) is run teacher-forced on a slice of the
forget set at a few temperatures; no student, no generation, no training. The teacher never
trains, so the slice needs no holding out.

What the student is pulled towards is the tempered teacher's prediction at each answer position;
a fact the tempered teacher still puts first is not forgotten (on the embedded benchmark the
student's forget fact recall after training equals the tempered teacher's greedy fact recall,
docs/sweeps.md). So the signals count argmax changes, per probed tau, against the untempered
teacher (tau=1):

* ``facts_forgotten(tau)``: share of the facts the untempered teacher reproduces (every token of
  the fact span is its top-1) that the tempered teacher no longer does (some token's top-1
  differs). The facts are the attribute values in the row's ``facts`` field, located in the
  answer's tokens.
* ``form_kept(tau)``: share of the answers' *non-fact* tokens (template words, end of turn) where
  the tempered teacher's top-1 is still the untempered teacher's. Evidence, and the fallback signal.

Rule (rows with facts the teacher knows): the **smallest tau in [TAU_MIN, tau_max] at which the
tempered teacher has forgotten at least ``method.tau_fact_target`` (default FACT_TARGET) times the
share of the facts it knows that it forgets at tau_max**, by bisection (relative to tau_max: a
teacher that keeps some facts however flat its attention would otherwise never reach an absolute
share); tau_max when tempering up to tau_max forgets none of them (with a warning).
Guard: the bisection stops at whichever comes first, the facts or the loss of half the template's
top-1 (FORM_FLOOR); when the template went first, auto takes the largest probed tau below that
point (on SmolLM2 the fact point alone left the student's forget answers empty, docs/sweeps.md).
Every tau above that point flattens the answers further for few more facts, every tau below it
leaves facts the student will keep. The first rule (the largest tau that keeps 95% of the non-fact
top-1 predictions) chose 5.2 on the embedded benchmark but 1.06 on SmolLM2-135M-Instruct, whose
template tokens (the end of turn after a name, "was written") change top-1 long before its facts
do, while training at tau 2.3 left its answers fluent: exact top-1 agreement on the template is
not a transferable stop signal; the facts are what the user asked to remove.

Fallback (no row has ``facts``, e.g. MUSE text, or the teacher reproduces none of them): the
largest tau whose teacher keeps ``form_kept >= method.tau_form_target`` (default FORM_TARGET).

Cost: the slice's rows are split over the ranks (each rank runs its share; the counts are summed
over ranks before any decision), 1 + 1 + BISECT_STEPS probes of the slice (the template guard
shares the fact search's bisection). A probe computes the lm_head only at the scored answer positions (``logits_to_keep``),
leaves out the last input position (it scores nothing), and runs a prompt prefix all rows share
(chat template, system prompt) once, the rows continuing from its KV cache: the full forward's
values up to float rounding, at about half its cost on SmolLM2 (docs/sweeps.md).

Collective safety (ZeRO-3): every rank runs the same number of forwards at the same temperatures in
the same order (each forward is a set of parameter all-gathers; a rank with fewer rows pads with a
discarded repeat; the shared prefix runs only when every rank's rows have one), and decisions use
rank-summed counts, so every rank takes the same branches.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

from pipeline.data.collate import pad_batch
from pipeline.data.formatting import IGNORE_INDEX
from pipeline.engine.distributed import all_reduce_sum
from pipeline.logging import SAME_ON_EVERY_RANK
from pipeline.methods.asu import FACT_TARGET, FORM_TARGET, TAU_MAX
from pipeline.methods.model_io import unwrap
from pipeline.models.runtime import model_device
from pipeline.models.sharded_embedding import embeddings_from_shards
from pipeline.models.tempered_attention import temperature
from pipeline.progress import expect, tracked

log = logging.getLogger(__name__)

TAU_MIN = 1.0  # the untempered teacher: the reference of both signals
BISECT_STEPS = 6  # interval (TAU_MAX - TAU_MIN) / 2**6 ~ 0.11 with the default bounds
VAL_FRACTION = 0.25  # validation slice: a quarter of the forget rows ...
VAL_MIN_ROWS = 32  # ... at least 32 (all of a smaller set): the signal is a share, 8 rows are too noisy
VAL_MAX_ROWS = 128  # ... at most 128 (more rows add cost, not accuracy)
# rows per forward: few, large forwards (under ZeRO-3 each forward gathers every layer's weights, which
# on small models costs more than the rows); 16 rows x T x vocab float logits stay small at 7B
BATCH_ROWS = 16
# shared prompt prefix (system prompt, chat template) run once per probe when every rank's rows share at
# least this many tokens: below it one more forward and the cache copies save little
MIN_PREFIX = 8
# the guard: the fact rule never goes above the largest tau keeping half the template's top-1. It is part of
# the one bisection (its stop condition is "facts forgotten OR half the template gone"), so it costs no probes
FORM_FLOOR = 0.5
FACTS_WARN = 0.5  # warn when even tau_max's teacher forgets fewer than half of the known facts
FORM_WARN = 0.5  # warn when the chosen tau's teacher changes more than half of the template's top-1


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


def _items(tokenizer, rows: Sequence[dict], encoded: Sequence[dict], skip_first: bool = False) -> list[dict]:
    """Per validation row: its encoded ids and labels plus the token spans of its facts.
    ``skip_first`` (``method.skip_first_answer_token``, ASU+IDK): the first answer token is not
    scored, as the forget KL leaves it out, so a fact counts as forgotten only by what the student
    is distilled on (its spans are found first, on the whole answer)."""
    out = []
    for enc in encoded:
        row = rows[int(enc["index"])] if "index" in enc else {}
        labels = list(enc["labels"])
        spans = fact_spans(tokenizer, enc, row.get("facts") or [])
        if skip_first:
            first = next((j for j, lab in enumerate(labels) if lab != IGNORE_INDEX), None)
            if first is not None:
                labels[first] = IGNORE_INDEX
        out.append({"input_ids": list(enc["input_ids"]), "labels": labels, "spans": spans})
    return out


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_share(n: int, rank: int, world: int) -> tuple[list[int], int]:
    """This rank's rows of ``n`` (contiguous, ceil(n / world) each) and the number of forwards
    every rank runs (the same on all ranks: ZeRO-3 gathers parameters in each forward)."""
    per = -(-n // world)
    mine = list(range(rank * per, min(n, (rank + 1) * per)))
    return mine, -(-per // BATCH_ROWS)


def keeps_positions(model: Any) -> bool:
    """Whether ``model``'s forward can compute its logits at given positions only: transformers'
    ``logits_to_keep`` with a (B, K) tensor of positions, handled by ``slice_logits_to_keep``
    before the lm_head, so the model's own logit post-processing (Gemma-2's
    ``final_logit_softcapping``, Granite's ``logits_scaling``) still applies. Models whose forward
    does not slice through that helper get the full forward."""
    import inspect

    fwd = type(unwrap(model)).forward
    if "logits_to_keep" not in inspect.signature(fwd).parameters:
        return False
    try:
        return "slice_logits_to_keep(" in inspect.getsource(fwd)
    except (OSError, TypeError):  # pragma: no cover - no source (compiled): be safe
        return False


def _scored_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the positions t whose logits score an answer token (``labels[t + 1]`` is labelled),
    as a (B, K) index tensor padded by repeating the row's last position (K = the most any row has),
    and the (B, K) mask of the real ones."""
    scored = labels[:, 1:] != IGNORE_INDEX
    k = max(1, int(scored.sum(1).max()))
    pos = torch.zeros(labels.shape[0], k, dtype=torch.long)
    keep = torch.zeros(labels.shape[0], k, dtype=torch.bool)
    for r in range(labels.shape[0]):
        at = scored[r].nonzero().flatten()
        n = len(at)
        if n:
            pos[r, :n], pos[r, n:], keep[r, :n] = at, at[-1], True
    return pos, keep


def shared_prefix(items: Sequence[dict]) -> int:
    """Number of leading tokens every row of ``items`` shares, stopping before the first position
    whose logits any row scores (so every scored logit comes from the rows' own part)."""
    if not items:
        return 0
    ids = [list(it["input_ids"]) for it in items]
    first = min(next((t for t, lab in enumerate(it["labels"][1:]) if lab != IGNORE_INDEX), len(it["labels"]) - 1)
                for it in items)
    n = 0
    while n < first and all(len(x) > n and x[n] == ids[0][n] for x in ids):
        n += 1
    return n


def _forward(model: Any, input_ids: torch.Tensor, **kwargs: Any) -> Any:
    """``model(input_ids=input_ids, **kwargs)``; under ZeRO-3 its token embeddings come from the table's
    shards when that moves less than gathering the table (pipeline/models/sharded_embedding.py)."""
    with embeddings_from_shards(unwrap(model), input_ids):
        return model(input_ids=input_ids, **kwargs)


def _prefix_cache(model: Any, prefix: Sequence[int], device: torch.device) -> Any:
    """The model's KV cache after the shared prefix (one row), or None when the cache cannot be
    repeated over a batch (then the rows run whole)."""
    cache = _forward(model, torch.tensor([list(prefix)], device=device), use_cache=True).past_key_values
    return cache if hasattr(cache, "batch_repeat_interleave") else None


@torch.no_grad()
def _answer_predictions(model: Any, items: Sequence[dict], pad_id: int, n_forwards: Optional[int] = None,
                        at_positions: Optional[bool] = None, prefix: int = 0, ran: Optional[dict] = None) -> list[dict]:
    """Per row, at each answer token j (scored by the logits at j-1): the model's top-1 token and
    the log-prob of the true token, as ``{j: (top1, logprob)}``. ``n_forwards``: run exactly this
    many forwards (a rank with fewer rows repeats a row and discards it; it needs ``items``).

    ``at_positions`` (default: ``keeps_positions(model)``): the lm_head runs only at the scored
    positions (``logits_to_keep``), not at every prompt and padding position: on SmolLM2 (49k
    vocabulary, prompts twice as long as answers) that is a sixth of a probe.

    ``prefix`` (> 0: every row starts with these ``prefix`` tokens, see ``shared_prefix``; needs
    ``at_positions``): the prefix runs once, one more forward, and the rows continue from its KV
    cache: on SmolLM2's chat template (26 of ~47 tokens are the system prompt and the user turn's
    start) a third of a probe. The values are those of the full forward's logits at the same
    positions up to float rounding (tested). ``ran``: gets ``prefix``, the prefix length that ran
    once (0 when the model's cache cannot be repeated over rows)."""
    device = model_device(model)
    at_positions = keeps_positions(model) if at_positions is None else at_positions
    n_forwards = -(-len(items) // BATCH_ROWS) if n_forwards is None else n_forwards
    cache = _prefix_cache(model, items[0]["input_ids"][:prefix], device) if prefix and at_positions else None
    p = prefix if cache is not None else 0
    if ran is not None:
        ran["prefix"] = p
    out: list[dict] = []
    for b in tracked(range(n_forwards)):
        chunk = list(items[b * BATCH_ROWS:(b + 1) * BATCH_ROWS])
        keep = len(chunk)
        if not chunk:  # this rank has run out of rows: the same collectives, result discarded
            chunk = [items[0]] if items else [{"input_ids": [pad_id, pad_id], "labels": [IGNORE_INDEX, pad_id]}]
        batch = pad_batch([{"input_ids": it["input_ids"], "labels": it["labels"]} for it in chunk], pad_id)
        # the last input position predicts nothing that is scored (position t scores labels[t + 1]) and, the
        # attention being causal, no scored position attends to it: the forward runs without it
        ids, mask = batch["input_ids"][:, :-1].to(device), batch["attention_mask"][:, :-1].to(device)
        labels = batch["labels"]
        pos, real = _scored_positions(labels)
        if cache is not None:  # the rows' own tokens after the shared prefix's cache (copied: the forward extends it)
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(len(chunk))
            # the mask spans prefix and rows (transformers' convention with a cache)
            logits = _forward(model, ids[:, p:], attention_mask=mask, past_key_values=past, use_cache=True,
                              logits_to_keep=(pos - p).to(device)).logits
        elif at_positions:
            logits = _forward(model, ids, attention_mask=mask, use_cache=False, logits_to_keep=pos.to(device)).logits
        else:  # the full forward: every position's logits, keep the scored ones
            logits = _forward(model, ids, attention_mask=mask, use_cache=False).logits
            logits = torch.take_along_dim(logits, pos.to(device)[..., None], dim=1)
        top1 = logits.argmax(-1).cpu()
        target = torch.take_along_dim(labels, pos + 1, dim=1).clamp_min(0)
        tok_lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, target.to(device)[..., None])[..., 0].cpu()
        for r in range(keep):
            out.append({int(pos[r, i]) + 1: (int(top1[r, i]), float(tok_lp[r, i]))
                        for i in real[r].nonzero().flatten().tolist()})
    return out


def _share(hits: float, total: float) -> float:
    return hits / total if total else float("nan")


def _none_if_nan(v: float) -> Optional[float]:
    return None if math.isnan(v) else v


class _Prober:
    """Runs the teacher at one temperature and compares its top-1 predictions with tau=1's.

    ``items`` are this rank's rows; ``n_forwards`` the number of forwards every rank runs."""

    def __init__(self, teacher: Any, items: list[dict], pad_id: int, layers: Optional[list[int]],
                 form_target: float = FORM_TARGET, fact_target: float = FACT_TARGET,
                 n_forwards: Optional[int] = None, prefix: int = 0) -> None:
        self.teacher, self.items, self.pad_id, self.layers = teacher, items, pad_id, layers
        self.form_target, self.fact_target = float(form_target), float(fact_target)
        # facts_forgotten a probe must reach: fact_target x the share forgotten at tau_max (set_fact_scale)
        self.fact_threshold: Optional[float] = None
        self.n_forwards = n_forwards
        self.prefix = prefix  # shared leading tokens run once per probe (0: the rows run whole)
        self.ran: dict = {"prefix": 0}  # what the last probe ran (the prefix length actually cached)
        self.base: Optional[list[dict]] = None  # tau=1 predictions per row
        self.probes: list[dict] = []
        self.seconds = 0.0
        self.probe_seconds: list[float] = []  # wall seconds of each probe, in probe order

    def predictions(self, tau: float) -> list[dict]:
        with temperature(self.teacher, float(tau), self.layers):
            return _answer_predictions(self.teacher, self.items, self.pad_id, self.n_forwards, prefix=self.prefix,
                                       ran=self.ran)

    def counts(self, preds: list[dict]) -> list[float]:
        """[form tokens kept, form tokens, facts forgotten, facts known, fact-token log-prob sum,
        fact tokens] of ``preds`` against tau=1 (summable over ranks)."""
        assert self.base is not None
        kept = form = forgotten = known = 0
        lp_sum, lp_n = 0.0, 0
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
                lp_sum += sum(now[j][1] for j in span)
                lp_n += len(span)
                label = it["input_ids"]
                if all(base[j][0] == label[j] for j in span):  # the untempered teacher reproduces it
                    known += 1
                    forgotten += int(any(now[j][0] != label[j] for j in span))
        return [kept, form, forgotten, known, lp_sum, lp_n]

    def signal(self, preds: list[dict]) -> tuple[float, float, float]:
        """(form_kept, facts_forgotten, mean fact-token log-prob) of ``preds`` on this rank's rows."""
        kept, form, forgotten, known, lp_sum, lp_n = self.counts(preds)
        return _share(kept, form), _share(forgotten, known), _share(lp_sum, lp_n)

    def probe(self, tau: float) -> dict:
        """Signal at ``tau`` over all ranks' rows; the first call must be the reference, ``tau == TAU_MIN``."""
        if self.base is None and float(tau) != TAU_MIN:
            raise ValueError(f"probe tau={TAU_MIN} first: it is the reference the other probes are compared with")
        t0 = time.time()
        preds = self.predictions(tau)
        if self.base is None:
            self.base = preds
        kept, form, forgotten, known, lp_sum, lp_n = all_reduce_sum(self.counts(preds))
        rec = {
            "tau": round(float(tau), 4),
            "form_kept": _none_if_nan(_share(kept, form)),
            "facts_forgotten": _none_if_nan(_share(forgotten, known)),
            "facts_known": int(known),
            "fact_logprob": _none_if_nan(_share(lp_sum, lp_n)),
        }
        rec["form_ok"] = rec["form_kept"] is None or rec["form_kept"] >= self.form_target  # the form rule's test
        rec["form_floor_ok"] = _keeps_form_floor(rec)  # the fact search's guard (a probe may pass it, not form_ok)
        self.probes.append(rec)
        self._mark(rec)
        self.probe_seconds.append(round(time.time() - t0, 3))
        self.seconds += time.time() - t0
        return rec


    def set_fact_scale(self, forgotten_at_max: float) -> None:
        """The fact threshold is relative: ``fact_target`` x the share of the known facts the
        teacher has forgotten at the search's upper bound (marks the probes made so far)."""
        self.fact_threshold = self.fact_target * float(forgotten_at_max)
        for rec in self.probes:
            self._mark(rec)

    def _mark(self, rec: dict) -> None:
        rec["facts_ok"] = bool(rec["facts_forgotten"] is not None and self.fact_threshold is not None
                               and rec["facts_forgotten"] > 0.0 and rec["facts_forgotten"] >= self.fact_threshold - 1e-9)


def _keeps_form_floor(rec: dict) -> bool:
    """The guard's condition: the teacher keeps at least FORM_FLOOR of the template's top-1."""
    return rec["form_kept"] is not None and rec["form_kept"] >= FORM_FLOOR


def _fact_search_stops(rec: dict) -> bool:
    """The fact search's stop condition: the facts are forgotten, or the guard fires (the teacher
    keeps less than FORM_FLOOR of the template's top-1), whichever comes first as tau grows."""
    return bool(rec["facts_ok"]) or not _keeps_form_floor(rec)


def _bisect(prober: _Prober, lo: float, hi: float, ok_at_hi: bool,
            key: str | Callable[[dict], bool]) -> tuple[float, float]:
    """Bisect [lo, hi] on the probes' boolean ``key`` (or a predicate of a probe record); returns
    the final (lo, hi).

    ``ok_at_hi``: the condition holds at ``hi`` and not at ``lo`` (search for its smallest tau),
    else it holds at ``lo`` and not at ``hi`` (its largest)."""
    for _ in range(BISECT_STEPS):  # announced up front by select_tau
        mid = 0.5 * (lo + hi)
        rec = prober.probe(mid)
        ok = key(rec) if callable(key) else rec[key]
        if ok == ok_at_hi:
            hi = mid
        else:
            lo = mid
    return lo, hi


def select_tau(teacher: Any, tokenizer: Any, data: Any, forget_encoded: Sequence[dict], cfg: Any) -> dict:
    """Choose ASU's tau in [TAU_MIN, ``method.tau_max``] for ``cfg.method`` (see the module docstring).

    ``teacher``: the frozen reference (a DeepSpeed engine or a plain model) with the tempered
    attention implementation. ``data``: the run's ``UnlearningData`` (its ``forget`` rows give
    the ``facts``); ``forget_encoded``: the encoded forget rows (with ``index``). Returns a dict
    with ``tau`` and the evidence (every probed tau with its signal values)."""
    if teacher is None:
        raise ValueError("method.tau=auto needs the frozen reference model (the ASU teacher)")
    t0, cpu0 = time.time(), time.process_time()
    mcfg = cfg.method
    layers = getattr(mcfg, "teacher_layers", None)
    layers = [int(i) for i in layers] if layers is not None else None
    tau_max = float(getattr(mcfg, "tau_max", TAU_MAX))
    form_target = float(getattr(mcfg, "tau_form_target", FORM_TARGET))
    fact_target = float(getattr(mcfg, "tau_fact_target", FACT_TARGET))
    if not (tau_max > TAU_MIN and 0.0 < form_target <= 1.0 and 0.0 < fact_target <= 1.0):
        raise ValueError(f"method.tau=auto: needs method.tau_max > {TAU_MIN}, 0 < method.tau_form_target <= 1 and "
                         f"0 < method.tau_fact_target <= 1, got {tau_max}, {form_target} and {fact_target}")
    rows = list(getattr(data, "forget", None) or [])
    idx = validation_indices(len(forget_encoded))
    if not idx:
        raise ValueError("method.tau=auto: the forget set is empty")
    rank, world = _world()
    mine, n_forwards = rank_share(len(idx), rank, world)
    items = _items(tokenizer, rows, [forget_encoded[idx[i]] for i in mine],
                   bool(getattr(mcfg, "skip_first_answer_token", False)))
    with_facts = int(all_reduce_sum([float(sum(1 for it in items if it["spans"]))])[0])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # the shared prefix runs once only if it does on every rank (the same number of forwards everywhere)
    prefix = shared_prefix(items)
    use_prefix = keeps_positions(teacher) and all_reduce_sum([float(prefix >= MIN_PREFIX)])[0] == world
    prefix = prefix if use_prefix else 0

    was_training = bool(getattr(teacher, "training", False))
    teacher.eval()
    prober = _Prober(teacher, items, pad_id, layers, form_target, fact_target, n_forwards, prefix)
    try:
        # every probe up front (the bounds' two and the bisection's), so the bar's first estimate of
        # the time left holds; a search that needs no bisection takes its share back
        expect((2 + BISECT_STEPS) * n_forwards)
        signal, tau, chosen, top, reason = _search(prober, tau_max, fact_target, form_target)
        expect(-(2 + BISECT_STEPS - len(prober.probes)) * n_forwards)
    finally:
        if was_training:
            teacher.train()
    tau = round(float(min(tau_max, max(TAU_MIN, tau))), 3)
    if chosen["form_kept"] is not None:
        reason += f"; form kept there: {chosen['form_kept']:.3g}"
    out = {
        "tau": tau,
        "reason": reason,
        "signal": ("share of the known facts whose tokens the tempered teacher no longer predicts top-1"
                   if signal == "facts" else
                   "teacher-forced top-1 agreement with the tau=1 teacher on the non-fact answer tokens (fallback)"),
        "rule": signal,
        "fact_target": fact_target,
        "facts_forgotten_at_tau_max": top["facts_forgotten"],
        "fact_threshold": prober.fact_threshold,
        "form_target": form_target,
        "bounds": [TAU_MIN, tau_max],
        "teacher_layers": layers,
        "validation_rows": idx,
        "rows_with_facts": with_facts,
        "ranks": world,
        # where the probes' lm_head ran: at the scored answer positions only, or everywhere (see keeps_positions)
        "logits": "answer positions" if keeps_positions(teacher) else "all positions",
        "shared_prefix_tokens": prober.ran["prefix"],  # run once per probe (this rank's rows; 0: the rows ran whole)
        "probes": sorted(prober.probes, key=lambda r: r["tau"]),
        "probe_order": [r["tau"] for r in prober.probes],
        "seconds": round(time.time() - t0, 3),
        # this process's CPU seconds (all its threads): unlike the wall seconds, not inflated by other
        # jobs on a shared host; compare with the training loop's CPU seconds, not its wall seconds
        "cpu_seconds": round(time.process_time() - cpu0, 3),
        "probe_seconds": prober.probe_seconds,
    }
    _warn(signal, tau, chosen, top, layers, tau_max, form_target, with_facts)
    log.info("tau=auto: %s -> tau=%.3f (%d probes on %d rows over %d rank(s), logits at %s, shared prefix of "
             "%d tokens run once, %.1fs)", reason, tau, len(prober.probes), len(idx), world, out["logits"],
             out["shared_prefix_tokens"],
             out["seconds"])
    return out


def _search(prober: _Prober, tau_max: float, fact_target: float,
            form_target: float) -> tuple[str, float, dict, dict, str]:
    """Probe the bounds, then bisect: (rule used, tau, its probe record, the tau_max record, why)."""
    ref = prober.probe(TAU_MIN)
    top = prober.probe(tau_max)
    if ref["facts_known"] > 0:
        signal = "facts"
        prober.set_fact_scale(top["facts_forgotten"] or 0.0)
        if not top["facts_ok"]:  # tempering up to tau_max removes none of the facts
            tau, chosen = tau_max, top
            reason = f"the teacher forgets none of the {ref['facts_known']} facts it knows even at the upper bound"
        else:
            # One bisection for the fact point and the guard: where the signals are monotone in tau it
            # probes exactly the fact search's taus when the guard does not act (the same choice)
            lo, hi = _bisect(prober, TAU_MIN, tau_max, True, _fact_search_stops)
            stop = _at(prober, hi)
            if _keeps_form_floor(stop):
                tau, chosen = hi, stop
                reason = (f"smallest tau at which the teacher has forgotten >= {fact_target} x the share of the "
                          f"{ref['facts_known']} facts it knows that it forgets at tau_max={tau_max:g} "
                          f"({_fmt(top['facts_forgotten'])}): {_fmt(chosen['facts_forgotten'])}")
            else:
                # Guard: past half the template the student's answers broke on SmolLM2 (docs/sweeps.md)
                tau, chosen = lo, _at(prober, lo)
                reason = (f"capped at tau={lo:.3f}, the largest probed tau whose teacher keeps >= {FORM_FLOOR} of "
                          f"the template's top-1 (it keeps {_fmt(stop['form_kept'])} at tau={hi:.3f}) before "
                          f"forgetting {fact_target} x the share of the {ref['facts_known']} facts it knows that "
                          f"it forgets at tau_max={tau_max:g} ({_fmt(top['facts_forgotten'])}); facts forgotten "
                          f"there: {_fmt(chosen['facts_forgotten'])}")
    else:
        signal = "form"
        if top["form_ok"]:
            tau, chosen = tau_max, top
            reason = f"no known facts; the answers keep their form (form kept {_fmt(top['form_kept'])}) up to the upper bound"
        else:
            tau, hi = _bisect(prober, TAU_MIN, tau_max, False, "form_ok")
            chosen = _at(prober, tau)
            reason = (f"no known facts (fallback): largest tau whose teacher keeps >= {form_target} of the "
                      f"answers' non-fact top-1 predictions (it breaks by tau={hi:.3f})")
    return signal, tau, chosen, top, reason


def _warn(signal: str, tau: float, chosen: dict, top: dict, layers: Optional[list[int]], tau_max: float,
          form_target: float, with_facts: int) -> None:
    """The warnings a choice can deserve (each logged once, by rank 0: every rank reaches it alike)."""
    where = "all layers" if layers is None else f"layers {layers}"
    if signal == "form":
        log.warning("tau=auto: %s, so the fallback rule (template top-1 agreement >= %s) chose tau; it can be "
                    "very cautious on real models (docs/sweeps.md)",
                    "no forget row has a 'facts' field found in its answer" if not with_facts else
                    "the untempered teacher reproduces none of the forget facts", form_target,
                    extra=SAME_ON_EVERY_RANK)
        if tau == TAU_MIN:
            log.warning("tau=auto: tau=1 was chosen and ASU's forget term will remove nothing; set method.tau by hand",
                        extra=SAME_ON_EVERY_RANK)
    elif tau == TAU_MIN:  # the guard fired at the bisection's first steps: the template goes before any fact
        log.warning("tau=auto: the tempered teacher loses half the template's top-1 before it forgets the facts, "
                    "so tau=1 was chosen and ASU's forget term will remove nothing; set method.tau by hand or "
                    "try other method.teacher_layers", extra=SAME_ON_EVERY_RANK)
    elif (top["facts_forgotten"] or 0.0) < FACTS_WARN:
        log.warning("tau=auto: tempering %s up to tau_max=%s leaves the teacher reproducing %.0f%% of the facts "
                    "it knows; ASU may not remove much (try other teacher_layers or a higher tau_max)",
                    where, tau_max, 100 * (1 - (top["facts_forgotten"] or 0.0)), extra=SAME_ON_EVERY_RANK)
    if chosen["form_kept"] is not None and chosen["form_kept"] < FORM_WARN:
        log.warning("tau=auto: at tau=%.3f the tempered teacher changes %.0f%% of the answers' non-fact top-1 "
                    "predictions; check the forget answers' fluency (results.json forget_well_formed)",
                    tau, 100 * (1 - chosen["form_kept"]), extra=SAME_ON_EVERY_RANK)


def _at(prober: _Prober, tau: float) -> dict:
    """The probe record at ``tau`` (the bisection probed it, or it is a bound)."""
    return min(prober.probes, key=lambda r: abs(r["tau"] - tau))


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3g}"
