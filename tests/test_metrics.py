"""Model-free metrics, each checked against values computed by hand (arithmetic in comments)."""

import math

import pytest

from pipeline.eval import metrics as M


# ------------------------------------------------------------------------------------- ROUGE-L
def test_rouge_tokens_follow_rouge_score_rules():
    # lowercase; every run outside [a-z0-9] becomes a space (hyphen, apostrophe, accents too)
    assert M.rouge_tokens("Jean-Luc's café, 1975!") == ["jean", "luc", "s", "caf", "1975"]
    assert M.rouge_tokens("  ...  ") == []


def test_lcs_classic_example():
    # Cormen et al.: LCS("ABCBDAB", "BDCABA") = 4 (e.g. "BCBA")
    assert M.lcs_length("ABCBDAB", "BDCABA") == 4
    assert M.lcs_length([], [1, 2]) == 0


ROUGE_PAIRS = [
    ("The author wrote books about running horses.", "She writes a book about a horse that runs."),
    ("Jean-Luc's café, 1975!", "jean luc cafe 1975"),
    ("Her novels were translated into several languages", "Her novel was translated into many languages."),
    ("", "a b"), ("!!!", "a b"), ("studies studying studied", "study"),
]


@pytest.mark.parametrize("stem", [False, True])
def test_rouge_l_equals_rouge_score(stem):
    """The ROUGE-L of the field's package (open-unlearning calls it with use_stemmer=True, our TOFU and
    MUSE data configs set data.rouge_stemmer=true), with and without stemming."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stem)
    for pred, ref in ROUGE_PAIRS:
        want = scorer.score(ref, pred)["rougeL"]
        got = M.rouge_l(pred, ref, stem)
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx(
            (want.precision, want.recall, want.fmeasure), abs=1e-12), (pred, ref)
    # stemming matters on real English: "books"/"book", "running"/"runs" match only when stemmed
    assert M.rouge_l(*ROUGE_PAIRS[0], stem=True)["recall"] > M.rouge_l(*ROUGE_PAIRS[0])["recall"]


def test_rouge_l_values():
    # pred: the cat sat on the mat (6)   ref: the cat is on the mat (6)
    # LCS = the cat on the mat = 5 -> P = R = F = 5/6
    s = M.rouge_l("The cat sat on the mat.", "The cat is on the mat")
    assert s["precision"] == pytest.approx(5 / 6)
    assert s["recall"] == pytest.approx(5 / 6)
    assert s["f1"] == pytest.approx(5 / 6)
    # pred: paris france (2)   ref: it is paris (3)   LCS = 1
    # P = 1/2, R = 1/3, F = 2 * (1/6) / (5/6) = 2/5
    s = M.rouge_l("Paris, France!", "It is Paris")
    assert (s["precision"], s["recall"], s["f1"]) == pytest.approx((0.5, 1 / 3, 0.4))
    # order matters: LCS("b a", "a b") = 1 -> recall 1/2
    assert M.rouge_l("b a", "a b")["recall"] == pytest.approx(0.5)
    # no tokens on either side -> all zero (as rouge_score)
    assert M.rouge_l("", "a b") == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert M.rouge_l("!!!", "a b")["f1"] == 0.0
    # disjoint -> 0
    assert M.rouge_l("x y", "a b")["recall"] == 0.0


# --------------------------------------------------------------------------- probabilities / TR
def test_length_normalised_prob():
    # sum log p = -3 over 3 tokens -> exp(-1)
    assert M.length_normalised_prob(-3.0, 3) == pytest.approx(math.exp(-1))
    assert math.isnan(M.length_normalised_prob(-1.0, 0))


def test_truth_ratio_geometric_and_arithmetic():
    # correct (paraphrase): sum -2 over 2 tokens -> avg -1 -> P_c = e^-1
    # perturbed: -3 over 1 token (avg -3), -4 over 2 tokens (avg -2)
    # geometric (TOFU code): exp(mean(-3, -2)) / e^-1 = exp(-2.5 + 1) = e^-1.5 = 0.2231301601...
    tr = M.truth_ratio(-2.0, 2, [-3.0, -4.0], [1, 2])
    assert tr == pytest.approx(0.22313016014842982)
    # arithmetic (TOFU paper): (e^-3 + e^-2) / 2 / e^-1 = (e^-2 + e^-1) / 2
    #   = (0.1353352832 + 0.3678794412) / 2 = 0.2516073622
    tr = M.truth_ratio(-2.0, 2, [-3.0, -4.0], [1, 2], perturbed_mean="arithmetic")
    assert tr == pytest.approx(0.2516073622040275)
    # equal likelihoods -> 1
    assert M.truth_ratio(-1.0, 1, [-2.0], [2]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        M.truth_ratio(-1.0, 1, [-1.0], [1], perturbed_mean="median")


def test_truth_ratio_scores():
    trs = [0.5, 2.0, 1.0]
    # closer_to_1_better: mean(min(0.5, 2), min(2, 0.5), min(1, 1)) = (0.5 + 0.5 + 1) / 3 = 2/3
    assert M.truth_ratio_score(trs, "closer_to_1_better") == pytest.approx(2 / 3)
    # true_better: mean(max(0, 0.5), max(0, -1), max(0, 0)) = 0.5 / 3 = 1/6
    assert M.truth_ratio_score(trs, "true_better") == pytest.approx(1 / 6)
    # non-finite entries are skipped: only 0.5 left -> 0.5
    assert M.truth_ratio_score([0.5, float("nan")], "true_better") == pytest.approx(0.5)
    with pytest.raises(ValueError):
        M.truth_ratio_score(trs, "max")


def test_normalised_prob():
    # 0.5 / (0.5 + 0.25 + 0.25) = 0.5
    assert M.normalised_prob(0.5, [0.25, 0.25]) == pytest.approx(0.5)
    # 0.2 / (0.2 + 0.6) = 0.25
    assert M.normalised_prob(0.2, [0.6]) == pytest.approx(0.25)



def _open_unlearning_tofu(correct_avg_nll, wrong_avg_nlls):
    """open-unlearning d3d7cf9 written out (memorization.py ``truth_ratio`` with ``aggregate_to_1D``
    over the perturbed avg losses, ``probability_w_options``): (truth ratio, closer_to_1_better of it,
    normalised probability)."""
    import numpy as np

    correct_prob = np.exp(-correct_avg_nll)
    wrong_prob = np.exp(-np.mean(wrong_avg_nlls))
    tr = wrong_prob / (correct_prob + 1e-10)
    closer = np.mean(np.minimum(np.array([tr]), 1 / (np.array([tr]) + 1e-10)))
    norm = correct_prob / (correct_prob + np.exp(-np.array(wrong_avg_nlls)).sum() + 1e-10)
    return tr, closer, norm


@pytest.mark.parametrize("correct, wrong", [
    (2.0, [2.5, 3.0]),  # a working model
    (30.0, [31.0, 29.5, 32.0]),  # collapsed: probabilities below the 1e-10
    (45.0, [44.0, 46.0]),
    (720.0, [5.0]),  # diverged: exp(720) overflowed (OverflowError) before
])
def test_truth_ratio_and_normalised_prob_equal_open_unlearning_also_for_a_collapsed_model(correct, wrong):
    n = 10
    tr = M.truth_ratio(-correct * n, n, [-w * n for w in wrong], [n] * len(wrong))
    norm = M.normalised_prob(math.exp(-correct), [math.exp(-w) for w in wrong])
    their_tr, their_closer, their_norm = _open_unlearning_tofu(correct, wrong)
    assert math.isfinite(tr)
    assert tr == pytest.approx(their_tr, rel=1e-9)
    assert M.truth_ratio_score([tr], "closer_to_1_better") == pytest.approx(their_closer, rel=1e-9, abs=1e-300)
    assert norm == pytest.approx(their_norm, rel=1e-9, abs=1e-300)


def test_an_infinite_truth_ratio_scores_zero_not_dropped():
    # open-unlearning: min(inf, 1/(inf + 1e-10)) = 0, max(0, 1 - inf) = 0; only nan (no tokens) is skipped
    assert M.truth_ratio_score([1.0, float("inf")], "closer_to_1_better") == pytest.approx(0.5)
    assert M.truth_ratio_score([0.0, float("inf")], "true_better") == pytest.approx(0.5)
    assert M.truth_ratio_score([0.5, float("nan"), None], "true_better") == pytest.approx(0.5)


# ----------------------------------------------------------------------------------- KS p-value
def test_forget_quality_ks_exact_small_samples():
    # Under H0 the C(6,3) = 20 ways to interleave two samples of 3 are equally likely.
    # Disjoint samples: D = 1, reached only by "aaabbb" and "bbbaaa" -> p = 2/20 = 0.1
    assert M.forget_quality_ks([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1)
    # Four vs four, disjoint: p = 2 / C(8,4) = 2/70
    assert M.forget_quality_ks([1, 2, 3, 4], [5, 6, 7, 8]) == pytest.approx(2 / 70)
    # a = [1,2,4], b = [3,5,6]: ECDF gap after 2 is 2/3 - 0 -> D = 2/3.
    # Paths with max |i - j| <= 1 (D <= 1/3) must take each step pair as ab or ba: 2^3 = 8 of 20.
    # p = P(D >= 2/3) = (20 - 8) / 20 = 0.6
    assert M.forget_quality_ks([1, 2, 4], [3, 5, 6]) == pytest.approx(0.6)
    # Perfect interleaving a=[1,3,5], b=[2,4,6]: D = 1/3, the smallest possible value -> p = 1
    assert M.forget_quality_ks([1, 3, 5], [2, 4, 6]) == pytest.approx(1.0)
    # 1/x is monotone: testing 1/TR (older open-unlearning code) gives the same p-value
    assert M.forget_quality_ks([1, 1 / 2, 1 / 4], [1 / 3, 1 / 5, 1 / 6]) == pytest.approx(0.6)
    assert math.isnan(M.forget_quality_ks([], [1.0]))


# ---------------------------------------------------------------------------------- utility
def test_model_utility_harmonic_mean():
    # 3 / (1/1 + 1/0.5 + 1/0.25) = 3 / (1 + 2 + 4) = 3/7
    assert M.model_utility([1.0, 0.5, 0.25]) == pytest.approx(3 / 7)
    # a zero component makes the harmonic mean 0
    assert M.model_utility([0.9, 0.0, 0.8]) == 0.0
    assert math.isnan(M.model_utility([0.5, float("nan")]))
    with pytest.raises(ValueError):
        M.model_utility([0.5, -0.1])


# ------------------------------------------------------------------------------ generations
def test_fact_recall():
    gen = "She was born in Paris, France in 1975."
    # "paris" and "1975" appear, "london" does not -> 2/3
    assert M.fact_recall(gen, ["Paris", "1975", "London"]) == pytest.approx(2 / 3)
    # word boundaries: "97" is inside "1975" but is not a word of the generation -> 0
    assert M.fact_recall(gen, ["97"]) == 0.0
    # normalisation: "New-York" == "new york"; multi-word fact -> 1
    assert M.fact_recall("lives in new york now", ["New-York"]) == 1.0
    assert math.isnan(M.fact_recall(gen, []))


def test_repetition_rate():
    # bigrams of 1 2 1 2 1: (1,2) (2,1) (1,2)* (2,1)* -> 2 repeats of 4 = 0.5
    assert M.repetition_rate([1, 2, 1, 2, 1]) == pytest.approx(0.5)
    assert M.repetition_rate([1, 2, 3]) == 0.0
    assert M.repetition_rate([5]) == 0.0  # no bigram at all
    # unigrams of a a b: a, a*, b -> 1/3
    assert M.repetition_rate(["a", "a", "b"], n=1) == pytest.approx(1 / 3)
    # 7 7 7 7: bigrams (7,7) x3, two repeats -> 2/3
    assert M.repetition_rate([7, 7, 7, 7]) == pytest.approx(2 / 3)


def test_well_formed():
    assert M.is_well_formed([1, 2, 3], ended_with_eos=True)
    assert not M.is_well_formed([1, 2, 3], ended_with_eos=False)  # hit the token limit
    assert not M.is_well_formed([1, 1, 1, 2], ended_with_eos=True)  # run of 3
    assert M.is_well_formed([1, 1, 2, 2], ended_with_eos=True)  # runs of 2 are fine
    assert M.is_well_formed([1, 1, 1, 2], ended_with_eos=True, max_run=4)
    assert M.longest_run([3, 3, 4, 4, 4, 3]) == 3


def test_unigram_entropy():
    # two symbols, equal counts -> 1 bit; four distinct -> log2 4 = 2; a single symbol -> 0
    assert M.unigram_entropy([1, 2, 1, 2]) == pytest.approx(1.0)
    assert M.unigram_entropy([1, 2, 3, 4]) == pytest.approx(2.0)
    assert M.unigram_entropy([7, 7, 7]) == 0.0
    assert M.unigram_entropy([]) == 0.0
