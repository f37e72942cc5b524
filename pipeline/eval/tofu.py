"""TOFU-style evaluation of a causal LM on QA rows (also used for the embedded synthetic benchmark).

Per split: length-normalised probabilities of the answer, the paraphrased answer and every
perturbed answer (teacher forcing, loss on answer tokens and ``<eos>`` only), greedy generations
scored with ROUGE-L recall and fact recall, and fluency statistics of the generations. Definitions
and the differences from open-unlearning are documented in :mod:`pipeline.eval.metrics`.

Data parallel use: ``evaluate_split(..., rank=r, world_size=w)`` evaluates ``rows[r::w]``; gather
the per-rank :class:`SplitResult` objects (e.g. ``torch.distributed.all_gather_object``) and merge
them with :func:`gather_split_results`. Every rank makes the *same number* of model calls (ranks
with fewer rows run throw-away padding batches), which ZeRO-3 requires because each forward pass
gathers the sharded parameters collectively; pass ``synced_gpus=True`` for ZeRO-3 generation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Union

import torch
from transformers import GenerationConfig

from pipeline.data.collate import pad_batch, padding_id
from pipeline.data.formatting import PROMPT_TEMPLATE, encode_qa, fit_prompt, prompt_ids
from pipeline.engine.distributed import is_main_process
from pipeline.eval import metrics as M
from pipeline.eval.batching import batch_count, batches, score_labelled, synced_batch_count
from pipeline.models.runtime import eval_mode, model_device
from pipeline.progress import expect

log = logging.getLogger(__name__)

# Splits whose truth ratio compares perturbed answers with the plain answer (open-unlearning's
# ra_/wf_ configs); every other split compares with the paraphrased answer.
ANSWER_AS_CORRECT_SPLITS = ("real_authors", "world_facts")
NOT_GENERATED = "rouge_l, fact_recall, repetition, well_formed, entropy: generation skipped (generate=False)"


@dataclass
class EvalSettings:
    batch_size: int = 32
    max_new_tokens: int = 48
    max_length: int = 192
    synced_gpus: bool = False  # True under ZeRO-3 so ranks keep stepping generate() together
    perturbed_mean: str = "geometric"  # truth-ratio aggregation of perturbed answers
    max_run: int = 3  # well-formedness: a token repeated this many times in a row is degenerate
    repetition_n: int = 2
    template: Any = PROMPT_TEMPLATE  # a format string (plain) or the run's PromptFormat
    rouge_stemmer: bool = False  # data.rouge_stemmer: ROUGE on Porter-stemmed tokens (metrics.rouge_tokens)

    @classmethod
    def from_config(cls, cfg: Any, **overrides) -> EvalSettings:
        """Build from any object/mapping with ``batch_size``, ``max_new_tokens``, ``max_length``
        (e.g. ``RunConfig.eval``); unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
        kw = {n: get(n) for n in names if get(n, None) is not None}
        kw.update(overrides)
        return cls(**kw)


# ----------------------------------------------------------------------------------- model calls
def answer_logprobs(
    model,
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str],
    batch_size: int,
    max_length: int,
    template: Any = PROMPT_TEMPLATE,
    num_batches: Optional[int] = None,
) -> tuple[list[float], list[int]]:
    """Sum of log-probabilities of each answer (its tokens and ``<eos>``) given its question, and
    the number of answer tokens scored. Batched with right padding, examples sorted by length to
    limit padding, results in input order; no gradients. An answer cut off by ``max_length`` is
    scored on its kept tokens (0 tokens -> sum 0.0, count 0).

    ``num_batches``: run at least this many forward passes (extra ones on a dummy example, results
    discarded) so that all ranks of a ZeRO-3 job call the model equally often.
    """
    if len(questions) != len(answers):
        raise ValueError("questions and answers differ in length")

    def example(q: str, a: str) -> dict:
        e = encode_qa(tokenizer, q, a, max_length, template=template)
        return {"input_ids": e.input_ids, "labels": e.labels}

    examples = [example(q, a) for q, a in zip(questions, answers)]
    sums, counts = [0.0] * len(examples), [0] * len(examples)
    for b in score_labelled(model, examples, padding_id(tokenizer), batch_size, num_batches, example("", "")):
        for i, total, n in zip(b.rows, b.row_sums(), b.counts):
            sums[i], counts[i] = total, int(n)
    return sums, counts


def trim_generation(new_tokens: Sequence[int], stop_ids: Union[int, Sequence[int], None]) -> tuple[list[int], bool]:
    """Cut generated ids at the first stop token (``<eos>``, or any of ``stop_ids``), dropping it and
    any padding after it. Returns ``(tokens, ended_with_a_stop_token)``."""
    stops = set() if stop_ids is None else {stop_ids} if isinstance(stop_ids, int) else set(stop_ids)
    toks = [int(t) for t in new_tokens]
    end = next((i for i, t in enumerate(toks) if t in stops), None)
    return (toks, False) if end is None else (toks[:end], True)


def generation_stop_ids(tokenizer, template: Any = PROMPT_TEMPLATE) -> list[int]:
    """The ids greedy generation stops at: the prompt format's (its end-of-turn token and EOS), or
    EOS for a plain string template."""
    if not isinstance(template, str):
        return template.stop_token_ids(tokenizer)
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def model_stop_ids(model) -> list[int]:
    """The end tokens of the model's own generation config (``generation_config.json``, else its
    config.json's ``eos_token_id``), which its ``generate()`` stops at: Llama-3.1-Instruct lists
    ``<|end_of_text|>``, ``<|eom_id|>`` and ``<|eot_id|>``, Qwen2.5-Instruct ``<|im_end|>`` and
    ``<|endoftext|>``; a chat format alone knows one or two of them."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


_LOGGED_MODEL_STOPS: set[tuple[int, ...]] = set()


def _log_model_stops(tokenizer, format_stops: list[int], model_stops: list[int]) -> None:
    extra = tuple(i for i in model_stops if i not in format_stops)
    if extra and extra not in _LOGGED_MODEL_STOPS and is_main_process():
        _LOGGED_MODEL_STOPS.add(extra)
        log.info("generation also stops at the model's generation_config end tokens: %s",
                 ", ".join(map(str, tokenizer.convert_ids_to_tokens(list(extra)))))


GENERATION = "greedy (the model's generation_config penalties not applied)"  # results.json evaluation.generation


@contextmanager
def plain_greedy_config(model, **settings: Any) -> Iterator[GenerationConfig]:
    """A fresh ``GenerationConfig`` of plain greedy decoding (``do_sample=False``, ``num_beams=1``
    and ``settings``), set as ``model.generation_config`` (and its base model's, for a peft wrapper)
    for the duration.

    Why the swap: ``generate()`` fills every field a passed config leaves unset from the model's own
    ``generation_config`` (``generation_config.json``), so a checkpoint's ``repetition_penalty``
    (Qwen2.5-Instruct: 1.05), ``no_repeat_ngram_size``, ``min_new_tokens``, ``suppress_tokens``, ...
    would still shape the answers, and suppress the very repetition the fluency metrics measure.
    """
    plain = GenerationConfig(do_sample=False, num_beams=1, **settings)
    owners = [model]
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else None
    if base is not None and base is not model:
        owners.append(base)
    saved = [(m, "generation_config" in vars(m), vars(m).get("generation_config")) for m in owners]
    for m in owners:
        m.generation_config = plain
    try:
        yield plain
    finally:
        for m, had, value in saved:
            if had:
                m.generation_config = value
            else:
                vars(m).pop("generation_config", None)


def greedy_generate(
    model,
    tokenizer,
    questions: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    synced_gpus: bool = False,
    template: Any = PROMPT_TEMPLATE,
    num_batches: Optional[int] = None,
    max_length: Optional[int] = None,
) -> list[tuple[str, list[int], bool]]:
    """Greedy answers to ``questions``: ``(text, token_ids, ended_with_a_stop_token)`` per question.

    Prompts are the format's (``<bos>Question: {q}\\nAnswer:`` by default), left-padded (sorted by
    length to limit padding); with ``max_length``, a prompt and its ``max_new_tokens`` fit in it: a
    longer question loses leading words, as in scoring (:func:`fit_prompt`), and the count is logged
    (before, an over-long question went to ``generate`` whole, past the model's context if it was
    longer); ``token_ids`` are the generated ids up to (excluding) the first stop
    token (:func:`generation_stop_ids`, :func:`model_stop_ids`); ``text`` is their decoding without special tokens, stripped.
    Plain argmax decoding whatever the model's ``generation_config`` says (:func:`plain_greedy_config`).
    ``synced_gpus`` is passed to ``generate`` (ZeRO-3); ``num_batches`` as in :func:`answer_logprobs`.
    """
    if max_length is None:
        prompts = [prompt_ids(tokenizer, q, template) for q in questions]
    else:
        # a budget of at least one token: a max_new_tokens over max_length still generates (its prompt cut)
        fitted = [fit_prompt(tokenizer, q, max(max_length - max_new_tokens, 1), template) for q in questions]
        prompts = [ids for ids, _ in fitted]
        cut = sum(shortened for _, shortened in fitted)
        if cut:
            log.warning("generation: %d of %d prompt(s) shortened (leading question words dropped) to leave "
                        "max_new_tokens=%d in max_length=%d", cut, len(prompts), max_new_tokens, max_length)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[Optional[tuple[str, list[int], bool]]] = [None] * len(prompts)
    # A chat format's answer ends with its end-of-turn token (e.g. <|eot_id|>), which may not be EOS.
    # ... and the model's own generate() stops at the end tokens of its generation_config as well
    format_stops = generation_stop_ids(tokenizer, template)
    model_stops = [i for i in model_stop_ids(model) if 0 <= i < len(tokenizer)]  # ids this tokenizer has
    _log_model_stops(tokenizer, format_stops, model_stops)
    stops = list(dict.fromkeys(format_stops + model_stops))
    pad, device = padding_id(tokenizer), model_device(model)
    gen_kwargs: dict[str, Any] = {"synced_gpus": True} if synced_gpus else {}
    with eval_mode(model), torch.no_grad(), plain_greedy_config(
        model, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=stops or None,
    ) as plain:
        for idx in batches(order, batch_size, num_batches):
            exs = [prompts[i] for i in idx] or [prompt_ids(tokenizer, "", template)]
            batch = pad_batch([{"input_ids": p} for p in exs], pad, "left")
            ids = batch["input_ids"].to(device)
            gen = model.generate(input_ids=ids, attention_mask=batch["attention_mask"].to(device),
                                 generation_config=plain, **gen_kwargs)
            new = gen[:, ids.shape[1]:].tolist()
            for j, i in enumerate(idx):
                toks, ended = trim_generation(new[j], stops)
                text = tokenizer.decode(toks, skip_special_tokens=True).strip()
                out[i] = (text, toks, ended)
    return out  # type: ignore[return-value]


# ------------------------------------------------------------------------------------ split eval
@dataclass
class SplitResult:
    """Per-example evaluation of one split (lists aligned with ``indices``, the row positions in
    the full split) plus :meth:`means`. Plain lists only, so it pickles for ``all_gather_object``."""

    name: str
    indices: list[int] = field(default_factory=list)
    answer_prob: list[float] = field(default_factory=list)  # exp(-avg NLL) of the answer
    para_prob: list[float] = field(default_factory=list)  # same for the paraphrased answer
    pert_probs: list[list[float]] = field(default_factory=list)  # same for each perturbed answer
    truth_ratio: list[float] = field(default_factory=list)  # P_pert / P_correct
    normalised_prob: list[float] = field(default_factory=list)  # p_ans / (p_ans + sum p_pert)
    rouge_l_recall: list[float] = field(default_factory=list)
    rouge_l_f1: list[float] = field(default_factory=list)
    fact_recall: list[float] = field(default_factory=list)  # nan when the row lists no facts
    repetition: list[float] = field(default_factory=list)
    well_formed: list[bool] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)  # unigram entropy of the generation (bits)
    gen_tokens: list[int] = field(default_factory=list)  # generated length (without eos)
    generation: list[str] = field(default_factory=list)
    truth_ratio_key: str = "paraphrased_answer"  # which answer the truth ratio treats as correct
    n_truncated: int = 0  # rows cut to max_length to be scored (question words dropped; or the answer's end)
    # Metrics not computed because the split lacks their columns (e.g. plain QA data without
    # perturbed answers): one "metric(s): reason" entry each; those values are nan.
    skipped: list[str] = field(default_factory=list)
    has_truth_ratio: bool = True

    PER_EXAMPLE = (
        "indices", "answer_prob", "para_prob", "pert_probs", "truth_ratio", "normalised_prob",
        "rouge_l_recall", "rouge_l_f1", "fact_recall", "repetition", "well_formed", "entropy",
        "gen_tokens", "generation",
    )

    def __len__(self) -> int:
        return len(self.indices)

    def means(self) -> dict[str, float]:
        """Split-level aggregates (nan-aware means; truth ratio in both TOFU aggregations)."""
        return {
            "n": len(self),
            "prob": M.nanmean(self.answer_prob),
            "para_prob": M.nanmean(self.para_prob),
            "normalised_prob": M.nanmean(self.normalised_prob),
            "truth_ratio_mean": M.nanmean(self.truth_ratio),
            "truth_ratio_closer_to_1": M.truth_ratio_score(self.truth_ratio, "closer_to_1_better"),
            "truth_ratio_true_better": M.truth_ratio_score(self.truth_ratio, "true_better"),
            "rouge_l_recall": M.nanmean(self.rouge_l_recall),
            "rouge_l_f1": M.nanmean(self.rouge_l_f1),
            "fact_recall": M.nanmean(self.fact_recall),
            "repetition": M.nanmean(self.repetition),
            "well_formed": M.nanmean([float(w) for w in self.well_formed]),
            "entropy": M.nanmean(self.entropy),
            "gen_tokens": M.nanmean([float(t) for t in self.gen_tokens]),
            "n_truncated": self.n_truncated,
        }

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_truth_ratio_key(name: str, truth_ratio_key: Optional[str] = None) -> str:
    """The answer field the truth ratio of split ``name`` treats as correct: ``truth_ratio_key``
    when given, else ``"answer"`` for real_authors / world_facts and ``"paraphrased_answer"``
    otherwise (TOFU's definition, as in open-unlearning)."""
    if truth_ratio_key is None:
        base = name.split("/")[-1]
        truth_ratio_key = "answer" if base in ANSWER_AS_CORRECT_SPLITS else "paraphrased_answer"
    if truth_ratio_key not in ("answer", "paraphrased_answer"):
        raise ValueError(f"truth_ratio_key must be 'answer' or 'paraphrased_answer', got {truth_ratio_key!r}")
    return truth_ratio_key


def column_present(rows: Sequence[dict], column: str) -> bool:
    """True when every row has a value in ``column`` (a non-empty list for ``perturbed_answer``)."""
    def ok(r: dict) -> bool:
        v = r.get(column)
        return bool(v) if column == "perturbed_answer" else v is not None

    return bool(rows) and all(ok(r) for r in rows)


def evaluate_split(
    model,
    tokenizer,
    rows: Sequence[dict],
    cfg: EvalSettings,
    *,
    name: str = "",
    rank: int = 0,
    world_size: int = 1,
    truth_ratio_key: Optional[str] = None,
    generate: bool = True,
) -> SplitResult:
    """Evaluate ``rows[rank::world_size]`` of one split (pass the *full* split on every rank).

    ``truth_ratio_key``: the answer field the truth ratio treats as correct; default
    ``"answer"`` for real_authors/world_facts and ``"paraphrased_answer"`` otherwise (as in
    open-unlearning). ``generate=False`` skips greedy generation (the slow part) and leaves the
    generation-based metrics (ROUGE-L, fact recall, fluency) ``nan``: enough for truth ratios and
    probabilities, which are the same either way (the retain-model reference needs only those).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    truth_ratio_key = resolve_truth_ratio_key(name, truth_ratio_key)
    cols = _split_columns(rows, truth_ratio_key)
    if cols.skipped and rank == 0:
        log.info("split %r: skipped %s", name, "; ".join(cols.skipped))
    indices = list(range(rank, len(rows), world_size))
    mine = [rows[i] for i in indices]
    out = _run_model(model, tokenizer, rows, mine, cfg, cols, world_size, generate)
    skipped = cols.skipped + ([] if generate else [NOT_GENERATED])
    res = SplitResult(name=name, indices=indices, truth_ratio_key=truth_ratio_key, skipped=skipped,
                      has_truth_ratio=cols.truth_ratio)
    res.n_truncated = sum(
        encode_qa(tokenizer, r["question"], r["answer"], cfg.max_length, template=cfg.template).truncated
        for r in mine
    )
    _score_rows(res, mine, out, cols, cfg)
    return res


@dataclass
class _SplitColumns:
    """The optional columns a split has, decided on the full split so that every rank makes the
    same model calls, and the metrics skipped for lack of them."""

    perturbed: bool
    paraphrased: bool
    truth_ratio: bool
    answer_is_correct: bool  # the truth ratio compares the perturbed answers with "answer"
    skipped: list[str]


def _split_columns(rows: Sequence[dict], truth_ratio_key: str) -> _SplitColumns:
    has_pert = column_present(rows, "perturbed_answer")
    has_para = column_present(rows, "paraphrased_answer")
    answer_is_correct = truth_ratio_key == "answer"
    has_tr = has_pert and (has_para or answer_is_correct)
    skipped = []
    if not has_para:
        skipped.append("para_prob: no paraphrased_answer column")
    if not has_pert:
        skipped.append("truth_ratio, normalised_prob (model utility, forget quality): no perturbed_answer column")
    elif not has_tr:
        skipped.append("truth_ratio (model utility, forget quality): no paraphrased_answer column")
    return _SplitColumns(has_pert, has_para, has_tr, answer_is_correct, skipped)


@dataclass
class _ModelOutputs:
    """Answer log-probabilities and token counts (per row; the perturbed ones flat, row by row)
    and the greedy generations of this rank's rows."""

    answer: tuple[list, list]
    para: tuple[list, list]
    pert: tuple[list, list]
    gens: Optional[list]  # None: generation skipped (evaluate_split(generate=False))


def _run_model(model, tokenizer, rows: Sequence[dict], mine: list[dict], cfg: EvalSettings,
               cols: _SplitColumns, world_size: int, generate: bool = True) -> _ModelOutputs:
    """Every model call of one split on this rank: teacher-forced answer, paraphrase and perturbed
    answers, then (with ``generate``) greedy generation."""
    bs = cfg.batch_size

    # Same number of model calls on every rank (ZeRO-3); computed from the full split, no comms.
    def calls(count_fn) -> Optional[int]:
        return synced_batch_count([sum(count_fn(r) for r in rows[k::world_size]) for k in range(world_size)], bs)

    one = calls(lambda r: 1)
    n_pert = calls(lambda r: len(r["perturbed_answer"])) if cols.perturbed else None
    qs = [r["question"] for r in mine]
    common = dict(batch_size=bs, max_length=cfg.max_length, template=cfg.template)

    # the progress bar's total: answer, paraphrase, generation, and the perturbed answers
    expect(batch_count(len(mine), bs, one) * (1 + generate + cols.paraphrased)
           + (batch_count(sum(len(r["perturbed_answer"]) for r in mine), bs, n_pert) if cols.perturbed else 0))

    answer = answer_logprobs(model, tokenizer, qs, [r["answer"] for r in mine], num_batches=one, **common)
    para: tuple[list, list] = ([float("nan")] * len(mine), [0] * len(mine))
    if cols.paraphrased:
        para = answer_logprobs(
            model, tokenizer, qs, [r["paraphrased_answer"] for r in mine], num_batches=one, **common
        )
    pert: tuple[list, list] = ([], [])
    if cols.perturbed:
        flat_q = [r["question"] for r in mine for _ in r["perturbed_answer"]]
        flat_a = [a for r in mine for a in r["perturbed_answer"]]
        pert = answer_logprobs(model, tokenizer, flat_q, flat_a, num_batches=n_pert, **common)
    gens = greedy_generate(
        model, tokenizer, qs, cfg.max_new_tokens, bs, synced_gpus=cfg.synced_gpus,
        template=cfg.template, num_batches=one, max_length=cfg.max_length,
    ) if generate else None
    return _ModelOutputs(answer, para, pert, gens)


def _score_rows(res: SplitResult, mine: list[dict], out: _ModelOutputs, cols: _SplitColumns,
                cfg: EvalSettings) -> None:
    """Append each row's metrics to ``res`` from the model's outputs."""
    nan = float("nan")
    (a_lp, a_n), (p_lp, p_n), (f_lp, f_n) = out.answer, out.para, out.pert
    pos = 0
    for j, r in enumerate(mine):
        k = len(r["perturbed_answer"]) if cols.perturbed else 0
        pl, pn = f_lp[pos:pos + k], f_n[pos:pos + k]
        pos += k
        ans_p = M.length_normalised_prob(a_lp[j], a_n[j])
        pert_p = [M.length_normalised_prob(lp, n) for lp, n in zip(pl, pn)]
        c_lp, c_n = (a_lp[j], a_n[j]) if cols.answer_is_correct else (p_lp[j], p_n[j])
        res.answer_prob.append(ans_p)
        res.para_prob.append(M.length_normalised_prob(p_lp[j], p_n[j]) if cols.paraphrased else nan)
        res.pert_probs.append(pert_p)
        res.truth_ratio.append(M.truth_ratio(c_lp, c_n, pl, pn, cfg.perturbed_mean) if cols.truth_ratio else nan)
        res.normalised_prob.append(M.normalised_prob(ans_p, pert_p) if cols.perturbed else nan)
        if out.gens is None:  # nan, not the scores of an empty answer
            for values in (res.rouge_l_recall, res.rouge_l_f1, res.fact_recall, res.repetition, res.well_formed,
                           res.entropy, res.gen_tokens):
                values.append(nan)
            res.generation.append("")
            continue
        text, toks, ended = out.gens[j]
        rl = M.rouge_l(text, r["answer"], cfg.rouge_stemmer)
        res.rouge_l_recall.append(rl["recall"])
        res.rouge_l_f1.append(rl["f1"])
        res.fact_recall.append(M.fact_recall(text, r.get("facts") or []))
        res.repetition.append(M.repetition_rate(toks, cfg.repetition_n))
        res.well_formed.append(M.is_well_formed(toks, ended, cfg.max_run))
        res.entropy.append(M.unigram_entropy(toks))
        res.gen_tokens.append(len(toks))
        res.generation.append(text)


def gather_split_results(parts: Sequence[SplitResult]) -> SplitResult:
    """Merge per-rank results (any order) back into one result in the original row order.

    Raises ``ValueError`` if the parts disagree on the split or the indices are not exactly
    ``0..N-1`` once each (a rank missing or evaluated twice)."""
    if not parts:
        raise ValueError("gather_split_results got no parts")
    names = {p.name for p in parts}
    keys = {p.truth_ratio_key for p in parts}
    if len(names) > 1 or len(keys) > 1:
        raise ValueError(f"cannot merge results of different splits/settings: {sorted(names)} {sorted(keys)}")
    pairs = [(idx, p, j) for p in parts for j, idx in enumerate(p.indices)]
    pairs.sort(key=lambda t: t[0])
    got = [t[0] for t in pairs]
    if got != list(range(len(got))):
        raise ValueError(f"per-rank indices do not cover 0..{len(got) - 1} exactly once")
    merged = SplitResult(name=parts[0].name, truth_ratio_key=parts[0].truth_ratio_key)
    merged.n_truncated = sum(p.n_truncated for p in parts)
    merged.skipped, merged.has_truth_ratio = list(parts[0].skipped), parts[0].has_truth_ratio
    for attr in SplitResult.PER_EXAMPLE:
        setattr(merged, attr, [getattr(p, attr)[j] for _, p, j in pairs])
    return merged


# --------------------------------------------------------------------------------- final metrics
def tofu_metrics(
    results: dict[str, SplitResult],
    retain_model_forget_truth_ratios: Optional[Sequence[float]],
    forget_split: str,
    retain_split: str,
    real_authors_split: str = "real_authors",
    world_facts_split: str = "world_facts",
) -> dict[str, Any]:
    """The TOFU summary (plus fluency) from per-split results.

    ``forget_quality`` is the KS-test p-value against the retain model's forget truth ratios
    (``None`` without them). ``model_utility`` is the harmonic mean of retain {prob, ROUGE-L,
    truth ratio true_better} and, for each of real_authors / world_facts present in ``results``,
    {normalised prob, ROUGE-L, truth ratio true_better}; ``model_utility_components`` lists the
    components used. Missing optional splits are skipped (and named in ``model_utility_missing``).
    """
    for s in (forget_split, retain_split):
        if s not in results:
            raise KeyError(f"no evaluation results for split {s!r}; have {sorted(results)}")
    f, r = results[forget_split].means(), results[retain_split].means()
    out: dict[str, Any] = {
        "forget_quality": (
            M.forget_quality_ks(results[forget_split].truth_ratio, retain_model_forget_truth_ratios)
            if retain_model_forget_truth_ratios is not None
            else None
        ),
        "model_utility": None,
        "forget_rouge_l": f["rouge_l_recall"],
        "retain_rouge_l": r["rouge_l_recall"],
        "forget_fact_recall": f["fact_recall"],
        "retain_fact_recall": r["fact_recall"],
        "forget_repetition": f["repetition"],
        "forget_well_formed": f["well_formed"],
        "forget_entropy": f["entropy"],
        "forget_truth_ratio": f["truth_ratio_closer_to_1"],
        "forget_prob": f["prob"],
        "forget_para_prob": f["para_prob"],
        "retain_prob": r["prob"],
        "retain_truth_ratio": r["truth_ratio_true_better"],
        "retain_repetition": r["repetition"],
        "retain_well_formed": r["well_formed"],
    }
    components = {
        "retain_prob": r["prob"],
        "retain_rouge_l": r["rouge_l_recall"],
        "retain_truth_ratio": r["truth_ratio_true_better"],
    }
    missing = []
    for key, split in (("real_authors", real_authors_split), ("world_facts", world_facts_split)):
        if split not in results:
            missing.append(split)
            continue
        m = results[split].means()
        components[f"{key}_prob"] = m["normalised_prob"]
        components[f"{key}_rouge_l"] = m["rouge_l_recall"]
        components[f"{key}_truth_ratio"] = m["truth_ratio_true_better"]
        out[f"{key}_fact_recall"] = m["fact_recall"]
    out.update(components)
    mu = M.model_utility(list(components.values()))
    out["model_utility"] = None if math.isnan(mu) else mu
    out["model_utility_components"] = list(components)
    out["model_utility_missing"] = missing
    return out
