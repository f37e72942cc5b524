"""MUSE metrics: VerbMem, KnowMem and PrivLeak (definitions and open-unlearning cross-check in
``docs/metrics.md``).

* **VerbMem** — greedy continuation of each ``verbmem`` prompt (``max_new_tokens=128``), ROUGE-L F1
  against the true continuation ``gt``; mean over prompts.
* **KnowMem** — greedy answer (``max_new_tokens=32``, cut at ``"\\n\\n"``, ``"\\nQuestion"``,
  ``"Question:"``) to ``Question: {q}\\nAnswer: `` preceded by the few-shot ``*_icl`` pairs, ROUGE-L
  F1 (reported) and recall against the answer; mean over questions (forget and retain QA).
* **PrivLeak** — Min-K% Prob (k=0.4) membership score per text: the mean of the lowest 40 % of its
  token log-probabilities (higher = more likely a member). AUC of forget (positives) vs holdout
  (negatives) by the Mann-Whitney rank formula (``privleak_auc``); PrivLeak as MUSE defines and
  reports it, on MUSE's AUC, which is ``1 - privleak_auc`` (see :func:`privleak`): 0 = like the
  retrained model, negative = forget set still detectable (a target model: about -100), positive =
  over-unlearned.

Data parallel like :func:`pipeline.eval.tofu.evaluate_split`: pass the full split on every rank
with ``rank``/``world_size``; each rank handles ``rows[rank::world_size]`` and makes the same
number of model calls (ZeRO-3); merge gathered :class:`ExampleResults` with :func:`merge_results`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np
from scipy.stats import rankdata

from pipeline.data.collate import padding_id
from pipeline.data.formatting import encode_text
from pipeline.eval import metrics as M
from pipeline.eval.batching import score_labelled, synced_batch_count
from pipeline.eval.tofu import greedy_generate
from pipeline.models.loading import model_context

RAW_TEMPLATE = "{question}"  # prompt used verbatim (after <bos>) by greedy_generate
KNOWMEM_STOP = ("\n\n", "\nQuestion", "Question:")
QA_TURN = "Question: {question}\nAnswer: {answer}\n\n"
# The trailing space is MUSE's and open-unlearning's (``asst_start_tag: "Answer: "``): a Llama-2 prompt then
# ends with a lone "▁" token, and the scores are only comparable with the same ids.
QA_PROMPT = "Question: {question}\nAnswer: "


@dataclass
class MuseSettings:
    batch_size: int = 8
    max_length: int = 2048  # Min-K%: texts are cut to this many tokens after <bos> (open-unlearning's MUSE_MIA)
    verbmem_max_new_tokens: int = 128
    knowmem_max_new_tokens: int = 32
    mink_k: float = 0.4
    synced_gpus: bool = False
    rouge_stemmer: bool = False  # data.rouge_stemmer (VerbMem / KnowMem ROUGE on stemmed tokens)

    @classmethod
    def from_config(cls, eval_cfg: Any, **overrides: Any) -> MuseSettings:
        get = eval_cfg.get if hasattr(eval_cfg, "get") else (lambda k, d=None: getattr(eval_cfg, k, d))
        kw = {k: get(k) for k in ("batch_size", "max_length", "verbmem_max_new_tokens", "knowmem_max_new_tokens",
                                  "mink_k") if get(k, None) is not None}
        kw.update(overrides)
        return cls(**kw)


# ------------------------------------------------------------------------------ model-free parts
def min_k_score(token_logprobs: Sequence[float], k: float = 0.4) -> float:
    """Min-K% Prob: mean of the lowest ``max(1, int(n * k))`` token log-probs (n = #tokens).
    ``nan`` for an empty sequence. Higher = more likely seen in training."""
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    lp = np.sort(np.asarray(list(token_logprobs), dtype=float))
    if lp.size == 0:
        return float("nan")
    n = max(1, int(lp.size * k))
    return float(lp[:n].mean())


def auc_mann_whitney(positive: Sequence[float], negative: Sequence[float]) -> float:
    """ROC AUC = P(score_pos > score_neg) + 0.5 * P(tie), via the Mann-Whitney U statistic with
    average ranks: ``(R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg)``. Non-finite scores are
    dropped; ``nan`` when a side is empty."""
    pos = np.asarray([x for x in positive if math.isfinite(x)], dtype=float)
    neg = np.asarray([x for x in negative if math.isfinite(x)], dtype=float)
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    ranks = rankdata(np.concatenate([pos, neg]))  # average ranks for ties, 1-based
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def privleak(auc_unlearn: float, auc_retrain: float = 0.5) -> float:
    """MUSE's ``(AUC_unlearn - AUC_retrain) / AUC_retrain * 100`` on MUSE's AUC, which labels the
    forget texts 0 and the holdout texts 1 (``privleak/scripts/get_ppl.py``: ``forget_holdout``), i.e.
    ``1 - auc`` of the AUCs here (forget positive): ``(auc_retrain - auc_unlearn) / (1 - auc_retrain)
    * 100``. open-unlearning's ``privleak`` computes the same (``score = 1 - auc``). Without a
    retrained model's AUC the reference is 0.5, as open-unlearning's ``ref_value``."""
    ref = 1.0 - auc_retrain
    if not ref > 0:
        return float("nan")
    return ((1.0 - auc_unlearn) - ref) / ref * 100.0


def cut_at_stops(text: str, stops: Sequence[str] = KNOWMEM_STOP) -> str:
    """Text before the first occurrence of any stop string, stripped afterwards (``text`` unstripped:
    a leading ``\n\n`` is a stop)."""
    for s in stops:
        if s and s in text:
            text = text.split(s)[0]
    return text.strip()


def knowmem_prompt(question: str, icl: Sequence[dict] = ()) -> str:
    """``Question: q1\\nAnswer: a1\\n\\n ... Question: q\\nAnswer: `` (MUSE's knowmem script and
    open-unlearning's non-chat template for the MUSE Llama-2 models, the ``*_icl`` pairs in front)."""
    shots = "".join(QA_TURN.format(question=r["question"], answer=r["answer"]) for r in icl)
    return shots + QA_PROMPT.format(question=question)


def split_prefix(tokenizer, text: str, k: int) -> tuple[str, str]:
    """Split raw text into (first ``k`` tokens, the rest), decoded — VerbMem prompts from plain text."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    dec = lambda t: tokenizer.decode(t, skip_special_tokens=True).strip()  # noqa: E731
    return dec(ids[:k]), dec(ids[k:])


# ---------------------------------------------------------------------------------- model calls
def token_logprobs(
    model,
    tokenizer,
    texts: Sequence[str],
    batch_size: int,
    max_length: int,
    num_batches: Optional[int] = None,
) -> list[list[float]]:
    """Log-probability of every token of each text (after ``<bos>``, no ``<eos>``), teacher
    forced, texts cut to ``max_length`` tokens after ``<bos>`` (open-unlearning's ``CompletionDataset``
    keeps ``max_length`` text tokens: a 2048-token MUSE text is scored whole). Right-padded batches
    sorted by length."""
    keep = max_length + (tokenizer.bos_token_id is not None)
    # eval.max_length is capped at the model's context (runner.evaluate_job); <bos> must fit in it too
    context = model_context(getattr(model, "config", None))
    if context is not None:
        keep = min(keep, context)

    def example(text: str, add_eos: bool) -> dict:
        e = encode_text(tokenizer, text, keep, add_eos=add_eos)
        return {"input_ids": e.input_ids, "labels": e.labels}

    out: list[list[float]] = [[] for _ in texts]
    for b in score_labelled(model, [example(t, False) for t in texts], padding_id(tokenizer), batch_size,
                            num_batches, example("", True)):
        for i, tokens in zip(b.rows, b.row_tokens()):
            out[i] = tokens
    return out


# --------------------------------------------------------------------------------- split results
@dataclass
class ExampleResults:
    """Per-example values of one split on one rank (``indices`` = row positions in the full
    split); plain lists so it pickles for ``all_gather_object``."""

    name: str
    indices: list[int] = field(default_factory=list)
    values: dict[str, list] = field(default_factory=dict)

    def mean(self, key: str) -> float:
        return M.nanmean(self.values.get(key, []))

    def to_dict(self) -> dict:
        return asdict(self)


def merge_results(parts: Sequence[ExampleResults]) -> ExampleResults:
    """Merge per-rank results back into row order; indices must cover 0..N-1 exactly once."""
    if not parts:
        raise ValueError("merge_results got no parts")
    if len({p.name for p in parts}) > 1:
        raise ValueError(f"cannot merge results of different splits: {sorted({p.name for p in parts})}")
    pairs = sorted(((idx, p, j) for p in parts for j, idx in enumerate(p.indices)), key=lambda t: t[0])
    if [t[0] for t in pairs] != list(range(len(pairs))):
        raise ValueError(f"per-rank indices do not cover 0..{len(pairs) - 1} exactly once")
    keys = list(parts[0].values)
    return ExampleResults(parts[0].name, [t[0] for t in pairs],
                          {k: [p.values[k][j] for _, p, j in pairs] for k in keys})


def _mine(rows: Sequence, rank: int, world_size: int) -> list[int]:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    return list(range(rank, len(rows), world_size))


def _calls(n_rows: int, batch_size: int, world_size: int) -> Optional[int]:
    return synced_batch_count([len(range(k, n_rows, world_size)) for k in range(world_size)], batch_size)


def evaluate_verbmem(model, tokenizer, rows: Sequence[dict], cfg: MuseSettings, *, name: str = "verbmem_forget",
                     rank: int = 0, world_size: int = 1) -> ExampleResults:
    """Greedy continuation of ``prompt``; ROUGE-L F1/recall against ``gt``."""
    idx = _mine(rows, rank, world_size)
    gens = greedy_generate(model, tokenizer, [rows[i]["prompt"] for i in idx], cfg.verbmem_max_new_tokens,
                           cfg.batch_size, synced_gpus=cfg.synced_gpus, template=RAW_TEMPLATE,
                           num_batches=_calls(len(rows), cfg.batch_size, world_size), max_length=cfg.max_length)
    res = ExampleResults(name, idx, {"rouge_l_f1": [], "rouge_l_recall": [], "generation": []})
    for i, (text, _, _) in zip(idx, gens):
        r = M.rouge_l(text, rows[i]["gt"], cfg.rouge_stemmer)
        res.values["rouge_l_f1"].append(r["f1"])
        res.values["rouge_l_recall"].append(r["recall"])
        res.values["generation"].append(text)
    return res


def evaluate_knowmem(model, tokenizer, rows: Sequence[dict], cfg: MuseSettings, *, icl: Sequence[dict] = (),
                     name: str = "knowmem", rank: int = 0, world_size: int = 1) -> ExampleResults:
    """Few-shot QA: greedy answer cut at the stop strings; ROUGE-L F1/recall against ``answer``."""
    idx = _mine(rows, rank, world_size)
    prompts = [knowmem_prompt(rows[i]["question"], icl) for i in idx]
    gens = greedy_generate(model, tokenizer, prompts, cfg.knowmem_max_new_tokens, cfg.batch_size,
                           synced_gpus=cfg.synced_gpus, template=RAW_TEMPLATE,
                           num_batches=_calls(len(rows), cfg.batch_size, world_size), max_length=cfg.max_length)
    res = ExampleResults(name, idx, {"rouge_l_f1": [], "rouge_l_recall": [], "generation": []})
    for i, (_, toks, _) in zip(idx, gens):
        # cut the raw decoding, then strip (MUSE's knowmem.py, open-unlearning's stopword cut): an
        # answer that opens with a blank line is empty, not the text after it
        ans = cut_at_stops(tokenizer.decode(toks, skip_special_tokens=True))
        r = M.rouge_l(ans, rows[i]["answer"], cfg.rouge_stemmer)
        res.values["rouge_l_f1"].append(r["f1"])
        res.values["rouge_l_recall"].append(r["recall"])
        res.values["generation"].append(ans)
    return res


def evaluate_mink(model, tokenizer, rows: Sequence[dict], cfg: MuseSettings, *, name: str = "privleak",
                  rank: int = 0, world_size: int = 1) -> ExampleResults:
    """Min-K% Prob score of each ``text``."""
    idx = _mine(rows, rank, world_size)
    lps = token_logprobs(model, tokenizer, [rows[i]["text"] for i in idx], cfg.batch_size, cfg.max_length,
                         num_batches=_calls(len(rows), cfg.batch_size, world_size))
    return ExampleResults(name, idx, {"min_k": [min_k_score(lp, cfg.mink_k) for lp in lps],
                                      "n_tokens": [len(lp) for lp in lps]})


def muse_metrics(
    verbmem: Optional[ExampleResults] = None,
    knowmem_forget: Optional[ExampleResults] = None,
    knowmem_retain: Optional[ExampleResults] = None,
    mink_forget: Optional[ExampleResults] = None,
    mink_holdout: Optional[ExampleResults] = None,
    retrain_auc: Optional[float] = None,
) -> dict[str, Any]:
    """Summary: ``verbmem_forget`` (ROUGE-L F1), ``knowmem_forget`` / ``knowmem_retain`` (ROUGE-L
    F1, plus ``*_recall``), ``privleak_auc`` and ``privleak`` (relative to ``retrain_auc``; 0.5
    when it is not given, as open-unlearning, flagged by ``privleak_reference``)."""
    out: dict[str, Any] = {}
    if verbmem is not None:
        out["verbmem_forget"] = verbmem.mean("rouge_l_f1")
    for key, res in (("knowmem_forget", knowmem_forget), ("knowmem_retain", knowmem_retain)):
        if res is not None:
            out[key] = res.mean("rouge_l_f1")
            out[f"{key}_recall"] = res.mean("rouge_l_recall")
    if mink_forget is not None and mink_holdout is not None:
        auc = auc_mann_whitney(mink_forget.values["min_k"], mink_holdout.values["min_k"])
        ref = 0.5 if retrain_auc is None else float(retrain_auc)
        out["privleak_auc"] = auc
        out["privleak"] = privleak(auc, ref)
        out["privleak_reference"] = "retrain" if retrain_auc is not None else "default_0.5"
    return out
