"""TOFU's real layout (config names and columns) and TOFU's truth ratio on it, checked by hand.

The fixture ``tests/fixtures/tofu`` mirrors ``locuslab/TOFU``: ``forget10`` / ``retain90``
(question, answer) for training, ``forget10_perturbed`` / ``retain_perturbed`` (+ paraphrased_question,
paraphrased_answer, perturbed_answer: list) and ``real_authors_perturbed`` / ``world_facts_perturbed``
(question, answer, perturbed_answer) for evaluation — the configs open-unlearning's
``configs/data/datasets/TOFU_QA_*.yaml`` read for each metric.
"""

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pipeline.config import DataConfig, RunConfig
from pipeline.data.formatting import encode_qa
from pipeline.data.loaders import load_unlearning_data
from pipeline.eval.runner import evaluate_splits, truth_ratio_key, truth_ratio_reference
from pipeline.eval.tofu import EvalSettings

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "tofu"


def data_cfg(name: str, **over):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(ROOT / "conf" / "data" / f"{name}.yaml"),
                           over)


def run_cfg(data_name: str, **data_over):
    cfg = OmegaConf.structured(RunConfig)
    cfg.data = data_cfg(data_name, **data_over)
    return cfg


@pytest.fixture(scope="module")
def data():
    return load_unlearning_data(data_cfg("tofu_forget10", path=str(FIX)))


@pytest.fixture(scope="module")
def tok_model(data):
    pre = pre_tokenizers.Whitespace()
    texts = ["Question: x\nAnswer:"]
    for rows in (data.forget, data.retain, *data.eval.values()):
        for r in rows:
            texts += [r["question"], r["answer"], r.get("paraphrased_answer") or "", *r.get("perturbed_answer", [])]
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)})
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>"] + words)},
                                    unk_token="<unk>"))
    tk.pre_tokenizer = pre
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>")
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.3,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg._attn_implementation = "eager"
    return tok, LlamaForCausalLM(cfg).eval()


def test_reads_tofu_config_names_and_columns(data):
    assert (data.forget_split, data.retain_split) == ("forget10", "retain90")
    assert len(data.forget) == 3 and sorted(data.forget[0]) == ["answer", "question"]
    assert len(data.retain) == 4
    f = data.eval["forget10"]  # read from config forget10_perturbed
    assert sorted(f[0]) == ["answer", "paraphrased_answer", "paraphrased_question", "perturbed_answer", "question"]
    assert [r["question"] for r in f] == [r["question"] for r in data.forget]
    assert all(isinstance(r["perturbed_answer"], list) and len(r["perturbed_answer"]) == 3 for r in f)
    assert "paraphrased_question" in data.eval["retain90"][0]  # retain_perturbed
    assert data.eval["real_authors"][0]["perturbed_answer"] and data.eval["world_facts"][0]["answer"] == "Paris"


def _avg_logprob(model, tok, q, a):
    """Mean log-probability of the answer tokens and <eos> given the plain prompt (one forward, by hand)."""
    e = encode_qa(tok, q, a, 128)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([e.input_ids])).logits[0].float(), -1)
    lps = [logp[t - 1, e.labels[t]].item() for t in range(1, len(e.input_ids)) if e.labels[t] != -100]
    return sum(lps) / len(lps)


def test_truth_ratio_is_tofus_definition_chosen_by_the_data_config(data, tok_model):
    tok, model = tok_model
    # The reference is a property of the dataset's config, not of its path.
    assert truth_ratio_reference(run_cfg("tofu_forget10", path="/data/synthetic-1234")) == "paraphrased_answer"
    assert truth_ratio_key(run_cfg("tofu_forget10")) is None  # TOFU's per-split definition
    assert truth_ratio_key(run_cfg("synthetic_forget10")) == "answer"  # the embedded benchmark: trained answer
    cfg = run_cfg("tofu_forget10")
    cfg.eval.truth_ratio_reference = "answer"  # an explicit eval override wins
    assert truth_ratio_key(cfg) == "answer"

    splits = {s: data.eval[s] for s in ("forget10", "real_authors")}
    st = EvalSettings(batch_size=2, max_new_tokens=2, max_length=128)
    res = evaluate_splits(model, tok, splits, st, truth_ratio_key(run_cfg("tofu_forget10")))
    f, ra = res["forget10"], res["real_authors"]
    assert (f.truth_ratio_key, ra.truth_ratio_key) == ("paraphrased_answer", "answer")
    differs = 0
    for r, tr in zip(splits["forget10"], f.truth_ratio):
        para = _avg_logprob(model, tok, r["question"], r["paraphrased_answer"])
        pert = [_avg_logprob(model, tok, r["question"], p) for p in r["perturbed_answer"]]
        # TOFU: P_pert / P_para with P = exp(mean log-prob per token); perturbed side geometric mean
        expect = math.exp(sum(pert) / len(pert) - para)
        assert tr == pytest.approx(expect, rel=1e-4)
        ans = _avg_logprob(model, tok, r["question"], r["answer"])
        differs += abs(math.exp(sum(pert) / len(pert) - ans) - expect) > 1e-3 * expect
    assert differs, "the fixture must tell the paraphrase-based ratio from the answer-based one"
    for r, tr in zip(splits["real_authors"], ra.truth_ratio):  # no paraphrase in TOFU: the answer
        pert = [_avg_logprob(model, tok, r["question"], p) for p in r["perturbed_answer"]]
        expect = math.exp(sum(pert) / len(pert) - _avg_logprob(model, tok, r["question"], r["answer"]))
        assert tr == pytest.approx(expect, rel=1e-4)


def test_question_answer_only_config_evaluates_without_truth_ratio(tok_model, caplog):
    """holdout01 (as full, real_authors: question / answer only; open-unlearning's TOFU_MIA reads
    holdout10 so) is a valid eval split: its truth-ratio metrics are skipped with a log line, as for
    any dataset's QA-only split. The *_perturbed configs still need their columns."""
    tok, model = tok_model
    d = load_unlearning_data(data_cfg("tofu_forget10", path=str(FIX), eval_splits=["forget10", "holdout01"]))
    assert sorted(d.eval["holdout01"][0]) == ["answer", "question"]
    with caplog.at_level("INFO", logger="pipeline.eval.tofu"):
        res = evaluate_splits(model, tok, {"holdout01": d.eval["holdout01"]},
                              EvalSettings(batch_size=2, max_new_tokens=2, max_length=128), None)
    assert any("no perturbed_answer column" in s for s in res["holdout01"].skipped)
    assert "split 'holdout01': skipped" in caplog.text
