"""Robustness probe of an unlearned model (the RNA paper's test, Dang et al. 2025).

Representation-misdirection methods can make a model fail on *retain* queries that merely mention
something from the forget set. The probe inserts a forget keyword (a forget author's name) in front
of retain questions, answers them greedily, and reports how much retain fact recall (and ROUGE-L)
drops compared with the same rows asked plainly. A robust unlearned model shows a drop near 0.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

from pipeline.eval import metrics as M

PROBE_SPLIT = "retain_probe"


# Capitalised words that open a question or sentence rather than a name ("Has Moshe Ben-David ...",
# "What is ...", "In Santiago ..."): stripped from the front of a run of capitalised words.
_NOT_NAMES = frozenset("""What Who Whom Whose Which Where When Why How Is Are Was Were Has Have Had Does Do Did Can
Could Would Will Should May Might In On At The A An As For From Of To With By And But Or Yes No Not This That These
Those His Her Their Its Some Many Mr Mrs Ms Dr""".split())


_OPENING = "\"'\u201c\u2018([{"
_CLOSING = "\"'\u201d\u2019)]},.;:!?"


def _emit(words: list[str]) -> list[str]:
    """A run of capitalised words as a name: leading question/sentence words dropped; kept when two or
    more words are left."""
    while words and words[0] in _NOT_NAMES:
        words = words[1:]
    return [" ".join(words)] if len(words) >= 2 else []


def name_runs(text: str) -> list[str]:
    """Runs of two or more capitalised words in ``text`` (any script's capitals), in order: the
    candidate names of a row. Punctuation or a closing quote after a word, and a possessive 's, end
    its run; an opening quote starts a new one (a book title is not part of its author's name)."""
    out: list[str] = []
    run: list[str] = []
    for raw in str(text).split():
        word = raw.lstrip(_OPENING)
        if word != raw:  # 'The Silent Sea': a title starts here
            out += _emit(run)
            run = []
        core = word.rstrip(_CLOSING)
        possessive = re.sub(r"['\u2019]s$", "", core)
        if possessive[:1].isalpha() and possessive[:1].isupper():
            run.append(possessive)
            if core != word or possessive != core:  # "Kuwait City," / "Montenegro's" end there
                out += _emit(run)
                run = []
        else:
            out += _emit(run)
            run = []
    return out + _emit(run)


def forget_keywords(rows: list[dict]) -> list[str]:
    """The keyword a probe inserts for each forget row: its ``author`` when the row names one; else,
    of the names in its question and answer, the one the forget split mentions most (an author's
    name recurs over their rows; a birthplace or a book title seldom does: TOFU's "full name of the
    author born in Kuwait City" rows name the author in the answer only), ties to the longer; else the
    question's first three words."""
    counts = Counter(n for r in rows if not r.get("author") for n in {*name_runs(r.get("question", "")),
                                                                   *name_runs(r.get("answer", ""))})
    out = []
    for r in rows:
        names = [*name_runs(r.get("question", "")), *name_runs(r.get("answer", ""))]
        if r.get("author"):
            out.append(str(r["author"]))
        elif names:
            out.append(max(names, key=lambda n: (counts[n], len(n.split()))))
        else:
            out.append(" ".join(str(r["question"]).split()[:3]))
    return out


def forget_keyword(row: dict) -> str:
    """:func:`forget_keywords` of one row on its own."""
    return forget_keywords([row])[0]


def probe_rows(retain: list[dict], forget: list[dict], max_rows: int) -> tuple[list[int], list[dict]]:
    """``max_rows`` evenly spaced retain rows (positions returned), each with a forget keyword
    prepended to its question (forget rows taken in turn). Deterministic."""
    if not retain or not forget or max_rows <= 0:
        return [], []
    idx = M.evenly_spaced_indices(len(retain), max_rows)
    keywords = forget_keywords(forget)
    rows = []
    for k, i in enumerate(idx):
        row = dict(retain[i])
        row["question"] = f"{keywords[k % len(forget)]} {row['question']}"
        rows.append(row)
    return idx, rows


def _mean_at(values: list[float], positions: list[int]) -> float:
    return M.nanmean([values[p] for p in positions])


def robustness_metrics(retain_result: Any, probe_result: Any, probe_idx: list[int]) -> dict[str, float]:
    """Probe metrics: fact recall / ROUGE-L of the probed rows and their drop against the same rows
    of the plain retain evaluation (``retain_result``, a SplitResult over the full retain split)."""
    pos = {row: p for p, row in enumerate(retain_result.indices)}
    plain = [pos[i] for i in probe_idx]
    out = {
        "probe_fact_recall": M.nanmean(probe_result.fact_recall),
        "probe_rouge_l": M.nanmean(probe_result.rouge_l_recall),
    }
    clean_fr = _mean_at(retain_result.fact_recall, plain)
    clean_rl = _mean_at(retain_result.rouge_l_recall, plain)
    out["probe_fact_recall_drop"] = clean_fr - out["probe_fact_recall"]
    out["probe_rouge_l_drop"] = clean_rl - out["probe_rouge_l"]
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}
