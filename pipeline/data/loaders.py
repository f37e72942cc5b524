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
    check_facts,
    check_optional_columns,
    check_overlap,
    check_text_values,
    hub_revision,
    load_hf_split,
    load_json_split,
    map_columns,
    rename_columns,
    subsample,
)
from pipeline.data.formatting import encode_qa, encode_texts, pack_texts
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


@DATASETS.register("synthetic")
def load_synthetic(data_cfg: Any, data_dir: Optional[str | Path] = None, **_: Any) -> UnlearningData:
    """The embedded benchmark, written as JSONL by ``pipeline.data.prepare``."""
    if data_dir is None:
        raise DataError("dataset 'synthetic' needs its prepared data directory (run launchers/prepare.py)")
    name = "synthetic"
    q, a = data_cfg.question_column, data_cfg.answer_column
    forget = map_columns(load_json_split(data_dir, data_cfg.forget_split, name), q, a)
    retain = map_columns(load_json_split(data_dir, data_cfg.retain_split, name), q, a)
    evals = {s: map_columns(load_json_split(data_dir, s, name), q, a) for s in data_cfg.eval_splits}
    return UnlearningData(name, forget, retain, evals, data_cfg.forget_split, data_cfg.retain_split)


@DATASETS.register("json")
def load_local_json(data_cfg: Any, **_: Any) -> UnlearningData:
    """Any directory of ``<split>.jsonl`` files (``data.path``): a user's own data. Forget / retain
    rows need ``question`` and ``answer`` (``facts``: optional list of strings for fact recall);
    TOFU's evaluation columns (``paraphrased_answer``, ``perturbed_answer``) are optional."""
    if not data_cfg.path:
        raise DataError("dataset 'json' needs data.path (a directory of <split>.jsonl files)")
    name = f"json:{data_cfg.path}"
    q, a = data_cfg.question_column, data_cfg.answer_column
    forget = map_columns(load_json_split(data_cfg.path, data_cfg.forget_split, name), q, a)
    retain = map_columns(load_json_split(data_cfg.path, data_cfg.retain_split, name), q, a)
    evals = {s: map_columns(load_json_split(data_cfg.path, s, name), q, a) for s in data_cfg.eval_splits}
    return UnlearningData(name, forget, retain, evals, data_cfg.forget_split, data_cfg.retain_split)


def encode_rows(tokenizer, rows: Sequence[dict], max_length: int, truncate: bool, split: str,
                prompt_format: Any = None, pack_text: bool = False) -> list[dict]:
    """Tokenise QA rows (loss on answers) or raw-text rows ``{"text": ...}`` (loss on every token,
    MUSE/WMDP corpora). Over-long rows are cut and counted, or refused. ``prompt_format``: a
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
    out, cut, answer_cut, mismatch = [], 0, 0, 0
    for i, r in enumerate(rows):
        if i in texts:
            enc = texts[i]
        else:
            enc = encode_qa(tokenizer, r["question"], r["answer"], max_length, template=template)
        answer_cut += enc.answer_cut
        mismatch += enc.prompt_mismatch
        if enc.truncated:
            if not truncate:
                raise DataError(
                    f"split {split!r} row {i}: sequence longer than {max_length} tokens (the limit set by "
                    f"data.max_length or the model's context) and data.truncate=false"
                )
            cut += 1
        out.append({"input_ids": enc.input_ids, "labels": enc.labels, "index": i})
    if cut:
        log.warning("split %r: truncated %d of %d sequences to data.max_length=%d (question words dropped from the "
                    "left, answers kept)", split, cut, len(rows), max_length, extra=SAME_ON_EVERY_RANK)
    if answer_cut:
        log.warning("split %r: %d answer(s) alone are longer than data.max_length=%d: their last tokens are cut "
                    "(no loss on them)", split, answer_cut, max_length, extra=SAME_ON_EVERY_RANK)
    if mismatch:
        log.warning("split %r: in %d row(s) the prompt tokenises differently inside prompt+answer (border merge); the "
                    "loss starts after the prompt's token count, as open-unlearning does", split, mismatch,
                    extra=SAME_ON_EVERY_RANK)
    return out


def _packed_rows(tokenizer, rows: Sequence[dict], max_length: int, split: str) -> list[dict]:
    qa = next((i for i, r in enumerate(rows) if "question" in r or "text" not in r), None)
    if qa is not None:
        raise DataError(f"split {split!r} row {qa}: data.pack_text=true packs raw-text rows ({{'text': ...}}), but this "
                        f"row has columns {sorted(rows[qa])}; set data.pack_text=false for question/answer data")
    packed = pack_texts(tokenizer, [r["text"] for r in rows], max_length)
    log.info("split %r: %d texts packed into %d rows of <= %d tokens (%d tokens; data.pack_text=true)", split,
             len(rows), len(packed), max_length, sum(len(e.input_ids) for e in packed), extra=SAME_ON_EVERY_RANK)
    return [{"input_ids": e.input_ids, "labels": e.labels, "index": i} for i, e in enumerate(packed)]


# Benchmark loaders register themselves in DATASETS on import (kept last: they import this module).
import pipeline.data.muse  # noqa: E402,F401
import pipeline.data.tofu  # noqa: E402,F401
import pipeline.data.wmdp  # noqa: E402,F401
