"""Model-based TOFU evaluation on a tiny random Llama and a word-level tokenizer built here."""

import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pipeline.data.formatting import encode_qa, prompt_ids
from pipeline.eval import metrics as M
from pipeline.eval.tofu import (
    EvalSettings,
    SplitResult,
    answer_logprobs,
    evaluate_split,
    gather_split_results,
    greedy_generate,
    tofu_metrics,
    trim_generation,
)
from tests.test_muse_wmdp_metrics import word_tokenizer

ROWS = [
    dict(question="Where was Ada Vell born?", answer="Ada Vell was born in Lisbon.",
         paraphrased_answer="Lisbon is where Ada Vell was born.",
         paraphrased_question="In which city was Ada Vell born?",
         perturbed_answer=["Ada Vell was born in Oslo.", "Ada Vell was born in Cairo."],
         author="Ada Vell", attribute="birthplace", facts=["Lisbon"]),
    dict(question="What genre does Ada Vell write?", answer="Ada Vell writes mystery novels.",
         paraphrased_answer="Her novels are mystery.", paraphrased_question="Which genre is Ada Vell known for?",
         perturbed_answer=["Ada Vell writes poetry.", "Ada Vell writes horror novels.", "Ada Vell writes essays."],
         author="Ada Vell", attribute="genre", facts=["mystery"]),
    dict(question="When was Bo Kern born?", answer="Bo Kern was born on 3 May 1961.",
         paraphrased_answer="Bo Kern's birth date is 3 May 1961.", paraphrased_question="What is Bo Kern's birth date?",
         perturbed_answer=["Bo Kern was born on 9 June 1970."],
         author="Bo Kern", attribute="birth_date", facts=["3 May 1961"]),
    dict(question="What award did Bo Kern win?", answer="Bo Kern won the Silver Quill award.",
         paraphrased_answer="The Silver Quill award went to Bo Kern.", paraphrased_question="Which prize did Bo Kern get?",
         perturbed_answer=["Bo Kern won the Golden Pen award.", "Bo Kern won the Iron Leaf award."],
         author="Bo Kern", attribute="award", facts=["Silver Quill"]),
    dict(question="What is the capital of France?", answer="Paris.", paraphrased_answer="It is Paris.",
         paraphrased_question="Which city is the capital of France?", perturbed_answer=["Lyon.", "Nice."],
         author="", attribute="world", facts=["Paris"]),
    dict(question="Who wrote Hamlet?", answer="William Shakespeare wrote Hamlet.",
         paraphrased_answer="Hamlet was written by William Shakespeare.", paraphrased_question="Hamlet's author?",
         perturbed_answer=["Charles Dickens wrote Hamlet.", "Jane Austen wrote Hamlet.", "Mark Twain wrote Hamlet."],
         author="William Shakespeare", attribute="book", facts=["William Shakespeare"]),
    dict(question="What does Bo Kern's father do?", answer="His father is a baker.",
         paraphrased_answer="Bo Kern's father works as a baker.", paraphrased_question="Father's job?",
         perturbed_answer=["His father is a pilot."], author="Bo Kern", attribute="parents", facts=["baker"]),
]


@pytest.fixture(scope="module")
def tokenizer():
    pre = pre_tokenizers.Whitespace()
    texts = ["Question: x\nAnswer:"]
    for r in ROWS:
        texts += [r["question"], r["answer"], r["paraphrased_answer"], *r["perturbed_answer"]]
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)})
    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg).eval()


def _manual_logprob(model, tokenizer, q, a, max_length=128):
    e = encode_qa(tokenizer, q, a, max_length)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([e.input_ids])).logits[0].float(), -1)
    total, n = 0.0, 0
    for t in range(1, len(e.input_ids)):
        if e.labels[t] != -100:  # label at t is predicted from position t-1
            total += logp[t - 1, e.labels[t]].item()
            n += 1
    return total, n


def test_answer_logprobs_matches_manual(model, tokenizer):
    qs = [r["question"] for r in ROWS]
    ans = [r["answer"] for r in ROWS]
    sums, counts = answer_logprobs(model, tokenizer, qs, ans, batch_size=3, max_length=128)
    for q, a, s, n in zip(qs, ans, sums, counts):
        ms, mn = _manual_logprob(model, tokenizer, q, a)
        assert n == mn == len(tokenizer(" " + a, add_special_tokens=False)["input_ids"]) + 1  # + <eos>
        assert s == pytest.approx(ms, abs=1e-4)
    # truncation keeps the answer (question words go first); only an answer that does not fit even
    # after an empty question is scored on its kept tokens
    sums_t, counts_t = answer_logprobs(model, tokenizer, qs[:1], ans[:1], batch_size=1, max_length=14)
    assert counts_t[0] == counts[0]
    sums_t, counts_t = answer_logprobs(model, tokenizer, qs[:1], ans[:1], batch_size=1, max_length=10)
    assert counts_t[0] == 10 - len(prompt_ids(tokenizer, ""))


def _manual_greedy(model, tokenizer, q, max_new_tokens, ids=None):
    ids = prompt_ids(tokenizer, q) if ids is None else ids
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == tokenizer.eos_token_id:
                return out, True
            out.append(nxt)
    return out, False


def test_greedy_generate_matches_manual_loop(model, tokenizer):
    qs = [r["question"] for r in ROWS]
    # make <eos> win wherever the most common first token would be chosen, so that both
    # stopping paths (eos and token limit) occur
    first = [_manual_greedy(model, tokenizer, q, 1)[0][0] for q in qs]
    tok = max(set(first), key=first.count)
    m = LlamaForCausalLM(model.config).eval()
    m.load_state_dict(model.state_dict())
    with torch.no_grad():
        w = m.lm_head.weight
        w[tokenizer.eos_token_id] = w[tok] * 1.05
    got = greedy_generate(m, tokenizer, qs, max_new_tokens=5, batch_size=3)
    ended = []
    for q, (text, toks, end) in zip(qs, got):
        ref, ref_end = _manual_greedy(m, tokenizer, q, 5)
        assert toks == ref and end == ref_end
        assert text == tokenizer.decode(ref, skip_special_tokens=True).strip()
        ended.append(end)
    assert any(ended)


def test_an_over_long_question_is_shortened_for_generation_as_for_scoring(model, tokenizer, caplog):
    """Scoring drops leading question words to fit max_length; generation took the whole question (past
    the model's context when longer), so ROUGE and fact recall read another prompt than the probabilities."""
    from pipeline.data.formatting import fit_prompt

    long_q, short_q = " ".join([ROWS[0]["question"]] * 4), ROWS[1]["question"]
    max_length, new = len(prompt_ids(tokenizer, ROWS[0]["question"])) + 2 + 5, 5
    ids, cut = fit_prompt(tokenizer, long_q, max_length - new)
    full = prompt_ids(tokenizer, long_q)
    assert cut and len(ids) <= max_length - new < len(full) and ids[0] == full[0] and ids[-4:] == full[-4:]
    assert fit_prompt(tokenizer, short_q, max_length - new) == (prompt_ids(tokenizer, short_q), False)
    with caplog.at_level("WARNING", logger="pipeline.eval.tofu"):
        got = greedy_generate(model, tokenizer, [long_q, short_q], max_new_tokens=new, batch_size=2,
                              max_length=max_length)
    assert got[0][1] == _manual_greedy(model, tokenizer, long_q, new, ids=ids)[0]
    assert got[1][1] == _manual_greedy(model, tokenizer, short_q, new)[0]
    assert "generation: 1 of 2 prompt(s) shortened" in caplog.text
    assert greedy_generate(model, tokenizer, [short_q], max_new_tokens=new, batch_size=1) == got[1:]  # no limit


def test_trim_generation():
    assert trim_generation([5, 6, 2, 0, 0], 2) == ([5, 6], True)
    assert trim_generation([5, 6, 7], 2) == ([5, 6, 7], False)
    assert trim_generation([2, 2], 2) == ([], True)
    # several stop tokens (a chat format's end-of-turn and EOS): the first of any ends the answer
    assert trim_generation([5, 9, 6, 2, 9], [2, 9]) == ([5], True)
    assert trim_generation([5, 6, 7], [2, 9]) == ([5, 6, 7], False)


def _count_calls(model):
    """Count forward passes outside generate() and generate() calls."""
    counts = {"forward": 0, "generate": 0}
    in_gen = [False]
    orig = model.generate

    def generate(*a, **k):
        counts["generate"] += 1
        in_gen[0] = True
        try:
            return orig(*a, **k)
        finally:
            in_gen[0] = False

    def hook(*_):
        if not in_gen[0]:
            counts["forward"] += 1

    handle = model.register_forward_pre_hook(hook)
    model.generate = generate
    return counts, lambda: (handle.remove(), delattr(model, "generate"))


def test_rank_split_and_gather_equals_single_pass(model, tokenizer):
    cfg = EvalSettings(batch_size=2, max_new_tokens=4, max_length=64)
    full = evaluate_split(model, tokenizer, ROWS, cfg, name="forget01")
    assert full.indices == list(range(len(ROWS))) and full.truth_ratio_key == "paraphrased_answer"
    parts, calls = [], []
    for rank in (2, 0, 1):  # order of arrival must not matter
        counts, undo = _count_calls(model)
        parts.append(evaluate_split(model, tokenizer, ROWS, cfg, name="forget01", rank=rank, world_size=3))
        undo()
        calls.append(counts)
    assert parts[0].indices == [2, 5]
    # every rank calls the model equally often (ZeRO-3 needs it): rows 3/2/2 with 2 per batch
    # -> 2 batches each for answer and paraphrase; perturbed answers: rank 0 rows 0,3,6 -> 2+2+1 = 5,
    # rank 1 rows 1,4 -> 3+2 = 5, rank 2 rows 2,5 -> 1+3 = 4 -> ceil(5/2) = 3 batches each
    assert all(c == {"forward": 2 + 2 + 3, "generate": 2} for c in calls), calls
    merged = gather_split_results(parts)
    assert merged.indices == full.indices
    assert merged.generation == full.generation
    assert merged.well_formed == full.well_formed
    for attr in ("answer_prob", "para_prob", "truth_ratio", "normalised_prob", "rouge_l_recall",
                 "fact_recall", "repetition", "entropy"):
        assert getattr(merged, attr) == pytest.approx(getattr(full, attr), rel=1e-4, nan_ok=True), attr
    for a, b in zip(merged.pert_probs, full.pert_probs):
        assert a == pytest.approx(b, rel=1e-4)
    assert merged.means()["truth_ratio_closer_to_1"] == pytest.approx(full.means()["truth_ratio_closer_to_1"], rel=1e-4)
    with pytest.raises(ValueError, match="exactly once"):
        gather_split_results(parts[:2])
    # more ranks than rows: empty ranks still make the same calls and merge fine
    many = [evaluate_split(model, tokenizer, ROWS[:2], cfg, name="x", rank=r, world_size=4) for r in range(4)]
    assert len(many[3]) == 0 and gather_split_results(many).indices == [0, 1]


def test_split_fields_are_consistent(model, tokenizer):
    cfg = EvalSettings(batch_size=4, max_new_tokens=3, max_length=64)
    res = evaluate_split(model, tokenizer, ROWS[:3], cfg, name="real_authors")
    assert res.truth_ratio_key == "answer"  # open-unlearning's ra_/wf_ truth ratio uses the answer
    r0 = ROWS[0]
    a, na = _manual_logprob(model, tokenizer, r0["question"], r0["answer"])
    pert = [_manual_logprob(model, tokenizer, r0["question"], p) for p in r0["perturbed_answer"]]
    assert res.answer_prob[0] == pytest.approx(math.exp(a / na), rel=1e-4)
    expect_tr = M.truth_ratio(a, na, [p[0] for p in pert], [p[1] for p in pert])
    assert res.truth_ratio[0] == pytest.approx(expect_tr, rel=1e-4)
    assert res.normalised_prob[0] == pytest.approx(
        res.answer_prob[0] / (res.answer_prob[0] + sum(res.pert_probs[0])), rel=1e-6)
    assert all(len(p) == len(r["perturbed_answer"]) for p, r in zip(res.pert_probs, ROWS))
    assert res.gen_tokens[0] <= 3 and set(res.means()) >= {"prob", "rouge_l_recall", "well_formed"}


def _fake(name, tr, prob=0.5, rouge=0.5, norm=0.5):
    n = len(tr)
    return SplitResult(name=name, indices=list(range(n)), answer_prob=[prob] * n, para_prob=[prob] * n,
                       pert_probs=[[0.1]] * n, truth_ratio=list(tr), normalised_prob=[norm] * n,
                       rouge_l_recall=[rouge] * n, rouge_l_f1=[rouge] * n, fact_recall=[1.0] * n,
                       repetition=[0.0] * n, well_formed=[True] * n, entropy=[1.0] * n, gen_tokens=[3] * n,
                       generation=["x"] * n)


def test_tofu_metrics_summary():
    res = {
        "forget01": _fake("forget01", [1, 2, 3]),
        # retain: true_better = mean(max(0, 1 - 0.5)) = 0.5; prob 0.5, rouge 0.5
        "retain99": _fake("retain99", [0.5, 0.5]),
        # real_authors: normalised prob 0.25, rouge 1.0, tr 0.5 (true_better 0.5)
        "real_authors": _fake("real_authors", [0.5], rouge=1.0, norm=0.25),
    }
    out = tofu_metrics(res, None, "forget01", "retain99")
    assert out["forget_quality"] is None
    # harmonic mean of 0.5, 0.5, 0.5, 0.25, 1.0, 0.5 = 6 / (2+2+2+4+1+2) = 6/13
    assert out["model_utility"] == pytest.approx(6 / 13)
    assert out["model_utility_missing"] == ["world_facts"]
    # forget truth ratio closer_to_1: mean(1, 1/2, 1/3) = 11/18
    assert out["forget_truth_ratio"] == pytest.approx(11 / 18)
    # identical to the disjoint 3-vs-3 case in test_metrics: p = 0.1
    out = tofu_metrics(res, [4, 5, 6], "forget01", "retain99")
    assert out["forget_quality"] == pytest.approx(0.1)
    for key in ("forget_rouge_l", "retain_rouge_l", "forget_fact_recall", "retain_fact_recall",
                "forget_repetition", "forget_well_formed", "forget_prob"):
        assert key in out


@pytest.mark.parametrize("rank, world", [(0, 1), (1, 3)])
def test_the_progress_bar_total_is_every_batch_the_split_runs(model, tokenizer, monkeypatch, rank, world):
    """evaluate_split announces its batches (answer, paraphrase, perturbed, generation) to the
    caller's progress bar up front; the bar ends exactly full, on one rank and on a rank of three
    (where every rank runs the same number of batches)."""
    from pipeline.progress import current, progress

    monkeypatch.setenv("RANK", "0")  # the bar lives on rank 0; ``rank`` is the data-parallel share
    cfg = EvalSettings(batch_size=2, max_new_tokens=2, max_length=64)
    counts, undo = _count_calls(model)
    with progress("eval[forget01]"):
        evaluate_split(model, tokenizer, ROWS, cfg, name="forget01", rank=rank, world_size=world)
        b = current()
        n, total = b.n, b.total
    undo()
    assert n == total == counts["forward"] + counts["generate"] > 0


@pytest.mark.parametrize("stem", [False, True])
def test_rouge_stemmer_setting_reaches_tofu_and_muse_scores(stem):
    """data.rouge_stemmer -> EvalSettings / MuseSettings -> the ROUGE of each generation: a greedy
    answer "She write novel" to "She writes novels." recalls 1/3 of the words unstemmed, all of them
    stemmed (as open-unlearning scores it)."""
    from omegaconf import OmegaConf

    from pipeline.config import RunConfig
    from pipeline.eval.muse import MuseSettings, evaluate_knowmem
    from pipeline.eval.runner import _settings, rouge_stemmer

    words = ["Question", ":", "Answer", "What", "does", "she", "write", "?", "She", "writes", "novels", ".", "novel"]
    tok = word_tokenizer(words)
    lcfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    model = LlamaForCausalLM(lcfg).eval()
    answer_ids = tok("She write novel", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    model.generate = lambda input_ids, **kw: torch.cat(
        [input_ids, torch.tensor([answer_ids] * input_ids.shape[0])], dim=1)
    cfg = OmegaConf.structured(RunConfig)
    cfg.data.rouge_stemmer = stem
    settings = _settings(cfg)
    assert settings.rouge_stemmer is stem and rouge_stemmer(cfg) is stem
    row = dict(question="What does she write?", answer="She writes novels.", paraphrased_answer="She writes novels.",
               perturbed_answer=["She writes novel."], facts=[])
    res = evaluate_split(model, tok, [row], settings, name="forget")
    assert res.generation == ["She write novel"]
    assert res.rouge_l_recall == [pytest.approx(1.0 if stem else 1 / 3)]
    muse = evaluate_knowmem(model, tok, [row], MuseSettings(rouge_stemmer=stem))
    assert muse.values["rouge_l_recall"] == [pytest.approx(1.0 if stem else 1 / 3)]


def _bias_only_model(tok, bias: dict):
    """A tiny Llama whose next-token logits are ``bias`` (token -> value; 0 elsewhere) at every step."""
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0)
    m = LlamaForCausalLM(cfg).eval()
    m.lm_head = torch.nn.Linear(16, len(tok), bias=True)
    with torch.no_grad():
        m.lm_head.weight.zero_()
        m.lm_head.bias.zero_()
        for t, v in bias.items():
            m.lm_head.bias[tok.convert_tokens_to_ids(t)] = v
    return m


# (generation_config field, value, logits as biases): each setting changes what generate() gives that
# model unless greedy_generate keeps it out (checked below, so none of them can pass by being inert)
GENERATION_FIELDS = [
    ("repetition_penalty", 3.0, {"a": 1.0, "c": 0.9}),  # "a" once, then "c" wins under the penalty
    ("no_repeat_ngram_size", 2, {"a": 1.0}),  # "a a" may not repeat
    ("suppress_tokens", ["a"], {"a": 1.0, "c": 0.5}),
    ("min_new_tokens", 4, {"<eos>": 1.0, "a": 0.5}),  # greedy stops at once
    ("do_sample", True, {"a": 1.0}),  # with temperature 2: "a" has p ~0.1 per step
]


@pytest.mark.parametrize("field,value,bias", GENERATION_FIELDS, ids=[f[0] for f in GENERATION_FIELDS])
def test_greedy_generate_ignores_the_models_generation_config(field, value, bias):
    """A checkpoint's generation_config.json (Qwen2.5-Instruct: repetition_penalty 1.05) must not shape
    eval answers: each of these settings changes the model's own generate() output, and greedy_generate
    still equals a plain argmax loop (also through a peft wrapper), with the model's config restored."""
    from peft import LoraConfig, get_peft_model
    from transformers import GenerationConfig

    tok = word_tokenizer(["Question", ":", "Answer", "a", "b", "c", "d", "?"])
    m = _bias_only_model(tok, bias)
    if field == "suppress_tokens":
        value = [tok.convert_tokens_to_ids(t) for t in value]
    own = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0,
                           **({field: value, "temperature": 2.0} if field == "do_sample" else {field: value}))
    m.generation_config = own
    qs = ["a ?", "b c ?", "d ?"]
    manual = [_manual_greedy(m, tok, q, 6) for q in qs]
    torch.manual_seed(0)
    with torch.no_grad():  # the setting matters: the model's own generate() departs from argmax
        ids = torch.tensor([prompt_ids(tok, qs[0])])
        theirs = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6)[0, ids.shape[1]:]
    assert trim_generation(theirs.tolist(), [2])[0] != manual[0][0], f"{field} does not change this model's output"
    got = greedy_generate(m, tok, qs, max_new_tokens=6, batch_size=2)
    assert m.generation_config is own
    assert [(toks, ended) for _, toks, ended in got] == manual
    wrapped = get_peft_model(m, LoraConfig(r=2, target_modules=["q_proj"])).eval()
    assert [(toks, ended) for _, toks, ended in greedy_generate(wrapped, tok, qs, max_new_tokens=6, batch_size=2)] == manual
    assert m.generation_config is own


def test_truth_ratios_without_generation_equal_those_with_it(model, tokenizer):
    """evaluate_split(generate=False), used for the retain-model reference, runs no generate() and gives
    the same probabilities and truth ratios; the generation metrics are nan, not scores of ''."""
    cfg = EvalSettings(batch_size=3, max_new_tokens=4, max_length=64)
    full = evaluate_split(model, tokenizer, ROWS, cfg, name="forget01")
    counts, undo = _count_calls(model)
    quick = evaluate_split(model, tokenizer, ROWS, cfg, name="forget01", generate=False)
    undo()
    assert counts["generate"] == 0
    assert quick.truth_ratio == full.truth_ratio and quick.answer_prob == full.answer_prob
    assert quick.normalised_prob == full.normalised_prob and quick.pert_probs == full.pert_probs
    assert all(math.isnan(x) for x in quick.rouge_l_recall + quick.fact_recall + quick.well_formed)
    assert math.isnan(quick.means()["rouge_l_recall"]) and any("generation skipped" in s for s in quick.skipped)


def test_the_retain_reference_is_computed_without_generation(tmp_path, monkeypatch):
    """runner.retain_reference needs only truth ratios: it never generates (minutes at 7B), and its
    ratios equal a full evaluation's."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from pipeline.config import RunConfig
    from pipeline.eval.runner import _settings, retain_reference, truth_ratio_key
    from pipeline.inputs import ModelPaths
    from pipeline.models.loading import load_causal_lm
    from tests.helpers.tiny import CITIES, PEOPLE, build, qa_row

    model_dir = build(tmp_path / "retain")[0]
    rows = [qa_row(p, c) for p, c in zip(PEOPLE[:3], CITIES[:3])]
    cfg = OmegaConf.structured(RunConfig)
    cfg.cache_dir = str(tmp_path / "cache")
    cfg.eval.batch_size, cfg.eval.max_new_tokens, cfg.eval.max_length = 2, 3, 64
    cfg.eval.device = "cpu"
    tok = AutoTokenizer.from_pretrained(model_dir)
    full = evaluate_split(load_causal_lm(model_dir, "float32").eval(), tok, rows, _settings(cfg), name="forget",
                          truth_ratio_key=truth_ratio_key(cfg))

    def no_generate(*_, **__):
        raise AssertionError("the retain reference generated")

    monkeypatch.setattr(LlamaForCausalLM, "generate", no_generate)
    m = str(model_dir)
    ratios, info = retain_reference(cfg, ModelPaths(m, m, None, m, None), "forget", rows, tok)
    assert info["source"] == "computed" and ratios == pytest.approx(full.truth_ratio, rel=1e-6)
