"""Gather several runs' ``results.json`` into one comparison (the demo's and sweeps' table)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from pipeline.io import run_config_section

COLUMNS = [
    ("forget_fact_recall", "forget facts"),
    ("retain_fact_recall", "retain facts"),
    ("model_utility", "utility"),
    ("forget_quality", "forget quality"),
    ("forget_rouge_l", "forget R-L"),
    ("retain_rouge_l", "retain R-L"),
    ("forget_repetition", "forget rep."),
    ("forget_well_formed", "well-formed"),
    ("probe_fact_recall_drop", "probe drop"),
]


def load_results(run_dir: Path) -> Optional[dict]:
    p = Path(run_dir) / "results.json"
    return json.loads(p.read_text()) if p.exists() else None


def eval_settings(run_dir: Path) -> Optional[dict]:
    """What makes two runs' rows comparable: ``results.json``'s evaluation record (generation
    length, rows scored per split, truth-ratio reference, dtype; not which splits were reused) and,
    where the run wrote a ``config.yaml`` (training runs do, evaluation-only runs do not), its
    ``data`` section. None when the run has no results."""
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    if results is None:
        return None
    return {"evaluation": evaluation_record(results), "data": run_config_section(run_dir, "data")}


def evaluation_record(results: dict) -> dict:
    """``results.json``'s evaluation record without where and how it ran, which does not change what
    it measured: the splits reused from an earlier attempt, the device(s), and whether the retain
    reference was computed or read from its cache."""
    evaluation = results.get("evaluation") if isinstance(results, dict) else None
    record = {k: v for k, v in (evaluation if isinstance(evaluation, dict) else {}).items()
              if k not in ("reused_splits", "device", "device_by_rank")}
    if isinstance(record.get("retain_reference"), dict):
        record["retain_reference"] = {k: v for k, v in record["retain_reference"].items() if k != "source"}
    return record


def diff_paths(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The dotted paths at which two JSON-like values differ (``rows.forget``), sorted."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += diff_paths(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if a == b else [prefix or "<root>"]


def same_settings(a: Optional[dict], b: Optional[dict]) -> bool:
    """Two :func:`eval_settings` alike: the same evaluation record, and the same data where both know it."""
    if a is None or b is None:
        return False
    return a["evaluation"] == b["evaluation"] and (a["data"] is None or b["data"] is None or a["data"] == b["data"])


def _missing_row(name: str, width: int) -> str:
    """A row without results, padded to ``width`` cells so the markdown table stays a table."""
    return "| " + " | ".join([name, "(no results)", *["-"] * (width - 2)]) + " |"


def gap_closed(target: float, retain: float, value: float) -> Optional[float]:
    """Share of the target→retain gap that ``value`` closes (1 = as the retain model, 0 = as the target)."""
    if target is None or retain is None or value is None or abs(target - retain) < 1e-12:
        return None
    return (target - value) / (target - retain)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-3 and v != 0 else f"{v:.3f}"
    return str(v)


# The ASU checks' forget-quality bar. Forget quality is a KS-test p-value on the forget split's truth
# ratios against the retain model's (40 rows each on the embedded benchmark), so it moves in coarse
# steps: each forget row whose truth ratio moves to the retain model's side lowers the KS statistic by
# 1/40 and multiplies the p-value by 7-15 (KS 0.9 to 0.75). Barely unlearning moves a row or two: 2 steps of
# asu_kl took it from the target's 2.94e-17 (KS 0.9) to 5.59e-15 (KS 0.85, 190x), which "above the
# target's" passed. The bar is 1e3x the target's, i.e. with that target a KS statistic at least 0.075
# below the target's (0.825: 2.0e3x passes); the default demo's asu_kl reaches 4.31e-12, 1.5e5x (KS
# 0.775, on 1 and on 2 ranks): two rows of margin, against numerical noise between machines. TOFU's own
# bar (p >= 0.05: not distinguishable from the retain model) caps it, for a target already close to its
# retain model; the demo's ASU is far below that (the tau sweep in docs/sweeps.md peaks at 1.9e-10).
FORGET_QUALITY_FACTOR = 1e3
FORGET_QUALITY_TOFU = 0.05


def forget_quality_bar(target: Optional[float]) -> Optional[float]:
    """The forget quality a checked row needs: :data:`FORGET_QUALITY_FACTOR` x the target's, at most
    :data:`FORGET_QUALITY_TOFU`; None when the target has none (no retain reference)."""
    return None if target is None else min(FORGET_QUALITY_TOFU, FORGET_QUALITY_FACTOR * target)


def summarise_demo(root: Path, names: list[str], checked: tuple[str, ...] = ("asu_kl",)) -> str:
    """Comparison table of ``root/<name>/results.json`` plus the ASU acceptance checks for the rows
    named in ``checked``; writes ``summary.md`` and ``summary.json`` in ``root`` and returns the markdown."""
    from pipeline.io import atomic_write_json, atomic_write_text

    rows = {n: load_results(root / n) for n in names}
    tgt = (rows.get("target") or {}).get("metrics", {})
    ret = (rows.get("retain") or {}).get("metrics", {})
    header = ["model", "ranks", "tau"] + [c[1] for c in COLUMNS] + ["gap closed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table = []
    for n, r in rows.items():
        if r is None:
            lines.append(_missing_row(n, len(header)))
            continue
        m = r["metrics"]
        gc = gap_closed(tgt.get("forget_fact_recall"), ret.get("forget_fact_recall"), m.get("forget_fact_recall"))
        cells = [n, _fmt(r.get("world_size")), _fmt(r.get("tau"))] + [_fmt(m.get(k)) for k, _ in COLUMNS] + [_fmt(gc)]
        lines.append("| " + " | ".join(cells) + " |")
        table.append({"name": n, "world_size": r.get("world_size"), "tau": r.get("tau"), **{k: m.get(k) for k, _ in COLUMNS}, "gap_closed": gc})
    checks = []
    for n, r in rows.items():
        if r is None or n not in checked or not tgt:
            continue
        m = r["metrics"]
        gc = gap_closed(tgt.get("forget_fact_recall"), ret.get("forget_fact_recall"), m.get("forget_fact_recall"))
        checks += [
            (f"{n}: forget fact recall closes >= 60% of the target->retain gap", gc is not None and gc >= 0.6, _fmt(gc)),
            (f"{n}: retain fact recall >= 0.95x target", m["retain_fact_recall"] >= 0.95 * tgt["retain_fact_recall"],
             f"{m['retain_fact_recall']:.3f} vs {0.95 * tgt['retain_fact_recall']:.3f}"),
            (f"{n}: model utility >= 0.95x target", m["model_utility"] >= 0.95 * tgt["model_utility"],
             f"{m['model_utility']:.3f} vs {0.95 * tgt['model_utility']:.3f}"),
            _forget_quality_check(n, m.get("forget_quality"), tgt.get("forget_quality")),
        ]
    text = "\n".join(["## Unlearning comparison (forget split: "
                      f"{(rows.get('target') or {}).get('forget_split', '?')})", "", *lines, ""])
    if checks:
        text += "\n### ASU checks\n\n" + "\n".join(f"- [{'x' if ok else ' '}] {what} ({val})" for what, ok, val in checks) + "\n"
    text += ("\n`gap closed` = (target - model) / (target - retain) on forget fact recall. ROUGE-L has a template "
             "floor on these templated answers, so fact recall is the criterion. `probe drop` = retain fact recall "
             "lost when a forget author's name is prepended to retain questions (RNA robustness probe; 0 = robust). "
             "`forget quality` = TOFU's KS-test p-value of the forget truth ratios against the retain model's; its "
             f"check asks for {FORGET_QUALITY_FACTOR:g}x the target's (on 40 rows: a KS statistic about 0.075 lower), "
             "since any training raises a near-zero p-value a little.\n")
    atomic_write_text(root / "summary.md", text)
    atomic_write_json(root / "summary.json", {"rows": table, "checks": [{"check": c, "ok": ok, "value": v} for c, ok, v in checks]})
    return text


def _forget_quality_check(name: str, value: Optional[float], target: Optional[float]) -> tuple[str, bool, str]:
    """The ASU check on forget quality (see :data:`FORGET_QUALITY_FACTOR`); fails without a value."""
    bar = forget_quality_bar(target)
    ok = value is not None and bar is not None and value >= bar
    times = f", {value / target:.3g}x target's" if value is not None and target else ""
    return (f"{name}: forget quality >= {FORGET_QUALITY_FACTOR:g}x target's (or >= {FORGET_QUALITY_TOFU}, TOFU's bar)",
            ok, f"{_fmt(value)} vs {_fmt(bar)} needed{times}")


REAL_COLUMNS = [
    ("forget_fact_recall", "forget facts"),
    ("retain_fact_recall", "retain facts"),
    ("world_facts_fact_recall", "held-out facts"),
    ("forget_repetition", "forget rep."),
    ("forget_well_formed", "well-formed"),
    ("forget_entropy", "forget entropy"),
]


def _first_generation(run_dir: Path, split: str) -> Optional[str]:
    p = Path(run_dir) / "eval_details.json"
    if not p.exists():
        return None
    gens = (json.loads(p.read_text()).get(split) or {}).get("generation") or []
    return gens[0] if gens else None


def summarise_real(root: Path, names: list[str], forget_split: str = "forget",
                   first_q: Optional[str] = None) -> str:
    """The real-model demo's table: fact recall on the forget, retain and held-out facts before
    (the ``target`` run, shown as "before") and after each method, forget-answer fluency (repetition, well-formed share, unigram
    entropy), and each model's greedy answer to the first forget question. Writes ``summary.md`` and
    ``summary.json`` in ``root``; returns the markdown."""
    from pipeline.io import atomic_write_json, atomic_write_text

    rows = {n: load_results(root / n) for n in names}
    header = ["model", "steps", "tau"] + [c[1] for c in REAL_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table, examples = [], []
    for n, r in rows.items():
        if r is None:
            lines.append(_missing_row(n, len(header)))
            continue
        m = r["metrics"]
        label = "before (as shipped)" if n == "target" else n
        cells = [label, _fmt(r.get("steps", 0)), _fmt(r.get("tau"))] + [_fmt(m.get(k)) for k, _ in REAL_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
        gen = _first_generation(root / n, forget_split)
        table.append({"name": n, "steps": r.get("steps", 0), "tau": r.get("tau"),
                      **{k: m.get(k) for k, _ in REAL_COLUMNS}, "first_forget_answer": gen})
        if gen is not None:
            examples.append(f"- **{label}**: {gen.strip()!r}")
    text = "\n".join(["## SmolLM2-135M-Instruct: real-world facts before and after unlearning", "", *lines, ""])
    text += ("\nFact recall = share of facts whose value (e.g. the author's name) the greedy answer contains; "
             "`held-out facts` were never trained on. Fluency on the forget answers: `forget rep.` = share of "
             "repeated bigrams, `well-formed` = share of answers that end cleanly, `forget entropy` = unigram "
             "entropy (bits).\n")
    if examples:
        text += f"\nGreedy answer to the first forget question{f' ({first_q!r})' if first_q else ''}:\n\n"
        text += "\n".join(examples) + "\n"
    atomic_write_text(root / "summary.md", text)
    atomic_write_json(root / "summary.json", {"rows": table})
    return text
