"""Atomic writes and the results.json / report formats."""

import json
import math

import numpy as np
import pytest

from pipeline.eval.report import (
    comparison_markdown,
    comparison_table,
    render_report_md,
    write_results,
)
from pipeline.io import atomic_dir, atomic_write_json, atomic_write_text, recover_dir


def _listing(d):
    return sorted(p.name for p in d.iterdir())


def test_atomic_write_text_and_json(tmp_path):
    p = atomic_write_text(tmp_path / "sub" / "a.txt", "hello")
    assert p.read_text() == "hello"
    atomic_write_text(p, "bye")
    assert p.read_text() == "bye"
    j = atomic_write_json(tmp_path / "x.json", {"a": np.float32(0.5), "b": float("nan"), "c": np.arange(2),
                                                 "d": (1, float("inf"))})
    assert json.loads(j.read_text()) == {"a": 0.5, "b": None, "c": [0, 1], "d": [1, None]}
    assert _listing(tmp_path) == ["sub", "x.json"] and _listing(tmp_path / "sub") == ["a.txt"]


def test_atomic_write_json_failure_keeps_old_file(tmp_path):
    p = atomic_write_json(tmp_path / "r.json", {"v": 1})
    with pytest.raises(TypeError):
        atomic_write_json(p, {"v": object()})
    assert json.loads(p.read_text()) == {"v": 1}
    assert _listing(tmp_path) == ["r.json"]


def test_atomic_dir_success_replaces_and_failure_keeps_previous(tmp_path):
    final = tmp_path / "ckpt"
    with atomic_dir(final) as d:
        (d / "w.bin").write_text("v1")
        assert not final.exists()  # invisible until the block succeeds
    assert (final / "w.bin").read_text() == "v1"

    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(final) as d:
            (d / "w.bin").write_text("half")
            raise RuntimeError("boom")
    assert _listing(final) == ["w.bin"] and (final / "w.bin").read_text() == "v1"
    assert _listing(tmp_path) == ["ckpt"]  # no temp dirs left behind

    with atomic_dir(final) as d:
        (d / "other.bin").write_text("v2")
    assert _listing(final) == ["other.bin"]  # replaced, not merged
    assert _listing(tmp_path) == ["ckpt"]  # old copy deleted


def test_recover_dir_after_crash_between_renames(tmp_path):
    old = tmp_path / ".ckpt.old-abc"
    old.mkdir()
    (old / "w.bin").write_text("v1")
    assert recover_dir(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "w.bin").read_text() == "v1" and _listing(tmp_path) == ["ckpt"]
    assert not recover_dir(tmp_path / "ckpt")


METRICS = {"forget_quality": 0.0123, "model_utility": 0.61, "forget_rouge_l": 0.2, "retain_rouge_l": float("nan"),
           "forget_well_formed": 0.9, "model_utility_missing": [], "model_utility_components": ["retain_prob"]}


def test_results_json_schema(tmp_path):
    p = write_results(tmp_path / "run", "asu", 2.0, METRICS, {"exp_name": "tofu_tiny", "steps": 10})
    assert p == tmp_path / "run" / "results.json"
    r = json.loads(p.read_text())
    assert list(r)[:4] == ["schema", "method", "tau", "metrics"]
    assert r["schema"] == 1 and r["method"] == "asu" and r["tau"] == 2.0
    assert r["metrics"]["forget_quality"] == pytest.approx(0.0123)
    assert r["metrics"]["retain_rouge_l"] is None  # nan -> null: strict JSON
    assert r["exp_name"] == "tofu_tiny" and r["steps"] == 10
    r2 = json.loads(write_results(tmp_path / "run2", "grad_ascent", None, {"x": 1}).read_text())
    assert r2["tau"] is None and r2["metrics"] == {"x": 1}
    with pytest.raises(ValueError, match="reserved"):
        write_results(tmp_path / "run", "asu", 2.0, METRICS, {"metrics": {}})


def test_report_markdown_and_tables(tmp_path):
    r = json.loads(write_results(tmp_path, "asu", 2.0, METRICS, {"exp_name": "tofu_tiny"}).read_text())
    md = render_report_md(r)
    assert md.startswith("# Unlearning report: asu (tau = 2.000)")
    assert "| `forget_quality` | 0.0123 | ↑ |" in md
    assert "| `retain_rouge_l` | - |" in md and "| exp_name | tofu_tiny |" in md
    assert "KS test" in md

    rows = [r, {"method": "grad_ascent", "tau": None, "metrics": {"forget_quality": 1e-9, "model_utility": 0.0}}]
    cols = ["method", "tau", "forget_quality", "model_utility"]
    table = comparison_table(rows, cols)
    lines = table.splitlines()
    assert lines[0].split() == cols and len(lines) == 4
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule have the same width
    assert lines[2].split() == ["asu", "2.0000", "0.0123", "0.6100"]
    assert lines[3].split() == ["grad_ascent", "-", "1.00e-09", "0.0000"]
    mdt = comparison_markdown(rows, cols).splitlines()
    assert mdt[0] == "| method | tau | forget_quality | model_utility |"
    assert mdt[1] == "|---|---:|---:|---:|"
    assert mdt[3] == "| grad_ascent | - | 1.00e-09 | 0.0000 |"
    assert not math.isnan(r["metrics"]["model_utility"])


PEFT = {"enabled": True, "r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": None, "layers": None,
        "adapter": "/runs/x/adapter", "adapted_modules": ["down_proj", "k_proj", "q_proj"]}
PLAIN = {"name": "plain", "template": "Question: {question}\nAnswer:", "applied_to": ["training", "evaluation", "generation"]}


def test_report_says_lora_tau_auto_and_the_prompt_format(tmp_path):
    """results.json records LoRA (``peft``), tau=auto's choice (``tau_selection``) and the prompt format
    as objects, which report.md skipped: a LoRA run, an auto tau and a chat format read like a full
    fine-tune at a fixed tau in the plain format. Each is one row now, only where it applies."""
    sel = {"tau": 2.35, "reason": "smallest tau at which the teacher has forgotten >= 0.5 x the facts", "probes": []}
    chat = {"name": "chat", "system_prompt": "Be | brief.", "source": "tokenizer.chat_template",
            "chat_template_kwargs": {"date_string": "26 Jul 2024"}, "applied_to": ["training"]}
    r = json.loads(write_results(tmp_path, "asu_kl", 2.35, METRICS, {"peft": PEFT, "tau_selection": sel,
                                                                     "prompt_format": chat}).read_text())
    md = render_report_md(r)
    assert md.startswith("# Unlearning report: asu_kl (tau = 2.350, chosen by method.tau=auto)")
    assert ("| peft | LoRA adapters r=4, alpha=8, dropout=0 on modules down_proj, k_proj, q_proj (the architecture's "
            "defaults), all layers; base weights frozen |") in md
    assert ("| prompt_format | chat, system prompt 'Be \\| brief.', chat_template_kwargs date_string='26 Jul 2024'; "
            "applied to training |") in md
    assert "| tau_selection | 2.350, chosen by method.tau=auto: smallest tau at which the teacher has forgotten" in md
    # a tau taken from the checkpoint a resume started from names it
    resumed = render_report_md({**r, "tau_selection": {"tau": 2.35, "source": "checkpoint /runs/x/step_2"}})
    assert "| tau_selection | 2.350, chosen by method.tau=auto: checkpoint /runs/x/step_2 |" in resumed
    # configured modules on given layers, not exported (no adapter config read back)
    some = {**PEFT, "target_modules": ["q_proj", "v_proj"], "layers": [0, 1], "adapted_modules": None, "r": 8,
            "alpha": 16.0, "dropout": 0.05}
    assert ("| peft | LoRA adapters r=8, alpha=16, dropout=0.05 on modules q_proj, v_proj, layers 0, 1; base "
            "weights frozen |") in render_report_md({**r, "peft": some})

    full = render_report_md(json.loads(write_results(tmp_path, "asu_kl", 2.0, METRICS, {"prompt_format": PLAIN})
                                       .read_text()))  # a full fine-tune at a fixed tau
    assert full.startswith("# Unlearning report: asu_kl (tau = 2.000)\n")
    assert "| prompt_format | plain; applied to training, evaluation, generation |" in full
    assert "LoRA" not in full and "peft" not in full and "method.tau=auto" not in full and "tau_selection" not in full
    raw = render_report_md({"method": "rmu", "tau": None, "metrics": {}, "prompt_format": {**PLAIN, "applied_to": []}})
    assert "| prompt_format | plain; not applied (no question/answer rows) |" in raw
    # MUSE / WMDP: the evaluation's prompts are the benchmark's own, and the report says which (it said none)
    from pipeline.inputs import OWN_EVALUATION_PROMPTS

    wmdp = render_report_md({"method": "rmu", "tau": None, "metrics": {},
                             "prompt_format": {**PLAIN, "applied_to": [], "evaluation_prompts": OWN_EVALUATION_PROMPTS["wmdp"]}})
    assert ("| prompt_format | plain; not applied; evaluation prompts: lm-eval's multiple-choice "
            "template ('...\\nA. ...\\nAnswer:', each choice scored as ' A', ' B', ...) |") in wmdp


def test_probe_metrics_have_a_direction_so_rules_and_report_arrows_are_right():
    """The robustness probe's metrics (every key robustness_metrics returns) are in METRIC_INFO: a drop
    is better low (``--rule probe_fact_recall_drop`` minimised it only by luck before: it maximised),
    the probed recalls high; report.md shows the arrow."""
    from types import SimpleNamespace

    from pipeline.eval.report import metric_info
    from pipeline.eval.robustness import robustness_metrics
    from pipeline.eval.sweep import parse_rule

    split = SimpleNamespace(indices=[0, 1], fact_recall=[1.0, 0.5], rouge_l_recall=[1.0, 0.5])
    keys = set(robustness_metrics(split, split, [0, 1]))
    assert {k: metric_info(k)[0] for k in keys} == {
        "probe_fact_recall": "up", "probe_rouge_l": "up", "probe_fact_recall_drop": "down", "probe_rouge_l_drop": "down"}
    assert all(metric_info(k)[1] for k in keys)
    assert parse_rule("probe_fact_recall_drop").direction == "down"
    md = render_report_md({"method": "x", "tau": None, "metrics": {"probe_fact_recall_drop": 0.3}})
    assert "| `probe_fact_recall_drop` | 0.3000 | ↓ |" in md


def test_the_data_row_names_a_hub_dataset_and_its_pinned_revisions():
    from pipeline.eval.report import data_setting

    hub = {"name": "wmdp", "dataset": "wmdp:bio", "path": None, "hub_id": None,
           "revisions": {"default": "abc123", "cais/wmdp": "def456"}, "rows": {"bio-forget-corpus": 2}}
    assert data_setting(hub) == ("data.name=wmdp (wmdp:bio) from the hub (the loader's default id) at revision abc123, "
                                 "cais/wmdp def456; rows: bio-forget-corpus 2")
    one = {**hub, "hub_id": "locuslab/TOFU", "revisions": {"locuslab/TOFU": "v1"}, "name": "tofu", "dataset": "tofu"}
    assert data_setting(one).startswith("data.name=tofu (tofu) from locuslab/TOFU at revision v1;")
    assert data_setting({"name": None}) is None and data_setting("x") is None


def test_the_report_says_what_the_evaluation_scored_and_how():
    """report.md had no word on the rows scored, lengths or BOS of a MUSE / WMDP evaluation (only
    results.json's evaluation record had them)."""
    from pipeline.eval.report import evaluation_setting

    wmdp = {"device": "cpu", "dtype": "float32", "reused_splits": [], "rows": {"wmdp-cyber": 3, "mmlu": 2},
            "max_rows": None, "max_length": 64, "mcq_add_bos": False}
    assert evaluation_setting(wmdp) == "rows wmdp-cyber 3, mmlu 2; max_length 64; BOS not added; on cpu, float32"
    muse = {"device": "cpu", "dtype": "float32", "rows": {"verbmem_forget": 1, "knowmem_forget": 1}, "max_rows": 1,
            "rouge_stemmer": False, "max_length": 48, "icl_rows": {"knowmem_forget_icl": 2},
            "generation": "greedy", "verbmem_max_new_tokens": 2, "knowmem_max_new_tokens": 2, "mink_k": 0.4,
            "retrain_auc": None}
    assert evaluation_setting(muse) == (
        "rows verbmem_forget 1, knowmem_forget 1 (eval.max_rows=1); few-shot knowmem_forget_icl 2; max_length 48; "
        "verbmem_max_new_tokens 2, knowmem_max_new_tokens 2 (greedy); Min-K% k=0.4; retrain AUC -; ROUGE unstemmed; "
        "on cpu, float32")
    md = render_report_md({"method": "model", "tau": None, "metrics": {"wmdp-cyber_accuracy": 0.5}, "evaluation": wmdp})
    assert "| evaluation | rows wmdp-cyber 3, mmlu 2; max_length 64; BOS not added; on cpu, float32 |" in md
    assert evaluation_setting(None) is None and evaluation_setting({"device": "cpu"}) is None


def test_the_report_names_a_resumed_checkpoint_and_the_command_line_overrides():
    """A resumed run's report.md dropped resumed_from (a dict, skipped as not a scalar), and a sweep point's
    report named neither its lr nor any other override (every point has the sweep's run_name)."""
    base = {"method": "asu_kl", "tau": 2.5, "metrics": {}, "resumed_from": None,
            "provenance": {"overrides": ["+exp=tofu_tiny", "method.tau=2.5", "trainer.lr=0.001"]}}
    fresh = render_report_md(base)
    assert "| resumed_from | - |" in fresh
    assert "| overrides | +exp=tofu_tiny method.tau=2.5 trainer.lr=0.001 |" in fresh
    resumed = render_report_md({**base, "resumed_from": {"checkpoint": "step_00000011", "step": 11, "kernels": None}})
    assert ("| resumed_from | step 11 (checkpoint step_00000011); train_seconds adds the earlier attempts' loop time |"
            in resumed)
    assert "| overrides |" not in render_report_md({**base, "provenance": {"overrides": None}})
