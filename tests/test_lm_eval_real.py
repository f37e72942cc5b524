"""lm-evaluation-harness for real: its own evaluator (``simple_evaluate`` with a ``TaskManager``
over a local, WMDP-shaped task shipped in ``tests/fixtures/lm_eval_tasks``) runs through our bridge
on a tiny Llama, and its accuracy and per-choice log-likelihoods equal our multiple-choice scorer's
(:mod:`pipeline.eval.mcq`) on the same rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.eval.lm_eval_bridge import run_lm_eval
from pipeline.eval.mcq import MCQSettings, evaluate_mcq, mcq_accuracy

TASK_DIR = Path(__file__).parent / "fixtures" / "lm_eval_tasks"
ROWS_FILE = TASK_DIR / "wmdp_local" / "test.jsonl"


def _tiny_model_dir(root: Path, rows: list[dict]) -> Path:
    """A random tiny Llama whose word-level vocabulary covers the task's prompts."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = " ".join([r["question"] + " " + " ".join(r["choices"]) for r in rows]
                    + ["The following are multiple choice questions (with answers) about biology. A B C D Answer:"])
    pre = pre_tokenizers.Whitespace()
    words = dict.fromkeys(w for w, _ in pre.pre_tokenize_str(text))
    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *words])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                  unk_token="<unk>")
    torch.manual_seed(7)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.5)
    out = root / "model"
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def test_lm_eval_evaluator_equals_our_mcq_scorer(tmp_path):
    pytest.importorskip("lm_eval", reason="the lm-eval extra (requirements/extras.lock) is not installed")
    from pipeline.models.loading import load_causal_lm, load_tokenizer

    rows = [json.loads(line) for line in ROWS_FILE.read_text().splitlines()]
    model_dir = _tiny_model_dir(tmp_path, rows)
    out = run_lm_eval(model_dir, ["wmdp_local"], include_path=TASK_DIR, include_defaults=False,
                      batch_size=4, log_samples=True)
    theirs = out["samples"]["wmdp_local"]
    assert [s["doc_id"] for s in theirs] == list(range(len(rows)))
    assert [int(s["target"]) for s in theirs] == [r["answer"] for r in rows]

    model = load_causal_lm(model_dir).eval()
    ours = evaluate_mcq(model, load_tokenizer(model_dir), rows, MCQSettings(batch_size=4), name="wmdp-bio")
    for s, ll in zip(theirs, ours.values["logliks"]):
        assert s["logliks"] == pytest.approx(ll, abs=1e-4)
    # The random model must not answer everything the same way, or the comparison would be weak.
    assert len(set(ours.values["pred"])) > 1
    assert out["summary"]["wmdp_local"] == pytest.approx(mcq_accuracy(ours), abs=1e-12)
    assert out["summary"]["wmdp_local_stderr"] > 0
