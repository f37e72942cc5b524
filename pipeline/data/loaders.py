"""Dataset registry and loading of forget / retain / evaluation splits.

Loaders return plain row dicts (via the HF ``datasets`` library) and are checked here, before any
model is loaded: every required column present, question / answer cells non-empty strings,
``facts`` lists of strings, a non-empty forget set, and no example shared by the forget and retain
sets (exact text), no empty evaluation split — each failure names the dataset, split and column (and row).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from pipeline.data.common import (  # noqa: F401  (re-exported: callers import them from here)
    DATASETS,
    EVAL_COLUMNS,
    OPTIONAL_EVAL_COLUMNS,
    QA_COLUMNS,
    TEXT_COLUMNS,
    DataError,
    UnlearningData,
    check_columns,
    check_configured_columns,
    check_facts,
    check_optional_columns,
    check_overlap,
    check_text_values,
    hub_revision,
    load_hf_split,
    load_json_split,
    map_columns,
    read_split_file,
    rename_columns,
    resolve_data_path,
    subsample,
)
from pipeline.data.formatting import IGNORE_INDEX, encode_qa, encode_texts, pack_texts, prompt_ids
from pipeline.logging import SAME_ON_EVERY_RANK

log = logging.getLogger(__name__)


def load_unlearning_data(data_cfg: Any, seed: int = 0, **ctx: Any) -> UnlearningData:
    """Load and check the configured dataset. ``ctx`` carries loader inputs (e.g. ``data_dir``)."""
    if data_cfg.name not in DATASETS:  # a typo (data.name=jsonl) is a user error, not a KeyError traceback
        raise DataError(f"data.name={data_cfg.name!r}: unknown dataset; registered: {', '.join(DATASETS.names())} "
                        f"(json: a directory of <split>.jsonl files in data.path)")
    loader = DATASETS.get(data_cfg.name)
    data = loader(data_cfg, **ctx)
    name = data.name
    for split, rows in ((data.forget_split, data.forget), (data.retain_split, data.retain)):
        check_columns(rows, data.train_columns, name, split)
        check_text_values(rows, data.train_columns, name, split)
        check_optional_columns(rows, name, split)  # the forget split is evaluated too, after training
        check_facts(rows, name, split)
    for split, rows in data.eval.items():
        # an empty evaluation split (e.g. a truncated download) would be scored as nothing, silently
        if not rows:
            raise DataError(f"dataset {name!r}: evaluation split {split!r} is empty (no rows read); fix or remove "
                            f"it from data.eval_splits")
        check_columns(rows, data.eval_columns.get(split, QA_COLUMNS), name, split)
        if split not in data.eval_columns:
            check_text_values(rows, QA_COLUMNS, name, split)
            check_optional_columns(rows, name, split)
        check_facts(rows, name, split)
    if not data.forget:
        raise DataError(f"dataset {name!r}: forget split {data.forget_split!r} is empty")
    if not data.retain:
        raise DataError(f"dataset {name!r}: retain split {data.retain_split!r} is empty")
    check_overlap(data.forget, data.retain, name, data.forget_split, data.retain_split)
    data.forget = subsample(data.forget, float(data_cfg.forget_fraction), seed)
    return data


def _read_qa_splits(data_cfg: Any, data_dir: str | Path, name: str) -> tuple[list[dict], list[dict], dict]:
    """Forget, retain and eval rows of a directory of ``<split>.jsonl`` files, with the configured
    columns (``data.columns``, then ``data.question_column`` / ``data.answer_column``) renamed to
    the canonical ones; a configured question/answer/text column a file lacks is a :class:`DataError`
    naming the key (the other columns, e.g. ``paraphrased_answer``, are optional per split)."""
    cols = {k: v for k, v in dict(getattr(data_cfg, "columns", None) or {}).items() if v}
    required = {f"data.columns.{k}": v for k, v in cols.items() if k in ("question", "answer", "text")}
    q, a = data_cfg.question_column, data_cfg.answer_column

    done: dict[str, list[dict]] = {}  # a split named twice (forget also evaluated) is read once

    def read(split: str) -> list[dict]:
        if split in done:  # its own row dicts: the two uses must not share them
            return [dict(r) for r in done[split]]
        path, rows = read_split_file(data_dir, split, name)
        check_configured_columns(rows, required, str(path))
        done[split] = map_columns(rename_columns(rows, cols), q, a, str(path))
        return done[split]

    return (read(data_cfg.forget_split), read(data_cfg.retain_split), {s: read(s) for s in data_cfg.eval_splits})


@DATASETS.register("synthetic")
def load_synthetic(data_cfg: Any, data_dir: Optional[str | Path] = None, **_: Any) -> UnlearningData:
    """The embedded benchmark, written as JSONL by ``pipeline.data.prepare``."""
    if data_dir is None:
        raise DataError("dataset 'synthetic' needs its prepared data directory (run launchers/prepare.py)")
    forget, retain, evals = _read_qa_splits(data_cfg, data_dir, "synthetic")
    return UnlearningData("synthetic", forget, retain, evals, data_cfg.forget_split, data_cfg.retain_split)


def json_data_dir(data_cfg: Any) -> Path:
    """``data.path`` of a ``data.name=json`` dataset, as the loaders read it (:func:`resolve_data_path`);
    unset: a :class:`DataError`."""
    if not data_cfg.path:
        named = [data_cfg.forget_split, data_cfg.retain_split, *(data_cfg.get("eval_splits") or [])]
        splits = list(dict.fromkeys(str(s) for s in named if s))  # an evaluation reads its eval_splits too
        raise DataError(f"data.path is not set: data.name=json (your own rows, as data=own_qa) reads a directory of "
                        f"<split>.jsonl files ({', '.join(f'{s}.jsonl' for s in splits)}; question and answer per "
                        f"row): set data.path=<that directory>")
    return resolve_data_path(data_cfg.path)


@DATASETS.register("json")
def load_local_json(data_cfg: Any, **_: Any) -> UnlearningData:
    """Any directory of ``<split>.jsonl`` (or ``.json`` / ``.parquet``) files (``data.path``): a
    user's own data. Forget / retain rows need ``question`` and ``answer`` (``facts``: optional list
    of strings for fact recall); TOFU's evaluation columns (``paraphrased_answer``,
    ``perturbed_answer``) are optional. ``~`` and repository-relative paths: :func:`resolve_data_path`."""
    forget, retain, evals = _read_qa_splits(data_cfg, json_data_dir(data_cfg), f"json:{data_cfg.path}")
    return UnlearningData(f"json:{data_cfg.path}", forget, retain, evals, data_cfg.forget_split,
                          data_cfg.retain_split)


def check_split_names(data_cfg: Any) -> None:
    """The eval split names of a benchmark with a fixed set (MUSE, WMDP) are known ones: a typo is a
    :class:`DataError` before anything is loaded or written (it would otherwise surface only after
    the corpora were read, with the run directory made)."""
    from pipeline.data.muse import muse_eval_source
    from pipeline.data.wmdp import mcq_source

    known = {"muse": muse_eval_source, "wmdp": mcq_source}.get(str(data_cfg.get("name") if hasattr(data_cfg, "get")
                                                                   else data_cfg.name))
    for s in (data_cfg.eval_splits or []) if known else []:
        known(str(s))


def encode_rows(tokenizer, rows: Sequence[dict], max_length: int, truncate: bool, split: str,
                prompt_format: Any = None, pack_text: bool = False) -> list[dict]:
    """Tokenise QA rows (loss on answers) or raw-text rows ``{"text": ...}`` (loss on every token,
    MUSE/WMDP corpora). Over-long rows are cut and counted, or refused; empty documents (no text
    tokens) are dropped with a warning. ``prompt_format``: a
    :class:`pipeline.data.prompt_formats.PromptFormat` (None: plain). ``pack_text``
    (``data.pack_text``): raw-text rows become one token stream cut into ``max_length`` rows
    (:func:`pipeline.data.formatting.pack_texts`) instead of one row per text."""
    from pipeline.data.formatting import PROMPT_TEMPLATE

    if pack_text:
        return _packed_rows(tokenizer, rows, max_length, split)
    template = prompt_format if prompt_format is not None else PROMPT_TEMPLATE
    text_rows = [i for i, r in enumerate(rows) if "question" not in r and "text" in r]
    # a raw-text row is <bos> + text, no <eos>, one row per text cut at max_length: as the WMDP authors' RMU
    # (the tokenizer's default special tokens: BOS only); open-unlearning's PretrainingDataset also adds no
    # <eos> but joins the texts and cuts windows (pack_text=True here). A document has no "answer" to close
    texts = dict(zip(text_rows, encode_texts(tokenizer, [rows[i]["text"] for i in text_rows], max_length,
                                             add_eos=False)))
    out, cut, text_cut, answer_cut, mismatch, no_loss, empty = [], 0, 0, 0, 0, 0, 0
    _warn_special_text(tokenizer, rows, split)
    for i, r in enumerate(rows):
        enc = texts[i] if i in texts else encode_qa(tokenizer, r["question"], r["answer"], max_length, template=template)
        if all(lab == IGNORE_INDEX for lab in enc.labels):
            if i in texts:
                empty += 1  # an empty document: <bos> alone, nothing to train on; dropped, said below
                continue
            no_loss += 1  # the prompt alone fills max_length: not the answer's fault, counted apart
        else:
            answer_cut += enc.answer_cut
        mismatch += enc.prompt_mismatch
        if enc.truncated:
            if not truncate:
                raise DataError(
                    f"split {split!r} row {i + 1}: sequence longer than {max_length} tokens (the limit set by "
                    f"data.max_length or the model's context) and data.truncate=false"
                )
            if i in texts:
                text_cut += 1
            else:
                cut += 1
        out.append({"input_ids": enc.input_ids, "labels": enc.labels, "index": i})
    if empty:
        if not out:
            raise DataError(f"split {split!r}: all {len(rows)} text row(s) are empty documents (no text tokens)")
        log.warning("split %r: dropped %d of %d text row(s): empty documents (no text tokens, nothing to train on)",
                    split, empty, len(text_rows), extra=SAME_ON_EVERY_RANK)
    kept = cut - answer_cut - no_loss  # rows whose answer was cut, or left no loss token, are said below
    if kept:
        log.warning("split %r: truncated %d of %d sequences to data.max_length=%d (question words dropped from the "
                    "left, answers kept)", split, kept, len(rows) - len(text_rows), max_length,
                    extra=SAME_ON_EVERY_RANK)
    if text_cut:
        log.warning("split %r: %d of %d documents cut at their end to data.max_length=%d tokens (the rest is not "
                    "trained on; data.pack_text=true trains on every token)", split, text_cut, len(text_rows),
                    max_length, extra=SAME_ON_EVERY_RANK)
    n_prompt = len(prompt_ids(tokenizer, "", template)) if no_loss or answer_cut else 0
    if no_loss:
        what = (f"the prompt alone (the template and system prompt: {n_prompt} tokens with an empty question) "
                f"fills data.max_length={max_length}")
        if no_loss == len(rows):
            raise DataError(f"split {split!r}: no row has a loss token: {what}; raise data.max_length or shorten "
                            f"model.system_prompt")
        log.warning("split %r: %d of %d row(s) have no loss token: %s (long questions are cut, but not the "
                    "template); raise data.max_length or shorten model.system_prompt", split, no_loss, len(rows),
                    what, extra=SAME_ON_EVERY_RANK)
    if answer_cut:
        # the answer is rarely long on its own: a chat template and system prompt can take most of max_length
        log.warning("split %r: %d of %d row(s) do not fit data.max_length=%d even with their whole question dropped: "
                    "the prompt (the template and system prompt: %d tokens with an empty question) and the answer are "
                    "longer, so the answer's last tokens are cut (no loss on them); raise data.max_length%s", split,
                    answer_cut, len(rows) - len(text_rows), max_length, n_prompt,
                    " or shorten model.system_prompt" if n_prompt * 2 > max_length else "", extra=SAME_ON_EVERY_RANK)
    if mismatch:
        log.warning("split %r: in %d row(s) the prompt tokenises differently inside prompt+answer (border merge); the "
                    "loss starts after the prompt's token count, as open-unlearning does", split, mismatch,
                    extra=SAME_ON_EVERY_RANK)
    return out


def _warn_special_text(tokenizer, rows: Sequence[dict], split: str) -> None:
    """Warn when question/answer text holds a special token's text (``<|im_end|>``, ``</s>``): it
    tokenises as the control token itself, and a chat format then ends the answer (and its loss) there."""
    specials = set(getattr(tokenizer, "all_special_tokens", None) or [])
    specials |= {str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)}
    specials = {t for t in specials if t}
    if not specials:
        return
    hits = [i for i, r in enumerate(rows) if "question" in r
            for t in specials if t in str(r["question"]) or t in str(r.get("answer", ""))]
    if hits:
        rows_hit = sorted(set(hits))
        found = sorted({t for i in rows_hit[:50] for t in specials
                        if t in str(rows[i]["question"]) or t in str(rows[i].get("answer", ""))})
        log.warning("split %r: %d row(s) hold special-token text %s in the question or answer (first: row %d): it "
                    "becomes the control token itself, and a chat format ends the answer there; remove or reword it",
                    split, len(rows_hit), found, rows_hit[0] + 1, extra=SAME_ON_EVERY_RANK)


def _packed_rows(tokenizer, rows: Sequence[dict], max_length: int, split: str) -> list[dict]:
    qa = next((i for i, r in enumerate(rows) if "question" in r or "text" not in r), None)
    if qa is not None:
        raise DataError(f"split {split!r} row {qa + 1}: data.pack_text=true packs raw-text rows ({{'text': ...}}), but this "
                        f"row has columns {sorted(rows[qa])}; set data.pack_text=false for question/answer data")
    packed = pack_texts(tokenizer, [r["text"] for r in rows], max_length)
    if not packed:  # as unpacked rows: a split with nothing to train on stops here, not in the batch plan
        raise DataError(f"split {split!r}: all {len(rows)} text row(s) are empty documents (no text tokens)")
    log.info("split %r: %d texts packed into %d rows of <= %d tokens (%d tokens; data.pack_text=true)", split,
             len(rows), len(packed), max_length, sum(len(e.input_ids) for e in packed), extra=SAME_ON_EVERY_RANK)
    return [{"input_ids": e.input_ids, "labels": e.labels, "index": i} for i, e in enumerate(packed)]


# Benchmark loaders register themselves in DATASETS on import (kept last: they import this module).
import pipeline.data.muse  # noqa: E402,F401
import pipeline.data.tofu  # noqa: E402,F401
import pipeline.data.wmdp  # noqa: E402,F401
