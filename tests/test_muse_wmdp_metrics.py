"""MUSE (VerbMem, KnowMem, Min-K%, PrivLeak), multiple-choice accuracy and the lm-eval bridge,
checked against values worked out by hand (arithmetic in the comments) or a manual loop."""

import math
import sys
import types

import pytest
import torch

from pipeline.eval import muse as MU
from pipeline.eval.lm_eval_bridge import LmEvalNotInstalled, run_lm_eval
from pipeline.eval.mcq import (
    MCQSettings,
    continuation_logliks,
    description_for,
    evaluate_mcq,
    letter_collision,
    mcq_accuracy,
    mcq_prompt,
)


def word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *dict.fromkeys(words)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")


def tiny_llama(vocab_size, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.5)
    return LlamaForCausalLM(cfg).eval()


# ---------------------------------------------------------------------------------- Min-K%, AUC
def test_min_k_score_by_hand():
    # 5 tokens, k=0.4 -> int(5*0.4)=2 lowest: -5, -4 -> mean -4.5
    assert MU.min_k_score([-1.0, -2.0, -3.0, -4.0, -5.0], 0.4) == pytest.approx(-4.5)
    # 3 tokens -> int(1.2)=1 lowest: -3
    assert MU.min_k_score([-0.5, -3.0, -1.0], 0.4) == pytest.approx(-3.0)
    # 1 token -> max(1, int(0.4)) = 1
    assert MU.min_k_score([-2.0], 0.4) == pytest.approx(-2.0)
    assert math.isnan(MU.min_k_score([], 0.4))
    with pytest.raises(ValueError):
        MU.min_k_score([-1.0], 0.0)


def test_auc_and_privleak_by_hand():
    forget, holdout = [0.9, 0.5, 0.3], [0.6, 0.2, 0.5]
    # pairs forget > holdout (tie = 1/2): 0.9 beats all 3 -> 3; 0.5: >0.2, tie 0.5 -> 1.5; 0.3: >0.2 -> 1
    # AUC = 5.5 / 9
    auc_unlearn = MU.auc_mann_whitney(forget, holdout)
    assert auc_unlearn == pytest.approx(5.5 / 9)
    # retrained model: forget [0.35, 0.1, 0.55] vs holdout [0.4, 0.2, 0.5]:
    # 0.35 > 0.2 -> 1; 0.1 -> 0; 0.55 beats all 3 -> 3  => 4 / 9
    auc_retrain = MU.auc_mann_whitney([0.35, 0.1, 0.55], [0.4, 0.2, 0.5])
    assert auc_retrain == pytest.approx(4 / 9)
    # PrivLeak on MUSE's AUC (forget labelled 0, holdout 1: 1 - ours): unlearned 3.5/9, retrained 5/9
    # -> (3.5/9 - 5/9) / (5/9) * 100 = -1.5/5 * 100 = -30 (the forget set is still more detectable)
    assert MU.privleak(auc_unlearn, auc_retrain) == pytest.approx(-30.0)
    # without a retrained model's AUC the reference is 0.5: (3.5/9 - 0.5)/0.5*100 = -200/9
    assert MU.privleak(auc_unlearn) == pytest.approx(-200 / 9)
    # a memorising target (every forget text above every holdout text) is MUSE's -100; retraining 0
    assert MU.privleak(1.0) == pytest.approx(-100.0) and MU.privleak(0.6, 0.6) == 0.0
    # MUSE's own formula on the AUC its script computes (sklearn, y = [0]*forget + [1]*holdout, score =
    # -ppl, where its Min-K "ppl" is minus our Min-K score) gives the same PrivLeak
    from sklearn.metrics import roc_auc_score

    def muse_auc(f, h):  # MUSE stores ppl = -(Min-K score) per text and ranks by -ppl, the Min-K score
        return roc_auc_score([0] * len(f) + [1] * len(h), f + h)

    u, r = muse_auc(forget, holdout), muse_auc([0.35, 0.1, 0.55], [0.4, 0.2, 0.5])
    assert MU.privleak(auc_unlearn, auc_retrain) == pytest.approx((u - r) / r * 100)
    assert MU.auc_mann_whitney([1.0, 2.0], [0.0]) == 1.0 and MU.auc_mann_whitney([0.0], [1.0, 2.0]) == 0.0
    assert math.isnan(MU.auc_mann_whitney([], [1.0]))


def test_muse_metrics_summary_from_min_k_scores():
    f = MU.ExampleResults("privleak_forget", [0, 1, 2], {"min_k": [0.9, 0.5, 0.3]})
    h = MU.ExampleResults("privleak_holdout", [0, 1, 2], {"min_k": [0.6, 0.2, 0.5]})
    out = MU.muse_metrics(mink_forget=f, mink_holdout=h, retrain_auc=4 / 9)
    assert out["privleak_auc"] == pytest.approx(5.5 / 9) and out["privleak"] == pytest.approx(-30.0)
    assert out["privleak_reference"] == "retrain"
    assert MU.muse_metrics(mink_forget=f, mink_holdout=h)["privleak_reference"] == "default_0.5"


def test_token_logprobs_and_min_k_match_manual_loop():
    words = "the harbour council voted to close old ferry pier".split()
    tok = word_tokenizer(words)
    model = tiny_llama(len(tok))
    texts = ["the harbour council voted to close", "old ferry pier", "the pier"]
    got = MU.token_logprobs(model, tok, texts, batch_size=2, max_length=64)
    for t, lp in zip(texts, got):
        ids = [1] + tok(t, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        manual = [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]
        assert lp == pytest.approx(manual, abs=1e-5)
    # max_length counts text tokens after <bos> (open-unlearning's MUSE_MIA): 3 of the first text's 6
    assert MU.token_logprobs(model, tok, texts[:1], batch_size=1, max_length=3)[0] == pytest.approx(got[0][:3], abs=1e-5)
    rows = [{"text": t} for t in texts]
    res = MU.evaluate_mink(model, tok, rows, MU.MuseSettings(batch_size=2, mink_k=0.4))
    assert res.values["min_k"][0] == pytest.approx(MU.min_k_score(got[0], 0.4))
    assert res.values["n_tokens"] == [6, 3, 2]
    # two ranks, merged = one rank
    parts = [MU.evaluate_mink(model, tok, rows, MU.MuseSettings(batch_size=2), rank=r, world_size=2) for r in (0, 1)]
    merged = MU.merge_results(parts[::-1])
    assert merged.indices == [0, 1, 2] and merged.values["min_k"] == pytest.approx(res.values["min_k"])


# ------------------------------------------------------------------------------ VerbMem, KnowMem
class ScriptedGenerator(torch.nn.Module):
    """generate() appends a scripted continuation chosen by the prompt's last token."""

    def __init__(self, tok, script):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.script = tok, script

    def generate(self, input_ids, attention_mask=None, max_new_tokens=8, **kw):
        rows = []
        for ids in input_ids.tolist():
            last = self.tok.convert_ids_to_tokens(ids[-1])
            new = self.tok(self.script[last], add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            rows.append(ids + (new + [0] * max_new_tokens)[:max_new_tokens])
        return torch.tensor(rows)


def test_verbmem_rouge_l_f1_by_hand():
    words = "the harbour council voted to close old ferry pier was closed today officials said open next spring".split()
    tok = word_tokenizer(words)
    model = ScriptedGenerator(tok, {"close": "the ferry pier was closed today", "said": "open next spring"})
    rows = [{"prompt": "the harbour council voted to close", "gt": "the old ferry pier closed"},
            {"prompt": "officials said", "gt": "open next spring"}]
    res = MU.evaluate_verbmem(model, tok, rows, MU.MuseSettings(batch_size=2, verbmem_max_new_tokens=10))
    # row 0: pred "the ferry pier was closed today" (6), ref "the old ferry pier closed" (5)
    # LCS = the ferry pier closed = 4; P = 4/6, R = 4/5, F1 = 2PR/(P+R) = (16/15)/(22/15) = 8/11
    # row 1: exact -> 1.0.  VerbMem = (8/11 + 1)/2 = 19/22
    assert res.values["rouge_l_f1"] == pytest.approx([8 / 11, 1.0])
    assert res.values["rouge_l_recall"] == pytest.approx([4 / 5, 1.0])
    assert MU.muse_metrics(verbmem=res)["verbmem_forget"] == pytest.approx(19 / 22)


def test_knowmem_prompt_stops_and_scores():
    icl = [{"question": "What did the survey find?", "answer": "cracks"}]
    assert MU.knowmem_prompt("When?", icl) == "Question: What did the survey find?\nAnswer: cracks\n\nQuestion: When?\nAnswer: "
    assert MU.cut_at_stops(" next spring\n\nQuestion: x") == "next spring"
    assert MU.cut_at_stops("next spring\nQuestion x") == "next spring"
    assert MU.cut_at_stops("a Question: b") == "a"

    words = "question : what did the survey find answer cracks when will it open which pier next spring old ferry".split()
    tok = word_tokenizer(words + ["?", "Question", "Answer", "What", "When", "Which"])
    model = ScriptedGenerator(tok, {":": "next spring"})  # every prompt ends with "Answer:"
    rows = [{"question": "When will it open?", "answer": "next spring"},
            {"question": "Which pier?", "answer": "the old ferry pier"}]
    res = MU.evaluate_knowmem(model, tok, rows, MU.MuseSettings(batch_size=1), icl=icl, name="knowmem_forget")
    # row 0 exact -> F1 1; row 1: no common token -> 0; KnowMem = 0.5
    assert res.values["rouge_l_f1"] == [1.0, 0.0] and res.values["generation"][0] == "next spring"
    out = MU.muse_metrics(knowmem_forget=res)
    assert out["knowmem_forget"] == 0.5 and out["knowmem_forget_recall"] == 0.5


def test_knowmem_cuts_the_raw_answer_before_stripping_it():
    """MUSE's knowmem.py and open-unlearning cut the decoded answer at the stop strings, then strip:
    an answer opening with a blank line scores as empty. Stripping first kept the text after it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<eos>", "<unk>", "\n\n", "Question:", "Answer:", "When?", "Paris", "today"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    # pieces: "\n\n" and runs of non-space (the rest dropped); decoding fuses them, newlines kept
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n\n|\S+"), behavior="removed", invert=True)
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                  unk_token="<unk>")
    model = ScriptedGenerator(tok, {"Answer:": "\n\n Paris"})
    res = MU.evaluate_knowmem(model, tok, [{"question": "When?", "answer": "Paris"}], MU.MuseSettings(batch_size=1))
    assert res.values["generation"] == [""] and res.values["rouge_l_f1"] == [0.0]
    model = ScriptedGenerator(tok, {"Answer:": "Paris \n\n today"})
    res = MU.evaluate_knowmem(model, tok, [{"question": "When?", "answer": "Paris"}], MU.MuseSettings(batch_size=1))
    assert res.values["generation"] == ["Paris"] and res.values["rouge_l_f1"] == [1.0]


def test_split_prefix():
    tok = word_tokenizer("a b c d e".split())
    assert MU.split_prefix(tok, "a b c d e", 2) == ("a b", "c d e")


# ------------------------------------------------------------------------------------------- MCQ
MCQ_WORDS = ("The following are multiple choice questions with answers about biology cybersecurity "
             "Answer A B C D ( ) . : \n which is red blue green gray sky grass sea ash").split()
ROWS = [
    {"question": "which is red ?", "choices": ["sky", "grass", "sea", "ash"], "answer": 1},
    {"question": "which is blue ?", "choices": ["sky", "grass", "sea", "ash"], "answer": 1},
    {"question": "which is green ?", "choices": ["sky", "grass", "sea", "ash"], "answer": 0},
]


def test_mcq_prompt_matches_lm_eval_format():
    expected = ("The following are multiple choice questions (with answers) about biology.\n\n"
                "Q?\nA. a\nB. b\nC. c\nD. d\nAnswer:")
    assert mcq_prompt(" Q? ", ["a", "b", "c", "d"], description_for("wmdp_bio")) == expected
    assert description_for("wmdp-cyber").endswith("about cybersecurity.\n\n")
    assert description_for("mmlu", {"subject": "high_school_biology"}).endswith("about high school biology.\n\n")


class FavourToken(torch.nn.Module):
    """Logits that put all mass on one token at every position."""

    def __init__(self, vocab, token_id):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.token_id = vocab, token_id

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.token_id] = 20.0
        return types.SimpleNamespace(logits=logits)


def test_mcq_accuracy_when_the_answer_is_certain_by_construction():
    tok = word_tokenizer(MCQ_WORDS)
    model = FavourToken(len(tok), tok.convert_tokens_to_ids("B"))
    res = evaluate_mcq(model, tok, ROWS, MCQSettings(batch_size=3), name="wmdp-bio")
    # " B" is the likeliest continuation for every question -> predictions [1, 1, 1];
    # answers [1, 1, 0] -> accuracy 2/3
    assert res.values["pred"] == [1, 1, 1] and mcq_accuracy(res) == pytest.approx(2 / 3)


def test_mcq_logliks_match_manual_loop_and_ranks_merge():
    tok = word_tokenizer(MCQ_WORDS)
    model = tiny_llama(len(tok), seed=3)
    cfg = MCQSettings(batch_size=5)
    res = evaluate_mcq(model, tok, ROWS, cfg, name="wmdp-bio")
    correct = []
    for r, got in zip(ROWS, res.values["logliks"]):
        ctx = tok(mcq_prompt(r["question"], r["choices"], description_for("wmdp-bio")),
                  add_special_tokens=False)["input_ids"]
        manual = []
        for letter in "ABCD":
            ids = ctx + [tok.convert_tokens_to_ids(letter)]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            manual.append(logp[len(ctx) - 1, ids[-1]].item())
        assert got == pytest.approx(manual, abs=1e-5)
        correct.append(float(max(range(4), key=lambda i: manual[i]) == r["answer"]))
    assert mcq_accuracy(res) == pytest.approx(sum(correct) / 3)
    parts = [evaluate_mcq(model, tok, ROWS, cfg, name="wmdp-bio", rank=k, world_size=2) for k in (0, 1)]
    merged = MU.merge_results(parts)
    assert merged.values["pred"] == res.values["pred"]
    assert mcq_accuracy(merged) == mcq_accuracy(res)


def test_continuation_with_bos_and_multi_token_continuations():
    tok = word_tokenizer(MCQ_WORDS)
    model = tiny_llama(len(tok), seed=1)
    (two,) = continuation_logliks(model, tok, ["which is"], [" red blue"], batch_size=1, add_bos=True)
    ids = [1] + tok("which is red blue", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    # sum of the log-probs of "red" (position 3) and "blue" (position 4)
    assert two == pytest.approx(logp[2, ids[3]].item() + logp[3, ids[4]].item(), abs=1e-5)


# ---------------------------------------------------------------------------------------- lm-eval
# lm-eval itself runs for real in tests/test_lm_eval_real.py.
def test_lm_eval_missing_gives_clear_error(monkeypatch, tmp_path):
    # None in sys.modules makes `import lm_eval` raise ImportError, as on a machine without the extra
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(LmEvalNotInstalled, match="requirements/extras.lock"):
        run_lm_eval(tmp_path)


def test_a_muse_evaluation_shorter_than_mia_2048_tokens_warns_and_is_recorded(tmp_path, caplog):
    """`data=muse_news` without the MUSE experiment keeps a short eval.max_length (192 by default; 48
    here, within the tiny model's context): Min-K% then scores that many tokens per text, not
    open-unlearning's 2048. The run says so and records the length."""
    import logging

    from pipeline.eval import runner

    with caplog.at_level(logging.WARNING, logger="pipeline.eval.runner"):
        metrics = _evaluate_tiny(tmp_path, ["data=muse_news", "data.path={root}/tests/fixtures/muse_news",
                                            "eval.verbmem_max_new_tokens=2", "eval.knowmem_max_new_tokens=2",
                                            "eval.max_length=48"])
    assert metrics[runner.EVALUATION_KEY]["max_length"] == 48 and "privleak_auc" in metrics
    assert any("eval.max_length=48" in r.getMessage() and "2048" in r.getMessage() for r in caplog.records)
    rows = metrics[runner.EVALUATION_KEY]["rows"]  # what was scored, as TOFU and WMDP runs record it
    assert rows and all(n > 0 for n in rows.values()) and "verbmem_forget" in rows, rows


def test_mcq_prompts_longer_than_max_length_are_counted_in_a_warning(caplog):
    """A prompt over eval.max_length loses its start (the description first); lm-eval keeps the model's
    whole context, so the numbers would differ. Before, nothing said so."""
    import logging

    tok = word_tokenizer(MCQ_WORDS)
    model = FavourToken(len(tok), tok.convert_tokens_to_ids("B"))
    with caplog.at_level(logging.WARNING, logger="pipeline.eval.mcq"):
        evaluate_mcq(model, tok, ROWS, MCQSettings(batch_size=3), name="wmdp-bio")
    assert "lose their start" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="pipeline.eval.mcq"):
        evaluate_mcq(model, tok, ROWS, MCQSettings(batch_size=3, max_length=8), name="wmdp-bio")
    assert "12 of 12 (prompt, choice) pairs are longer than eval.max_length=8 tokens" in caplog.text


def test_answer_letters_a_tokenizer_cannot_tell_apart_are_named():
    assert letter_collision(word_tokenizer(MCQ_WORDS), 4) is None
    assert "letter 'C'" in letter_collision(word_tokenizer([w for w in MCQ_WORDS if w != "C"]), 4)
    assert letter_collision(word_tokenizer([w for w in MCQ_WORDS if w != "C"]), 2) is None  # only A and B asked

    class Merged:  # a vocabulary where " C" and " D" are one token
        unk_token_id, bos_token_id = None, None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [{"C": 9, "D": 9}.get(w, ord(w[0])) for w in text.split()]}

    assert letter_collision(Merged(), 4) == "the tokenizer encodes the answer letters 'C' and 'D' alike ([9])"


def test_a_wmdp_evaluation_with_a_tokenizer_without_letters_stops_before_the_model_loads(tmp_path):
    """A vocabulary without A-D scored every choice as <unk>: equal log-likelihoods, the first of them won
    each tie, and the accuracy (0.0 on the fixture) came out silently, after training."""
    from tests.helpers.launch import run
    from tests.helpers.tiny import build

    model_dir = build(tmp_path)[0]  # a word-level vocabulary of the synthetic rows: no answer letters
    out = run(["data=wmdp_cyber", "data.path=tests/fixtures/wmdp", "data.eval_splits=[wmdp-cyber]",
               "model.source=pretrained", f"model.path={model_dir}", f"output_dir={tmp_path}", "run_name=e",
               "logging=none"], script="launchers/eval.py", timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("error (PromptFormatError, rank 0): multiple-choice evaluation of 'wmdp-cyber' (4 choices): "
                           "the tokenizer has no token for the answer letter 'A'"), line
    assert not (tmp_path / "e" / "results.json").exists()


def test_a_wmdp_evaluation_records_its_length_bos_and_rows(tmp_path):
    """What changes multiple-choice numbers is recorded in results.json's evaluation block (before:
    only the device and dtype)."""
    from pipeline.eval import runner

    metrics = _evaluate_tiny(tmp_path, ["data=wmdp_cyber", "data.path={root}/tests/fixtures/wmdp",
                                        "data.eval_splits=[wmdp-cyber]", "eval.max_length=64"])
    record = metrics[runner.EVALUATION_KEY]
    assert (record["max_length"], record["mcq_add_bos"]) == (64, False)
    assert set(record["rows"]) == {"wmdp-cyber"} and record["rows"]["wmdp-cyber"] > 0 and "wmdp-cyber_accuracy" in metrics


def test_eval_max_rows_applies_to_muse_splits_but_not_the_few_shot_examples(tmp_path):
    """eval.max_rows caps every scored split (before: silently ignored outside TOFU), is recorded, and the
    knowmem_*_icl in-context examples are neither cut nor listed as scored rows (icl_rows instead)."""
    from pipeline.eval import runner

    metrics, details = _evaluate_tiny(tmp_path, ["data=muse_news", "data.path={root}/tests/fixtures/muse_news",
                                                 "eval.verbmem_max_new_tokens=2", "eval.knowmem_max_new_tokens=2",
                                                 "eval.max_rows=1", "eval.retrain_auc=0.5228"], with_details=True)
    record = metrics[runner.EVALUATION_KEY]
    # eval_details.json is keyed by split, as the record's rows (it said verbmem and mink_forget)
    assert set(details) == set(record["rows"]), (sorted(details), sorted(record["rows"]))
    # every setting that changes MUSE's numbers is recorded (PrivLeak's reference AUC was nowhere)
    assert (record["retrain_auc"], record["mink_k"], record["verbmem_max_new_tokens"],
            record["knowmem_max_new_tokens"]) == (0.5228, 0.4, 2, 2)
    assert record["max_rows"] == 1 and record["rows"] and set(record["rows"].values()) == {1}, record["rows"]
    assert not any(name.endswith("_icl") for name in record["rows"])
    assert set(record["icl_rows"]) == {"knowmem_forget_icl", "knowmem_retain_icl"}
    assert record["generation"].startswith("greedy")
    shots = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(5)]
    limited = runner.limit_rows({"forget": list(range(9)), "knowmem_forget": list(range(9)),
                                 "knowmem_forget_icl": shots}, 3, "forget")
    assert limited == {"forget": list(range(9)), "knowmem_forget": [0, 3, 6], "knowmem_forget_icl": shots}


def test_eval_max_rows_applies_to_multiple_choice_splits(tmp_path):
    from pipeline.eval import runner

    metrics = _evaluate_tiny(tmp_path, ["data=wmdp_cyber", "data.path={root}/tests/fixtures/wmdp",
                                        "data.eval_splits=[wmdp-cyber]", "eval.max_length=64", "eval.max_rows=1"])
    record = metrics[runner.EVALUATION_KEY]
    assert record["rows"] == {"wmdp-cyber": 1} and record["max_rows"] == 1


def _evaluate_tiny(tmp_path, overrides: list[str], with_details: bool = False):
    """runner.evaluate_job on a tiny random Llama with the composed config (``{root}`` in an override:
    the repository): its metrics (``with_details``: and eval_details)."""
    import os

    from hydra import compose, initialize_config_dir
    from transformers import AutoTokenizer

    from pipeline.config import register_configs
    from pipeline.data.loaders import load_unlearning_data
    from pipeline.eval import runner
    from tests.helpers.tiny import build

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    model_dir = build(tmp_path, extra_texts=("A B C D",))[0]  # the answer letters, as a real vocabulary has
    register_configs()
    with initialize_config_dir(config_dir=os.path.join(root, "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[o.format(root=root) for o in overrides])
    data = load_unlearning_data(cfg.data, 0)
    metrics, details = runner.evaluate_job(cfg, model_dir, AutoTokenizer.from_pretrained(model_dir), data, None)
    return (metrics, details) if with_details else metrics


def test_min_k_scoring_fits_bos_and_text_in_a_learned_position_context(tmp_path):
    """eval.max_length is capped at the model's context, but token_logprobs adds <bos> to max_length text
    tokens: a GPT-2-style model (learned positions) raised an IndexError at exactly its context."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from pipeline.eval.muse import token_logprobs
    from tests.helpers.tiny import build

    model_dir, _ = build(tmp_path)
    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=16, n_embd=32, n_layer=1, n_head=2)).eval()
    words = " ".join(tok.convert_ids_to_tokens(list(range(4, 24))))  # 20 text tokens
    (scores,) = token_logprobs(model, tok, [words], batch_size=1, max_length=16)
    assert len(scores) == 15  # <bos> + 15 text tokens fill the 16 positions
