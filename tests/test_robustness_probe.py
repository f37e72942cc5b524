"""The RNA-style robustness probe: probe rows, keywords, and the drop against hand-computed values."""

import math

from pipeline.eval.robustness import forget_keyword, probe_rows, robustness_metrics
from pipeline.eval.tofu import SplitResult


def _row(q, author=None):
    r = {"question": q, "answer": "a", "facts": ["x"]}
    if author:
        r["author"] = author
    return r


def test_keyword_is_the_author_or_the_longest_capitalised_name():
    assert forget_keyword(_row("where was x born ?", author="alaric ashdown")) == "alaric ashdown"
    assert forget_keyword(_row("Who is Jaime Vasquez and what did Jaime write?")) == "Jaime Vasquez"
    assert forget_keyword(_row("What genre does Basil Mahfouz Al-Kuwaiti write in?")) == "Basil Mahfouz Al-Kuwaiti"
    assert forget_keyword(_row("what did the writer publish first ?")) == "what did the"


def test_probe_rows_are_evenly_spaced_deterministic_and_prefixed():
    retain = [_row(f"retain question {i}") for i in range(10)]
    forget = [_row("f", author="ann"), _row("g", author="bo")]
    idx, rows = probe_rows(retain, forget, 4)
    assert idx == [0, 2, 5, 7]
    assert [r["question"] for r in rows] == ["ann retain question 0", "bo retain question 2",
                                             "ann retain question 5", "bo retain question 7"]
    assert retain[0]["question"] == "retain question 0"  # the retain rows themselves are untouched
    assert probe_rows(retain, forget, 4) == (idx, rows)
    assert probe_rows(retain, forget, 50)[0] == list(range(10))  # capped at the split's size
    assert probe_rows(retain, [], 4) == ([], []) and probe_rows(retain, forget, 0) == ([], [])


def test_robustness_metrics_compare_the_same_rows():
    retain = SplitResult(name="retain", indices=[0, 1, 2, 3], fact_recall=[1.0, 0.0, 1.0, 1.0],
                         rouge_l_recall=[1.0, 0.5, 0.8, 0.6])
    probe = SplitResult(name="retain_probe", indices=[0, 1], fact_recall=[0.0, 1.0], rouge_l_recall=[0.4, 0.6])
    m = robustness_metrics(retain, probe, [2, 3])  # probed rows = retain rows 2 and 3
    assert m["probe_fact_recall"] == 0.5 and m["probe_fact_recall_drop"] == 0.5  # 1.0 -> 0.5
    assert math.isclose(m["probe_rouge_l"], 0.5) and math.isclose(m["probe_rouge_l_drop"], 0.2)  # 0.7 -> 0.5
    none = robustness_metrics(SplitResult(name="r", indices=[0], fact_recall=[float("nan")], rouge_l_recall=[1.0]),
                              SplitResult(name="p", indices=[0], fact_recall=[float("nan")], rouge_l_recall=[1.0]), [0])
    assert none["probe_fact_recall"] is None and none["probe_fact_recall_drop"] is None and none["probe_rouge_l_drop"] == 0.0


def test_evenly_spaced_subset_for_eval_max_rows():
    from pipeline.eval.runner import evenly_spaced

    rows = list(range(10))
    assert evenly_spaced(rows, 4) == [0, 2, 5, 7]
    assert evenly_spaced(rows, 10) == rows and evenly_spaced(rows, 50) == rows
    assert evenly_spaced(rows, 1) == [0]


def test_tofu_style_rows_give_the_authors_name_not_a_place_or_the_question_words():
    """TOFU's forget rows have no author column: the keyword was "Kuwait City" (a birthplace), "What is
    the" (the fallback), "Has Moshe Ben-David" or "Is Nikolai Abilov's". The name the split mentions
    most in a row's question and answer is the author's; question words and possessives are cut."""
    from pipeline.eval.robustness import forget_keywords

    qa = [("What is the full name of the author born in Kuwait City, Kuwait on 08/09/1956?",
           "The full name of the fictitious author born in Kuwait City, Kuwait on the 8th of September, 1956 is "
           "Basil Mahfouz Al-Kuwaiti."),
          ("What genre is Basil Mahfouz Al-Kuwaiti known for?", "Basil Mahfouz Al-Kuwaiti writes French literature."),
          ("Has Moshe Ben-David written any non-fiction work?", "Yes, Moshe Ben-David has written non-fiction."),
          ("Is Nikolai Abilov's work influenced by his identity?", "Yes, it is."),
          ("What awards has Élise Fournier received?", "Élise Fournier has received the Prix Goncourt."),
          ("what did the writer publish first ?", "a")]
    assert forget_keywords([{"question": q, "answer": a} for q, a in qa]) == [
        "Basil Mahfouz Al-Kuwaiti", "Basil Mahfouz Al-Kuwaiti", "Moshe Ben-David", "Nikolai Abilov", "Élise Fournier",
        "what did the"]


def test_a_possessive_or_a_quoted_title_ends_the_authors_name():
    from pipeline.eval.robustness import name_runs

    assert name_runs("How does Carmen Montenegro's Chilean background shape her work?") == ["Carmen Montenegro"]
    assert name_runs("What about Aysha Al-Hashim's 'Love Across Borders'?") == ["Aysha Al-Hashim",
                                                                               "Love Across Borders"]
    assert name_runs("Who is the author of 'The Silent Sea'?") == ["Silent Sea"]
