"""A user's own data: plain QA pairs (question, answer, optional facts) train and evaluate without
TOFU's evaluation columns; the metrics those columns feed are skipped with one log line per split."""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.config import DataConfig
from pipeline.data.loaders import load_unlearning_data
from tests.helpers.launch import run
from tests.helpers.tiny import build

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "own_qa"
SPLITS = ["data.name=json", f"data.path={FIX}", "data.forget_split=forget", "data.retain_split=retain",
          "data.eval_splits=[forget,retain]"]


def _texts() -> list[str]:
    rows = [json.loads(ln) for f in ("forget", "retain") for ln in (FIX / f"{f}.jsonl").read_text().splitlines()]
    return [t for r in rows for t in (r["question"], r["answer"])]


def test_plain_qa_loads_with_its_splits_listed_for_evaluation():
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), {"name": "json", "path": str(FIX), "forget_split": "forget",
                                                            "retain_split": "retain", "eval_splits": ["forget", "retain"]})
    d = load_unlearning_data(cfg)
    assert len(d.forget) == 4 and len(d.retain) == 6 and "perturbed_answer" not in d.eval["forget"][0]


def test_a_split_both_trained_and_evaluated_is_read_once(monkeypatch):
    import pipeline.data.common as common

    reads = []
    real = common._load_local_file
    monkeypatch.setattr(common, "_load_local_file", lambda path, *a: reads.append(path.name) or real(path, *a))
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), {"name": "json", "path": str(FIX), "forget_split": "forget",
                                                            "retain_split": "retain", "eval_splits": ["forget", "retain"]})
    d = load_unlearning_data(cfg)
    assert sorted(reads) == ["forget.jsonl", "retain.jsonl"]
    assert d.eval["forget"] == d.forget and all(a is not b for a, b in zip(d.eval["forget"], d.forget))


@pytest.mark.distributed
def test_plain_qa_trains_and_evaluates_what_it_can(tmp_path):
    model_dir, _ = build(tmp_path, extra_texts=_texts())
    out = run(["model.source=pretrained", f"model.path={model_dir}", *SPLITS, "method=grad_diff", "trainer.max_steps=2",
               "trainer.batch_size=2", "trainer.retain_batch_size=2", "logging=none", "eval.max_new_tokens=6",
               f"eval.retain_model={model_dir}", f"output_dir={tmp_path / 'runs'}", "run_name=own",
               f"cache_dir={tmp_path / 'cache'}"], timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "runs" / "own" / "results.json").read_text())
    m, ev = res["metrics"], res["evaluation"]
    assert res["steps"] == 2 and res["final_train"]
    for k in ("forget_rouge_l", "retain_rouge_l", "forget_prob", "retain_prob", "forget_fact_recall", "forget_well_formed"):
        assert isinstance(m[k], float), k  # computed from question + answer (+ facts)
    assert m["forget_quality"] is None and m["model_utility"] is None and m["forget_truth_ratio"] is None
    assert ev["rows"]["forget"] == 4 and ev["rows"]["retain"] == 6 and ev["max_new_tokens"] == 6
    assert ev["truth_ratio_key"]["forget"] is None and "no perturbed_answer column" in ev["skipped"]["forget"][1]
    assert ev["retain_reference"]["source"] is None  # the retain model is never evaluated for nothing
    assert ev["device"] == "cpu" and ev["dtype"] == "float32"  # eval.dtype=auto on a CPU-only machine
    lines = out.stderr.splitlines()
    assert sum("split 'forget': skipped" in ln for ln in lines) == 1
    assert sum("metric forget_quality skipped" in ln for ln in lines) == 1
    assert sum(f"evaluation model {tmp_path / 'runs' / 'own' / 'model'}: float32 on cpu (eval.dtype=auto, eval.device=auto)" in ln
               for ln in lines) == 1
    # which data ran, from where, is in results.json, the log and report.md (before: only in config.yaml)
    assert res["data"] == {"name": "json", "dataset": f"json:{FIX}", "path": str(FIX), "hub_id": None,
                           "revisions": None, "rows": {"forget": 4, "retain": 6}}
    line = f"data.name=json from {FIX}; rows: forget 4, retain 6"  # the path once (the label repeats it)
    assert sum(ln.endswith(f"data: {line}") for ln in lines) == 1
    report = (tmp_path / "runs" / "own" / "report.md").read_text()
    assert f"| data | {line} |" in report
    # null forget quality and utility give their own reasons (it blamed a missing reference, and said
    # utility was "computed without" real_authors / world_facts)
    assert "Forget quality is not reported: split 'forget' has no truth ratios." in report
    assert "Model utility is not reported: it is the harmonic mean of retain_prob, retain_rouge_l, " \
           "retain_truth_ratio, and retain_truth_ratio has no value (no paraphrased / perturbed answers" in report
    assert "computed without" not in report
