"""MUSE (``muse-bench/MUSE-News``, ``muse-bench/MUSE-Books``) loader.

Hub layout (configs / splits / columns, as in open-unlearning's ``configs/data/datasets/MUSE_*.yaml``):

* ``raw``: ``forget``, ``retain1``, ``retain2``, ``holdout`` — ``text`` (training corpora);
* ``verbmem``: ``forget`` — ``prompt``, ``gt`` (VerbMem: continue ``prompt``, compare with ``gt``);
* ``knowmem``: ``forget_qa``, ``retain_qa`` and the few-shot ``forget_qa_icl``, ``retain_qa_icl`` —
  ``question``, ``answer``;
* ``privleak``: ``forget``, ``retain``, ``holdout`` — ``text`` (Min-K% membership inference).

Forget/retain rows are raw text ``{"text": ...}`` (``data.forget_split``/``retain_split`` name
``raw`` splits, default ``forget`` / ``retain1``). Eval split names (``data.eval_splits``):
``verbmem_forget``, ``knowmem_forget``, ``knowmem_retain``, ``privleak_forget``,
``privleak_retain``, ``privleak_holdout``, or any ``<config>/<split>``. Listing a knowmem split also
loads its in-context examples as ``<name>_icl``.
"""

from __future__ import annotations

from typing import Any

from pipeline.data.common import (
    DATASETS,
    TEXT_COLUMNS,
    DataError,
    UnlearningData,
    check_columns,
    check_text_values,
    hub_revision,
    load_hf_split,
    rename_columns,
)

MUSE_NEWS_HUB_ID = "muse-bench/MUSE-News"
MUSE_BOOKS_HUB_ID = "muse-bench/MUSE-Books"
RAW = "raw"
KNOWMEM_COLUMNS = ("question", "answer")
VERBMEM_COLUMNS = ("prompt", "gt")

# logical eval name -> (config, split, required columns)
MUSE_EVAL_SPLITS: dict[str, tuple[str, str, tuple]] = {
    "verbmem_forget": ("verbmem", "forget", VERBMEM_COLUMNS),
    "knowmem_forget": ("knowmem", "forget_qa", KNOWMEM_COLUMNS),
    "knowmem_retain": ("knowmem", "retain_qa", KNOWMEM_COLUMNS),
    "knowmem_forget_icl": ("knowmem", "forget_qa_icl", KNOWMEM_COLUMNS),
    "knowmem_retain_icl": ("knowmem", "retain_qa_icl", KNOWMEM_COLUMNS),
    "privleak_forget": ("privleak", "forget", TEXT_COLUMNS),
    "privleak_retain": ("privleak", "retain", TEXT_COLUMNS),
    "privleak_holdout": ("privleak", "holdout", TEXT_COLUMNS),
}
_BY_CONFIG = {"verbmem": VERBMEM_COLUMNS, "knowmem": KNOWMEM_COLUMNS, "privleak": TEXT_COLUMNS, RAW: TEXT_COLUMNS}


def is_icl(split: str) -> bool:
    """Whether ``split`` holds in-context examples (``knowmem_*_icl``): prompt text, not scored rows."""
    return split.endswith("_icl")


def muse_eval_source(name: str) -> tuple[str, str, tuple]:
    """``(config, split, required columns)`` of logical eval split ``name`` (or ``config/split``)."""
    if name in MUSE_EVAL_SPLITS:
        return MUSE_EVAL_SPLITS[name]
    if "/" in name:
        config, split = name.split("/", 1)
        return config, split, _BY_CONFIG.get(config, ())
    raise DataError(f"data.eval_splits: unknown MUSE eval split {name!r}; use one of {sorted(MUSE_EVAL_SPLITS)} or '<config>/<split>'")


@DATASETS.register("muse")
def load_muse(data_cfg: Any, **_: Any) -> UnlearningData:
    """MUSE-News (default) or MUSE-Books (``data.hub_id``), from the hub or ``data.path``."""
    hub = data_cfg.hub_id or MUSE_NEWS_HUB_ID
    name = "muse:" + hub.split("/")[-1]
    rev = hub_revision(data_cfg, hub, hub)
    cols = dict(getattr(data_cfg, "columns", None) or {})
    text_col = getattr(data_cfg, "text_column", "text") or "text"
    cols.setdefault("text", text_col)

    def read(config: str, split: str, required: tuple) -> list[dict]:
        rows = rename_columns(load_hf_split(name, hub, config, split, rev, data_cfg.path), cols)
        check_columns(rows, required, name, f"{config}/{split}")
        # a number where a KnowMem answer or a VerbMem continuation belongs failed in the scorer, after training
        check_text_values(rows, required, name, f"{config}/{split}")
        return rows

    def text_only(rows: list[dict]) -> list[dict]:
        return [{"text": r["text"]} for r in rows]

    forget = text_only(read(RAW, data_cfg.forget_split, TEXT_COLUMNS))
    retain = text_only(read(RAW, data_cfg.retain_split, TEXT_COLUMNS))
    evals: dict[str, list[dict]] = {}
    eval_columns: dict[str, tuple] = {}
    wanted = list(data_cfg.eval_splits)
    for s in list(wanted):
        icl = f"{s}_icl"
        if s.startswith("knowmem_") and not is_icl(s) and icl in MUSE_EVAL_SPLITS and icl not in wanted:
            wanted.append(icl)
    for s in wanted:
        config, split, required = muse_eval_source(s)
        evals[s] = read(config, split, required)
        eval_columns[s] = required
    return UnlearningData(name, forget, retain, evals, data_cfg.forget_split, data_cfg.retain_split,
                          train_columns=TEXT_COLUMNS, eval_columns=eval_columns)
