"""What a job tells its user: a short summary on stdout at the end of a train or eval job (also when
a finished run is reused), one log line on what trains (method, tau, teacher, weights, lr, steps,
trainable set), and why forget_quality is null."""

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.eval.report import run_summary
from tests.helpers import launch
from tests.helpers.tiny import build, train_overrides


def _tofu(fq, tr_key="answer"):
    return {"method": "asu_kl", "tau": 2.0, "steps": 4, "forget_split": "forget",
            "evaluation": {"truth_ratio_key": {"forget": tr_key}, "retain_reference": {"source": None}},
            "metrics": {"forget_quality": fq, "model_utility": 0.5, "forget_fact_recall": 0.25,
                        "retain_fact_recall": 1.0, "forget_rouge_l": 0.3, "retain_rouge_l": 0.9,
                        "forget_entropy": 2.0}}


def test_the_summary_names_files_settings_and_headline_metrics(tmp_path):
    (tmp_path / "report.md").write_text("#")
    text = run_summary(_tofu(None), tmp_path)
    lines = text.splitlines()
    assert len(lines) == 5 and lines[0] == f"run: {tmp_path}"
    assert lines[1] == f"results: {tmp_path / 'results.json'}; report: {tmp_path / 'report.md'}"
    assert lines[2] == "method asu_kl, tau 2.000, 4 steps"
    assert "forget_fact_recall 0.2500" in lines[3] and "model_utility 0.5000" in lines[3]
    assert "forget_entropy" not in text  # headline metrics only
    assert lines[4] == "forget_quality: null (no eval.retain_model or eval.retain_reference)"
    assert "forget_quality: null (split 'forget' has no truth ratios)" in run_summary(_tofu(None, None), tmp_path)
    assert "forget_quality: 0.0123" in run_summary(_tofu(0.0123), tmp_path, reused=True)
    assert "(finished already: its results reused)" in run_summary(_tofu(0.0123), tmp_path, reused=True)
    wmdp = run_summary({"method": "asu_wmdp", "tau": 2.0, "metrics": {"wmdp_bio_accuracy": 0.25}}, tmp_path)
    assert "wmdp_bio_accuracy 0.2500" in wmdp and "forget_quality" not in wmdp
    assert "metrics: none (eval.enabled=false)" in run_summary({"method": "rmu", "tau": None, "metrics": {}}, tmp_path)


PLAIN = {"name": "plain", "template": "Question: {question}\nAnswer:", "applied_to": ["training", "evaluation", "generation"]}


def test_the_summary_says_lora_tau_auto_and_the_prompt_format(tmp_path):
    """A LoRA run, a tau chosen by method.tau=auto and the prompt format were missing from the summary:
    each is said now, only where it applies (no LoRA line for a full fine-tune, no "auto" for a fixed tau)."""
    peft = {"enabled": True, "r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": None, "layers": None,
            "adapter": str(tmp_path / "adapter"), "adapted_modules": ["k_proj", "q_proj"],
            "trainable_params": 2048, "total_params": 1_000_000}
    lora = {**_tofu(0.5), "tau": 2.35, "tau_selection": {"tau": 2.35, "reason": "long"}, "peft": peft,
            "prompt_format": PLAIN}
    lines = run_summary(lora, tmp_path).splitlines()
    assert lines[2] == "method asu_kl, tau 2.350 (chosen by method.tau=auto), 4 steps"
    assert lines[3] == ("trained: LoRA adapters r=4, alpha=8, dropout=0 on modules k_proj, q_proj (the architecture's "
                        "defaults), all layers; base weights frozen (2,048 of 1,000,000 parameters trained, 0.20%)")
    assert lines[4] == "prompt format: plain; applied to training, evaluation, generation"
    assert lines[5].startswith("metrics: ") and len(lines) == 7
    full = run_summary({**_tofu(0.5), "prompt_format": PLAIN}, tmp_path)
    assert "method asu_kl, tau 2.000, 4 steps\nprompt format: plain;" in full
    assert "LoRA" not in full and "auto" not in full


def _tiny_lora():
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.models.peft_student import FrozenBaseView, wrap_lora

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2))
    n_base = sum(p.numel() for p in base.parameters())
    peft = OmegaConf.create({"enabled": True, "r": 2, "alpha": 4.0, "dropout": 0.0, "target_modules": None,
                             "layers": None})
    student = wrap_lora(base, peft)
    return student, FrozenBaseView(student), n_base


def test_the_lora_reference_partition_counts_the_base_weights_not_the_adapters(caplog):
    """A LoRA run's frozen model is the student's base with the adapters off: results.json's
    zero3_partition.reference counted the adapters as its weights (they sit in the same modules), and
    its log line read as a second model's."""
    from pipeline.engine.sharding import record_models

    student, view, n_base = _tiny_lora()
    n_lora = sum(p.numel() for n, p in student.named_parameters() if "lora_" in n)
    with caplog.at_level("INFO"):
        part = record_models(student, view, 1, 0)
    assert f"ZeRO-0 reference: 0 of {part['reference']['params']} parameters partitioned; this rank holds " \
           f"{n_base} of {n_base} elements (the LoRA student's own base weights, adapters off: no second copy)" \
           in caplog.text
    assert n_lora > 0 and part["student"]["full_elements"] == n_base + n_lora
    ref = part["reference"]
    assert ref["full_elements"] == ref["local_elements"] == n_base, (ref, n_base, n_lora)
    assert ref["params"] == len([n for n, _ in student.named_parameters() if "lora_" not in n])
    assert ref["shared_with"] == "student" and not any("lora_" in n for n in ref["whole"])
    assert set(record_models(student, None, 1, 0)) == {"student"}  # no frozen model needed: none recorded


@pytest.mark.parametrize("lora,need,retain_kl,expect", [
    (True, True, False, "reference model loaded: no (LoRA student: its own base with the adapters off is the frozen "
                        "model, no second copy); frozen model during training: none"),
    (True, True, True, "frozen model during training: the LoRA base (retain KL)"),
    (True, False, False, "reference model loaded: no (LoRA student: the cache was ready, so no frozen model was "
                         "needed)"),
    (False, True, False, "reference model loaded: yes; reference engine during training: none"),
    (False, True, True, "reference model loaded: yes; reference engine during training: yes (retain KL)"),
    (False, False, False, "reference model loaded: no; reference engine during training: none"),
])
def test_the_teacher_cache_log_says_which_frozen_model_exists(monkeypatch, caplog, lora, need, retain_kl, expect):
    """method.teacher=cached with a LoRA student logged "reference model loaded: yes": no second model
    is loaded there, its own base with the adapters off is the frozen model."""
    import pipeline.engine.teacher_cache as tc
    import pipeline.run as run

    monkeypatch.setattr(tc, "build_teacher_cache", lambda *a, **k: "/cache/key")
    monkeypatch.setattr(tc, "TeacherCache", lambda path: path)
    monkeypatch.setattr(run, "_compute_dtype", lambda cfg, cuda: "float32")
    frozen = SimpleNamespace() if need else None  # a LoRA view or a reference engine (no destroy() needed here)
    engines = run.JobEngines(engine=object(), reference=frozen, lora=lora, dtype="float32",
                             precision={"device": "cpu"})
    trainer = SimpleNamespace(device="cpu", reference=frozen, engine=engines.engine)
    method = SimpleNamespace(cached_teacher=True, uses_reference=retain_kl)
    cfg = OmegaConf.create({"logging": {"progress_bar": False}, "method": {"tau": 2.0}, "cache_dir": "/c",
                            "trainer": {"batch_size": 2}, "model": {"revision": None}})
    inputs = SimpleNamespace(forget=[], paths=SimpleNamespace(model="m"), data=SimpleNamespace(forget_split="f"),
                             max_len=8, tokenizer=SimpleNamespace(pad_token_id=0))
    with caplog.at_level(logging.INFO, logger="pipeline.run"):
        run._attach_teacher_cache(cfg, method, engines, inputs, trainer, need)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("teacher cache /cache/key; "))
    assert expect in line, line
    assert ("loaded: yes" in line) == (need and not lora)


def test_train_and_eval_print_a_summary_and_the_log_says_what_trains(tmp_path):
    """Before, stdout stayed empty after a train or eval job, a fixed tau, the teacher and the trainable
    set were never logged, and forget_quality: null came without a word when no retain model was set."""
    model_dir, data_dir = build(tmp_path)
    args = train_overrides(model_dir, data_dir, tmp_path / "runs", "asu", steps=2) + [
        "method=asu_kl", "method.tau=2.0", "trainer.save_every=2", "eval.probe_rows=0"]
    run = tmp_path / "runs" / "asu"
    tr = launch.run(args)
    assert tr.returncode == 0, tr.stderr[-3000:]
    out = tr.stdout.splitlines()
    assert out[0] == f"run: {run}" and out[1] == f"results: {run / 'results.json'}; report: {run / 'report.md'}"
    assert out[2] == "method asu_kl, tau 2.000, 2 steps"  # a fixed tau, a full fine-tune: no "auto", no LoRA line
    assert out[3] == "prompt format: plain; applied to training, evaluation, generation"
    assert out[4].startswith("metrics: forget_fact_recall ") and "model_utility" in out[4]
    assert out[5] == "forget_quality: null (no eval.retain_model or eval.retain_reference)"
    assert json.loads((run / "results.json").read_text())["metrics"]["forget_quality"] is None
    md = (run / "report.md").read_text()
    assert "| prompt_format | plain; applied to training, evaluation, generation |" in md
    assert md.startswith("# Unlearning report: asu_kl (tau = 2.000)\n") and "| peft |" not in md
    # one line before training says what trains; the null forget quality is explained once
    assert tr.stderr.count("method asu_kl: tau=2.0, teacher_layers=all, teacher live, gamma=0.1, alpha=1.0; "
                           "lr 0.001, 2 steps; trainable: ") == 1, tr.stderr[-3000:]
    assert "params (all)" in tr.stderr
    # both asu_kl terms are sequence means: no token_mean clause
    assert "loss reductions: forget term sequence_mean, retain term sequence_mean\n" in tr.stderr, tr.stderr[-3000:]
    assert tr.stderr.count("metric forget_quality skipped: no retain-model reference") == 1
    assert (run / "config.yaml").exists()

    again = launch.run(args)  # finished: its results reused, and said so on stdout
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.splitlines()[0] == f"run: {run} (finished already: its results reused)"
    assert "forget_quality: null" in again.stdout

    exported = [a for a in train_overrides(run / "model", data_dir, tmp_path / "runs", "asu_eval")
                if not a.startswith("trainer.")]
    ev = launch.run(exported, script="launchers/eval.py")
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert ev.stdout.splitlines()[0] == f"run: {tmp_path / 'runs' / 'asu_eval'}"
    assert ev.stdout.splitlines()[2] == f"evaluated {run / 'model'}"  # it said "method model" (the model's label)
    assert "metrics: forget_fact_recall" in ev.stdout and "forget_quality: null" in ev.stdout


def test_the_log_names_the_layers_rmu_trains(tmp_path):
    model_dir, data_dir = build(tmp_path)
    args = train_overrides(model_dir, data_dir, tmp_path / "runs", "rmu", steps=1) + [
        "method=rmu", "method.layer=1", "eval.enabled=false"]
    tr = launch.run(args)
    assert tr.returncode == 0, tr.stderr[-3000:]
    assert tr.stderr.count("method rmu: layer=1, gamma=1.0, alpha=1200.0; lr 0.001, 1 step; trainable: ") == 1
    assert "params (mlp.down_proj of layers 0,1)" in tr.stderr and "tau=" not in tr.stderr
    assert "metrics: none (eval.enabled=false)" in tr.stdout and "method rmu" in tr.stdout
