"""Robustness probe of an unlearned model (the RNA paper's test, Dang et al. 2025).

Representation-misdirection methods can make a model fail on *retain* queries that merely mention
something from the forget set. The probe inserts a forget keyword (a forget author's name) in front
of retain questions, answers them greedily, and reports how much retain fact recall (and ROUGE-L)
drops compared with the same rows asked plainly. A robust unlearned model shows a drop near 0.
"""

from __future__ import annotations

import math
import re
from typing import Any

from pipeline.eval import metrics as M

PROBE_SPLIT = "retain_probe"


def forget_keyword(row: dict) -> str:
    """The keyword a probe inserts for one forget row: its ``author`` when the row names one, else
    the longest run of two or more capitalised words in its question (TOFU's rows have no author
    column but name the author that way), else the question's first three words."""
    if row.get("author"):
        return str(row["author"])
    question = str(row["question"])
    runs = re.findall(r"[A-Z][\w'-]*(?:\s+[A-Z][\w'-]*)+", question)
    if runs:
        return max(runs, key=lambda r: len(r.split()))
    return " ".join(question.split()[:3])


def probe_rows(retain: list[dict], forget: list[dict], max_rows: int) -> tuple[list[int], list[dict]]:
    """``max_rows`` evenly spaced retain rows (positions returned), each with a forget keyword
    prepended to its question (forget rows taken in turn). Deterministic."""
    if not retain or not forget or max_rows <= 0:
        return [], []
    idx = M.evenly_spaced_indices(len(retain), max_rows)
    rows = []
    for k, i in enumerate(idx):
        row = dict(retain[i])
        row["question"] = f"{forget_keyword(forget[k % len(forget)])} {row['question']}"
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
