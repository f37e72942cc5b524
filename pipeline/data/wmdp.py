"""WMDP loader: forget/retain corpora (``cais/wmdp-corpora``) and multiple-choice evaluation sets
(``cais/wmdp`` for hazardous knowledge, ``cais/mmlu`` for utility).

Hub layout:

* ``cais/wmdp-corpora``: configs ``bio-retain-corpus``, ``cyber-forget-corpus``,
  ``cyber-retain-corpus`` (split ``train``, column ``text``; the bio *forget* corpus is only
  released on request — put it under ``data.path`` as ``bio-forget-corpus/train.jsonl``);
  open-unlearning's ``WMDP_forget.yaml`` / ``WMDP_retain.yaml`` read the same corpora from local
  JSONL (``text`` key).
* ``cais/wmdp``: configs ``wmdp-bio``, ``wmdp-cyber``, ``wmdp-chem``, split ``test``:
  ``question`` (str), ``choices`` (list of 4 str), ``answer`` (int index into ``choices``).
* ``cais/mmlu``: config ``all`` or one per subject, split ``test``: ``question``, ``subject``,
  ``choices``, ``answer`` (int).

Eval split names: ``wmdp-bio`` / ``wmdp-cyber`` / ``wmdp-chem`` (also ``wmdp_bio`` ...), ``mmlu``
(config ``all``) or ``mmlu-<subject>`` / ``mmlu_<subject>``. With ``data.path`` all of them are read
from the same local directory (:func:`pipeline.data.common.load_local_split`): the config folders of
the three repos' ``hf download`` snapshots copied into one directory (``<config>/<split>-NNNNN-of-NNNNN.parquet``
shards, read through the README.md card that is there, or by their hub names where the card is
another repo's), or ``<path>/<config>/<split>.{jsonl,json,parquet}``.
"""

from __future__ import annotations

from typing import Any

from pipeline.data.common import (
    DATASETS,
    TEXT_COLUMNS,
    DataError,
    UnlearningData,
    check_columns,
    hub_revision,
    load_hf_split,
    rename_columns,
)

WMDP_CORPORA_HUB_ID = "cais/wmdp-corpora"
WMDP_HUB_ID = "cais/wmdp"
MMLU_HUB_ID = "cais/mmlu"
CORPUS_SPLIT = "train"
MCQ_SPLIT = "test"
MCQ_COLUMNS = ("question", "choices", "answer")
WMDP_SUBSETS = ("wmdp-bio", "wmdp-cyber", "wmdp-chem")


def mcq_source(name: str, mcq_hub: str = WMDP_HUB_ID, utility_hub: str = MMLU_HUB_ID) -> tuple[str, str, str]:
    """``(hub id, config, split)`` of eval split ``name``."""
    norm = name.replace("_", "-")
    if norm in WMDP_SUBSETS:
        return mcq_hub, norm, MCQ_SPLIT
    if name == "mmlu":
        return utility_hub, "all", MCQ_SPLIT
    if name.startswith(("mmlu-", "mmlu_")):
        return utility_hub, name[5:], MCQ_SPLIT
    raise DataError(f"data.eval_splits: unknown WMDP eval split {name!r}; use one of {list(WMDP_SUBSETS)}, 'mmlu' or 'mmlu-<subject>'")


def check_mcq_rows(rows: list[dict], dataset: str, split: str) -> None:
    """Each row: a list of choices and an integer ``answer`` indexing it."""
    for i, r in enumerate(rows):
        ch, ans = r["choices"], r["answer"]
        if not isinstance(ch, (list, tuple)) or len(ch) < 2:
            raise DataError(f"dataset {dataset!r}, split {split!r}, column 'choices': row {i + 1} needs a list of >= 2 choices")
        if isinstance(ans, bool) or not isinstance(ans, int) or not 0 <= ans < len(ch):
            raise DataError(
                f"dataset {dataset!r}, split {split!r}, column 'answer': row {i + 1} must be an int index in "
                f"[0, {len(ch)}), got {ans!r}"
            )


@DATASETS.register("wmdp")
def load_wmdp(data_cfg: Any, **_: Any) -> UnlearningData:
    """Corpora from ``data.hub_id`` (default cais/wmdp-corpora; ``forget_split``/``retain_split``
    are corpus configs, e.g. ``cyber-forget-corpus``), eval MCQ from ``data.mcq_hub_id`` /
    ``data.utility_hub_id``; or everything from ``data.path``."""
    name = "wmdp"
    hub = data_cfg.hub_id or WMDP_CORPORA_HUB_ID
    mcq_hub = getattr(data_cfg, "mcq_hub_id", None) or WMDP_HUB_ID
    util_hub = getattr(data_cfg, "utility_hub_id", None) or MMLU_HUB_ID
    cols = dict(getattr(data_cfg, "columns", None) or {})
    cols.setdefault("text", getattr(data_cfg, "text_column", "text") or "text")

    def corpus(config: str) -> list[dict]:
        rows = rename_columns(load_hf_split(name, hub, config, CORPUS_SPLIT, hub_revision(data_cfg, hub, hub),
                                            data_cfg.path), cols)
        check_columns(rows, TEXT_COLUMNS, name, f"{config}/{CORPUS_SPLIT}")
        return [{"text": r["text"]} for r in rows]

    forget = corpus(data_cfg.forget_split)
    retain = corpus(data_cfg.retain_split)
    evals: dict[str, list[dict]] = {}
    eval_columns: dict[str, tuple] = {}
    for s in data_cfg.eval_splits:
        h, config, split = mcq_source(s, mcq_hub, util_hub)
        rows = rename_columns(load_hf_split(name, h, config, split, hub_revision(data_cfg, h, hub), data_cfg.path),
                              cols)
        where = f"{config}/{split}"
        check_columns(rows, MCQ_COLUMNS, name, where)
        check_mcq_rows(rows, name, where)
        evals[s] = rows
        eval_columns[s] = MCQ_COLUMNS
    return UnlearningData(name, forget, retain, evals, data_cfg.forget_split, data_cfg.retain_split,
                          train_columns=TEXT_COLUMNS, eval_columns=eval_columns)
