"""TOFU (``locuslab/TOFU``) loader: forget/retain QA pairs and the perturbed evaluation sets.

Hub layout (every config has one split, ``train``): ``forget01/05/10``, ``retain90/95/99``,
``holdout01/05/10``, ``full`` (``question``, ``answer``); ``forget01/05/10_perturbed`` and
``retain_perturbed`` (``question``, ``answer``, ``paraphrased_question``, ``paraphrased_answer``,
``perturbed_answer``: list of strings); ``real_authors_perturbed`` and ``world_facts_perturbed``
(``question``, ``answer``, ``perturbed_answer``); ``real_authors``, ``world_facts`` (QA only).
Same subsets/keys as open-unlearning's ``configs/data/datasets/TOFU_QA_*.yaml``.

Eval split names in ``data.eval_splits`` are the *logical* names the TOFU metrics use
(:func:`pipeline.eval.tofu.tofu_metrics`): ``forgetNN`` reads ``forgetNN_perturbed``,
``retainNN`` reads ``retain_perturbed`` (TOFU's 400-question retain evaluation set),
``real_authors`` / ``world_facts`` read their ``*_perturbed`` configs; any other name is read as
the config of that name. The ``*_perturbed`` configs must have their evaluation columns; other
configs (``holdout01``, ``full``, ...) need only ``question`` / ``answer`` (their truth-ratio
metrics are skipped, as for any dataset's QA-only split). real_authors / world_facts have no
paraphrased answer: their truth ratio uses the plain answer (open-unlearning ``ra_Truth_Ratio``),
so ``paraphrased_answer`` is set to ``answer`` there to fit the common evaluation row shape.
"""

from __future__ import annotations

import re
from typing import Any

from pipeline.data.common import (
    DATASETS,
    EVAL_COLUMNS,
    QA_COLUMNS,
    DataError,
    UnlearningData,
    check_columns,
    hub_revision,
    load_hf_split,
    map_columns,
    rename_columns,
)

TOFU_HUB_ID = "locuslab/TOFU"
TOFU_SPLIT = "train"  # every TOFU config has this one split
NO_PARAPHRASE = ("real_authors", "world_facts")
RA_WF_COLUMNS = ("question", "answer", "perturbed_answer")
PERTURBED_SUFFIX = "_perturbed"


def tofu_eval_subset(name: str) -> str:
    """Hub config holding the evaluation rows of logical split ``name``."""
    if re.fullmatch(r"forget\d+", name):
        return f"{name}_perturbed"
    if re.fullmatch(r"retain\d+", name):
        return "retain_perturbed"
    if name in NO_PARAPHRASE:
        return f"{name}_perturbed"
    return name


def check_list_column(rows: list[dict], column: str, dataset: str, split: str) -> None:
    for i, r in enumerate(rows):
        if not isinstance(r.get(column), (list, tuple)):
            raise DataError(
                f"dataset {dataset!r}, split {split!r}, column {column!r}: row {i + 1} must hold a list of strings, "
                f"got {type(r.get(column)).__name__}"
            )


@DATASETS.register("tofu")
def load_tofu(data_cfg: Any, **_: Any) -> UnlearningData:
    """TOFU from the hub (``data.hub_id``, ``data.revision``) or a local mirror (``data.path``)."""
    name = "tofu"
    hub = data_cfg.hub_id or TOFU_HUB_ID
    rev = hub_revision(data_cfg, hub, hub)
    q, a = data_cfg.question_column, data_cfg.answer_column
    cols = dict(getattr(data_cfg, "columns", None) or {})

    def read(subset: str) -> list[dict]:
        rows = load_hf_split(name, hub, subset, TOFU_SPLIT, rev, data_cfg.path)
        return map_columns(rename_columns(rows, cols), q, a, f"{hub} subset {subset!r}")

    forget = read(data_cfg.forget_split)
    check_columns(forget, QA_COLUMNS, name, data_cfg.forget_split)
    retain = read(data_cfg.retain_split)
    check_columns(retain, QA_COLUMNS, name, data_cfg.retain_split)
    evals: dict[str, list[dict]] = {}
    for split in data_cfg.eval_splits:
        subset = tofu_eval_subset(split)
        rows = read(subset)
        if split in NO_PARAPHRASE:
            check_columns(rows, RA_WF_COLUMNS, name, subset)
            rows = [{**r, "paraphrased_answer": r.get("paraphrased_answer") or r["answer"]} for r in rows]
        if subset.endswith(PERTURBED_SUFFIX):
            # a perturbed config is defined by these columns: one without them is a broken copy, and
            # forget quality / model utility need its truth ratio
            check_columns(rows, EVAL_COLUMNS, name, subset)
            check_list_column(rows, "perturbed_answer", name, subset)
        else:
            # question/answer-only configs (holdout01/05/10, full, ...): the truth-ratio columns are
            # optional as for any dataset (checked by load_unlearning_data; their metrics are skipped)
            check_columns(rows, QA_COLUMNS, name, subset)
        evals[split] = rows
    return UnlearningData(name, forget, retain, evals, data_cfg.forget_split, data_cfg.retain_split)
