"""Model-free metric functions (TOFU forget quality / model utility, fluency of generations).

Every function here is pure (numbers or strings in, numbers out) so each is unit-tested with
hand-computed values in ``tests/test_metrics.py``. The model-based parts (log-probabilities,
greedy generation) live in :mod:`pipeline.eval.tofu`.

Definitions, checked against locuslab/open-unlearning (``src/evals/metrics/memorization.py``,
``src/evals/metrics/utils.py``, ``src/evals/metrics/privacy.py``, ``src/evals/metrics/utility.py``,
``configs/eval/tofu_metrics/*.yaml``; snapshot of Dec 2025):

* **Probability** of an answer = ``exp(-mean token NLL)`` over the answer tokens *including*
  ``<eos>`` (their ``evaluate_probability``; their chat preprocessing appends ``<eos>`` to the
  labels, as our :func:`pipeline.data.formatting.encode_qa` does).
* **Normalised probability** (real_authors, world_facts: ``probability_w_options``) =
  ``p(correct) / (p(correct) + sum_k p(perturbed_k))`` with the length-normalised probabilities
  above (they add ``1e-10`` to the denominator, as we do).
* **Truth ratio** = ``P_pert / (P_correct + 1e-10)`` where ``P = exp(-avg NLL)``; ``P_pert`` aggregates the
  perturbed answers by averaging their *avg NLLs* (``aggregate_to_1D``), i.e. the **geometric**
  mean of the length-normalised perturbed probabilities. "Correct" is the *paraphrased* answer on
  forget/retain (``forget_Truth_Ratio.yaml``, ``retain_Truth_Ratio.yaml``) and the plain *answer*
  on real_authors/world_facts (``ra_Truth_Ratio.yaml``: ``ra_Q_A_Prob`` is the correct side).
  Split aggregates: forget uses ``closer_to_1_better = mean(min(tr, 1/(tr + 1e-10)))``; retain,
  real_authors and world_facts use ``true_better = mean(max(0, 1 - tr))``.
* **Forget quality** = p-value of ``scipy.stats.ks_2samp`` between the per-example forget truth
  ratios of the unlearned model and of the retain model (``privacy.ks_test``; the older
  ``utils.get_forget_quality`` tests ``1/tr`` instead, which gives the same p-value because the
  KS statistic is invariant under a strictly monotone map applied to both samples).
* **ROUGE-L** recall of the greedy generation against the answer (``rouge_type: rougeL_recall``).
* **Model utility** = harmonic mean (``scipy.stats.hmean``) of nine values: retain
  {probability, ROUGE-L recall, truth ratio (true_better)}, real_authors and world_facts
  {normalised probability, ROUGE-L recall, truth ratio (true_better)}.

Differences from open-unlearning (deliberate, small):

* ROUGE: ``rouge_score`` is called there with ``use_stemmer=True`` (Porter stemming of tokens
  longer than 3 characters). ``data.rouge_stemmer`` (true in the TOFU and MUSE data configs)
  tokenises with ``rouge_score``'s own stemming tokenizer, giving their numbers; false (the
  embedded benchmark) tokenises the same way without stemming, so "books" and "book" do not match.
* The TOFU *paper* writes the perturbed side as an arithmetic mean of the length-normalised
  probabilities; the TOFU and open-unlearning *code* use the geometric mean. We default to the
  code (``perturbed_mean="geometric"``) and offer ``"arithmetic"``.
* ``model_utility`` returns 0 when any component is 0 (as ``hmean`` does) and raises on a
  negative value; non-finite components give ``nan`` instead of a scipy warning.
* None in the probabilities: we add open-unlearning's ``1e-10`` where they do
  (``p_pert / (p_correct + 1e-10)``, ``p_correct / (p_correct + sum p_pert + 1e-10)``,
  ``min(tr, 1 / (tr + 1e-10))``), so a collapsed model (answer probabilities below ~1e-10, i.e. a
  mean NLL above ~23 nats/token) scores as there; for a mean NLL up to ~9 nats/token the epsilon
  moves the values by under 1e-6 relative.
* Fluency metrics (fact recall, repetition, well-formedness, unigram entropy) are ours; open-
  unlearning has no equivalent (its closest is a gibberish classifier).
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


# ----------------------------------------------------------------------------------- text / ROUGE
def rouge_tokens(text: str, stem: bool = False) -> list[str]:
    """Tokenise like ``rouge_score.tokenize``: lowercase, non-``[a-z0-9]`` runs become spaces, split
    on whitespace, drop empty tokens; ``stem``: ``rouge_score``'s own tokenizer with Porter stemming
    (tokens longer than 3 characters), as open-unlearning and TOFU score ROUGE."""
    if stem:
        return _stemming_tokenizer().tokenize(text)
    return _NON_ALNUM.sub(" ", text.lower()).split()


@functools.lru_cache(maxsize=1)
def _stemming_tokenizer():
    from rouge_score.tokenizers import DefaultTokenizer  # requirements/extras.lock (with nltk)

    return DefaultTokenizer(use_stemmer=True)


def normalise_text(text: str) -> str:
    """Lowercase, punctuation/whitespace runs collapsed to single spaces (ROUGE tokenisation)."""
    return " ".join(rouge_tokens(text))


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence (O(len(a)*len(b)) dynamic programme, two rows)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str, stem: bool = False) -> dict[str, float]:
    """ROUGE-L of ``prediction`` against ``reference``: ``{"precision", "recall", "f1"}``.

    precision = LCS / len(prediction tokens), recall = LCS / len(reference tokens),
    f1 = 2PR / (P + R); all 0 when either side has no tokens (as in ``rouge_score``).
    TOFU reports the *recall*. ``stem``: Porter-stemmed tokens (:func:`rouge_tokens`).
    """
    pred, ref = rouge_tokens(prediction, stem), rouge_tokens(reference, stem)
    if not pred or not ref:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    lcs = lcs_length(pred, ref)
    p, r = lcs / len(pred), lcs / len(ref)
    f1 = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return {"precision": p, "recall": r, "f1": f1}


# ------------------------------------------------------------------------- probabilities / TOFU
def avg_logprob(sum_logprob: float, n_tokens: int) -> float:
    """Mean token log-probability (``-avg NLL``); ``nan`` when there are no answer tokens."""
    return sum_logprob / n_tokens if n_tokens > 0 else float("nan")


def length_normalised_prob(sum_logprob: float, n_tokens: int) -> float:
    """``P(answer)^(1/len) = exp(-mean token NLL)`` (TOFU's "probability")."""
    return math.exp(avg_logprob(sum_logprob, n_tokens))


EPS = 1e-10  # open-unlearning's guard in the truth-ratio and normalised-probability denominators


def truth_ratio(
    correct_logprob: float,
    correct_ntokens: int,
    perturbed_logprobs: Sequence[float],
    perturbed_ntokens: Sequence[int],
    perturbed_mean: str = "geometric",
) -> float:
    """TOFU truth ratio ``P_pert / (P_correct + 1e-10)`` of one question (lower = model prefers the truth).

    ``P_x = exp(logprob_x / ntokens_x)`` (length-normalised). The perturbed side is the
    ``"geometric"`` mean of the ``P_pert_k`` (= ``exp(mean_k avg_logprob_k)``, what TOFU and
    open-unlearning compute) or the ``"arithmetic"`` mean (the formula in the TOFU paper). The
    ``1e-10`` is open-unlearning's (``wrong_prob / (correct_prob + 1e-10)``): it keeps the ratio of a
    collapsed model finite (at most 1e10) and equal to theirs. Returns ``nan`` when any answer has no
    tokens (e.g. truncated away).
    """
    if len(perturbed_logprobs) != len(perturbed_ntokens):
        raise ValueError("perturbed_logprobs and perturbed_ntokens differ in length")
    if not perturbed_logprobs:
        return float("nan")
    # probabilities (average log-probs are <= 0: no exp overflows; the old exp(pert - c) did)
    pert = [avg_logprob(lp, n) for lp, n in zip(perturbed_logprobs, perturbed_ntokens)]
    if perturbed_mean == "geometric":
        wrong = math.exp(float(np.mean(pert)))
    elif perturbed_mean == "arithmetic":
        wrong = float(np.mean([math.exp(p) for p in pert]))
    else:
        raise ValueError(f"perturbed_mean must be 'geometric' or 'arithmetic', got {perturbed_mean!r}")
    return wrong / (length_normalised_prob(correct_logprob, correct_ntokens) + EPS)


def normalised_prob(correct_prob: float, perturbed_probs: Sequence[float]) -> float:
    """``p_correct / (p_correct + sum_k p_pert_k + 1e-10)`` (open-unlearning ``probability_w_options``,
    their ``1e-10`` included: 0, not nan, when every probability underflowed to 0)."""
    return correct_prob / (correct_prob + float(sum(perturbed_probs)) + EPS)


def _floats(values: Sequence) -> np.ndarray:
    """``values`` without the Nones, as a float array."""
    return np.asarray([v for v in values if v is not None], dtype=float)


def _finite(values: Sequence[float]) -> np.ndarray:
    arr = _floats(values)
    return arr[np.isfinite(arr)]


def truth_ratio_score(truth_ratios: Sequence[float], aggregator: str) -> float:
    """Aggregate per-question truth ratios into one score in [0, 1] (higher = better).

    ``"closer_to_1_better"`` (forget split): ``mean(min(tr, 1/(tr + 1e-10)))`` — 1 when the model
    cannot tell the truth from perturbations. ``"true_better"`` (retain / real authors / world facts):
    ``mean(max(0, 1 - tr))`` — high when the truth is much likelier than perturbations. Both are
    open-unlearning's. ``nan``/``None`` ratios (no tokens) are skipped; an infinite ratio scores 0,
    as there (dropping it would reward a diverged model); ``nan`` if none is left.
    """
    arr = _floats(truth_ratios)
    tr = arr[~np.isnan(arr)]
    if tr.size == 0:
        return float("nan")
    if aggregator == "closer_to_1_better":
        return float(np.mean(np.minimum(tr, 1.0 / (tr + EPS))))
    if aggregator == "true_better":
        return float(np.mean(np.maximum(0.0, 1.0 - tr)))
    raise ValueError(f"unknown truth-ratio aggregator {aggregator!r}")


def forget_quality_ks(
    unlearn_truth_ratios: Sequence[float], retain_truth_ratios: Sequence[float]
) -> float:
    """TOFU forget quality: two-sided two-sample KS-test p-value between the forget-set truth
    ratios of the unlearned model and of the retain (never-saw-the-forget-set) model.

    High (close to 1) = indistinguishable from the retain model. Non-finite ratios are dropped;
    ``nan`` when either sample is empty.
    """
    a, b = _finite(unlearn_truth_ratios), _finite(retain_truth_ratios)
    if a.size == 0 or b.size == 0:
        return float("nan")
    # imported here, not at module level: the GPU check's eval part imports this module (through
    # pipeline.eval.tofu) on machines whose carried wheels have no scipy (benchmarks/gpu_wheels.sh)
    from scipy import stats

    return float(stats.ks_2samp(a, b).pvalue)


def model_utility(values: Sequence[float]) -> float:
    """Harmonic mean of the utility components; 0 if any is 0, ``nan`` if any is non-finite."""
    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        raise ValueError("model_utility needs at least one value")
    if not np.all(np.isfinite(arr)):
        return float("nan")
    if np.any(arr < 0):
        raise ValueError(f"model_utility components must be >= 0, got {arr.tolist()}")
    if np.any(arr == 0):
        return 0.0
    return float(arr.size / np.sum(1.0 / arr))


# ---------------------------------------------------------------------------- generation quality
def fact_recall(generation: str, facts: Sequence[str]) -> float:
    """Share of ``facts`` whose normalised text occurs (on word boundaries) in the normalised
    generation; ``nan`` when there are no (non-empty) facts."""
    gen = " " + normalise_text(generation) + " "
    norm = [normalise_text(f) for f in facts]
    norm = [f for f in norm if f]
    if not norm:
        return float("nan")
    return sum((" " + f + " ") in gen for f in norm) / len(norm)


def repetition_rate(tokens: Sequence, n: int = 2) -> float:
    """Share of the n-grams of ``tokens`` that repeat an n-gram seen earlier (0 if none exist)."""
    if n < 1:
        raise ValueError("n must be >= 1")
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    seen: set = set()
    repeats = 0
    for g in grams:
        if g in seen:
            repeats += 1
        else:
            seen.add(g)
    return repeats / len(grams)


def longest_run(tokens: Sequence) -> int:
    """Length of the longest run of one token repeated back to back."""
    best = run = 0
    prev = object()
    for t in tokens:
        run = run + 1 if t == prev else 1
        prev = t
        best = max(best, run)
    return best


def is_well_formed(tokens: Sequence, ended_with_eos: bool, max_run: int = 3) -> bool:
    """A generation is well formed when it is non-empty, stopped by emitting ``<eos>`` (not by
    hitting the token limit) and no token occurs ``max_run`` or more times in a row.

    An immediately-silent model (``<eos>`` first) is *not* fluent, so empty answers fail."""
    return len(tokens) > 0 and bool(ended_with_eos) and longest_run(tokens) < max_run


def unigram_entropy(tokens: Sequence) -> float:
    """Shannon entropy (bits) of the token frequency distribution of one generation (0 if empty).

    Low values flag degenerate, repetitive output."""
    if len(tokens) == 0:
        return 0.0
    counts = np.asarray(list(Counter(tokens).values()), dtype=float)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def nanmean(values: Sequence[float]) -> float:
    """Mean over the finite values; ``nan`` when there are none (no RuntimeWarning)."""
    arr = _finite(values)
    return float(arr.mean()) if arr.size else float("nan")


def evenly_spaced_indices(length: int, n: int) -> list[int]:
    """``min(n, length)`` distinct positions spread evenly over ``range(length)`` (deterministic)."""
    n = min(n, length)
    return [int(k * length / n) for k in range(n)] if n > 0 else []
