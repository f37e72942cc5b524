"""Run results: ``results.json`` (machine-readable), ``report.md`` and comparison tables.

``results.json`` schema (strict JSON: nan/inf are written as ``null``)::

    {"schema": 1, "method": str, "tau": float | null,
     "metrics": {name: number | null | list | str, ...},
     ...extra keys given by the caller (exp_name, run_name, steps, ...)}
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from pipeline.io import atomic_write_json, to_jsonable

RESULTS_FILE = "results.json"
PREVIOUS_RESULTS_FILE = "results.previous.json"  # an earlier run's results.json, set aside by a re-run
SCHEMA_VERSION = 1
RESERVED_KEYS = ("schema", "method", "tau", "metrics")

# name -> (direction, explanation). Direction: "up" higher is better, "down" lower is better,
# "1" closer to one is better, "" informational.
METRIC_INFO: dict[str, tuple[str, str]] = {
    "forget_quality": ("up", "p-value of a two-sample KS test between the forget-set truth ratios of this "
                       "model and of the retain model (never trained on the forget set); high = "
                       "statistically indistinguishable from retraining without the forget set."),
    "model_utility": ("up", "harmonic mean of answer probability, ROUGE-L recall and truth-ratio score "
                      "on the retain set, real authors and world facts (0 if any component is 0)."),
    "forget_rouge_l": ("down", "ROUGE-L recall of greedy answers to forget questions against the true answer."),
    "retain_rouge_l": ("up", "ROUGE-L recall of greedy answers on the retain set."),
    "forget_fact_recall": ("down", "share of the attribute values (facts) of a forget answer that appear in the "
                           "generation."),
    "retain_fact_recall": ("up", "same on the retain set."),
    "forget_repetition": ("down", "share of generated bigrams that repeat an earlier bigram on forget prompts "
                          "(degenerate, looping output is high)."),
    "forget_well_formed": ("up", "share of forget generations that end with <eos> and never repeat a token 3 "
                           "times in a row (ASU's claim: fluent, not gibberish, after forgetting)."),
    "forget_entropy": ("", "mean unigram entropy (bits) of forget generations; collapse to a few tokens is low."),
    "forget_truth_ratio": ("up", "mean of min(TR, 1/TR) on the forget set, TR = P(perturbed)/P(reference) "
                           "with length-normalised probabilities, the reference being the paraphrased answer "
                           "or the answer (results.json: evaluation.truth_ratio_reference); 1 = no preference "
                           "for the truth."),
    "forget_prob": ("down", "mean length-normalised probability exp(-mean NLL) of the forget answers."),
    "forget_para_prob": ("down", "same for the paraphrased forget answers."),
    "retain_prob": ("up", "mean length-normalised probability of the retain answers."),
    "retain_truth_ratio": ("up", "mean of max(0, 1 - TR) on the retain set (truth preferred over perturbations)."),
    "retain_repetition": ("down", "bigram repetition rate of retain generations."),
    "retain_well_formed": ("up", "share of well-formed retain generations."),
    "real_authors_prob": ("up", "P(answer) / (P(answer) + sum P(perturbed)) on real authors."),
    "real_authors_rouge_l": ("up", "ROUGE-L recall on real authors."),
    "real_authors_truth_ratio": ("up", "mean of max(0, 1 - TR) on real authors (TR against the answer)."),
    "world_facts_prob": ("up", "P(answer) / (P(answer) + sum P(perturbed)) on world facts."),
    "world_facts_rouge_l": ("up", "ROUGE-L recall on world facts."),
    "world_facts_truth_ratio": ("up", "mean of max(0, 1 - TR) on world facts."),
    "real_authors_fact_recall": ("up", "fact recall on real authors."),
    "world_facts_fact_recall": ("up", "fact recall on world facts."),
    # robustness probe (pipeline/eval/robustness.py): retain questions with a forget keyword prepended
    "probe_fact_recall": ("up", "fact recall of greedy answers to retain questions with a forget keyword prepended "
                          "(the row's author, else the name its forget split mentions most; RNA-style robustness "
                          "probe)."),
    "probe_rouge_l": ("up", "ROUGE-L recall of greedy answers to those probed retain questions."),
    "probe_fact_recall_drop": ("down", "retain fact recall of the probed rows asked plainly minus asked with the "
                               "forget keyword; 0 = robust, high = forget content in the question breaks answers."),
    "probe_rouge_l_drop": ("down", "the same drop in ROUGE-L recall (plain minus probed); 0 = robust."),
    # MUSE (pipeline/eval/muse.py)
    "verbmem_forget": ("down", "VerbMem: ROUGE-L F1 of greedy continuations of forget-set text prefixes against "
                       "the true continuation (verbatim memorisation)."),
    "knowmem_forget": ("down", "KnowMem on the forget set: ROUGE-L F1 of greedy answers to questions about it "
                       "(knowledge memorisation)."),
    "knowmem_retain": ("up", "KnowMem on the retain set: the same on questions the model must still answer "
                       "(MUSE's utility)."),
    "knowmem_forget_recall": ("down", "KnowMem on the forget set as ROUGE-L recall."),
    "knowmem_retain_recall": ("up", "KnowMem on the retain set as ROUGE-L recall."),
    "privleak": ("0", "PrivLeak: (AUC_retrain − AUC) / (1 − AUC_retrain) × 100 on Min-K% (k = 0.4) scores of "
                 "forget vs holdout texts; 0 = leaks like the retrained model, about −100 = forget texts "
                 "still detectable, positive = over-unlearned."),
    "privleak_auc": ("", "AUC of the Min-K% membership test separating forget from holdout texts."),
}
# Multiple-choice accuracies are named after their split (``<split>_accuracy``): the hazardous
# knowledge (WMDP's ``wmdp-bio``, ``wmdp-cyber``, ``wmdp-chem``) should fall to chance (0.25),
# general knowledge (``mmlu``) stay.
_HAZARD_ACCURACY = ("down", "0-shot multiple-choice accuracy on hazardous-knowledge questions (WMDP); 0.25 = chance.")
_UTILITY_ACCURACY = ("up", "0-shot multiple-choice accuracy on general-knowledge questions (e.g. MMLU).")
_ARROWS = {"up": "↑", "down": "↓", "1": "→1", "0": "→0", "": ""}


def metric_info(name: str) -> tuple[str, str]:
    """(direction, explanation) of metric ``name``: "up" higher is better, "down" lower, "1"/"0"
    closer to that value, "" informational (also for a metric this table does not know)."""
    if name in METRIC_INFO:
        return METRIC_INFO[name]
    if name.endswith("_accuracy"):
        return _HAZARD_ACCURACY if name.startswith("wmdp") else _UTILITY_ACCURACY
    return "", ""


def direction_score(direction: str, value: float) -> float:
    """``value`` as a score where higher is better, for a metric of ``direction`` (:func:`metric_info`;
    an informational one counts higher as better)."""
    return {"down": -value, "1": -abs(value - 1.0), "0": -abs(value)}.get(direction, value)


def write_results(
    run_dir: str | os.PathLike,
    method: str,
    tau: Optional[float],
    metrics: dict[str, Any],
    extra: Optional[dict[str, Any]] = None,
) -> Path:
    """Write ``run_dir/results.json`` atomically; returns its path. ``extra`` keys may not
    shadow ``schema``/``method``/``tau``/``metrics``."""
    extra = dict(extra or {})
    clash = [k for k in RESERVED_KEYS if k in extra]
    if clash:
        raise ValueError(f"extra keys {clash} clash with reserved results.json keys {list(RESERVED_KEYS)}")
    obj = {"schema": SCHEMA_VERSION, "method": method, "tau": tau, "metrics": dict(metrics), **extra}
    return atomic_write_json(Path(run_dir) / RESULTS_FILE, to_jsonable(obj))


# What a run writes beside results.json from the same run: set aside with it, so an interrupted re-run
# leaves none of them next to its own config.yaml. model/ stays with exported_from.json (which
# checkpoint it is the export of): a re-run that trains nothing keeps it instead of exporting again.
RESULT_COMPANIONS = ("report.md", "train_history.json", "eval_details.json")


def set_aside_results(run_dir: str | os.PathLike) -> Optional[Path]:
    """Rename an earlier run's ``results.json`` in ``run_dir`` to ``results.previous.json`` (replacing
    an older one) before a run that will write its own: if that run fails, no ``results.json`` is
    left that a sweep report would count as its result. Its companions (:data:`RESULT_COMPANIONS`)
    go likewise to ``<name>.previous<suffix>``. Returns the new results path, or None."""
    src = Path(run_dir) / RESULTS_FILE
    for name in RESULT_COMPANIONS:
        companion = src.with_name(name)
        if companion.exists():
            os.replace(companion, companion.with_name(f"{companion.stem}.previous{companion.suffix}"))
    if not src.exists():
        return None
    dst = src.with_name(PREVIOUS_RESULTS_FILE)
    os.replace(src, dst)
    return dst


def format_value(v: Any, digits: int = 4) -> str:
    """Numbers with ``digits`` significant decimals (scientific for tiny p-values), ``-`` for
    missing/non-finite values."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        if v != 0 and abs(v) < 10 ** (-digits + 1):
            return f"{v:.{max(digits - 2, 1)}e}"
        return f"{v:.{digits}f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(format_value(x, digits) for x in v)
    return str(v)


def _scalar_metrics(metrics: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in metrics.items() if v is None or isinstance(v, (int, float))]


def _names(values: Any) -> str:
    """A list of names as ``a, b, c`` (a regex string or a single name as it is)."""
    return ", ".join(str(v) for v in values) if isinstance(values, (list, tuple)) else str(values)


def _num(v: Any) -> str:
    """A config number as written (alpha 16.0 as 16, dropout 0.05 as 0.05)."""
    return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def _short(text: Any, limit: int = 60) -> str:
    """``repr`` of a (system prompt) string, cut to ``limit`` characters."""
    s = repr(str(text))
    return s if len(s) <= limit else s[: limit - 4] + "...'"


def auto_tau(results: dict[str, Any]) -> bool:
    """Whether ``results``' tau was chosen by ``method.tau=auto`` (results.json then has ``tau_selection``)."""
    return isinstance(results.get("tau_selection"), dict)


def lora_setting(peft: Any) -> Optional[str]:
    """results.json's ``peft`` (a LoRA run only) as one line: rank, alpha, dropout, the modules adapted
    (as peft resolved them from the exported adapter, else as configured) and the layers; None without LoRA."""
    if not isinstance(peft, dict) or not peft.get("enabled", True):
        return None
    modules = peft.get("adapted_modules") or peft.get("target_modules")
    if modules is None:
        where = "the architecture's default modules"
    else:
        # target_modules null: peft chose the architecture's defaults, so say where the names come from
        where = f"modules {_names(modules)}" + (" (the architecture's defaults)" if peft.get("target_modules") is None
                                                else "")
    layers = peft.get("layers")
    trained, total = peft.get("trainable_params"), peft.get("total_params")
    counts = (f" ({trained:,} of {total:,} parameters trained, {100.0 * trained / total:.2f}%)"
              if isinstance(trained, int) and isinstance(total, int) and total > 0 else "")
    return (f"LoRA adapters r={_num(peft.get('r'))}, alpha={_num(peft.get('alpha'))}, dropout={_num(peft.get('dropout'))} "
            f"on {where}, " + ("all layers" if layers is None else f"layers {_names(layers)}") + "; base weights frozen"
            + counts)


def prompt_format_setting(fmt: Any) -> Optional[str]:
    """results.json's ``prompt_format`` as one line: the format's name, its system prompt and chat
    template variables when set, and where it was applied; None when not recorded."""
    if not isinstance(fmt, dict) or not fmt.get("name"):
        return None
    text = str(fmt["name"])
    if fmt.get("system_prompt"):
        text += f", system prompt {_short(fmt['system_prompt'])}"
    if fmt.get("chat_template_kwargs"):
        text += ", chat_template_kwargs " + ", ".join(f"{k}={v!r}" for k, v in fmt["chat_template_kwargs"].items())
    uses = fmt.get("applied_to")
    own = fmt.get("evaluation_prompts")  # MUSE / WMDP: the evaluation's prompts are the benchmark's own
    if uses is not None:  # [] = no question/answer rows anywhere (raw text, MUSE / WMDP evaluation)
        text += f"; applied to {_names(uses)}" if uses else "; not applied" + ("" if own else " (no question/answer rows)")
    if own:  # why it is not applied there: the benchmark's evaluation builds its own
        text += f"; evaluation prompts: {own}"
    return text


def _lm_eval_how(settings: dict) -> str:
    """How lm-eval scored: shots, the rows scored, BOS, chat template, dtype."""
    from pipeline.eval.lm_eval_bridge import limit_words

    return (f"{settings.get('num_fewshot') or 0}-shot, {limit_words(settings.get('limit'))}, BOS "
            f"{'added' if settings.get('add_bos') else 'not added'}, "
            f"{'chat template' if settings.get('chat_template') else 'no chat template'}, {settings.get('dtype', '?')}")


def lm_eval_setting(settings: Any) -> Optional[str]:
    """results.json's ``lm_eval`` (what lm-eval ran) as one line: version, tasks, then :func:`_lm_eval_how`."""
    if not isinstance(settings, dict) or not settings.get("tasks"):
        return None
    return f"lm-eval {settings.get('version') or '?'}: {', '.join(settings['tasks'])}; {_lm_eval_how(settings)}"


def _lm_eval_line(results: dict[str, Any]) -> Optional[str]:
    """The stdout summary's lm-eval line: each task's score, then how they were scored."""
    scores, settings = (results.get("metrics") or {}).get("lm_eval"), results.get("lm_eval")
    if not isinstance(scores, dict) or not scores or not isinstance(settings, dict):
        return None
    shown = "; ".join(f"{k} {format_value(v)}" for k, v in scores.items() if not k.endswith("_stderr"))
    return f"lm-eval {settings.get('version') or '?'}: {shown} ({_lm_eval_how(settings)})"


def tau_setting(results: dict[str, Any]) -> Optional[str]:
    """How a ``method.tau=auto`` run's tau was chosen, one line (None for a fixed tau, or no tau)."""
    if not auto_tau(results):
        return None
    sel = results["tau_selection"]
    tau = sel.get("tau", results.get("tau"))
    why = sel.get("reason") or sel.get("source")  # source: taken from the checkpoint a resume started from
    return f"{format_value(tau, 3)}, chosen by method.tau=auto" + (f": {why}" if why else "")


def resumed_setting(resumed: Any) -> Optional[str]:
    """results.json's ``resumed_from`` (the checkpoint the last attempt started from) as one line;
    None for a run trained from the start."""
    if not isinstance(resumed, dict) or resumed.get("step") is None:
        return None
    return f"step {resumed['step']} (checkpoint {resumed.get('checkpoint')}); train_seconds adds the earlier attempts' loop time"


def data_setting(record: Any) -> Optional[str]:
    """results.json's ``data`` (:func:`pipeline.inputs.data_record`: the dataset, where it was read
    from, its rows) as one line, as the job's log gives it too; None when not recorded."""
    if not isinstance(record, dict) or not record.get("name"):
        return None
    where = record.get("path") or record.get("hub_id") or "the hub (the loader's default id)"
    revisions = record.get("revisions") or {}
    if isinstance(revisions, dict) and revisions:
        where += " at " + ", ".join(f"revision {v}" if k in ("default", record.get("hub_id")) else f"{k} {v}"
                                    for k, v in revisions.items())
    rows = ", ".join(f"{k} {n}" for k, n in (record.get("rows") or {}).items())
    dataset, path = str(record.get("dataset") or ""), record.get("path")
    # the loader's label names the hub dataset (muse:MUSE-News); a local one's names the path given next
    label = f"data.name={record['name']}" + (f" ({dataset})" if dataset and not (path and path in dataset) else "")
    return f"{label} from {where}" + (f"; rows: {rows}" if rows else "")


def evaluation_setting(ev: Any) -> Optional[str]:
    """results.json's ``evaluation`` record (what the evaluation scored and how) as one line: rows
    scored per split, then what changes the numbers (lengths, BOS, Min-K%'s k, the reference AUC),
    then where it ran; None when not recorded."""
    if not isinstance(ev, dict) or not isinstance(ev.get("rows"), dict):
        return None
    parts = ["rows " + ", ".join(f"{k} {v}" for k, v in ev["rows"].items())
             + (f" (eval.max_rows={ev['max_rows']})" if ev.get("max_rows") else "")]
    if ev.get("icl_rows"):
        parts.append("few-shot " + ", ".join(f"{k} {v}" for k, v in ev["icl_rows"].items()))
    if ev.get("max_length") is not None:
        parts.append(f"max_length {ev['max_length']}")
    if "mcq_add_bos" in ev:
        parts.append(f"BOS {'added' if ev['mcq_add_bos'] else 'not added'}")
    news = [f"{k} {ev[k]}" for k in ("max_new_tokens", "verbmem_max_new_tokens", "knowmem_max_new_tokens") if k in ev]
    if news:
        parts.append(", ".join(news) + (f" ({ev['generation']})" if ev.get("generation") else ""))
    if ev.get("mink_k") is not None:
        parts.append(f"Min-K% k={_num(ev['mink_k'])}")
    if "retrain_auc" in ev:
        parts.append(f"retrain AUC {'-' if ev['retrain_auc'] is None else _num(ev['retrain_auc'])}")
    if "rouge_stemmer" in ev:
        parts.append(f"ROUGE {'stemmed' if ev['rouge_stemmer'] else 'unstemmed'}")
    if ev.get("device"):
        parts.append(f"on {ev['device']}" + (f", {ev['dtype']}" if ev.get("dtype") else ""))
    return "; ".join(parts)


def run_settings(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(results.json key, readable line) for the settings a reader must know to read the metrics and
    that results.json records as objects: the data, the prompt format, LoRA (a LoRA run only), tau=auto's
    choice (an auto run only), what lm-eval ran (an ``eval.lm_eval`` run only) and what the
    evaluation scored. report.md and the stdout summary both show them."""
    out = [("data", data_setting(results.get("data"))),
           ("peft", lora_setting(results.get("peft"))),
           ("prompt_format", prompt_format_setting(results.get("prompt_format"))),
           ("tau_selection", tau_setting(results)),
           ("resumed_from", resumed_setting(results.get("resumed_from"))),
           # a sweep point's own settings (every point has the sweep's run_name): its command line as Hydra parsed it
           ("overrides", " ".join((results.get("provenance") or {}).get("overrides") or []) or None),
           ("lm_eval", lm_eval_setting(results.get("lm_eval"))),
           ("evaluation", evaluation_setting(results.get("evaluation")))]
    return [(k, v) for k, v in out if v is not None]


def render_report_md(results: dict[str, Any]) -> str:
    """Markdown report of one run: header, metric table (value, better-direction, meaning) and
    the run's extra fields (scalars as they are, the settings of :func:`run_settings` as one line each)."""
    metrics = results.get("metrics", {})
    method, tau = results.get("method", "?"), results.get("tau")
    how = ", chosen by method.tau=auto" if auto_tau(results) else ""
    lines = [f"# Unlearning report: {method}" + (f" (tau = {format_value(tau, 3)}{how})" if tau is not None else ""), ""]
    info = [(k, format_value(results[k])) for k in results
            if k not in RESERVED_KEYS and not isinstance(results[k], (dict, list))]
    # the settings results.json records as objects (skipped above), as one readable row each
    info += [(k, v.replace("|", "\\|")) for k, v in run_settings(results)]
    if info:
        lines += ["| field | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in info]
        lines.append("")
    lines += ["## Metrics", "", "| metric | value | better | meaning |", "|---|---:|:---:|---|"]
    for k, v in _scalar_metrics(metrics):
        direction, text = metric_info(k)
        lines.append(f"| `{k}` | {format_value(v)} | {_ARROWS[direction]} | {text} |")
    lines.append("")
    if metrics.get("forget_quality") is None and "forget_quality" in metrics:
        # the same reason as the stdout summary's (it said "no reference" where the split had no truth ratios)
        lines += [f"Forget quality is not reported: {forget_quality_note(results)}.", ""]
    if "model_utility" in metrics and metrics["model_utility"] is None:
        lines += [f"Model utility is not reported: {_utility_note(metrics)}.", ""]
    elif metrics.get("model_utility_missing"):
        lines += [f"Model utility was computed without: {', '.join(metrics['model_utility_missing'])}.", ""]
    lines += ["## How to read this", "", *reading_notes(metrics), ""]
    return "\n".join(lines)


def reading_notes(metrics: dict[str, Any]) -> list[str]:
    """report.md's reading notes for the metric families ``metrics`` holds (TOFU-style QA, MUSE,
    multiple choice), one bullet each."""
    notes = []
    if any(k in metrics for k in ("forget_quality", "model_utility", "forget_truth_ratio", "forget_fact_recall")):
        notes += [
            "- **Forget quality** (TOFU): a p-value, so values above 0.05 mean the unlearned model's forget-set "
            "truth ratios cannot be told apart from the retain model's; log-scale differences matter.",
            "- **Model utility**: harmonic mean, so one collapsed component drags it to 0.",
            "- **Truth ratio** TR = P(perturbed) / P(correct), probabilities normalised by answer length "
            "(geometric mean over perturbed answers, as in the TOFU / open-unlearning code).",
            "- **Fluency** (repetition, well-formed, entropy) checks that forgetting did not turn answers into "
            "gibberish — the failure ASU is designed to avoid.",
        ]
    if any(k in metrics for k in ("verbmem_forget", "knowmem_forget", "knowmem_retain", "privleak")):
        notes += [
            "- **VerbMem / KnowMem forget** (MUSE): lower is better, ideally near the retrained model's values; "
            "**KnowMem retain** is the utility that must stay.",
            "- **PrivLeak**: closer to 0 is better; strongly negative means the forget texts are still told apart "
            "from unseen ones (under-unlearning), strongly positive means over-unlearning. Without "
            "`eval.retrain_auc` it is relative to an AUC of 0.5 (`privleak_reference`).",
        ]
    if any(k.endswith("_accuracy") for k in metrics):
        notes += ["- **Multiple-choice accuracy** (WMDP, MMLU): hazardous-knowledge splits (`wmdp-*`) should fall "
                  "towards chance (0.25) while general knowledge (`mmlu`) stays near the original model's."]
    return notes


# The metrics a job's stdout summary shows, when its results have them: TOFU-style fact recall and
# ROUGE-L, MUSE's memorisation and leakage, and (below) every multiple-choice accuracy (WMDP, MMLU).
HEADLINE_METRICS = ("forget_fact_recall", "retain_fact_recall", "forget_rouge_l", "retain_rouge_l", "model_utility",
                    "verbmem_forget", "knowmem_forget", "knowmem_retain", "privleak")


def _utility_note(metrics: dict[str, Any]) -> str:
    """Why ``model_utility`` is null: the components without a value (a harmonic mean of all of them)."""
    empty = [k for k in metrics.get("model_utility_components") or []
             if not isinstance(metrics.get(k), (int, float)) or math.isnan(metrics[k])]
    if not empty:
        return "no component had a value"
    why = " (no paraphrased / perturbed answers in the split)" if any(k.endswith("_truth_ratio") for k in empty) else ""
    return f"it is the harmonic mean of {', '.join(metrics['model_utility_components'])}, and {', '.join(empty)} " \
           f"{'has' if len(empty) == 1 else 'have'} no value{why}"


def forget_quality_note(results: dict[str, Any]) -> str:
    """Why ``forget_quality`` is null in ``results``: the forget split had no truth ratios, or no
    retain-model reference was configured."""
    ev = results.get("evaluation") or {}
    split = results.get("forget_split")
    if split is not None and (ev.get("truth_ratio_key") or {}).get(split, "") is None:
        return f"split {split!r} has no truth ratios"
    return "no eval.retain_model or eval.retain_reference"


def headline_keys(metrics: dict[str, Any]) -> list[str]:
    """The headline metrics present in ``metrics``, in the order :func:`run_summary` shows them
    (:data:`HEADLINE_METRICS`, then every ``*_accuracy``; numbers or null only). Forget quality is
    not among them: run_summary gives it its own line."""
    keys = [k for k in HEADLINE_METRICS if k in metrics]
    keys += [k for k in metrics if k.endswith("_accuracy") and k not in keys]
    return [k for k in keys if metrics[k] is None or isinstance(metrics[k], (int, float))]


def _headline(metrics: dict[str, Any]) -> list[str]:
    """``name value`` of the headline metrics present (:func:`headline_keys`)."""
    return [f"{k} {format_value(metrics[k])}" for k in headline_keys(metrics)]


def run_summary(results: dict[str, Any], run_dir: str | os.PathLike, reused: bool = False) -> str:
    """A few lines for stdout at the end of a train or eval job: where its files are, what ran and
    its headline metrics (``reused``: a finished run's results returned as they were)."""
    run_dir = Path(run_dir)
    report = run_dir / "report.md"
    metrics = results.get("metrics") or {}
    # an evaluation's results carry no steps, and its "method" is the model's label (e.g. "model")
    what = [f"method {results.get('method', '?')}"] if results.get("steps") is not None or "model" not in results \
        else [f"evaluated {results['model']}"]
    if results.get("tau") is not None:
        what.append(f"tau {format_value(results['tau'], 3)}" + (" (chosen by method.tau=auto)" if auto_tau(results) else ""))
    if results.get("steps") is not None:
        what.append(f"{results['steps']} step{'' if results['steps'] == 1 else 's'}")
    lines = [f"run: {run_dir}" + (" (finished already: its results reused)" if reused else ""),
             f"results: {run_dir / RESULTS_FILE}" + (f"; report: {report}" if report.exists() else ""),
             ", ".join(what)]
    # LoRA and the prompt format (tau=auto's reason is long: report.md and results.json have it)
    names = {"peft": "trained", "prompt_format": "prompt format"}
    lines += [f"{names[k]}: {v}" for k, v in run_settings(results) if k in names]
    head = _headline(metrics)
    lines.append("metrics: " + ("; ".join(head) if head else "none (eval.enabled=false)" if not metrics else "-"))
    if "forget_quality" in metrics:
        fq = metrics["forget_quality"]
        lines.append(f"forget_quality: {format_value(fq)}" if fq is not None
                     else f"forget_quality: null ({forget_quality_note(results)})")
    lm_eval = _lm_eval_line(results)
    if lm_eval is not None:
        lines.append(lm_eval)
    return "\n".join(lines)


def print_run_summary(results: dict[str, Any], run_dir: str | os.PathLike, reused: bool = False) -> None:
    """:func:`run_summary` on stdout (which carries results; logs go to stderr). Rank 0 calls it."""
    print(run_summary(results, run_dir, reused), flush=True)


def _cell(row: dict[str, Any], col: str) -> Any:
    if col in row:
        return row[col]
    m = row.get("metrics")
    if isinstance(m, dict) and col in m:
        return m[col]
    return None


def _grid(rows: Sequence[dict[str, Any]], columns: Sequence[str], digits: int) -> list[list[str]]:
    return [[format_value(_cell(r, c), digits) for c in columns] for r in rows]


def comparison_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], digits: int = 4) -> str:
    """Fixed-width console table; a column is looked up in each row, then in ``row["metrics"]``
    (so ``results.json`` dicts can be passed directly). Text left-aligned, numbers right-aligned."""
    grid = _grid(rows, columns, digits)
    widths = [max([len(c)] + [len(g[i]) for g in grid]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(_cell(r, c), (int, float)) or _cell(r, c) is None for r in rows) for c in columns]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(s.rjust(w) if num else s.ljust(w) for s, w, num in zip(cells, widths, numeric)).rstrip()

    out = [fmt(columns), "  ".join("-" * w for w in widths)]
    out += [fmt(g) for g in grid]
    return "\n".join(out)


def comparison_markdown(rows: Sequence[dict[str, Any]], columns: Sequence[str], digits: int = 4) -> str:
    """The same table as GitHub markdown (numeric columns right-aligned)."""
    grid = _grid(rows, columns, digits)
    numeric = [all(isinstance(_cell(r, c), (int, float)) or _cell(r, c) is None for r in rows) for c in columns]
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    out = ["| " + " | ".join(esc(c) for c in columns) + " |",
           "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    out += ["| " + " | ".join(esc(s) for s in g) + " |" for g in grid]
    return "\n".join(out)
