"""Prompt formats (pipeline/data/prompt_formats.py): token ids and labels of every format against
hand-written expectations, on small word-level tokenizers built here with each family's real special
tokens (and real Jinja chat templates); truncation keeps the answer; BOS appears once; the prompt a
model is trained on is the prompt it is evaluated and generates from."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pipeline.config import ConfigError, RunConfig
from pipeline.data.formatting import IGNORE_INDEX, encode_qa, prompt_ids
from pipeline.data.loaders import encode_rows
from pipeline.data.prompt_formats import (
    PROMPT_FORMATS,
    PromptFormatError,
    get_prompt_format,
    prompt_format_from_config,
)
from pipeline.inputs import checked_prompt_format

# Words, single punctuation marks, single spaces and newlines are tokens: every space in a template
# shows up in the expectation (e.g. TOFU's missing space before the answer).
SPLIT = pre_tokenizers.Split(Regex(r"\n|[A-Za-z0-9']+|[^A-Za-z0-9'\s]| "), behavior="isolated")
WORDS = ("Question: Answer: [INST] [/INST] <<SYS>> <</SYS>> Be brief. Who wrote Emma? Jane Austen. Where was Basil "
         "born? In Paris. <|user|> <|assistant|> <|system|> system user assistant You are a helpful AI named SmolLM, "
         "trained by Hugging Face")
PAIRS = [("Who wrote Emma?", "Jane Austen."), ("Where was Basil born?", "In Paris.")]

# Real chat templates (tokenizer_config.json of each model), as Jinja source.
CHATML_SMOLLM2 = (
    r"{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    r"{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    r"{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA2_CHAT = (
    r"{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    r"{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    r"{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    r"{% if loop.index0 == 0 and system_message != false %}"
    r"{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
    r"{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    r"{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    r"{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
LLAMA3_INSTRUCT = (
    r"{% set loop_messages = messages %}{% for message in loop_messages %}"
    r"{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    r" + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    r"{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def make_tokenizer(specials: list[str], chat_template: str | None = None, **roles: str) -> PreTrainedTokenizerFast:
    words = sorted({w for w, _ in SPLIT.pre_tokenize_str(WORDS + " \n")})
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials[0]))
    tok.pre_tokenizer = SPLIT
    tok.decoder = decoders.Fuse()  # spaces and newlines are tokens: decoding is the exact text
    t = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=specials[0], **roles)
    t.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in roles.values()]})
    assert [t.convert_tokens_to_ids(s) for s in specials] == list(range(len(specials)))  # no new ids
    if chat_template:
        t.chat_template = chat_template
    return t


@pytest.fixture(scope="module")
def toks() -> dict[str, PreTrainedTokenizerFast]:
    return {
        "plain": make_tokenizer(["<unk>", "<bos>", "<eos>", "<pad>"], bos_token="<bos>", eos_token="<eos>",
                                pad_token="<pad>"),
        "llama2": make_tokenizer(["<unk>", "<s>", "</s>"], LLAMA2_CHAT, bos_token="<s>", eos_token="</s>"),
        # Meta-Llama-3-8B-Instruct as first released: eos <|end_of_text|>, turns end with <|eot_id|>.
        "llama3": make_tokenizer(["<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                  "<|end_header_id|>", "<|eot_id|>"], LLAMA3_INSTRUCT,
                                 bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"),
        "chatml": make_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML_SMOLLM2,
                                 bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"),
    }


def S(text: str) -> list[str]:
    """Hand-writing helper: a text span as tokens, i.e. split at spaces/newlines/punctuation (the
    test tokenizer's rule), so that the expectations below read like the template."""
    return [w for w, _ in SPLIT.pre_tokenize_str(text)]


Q1, A1 = S("Who wrote Emma?"), S("Jane Austen.")
Q2, A2 = S("Where was Basil born?"), S("In Paris.")
INST, END_INST = S("[INST]"), S("[/INST]")
SYS_L2 = INST + [" "] + S("<<SYS>>") + ["\n"] + S("Be brief.") + ["\n"] + S("<</SYS>>") + ["\n", "\n"]
H3 = ["<|start_header_id|>"]
EH3 = ["<|end_header_id|>", "\n", "\n"]
SMOL_SYS = ["<|im_start|>", "system", "\n"] + S("You are a helpful AI assistant named SmolLM, trained by Hugging Face") + [
    "<|im_end|>", "\n"]

# format -> (tokenizer, system prompt, [(prompt tokens, answer tokens incl. the end token)] for PAIRS)
EXPECTED = {
    "plain": ("plain", None, [
        (["<bos>"] + S("Question:") + [" "] + Q1 + ["\n"] + S("Answer:"), [" "] + A1 + ["<eos>"]),
        (["<bos>"] + S("Question:") + [" "] + Q2 + ["\n"] + S("Answer:"), [" "] + A2 + ["<eos>"]),
    ]),
    "llama2_chat": ("llama2", "Be brief.", [
        (["<s>"] + SYS_L2 + Q1 + [" "] + END_INST, [" "] + A1 + [" ", "</s>"]),
        (["<s>"] + SYS_L2 + Q2 + [" "] + END_INST, [" "] + A2 + [" ", "</s>"]),
    ]),
    "llama2_chat_tofu": ("llama2", None, [  # no system prompt, no space between [/INST] and the answer
        (["<s>"] + INST + [" "] + Q1 + [" "] + END_INST, A1 + ["</s>"]),
        (["<s>"] + INST + [" "] + Q2 + [" "] + END_INST, A2 + ["</s>"]),
    ]),
    "llama3_instruct": ("llama3", "Be brief.", [
        (["<|begin_of_text|>"] + H3 + ["system"] + EH3 + S("Be brief.") + ["<|eot_id|>"] + H3 + ["user"] + EH3 + Q1
         + ["<|eot_id|>"] + H3 + ["assistant"] + EH3, A1 + ["<|eot_id|>"]),
        (["<|begin_of_text|>"] + H3 + ["system"] + EH3 + S("Be brief.") + ["<|eot_id|>"] + H3 + ["user"] + EH3 + Q2
         + ["<|eot_id|>"] + H3 + ["assistant"] + EH3, A2 + ["<|eot_id|>"]),
    ]),
    "zephyr": ("llama2", None, [  # <|user|> is plain text in Zephyr's vocabulary, </s> the special token
        (["<s>"] + S("<|user|>") + ["\n"] + Q1 + ["</s>", "\n"] + S("<|assistant|>") + ["\n"], A1 + ["</s>"]),
        (["<s>"] + S("<|user|>") + ["\n"] + Q2 + ["</s>", "\n"] + S("<|assistant|>") + ["\n"], A2 + ["</s>"]),
    ]),
    # ChatML (SmolLM2's real template): its default system turn, the answer closed by <|im_end|>;
    # the template's newline after <|im_end|> is not trained (it follows the stop token).
    "chat": ("chatml", None, [
        (SMOL_SYS + ["<|im_start|>", "user", "\n"] + Q1 + ["<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"],
         A1 + ["<|im_end|>"]),
        (SMOL_SYS + ["<|im_start|>", "user", "\n"] + Q2 + ["<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"],
         A2 + ["<|im_end|>"]),
    ]),
}


def test_every_registered_format_has_a_token_level_expectation():
    assert sorted(EXPECTED) == PROMPT_FORMATS.names()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_ids_and_labels_equal_hand_written_expectation(toks, name):
    tok_key, system, pairs = EXPECTED[name]
    tok = toks[tok_key]
    fmt = get_prompt_format(name, system)
    fmt.check(tok)
    for (q, a), (p_tokens, a_tokens) in zip(PAIRS, pairs):
        want_ids = tok.convert_tokens_to_ids(p_tokens + a_tokens)
        assert tok.unk_token_id not in want_ids
        enc = encode_qa(tok, q, a, 128, template=fmt)
        assert tok.convert_ids_to_tokens(enc.input_ids) == p_tokens + a_tokens
        assert enc.labels == [IGNORE_INDEX] * len(p_tokens) + tok.convert_tokens_to_ids(a_tokens)
        assert not enc.truncated and not enc.prompt_mismatch
        # what generation is conditioned on: exactly the trained prompt
        assert fmt.prompt_ids(tok, q) == enc.input_ids[:len(p_tokens)]
        assert enc.input_ids[:2] != [tok.bos_token_id] * 2  # BOS never doubled


def test_plain_format_is_the_legacy_string_template(toks):
    tok = toks["plain"]
    fmt = get_prompt_format("plain")
    for q, a in PAIRS:
        assert encode_qa(tok, q, a, 128, template=fmt) == encode_qa(tok, q, a, 128)
        assert fmt.prompt_ids(tok, q) == prompt_ids(tok, q)


def _bpe_tokenizer(llama2_legacy: bool) -> PreTrainedTokenizerFast:
    """A small BPE trained on the QA pairs with Llama-2's tokenizer.json pipeline (no pre-tokenizer;
    the normaliser prepends ``▁`` and turns spaces into ``▁``). ``llama2_legacy``: merges learned
    within words, as SentencePiece's; otherwise across spaces, so the prompt's last tokens merge with
    the answer's first ones in the joint text."""
    from tokenizers import models as tk_models
    from tokenizers import normalizers, trainers

    corpus = [f"Question: {q}\nAnswer: {a}" for q, a in PAIRS] * 5
    tk = Tokenizer(tk_models.BPE(unk_token="<unk>"))
    llama2 = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    if llama2_legacy:
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    else:
        tk.normalizer = llama2
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    tk.pre_tokenizer, tk.normalizer = None, llama2
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_plain_answer_ids_are_those_of_the_joint_text():
    """Llama-2's SentencePiece tokenises `` Paris.`` alone as ``▁`` + ``▁Paris.`` but ``Answer: Paris.``
    with ``▁Paris.``: the plain format's answer labels are the joint text's (no lone ``▁`` label, the
    same ids the model reads in a document); the prompt ids stay those generation is conditioned on.
    When a merge crosses the prompt/answer border the answer is tokenised alone instead."""
    tok = _bpe_tokenizer(llama2_legacy=True)
    space = tok.convert_tokens_to_ids("▁")
    for q, a in PAIRS:
        alone = tok(" " + a, add_special_tokens=False)["input_ids"]
        assert alone[0] == space  # the pitfall
        prompt = tok("Question: " + q + "\nAnswer:", add_special_tokens=False)["input_ids"]
        joint = tok("Question: " + q + "\nAnswer: " + a, add_special_tokens=False)["input_ids"]
        assert joint[: len(prompt)] == prompt
        e = encode_qa(tok, q, a, 128)
        assert e.input_ids == [tok.bos_token_id] + joint + [tok.eos_token_id]
        assert [t for t in e.labels if t != IGNORE_INDEX] == joint[len(prompt):] + [tok.eos_token_id]
        assert space not in e.labels and e.input_ids[: len(prompt) + 1] == prompt_ids(tok, q)
    across = _bpe_tokenizer(llama2_legacy=False)
    for q, a in PAIRS:
        prompt = across("Question: " + q + "\nAnswer:", add_special_tokens=False)["input_ids"]
        joint = across("Question: " + q + "\nAnswer: " + a, add_special_tokens=False)["input_ids"]
        assert joint[: len(prompt)] != prompt  # the border merged
        e = encode_qa(across, q, a, 128)
        assert e.input_ids == prompt_ids(across, q) + across(" " + a, add_special_tokens=False)["input_ids"] + [
            across.eos_token_id]


@pytest.mark.parametrize("name,tok_key,system", [("llama2_chat", "llama2", "Be brief."), ("llama2_chat", "llama2", None),
                                                 ("llama3_instruct", "llama3", "Be brief."),
                                                 ("llama3_instruct", "llama3", None)])
def test_named_template_equals_the_models_own_jinja_template(toks, name, tok_key, system):
    """The named formats reproduce apply_chat_template of the models' released templates (which
    carry the BOS text themselves: one BOS either way)."""
    tok = toks[tok_key]
    named, chat = get_prompt_format(name, system), get_prompt_format("chat", system)
    for q, a in PAIRS:
        e1, e2 = named.encode(tok, q, a, 128), chat.encode(tok, q, a, 128)
        assert e1 == e2
        assert named.prompt_ids(tok, q) == chat.prompt_ids(tok, q)
    assert named.stop_token_id(tok) == chat.stop_token_id(tok)


def test_truncation_drops_question_words_from_the_left_and_keeps_the_answer(toks):
    tok = toks["llama2"]
    fmt = get_prompt_format("llama2_chat_tofu")
    q, a = PAIRS[1]
    full = fmt.encode(tok, q, a, 128)
    n_ans = sum(lab != IGNORE_INDEX for lab in full.labels)
    cut = fmt.encode(tok, q, a, len(full.input_ids) - 3)  # 3 tokens too long: "Where", " ", "was", " " go
    assert cut.truncated and not cut.answer_cut and len(cut.input_ids) <= len(full.input_ids) - 3
    assert cut.input_ids[-n_ans:] == full.input_ids[-n_ans:] and cut.labels[-n_ans:] == full.labels[-n_ans:]
    assert tok.convert_ids_to_tokens(cut.input_ids[:len(cut.input_ids) - n_ans]) == \
        ["<s>"] + INST + [" "] + S("Basil born?") + [" "] + END_INST
    # even an empty question leaves no room for the whole answer: its end is cut, and it says so
    tiny = fmt.encode(tok, q, a, 8)
    assert tiny.truncated and tiny.answer_cut and len(tiny.input_ids) == 8
    plain = encode_qa(toks["plain"], q, a, 15)  # the plain format too: "born?" is all that stays of the question
    assert plain.truncated and not plain.answer_cut
    assert toks["plain"].convert_ids_to_tokens(plain.input_ids) == \
        ["<bos>"] + S("Question:") + [" "] + S("born?") + ["\n"] + S("Answer:") + [" "] + A2 + ["<eos>"]


def test_formats_refuse_a_tokenizer_or_setting_they_cannot_express(toks):
    with pytest.raises(PromptFormatError, match="<\\|eot_id\\|>"):
        get_prompt_format("llama3_instruct").check(toks["llama2"])
    with pytest.raises(PromptFormatError, match="chat_template"):
        get_prompt_format("chat").check(toks["plain"])
    with pytest.raises(PromptFormatError, match="system prompt"):
        get_prompt_format("llama2_chat_tofu", "Be brief.")
    with pytest.raises(PromptFormatError, match="system prompt"):
        get_prompt_format("plain", "Be brief.")


@pytest.mark.parametrize("name,tok_key,bos_text", [("llama3_instruct", "llama3", "<|begin_of_text|>"),
                                                   ("chat", "chatml", ""), ("plain", "plain", "<bos>")])
def test_trained_prompt_is_the_evaluated_and_generated_prompt(toks, name, tok_key, bos_text):
    """One setting, model.prompt_format, reaches the training encoder (encode_rows) and the
    evaluation settings (eval.runner); the prompt part of every training row is the string and the
    ids that evaluation scores under and that generation is conditioned on."""
    from pipeline.eval.runner import _settings
    from pipeline.eval.tofu import answer_logprobs, greedy_generate

    tok = toks[tok_key]
    cfg = OmegaConf.structured(RunConfig)
    cfg.model.prompt_format = name
    rows = [{"question": q, "answer": a} for q, a in PAIRS]
    train = encode_rows(tok, rows, 64, True, "forget", prompt_format_from_config(cfg.model))
    settings = _settings(cfg)
    for r, t in zip(rows, train):
        n = next(i for i, lab in enumerate(t["labels"]) if lab != IGNORE_INDEX)
        p_eval = prompt_ids(tok, r["question"], settings.template)
        assert p_eval == t["input_ids"][:n]
        assert tok.decode(t["input_ids"][:n]) == bos_text + settings.template.prompt_text(tok, r["question"])
        assert encode_qa(tok, r["question"], r["answer"], 64, template=settings.template).labels == t["labels"]

    torch.manual_seed(0)
    mcfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                       pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    mcfg._attn_implementation = "eager"
    model = LlamaForCausalLM(mcfg).eval()
    stop = settings.template.stop_token_id(tok)
    with torch.no_grad():
        # the end-of-turn token outscores the first greedy token of row 0 (positive logit), so generation
        # must stop on it there: for llama3 it is <|eot_id|>, not the tokenizer's EOS
        first = model(input_ids=torch.tensor([prompt_ids(tok, rows[0]["question"], settings.template)])).logits[0, -1]
        assert first.max() > 0
        model.lm_head.weight[stop] = 3 * model.lm_head.weight[int(first.argmax())]
    gens = greedy_generate(model, tok, [r["question"] for r in rows], 6, 2, template=settings.template)
    stops = settings.template.stop_token_ids(tok)
    assert stops[0] == stop and tok.eos_token_id in stops
    for t, (_, toks_out, ended) in zip(train, gens):
        n = next(i for i, lab in enumerate(t["labels"]) if lab != IGNORE_INDEX)
        ids, out = list(t["input_ids"][:n]), []
        with torch.no_grad():
            for _ in range(6):
                nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
                if nxt in stops:
                    break
                out.append(nxt)
        assert toks_out == out and ended == (len(out) < 6)
    assert any(ended for _, _, ended in gens)  # the end-of-turn token (not EOS for llama3) stopped generation
    # scoring uses the training labels: the summed log-prob equals a manual sum over the row's labels
    sums, counts = answer_logprobs(model, tok, [rows[0]["question"]], [rows[0]["answer"]], 2, 64,
                                   template=settings.template)
    t = train[0]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([t["input_ids"]])).logits[0].float(), -1)
    want = [logp[i - 1, lab].item() for i, lab in enumerate(t["labels"]) if lab != IGNORE_INDEX]
    assert counts[0] == len(want) and sums[0] == pytest.approx(sum(want), abs=1e-4)


@pytest.mark.parametrize("eos", ["<|end_of_text|>", "<|eot_id|>"])
def test_llama3_generation_stops_at_either_end_token(toks, eos, caplog):
    """Llama-3-Instruct's generation_config ends generation at <|eot_id|> and <|end_of_text|>; so does
    ours, whichever of the two the tokenizer calls EOS (the first release said <|end_of_text|>, later
    ones <|eot_id|>). The answer's label still ends with <|eot_id|>."""
    from pipeline.eval.tofu import greedy_generate

    tok = make_tokenizer(["<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                          "<|eot_id|>"], LLAMA3_INSTRUCT, bos_token="<|begin_of_text|>", eos_token=eos, pad_token="<unk>")
    fmt = get_prompt_format("llama3_instruct")
    eot, eot_text = tok.convert_tokens_to_ids("<|eot_id|>"), tok.convert_tokens_to_ids("<|end_of_text|>")
    assert fmt.stop_token_ids(tok) == [eot, eot_text]
    cfg = OmegaConf.structured(RunConfig)
    cfg.model.prompt_format = "llama3_instruct"
    with caplog.at_level("INFO"):
        checked_prompt_format(cfg, tok, ["training", "evaluation", "generation"])
    assert "generation stops at <|eot_id|>, <|end_of_text|>" in caplog.text  # the log says what ran
    assert fmt.encode(tok, *PAIRS[0], 64).labels[-1] == eot
    torch.manual_seed(0)
    mcfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    mcfg._attn_implementation = "eager"
    model = LlamaForCausalLM(mcfg).eval()
    model.lm_head = torch.nn.Linear(32, len(tok), bias=True)
    with torch.no_grad():  # <|end_of_text|> is every position's greedy token, <|eot_id|> never is
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()
        model.lm_head.bias[eot_text], model.lm_head.bias[eot] = 1.0, -1.0
    (text, ids, ended), = greedy_generate(model, tok, [PAIRS[0][0]], 5, 1, template=fmt)
    assert (text, ids, ended) == ("", [], True)
    # a plain format (and a string template) stops at EOS only
    assert get_prompt_format("plain").stop_token_ids(tok) == [tok.eos_token_id]


def test_generation_also_stops_at_the_models_generation_config_end_tokens(toks, caplog):
    """`chat` on a Llama-3.1-style tokenizer (EOS <|eot_id|>) knew only <|eot_id|>; the model's
    generation_config also ends at <|end_of_text|>, and text past it was scored as the answer."""
    from pipeline.eval.tofu import greedy_generate

    tok = make_tokenizer(["<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                          "<|eot_id|>"], LLAMA3_INSTRUCT, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                         pad_token="<unk>")
    fmt = get_prompt_format("chat")
    eot, eot_text = tok.convert_tokens_to_ids("<|eot_id|>"), tok.convert_tokens_to_ids("<|end_of_text|>")
    assert fmt.stop_token_ids(tok) == [eot]
    torch.manual_seed(0)
    mcfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                       eos_token_id=eot)
    mcfg._attn_implementation = "eager"
    model = LlamaForCausalLM(mcfg).eval()
    model.lm_head = torch.nn.Linear(32, len(tok), bias=True)
    with torch.no_grad():  # <|end_of_text|> is every position's greedy token
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()
        model.lm_head.bias[eot_text] = 1.0
    assert greedy_generate(model, tok, [PAIRS[0][0]], 3, 1, template=fmt)[0] == ("", [eot_text] * 3, False)
    model.generation_config.eos_token_id = [eot_text, eot]  # as Llama-3.1-Instruct's generation_config.json
    with caplog.at_level("INFO"):
        assert greedy_generate(model, tok, [PAIRS[0][0]], 3, 1, template=fmt)[0] == ("", [], True)
    assert "generation also stops at the model's generation_config end tokens: <|end_of_text|>" in caplog.text
    assert model.generation_config.eos_token_id == [eot_text, eot]  # the model's own config is left as it was


def test_an_unknown_character_in_a_chat_answer_does_not_end_the_turn():
    """A chat template's end of turn was the answer's first special token, <unk> included: an answer
    with a character the vocabulary lacks (no byte fallback) lost its rest and its </s> label."""
    tok = make_tokenizer(["<unk>", "<s>", "</s>"], LLAMA2_CHAT, bos_token="<s>", eos_token="</s>")
    enc = get_prompt_format("chat").encode(tok, "Who wrote Emma?", "Jane Zyx Austen.", 64)
    answer = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]
    assert tok.convert_ids_to_tokens(answer) == [" ", "Jane", " ", "<unk>", " ", "Austen", ".", " ", "</s>"]


def test_bos_text_inside_a_template_is_not_doubled(toks):
    """A template whose text starts with the BOS token itself gets no second BOS id."""
    from pipeline.data.prompt_formats import TemplateFormat

    tok = toks["llama2"]
    with_text = TemplateFormat(name="x", prompt="<s>[INST] {question} [/INST]", answer="{answer}</s>", end_token="</s>",
                               strip=False)
    named = get_prompt_format("llama2_chat_tofu")
    for q, a in PAIRS:
        e = with_text.encode(tok, q, a, 128)
        assert e.input_ids[:2] != [tok.bos_token_id] * 2 and e.input_ids.count(tok.bos_token_id) == 1
        assert e == named.encode(tok, q, a, 128)


# Llama-3.2-Instruct's date logic (its tokenizer_config.json), shortened to the parts that matter here:
# the system header carries today's date unless the caller passes date_string.
LLAMA32_DATED = (
    r"{{- bos_token }}{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    r"{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    r"{%- endif %}{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}{{- 'Today Date: ' + date_string + '\n\n' }}"
    r"{{- '<|eot_id|>' }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
    r"'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    r"{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)


def _llama32():
    return make_tokenizer(["<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                           "<|end_header_id|>", "<|eot_id|>"], LLAMA32_DATED, bos_token="<|begin_of_text|>",
                          eos_token="<|eot_id|>")


def test_a_chat_template_that_writes_todays_date_needs_a_fixed_date():
    """Llama-3.2's template stamps the current date into every prompt: prompts (and so the tokens trained
    and scored) would change from one day to the next. prompt_format=chat refuses it without
    model.chat_template_kwargs.date_string, and renders the date given."""
    tok = _llama32()
    cfg = OmegaConf.structured(RunConfig)
    cfg.model.prompt_format = "chat"
    with pytest.raises(Exception, match=r"config error at 'model.chat_template_kwargs'.*today's date.*date_string"):
        checked_prompt_format(cfg, tok, ["training"])
    cfg.model.chat_template_kwargs = {"date_string": "10 Apr 2025"}
    fmt = checked_prompt_format(cfg, tok, ["training"])
    assert "Today Date: 10 Apr 2025" in fmt.prompt_text(tok, "Who wrote Emma?")
    assert fmt.describe()["chat_template_kwargs"] == {"date_string": "10 Apr 2025"}
    enc = fmt.encode(tok, *PAIRS[0], 128)
    assert enc.labels[-1] == tok.convert_tokens_to_ids("<|eot_id|>")


def test_template_kwargs_with_a_named_format_are_refused():
    cfg = OmegaConf.structured(RunConfig)
    cfg.model.prompt_format = "llama3_instruct"
    cfg.model.chat_template_kwargs = {"date_string": "10 Apr 2025"}
    with pytest.raises(PromptFormatError, match="only prompt_format=chat reads it"):
        prompt_format_from_config(cfg.model)


def test_a_named_format_that_differs_from_the_tokenizers_template_is_warned(toks, caplog):
    """llama3_instruct reproduces Llama-3(.0)'s template; on a Llama-3.2 tokenizer (system header with
    dates) the model's own text differs, said in a warning. Formats on their own family's template
    are not warned; llama2_chat_tofu differs from Llama-2's template on purpose and is not either."""
    cfg = OmegaConf.structured(RunConfig)
    with caplog.at_level("WARNING"):
        for name, tok in (("llama2_chat", toks["llama2"]), ("llama2_chat_tofu", toks["llama2"]),
                          ("llama3_instruct", toks["llama3"])):
            cfg.model.prompt_format = name
            checked_prompt_format(cfg, tok, ["training"])
    assert "renders prompts differently" not in caplog.text
    cfg.model.prompt_format = "llama3_instruct"
    with caplog.at_level("WARNING"):
        checked_prompt_format(cfg, _llama32(), ["training"])
    assert "model.prompt_format=llama3_instruct renders prompts differently from this tokenizer's own chat template" \
        in caplog.text


def _llama2_non_legacy() -> PreTrainedTokenizerFast:
    """Llama-2-chat's tokenizer as transformers 5 loads it with ``legacy: false``: a BPE with
    Metaspace(prepend_scheme="first"), so text right after a special token gets no ``▁`` (the
    template's ``<s>[INST]`` reads ``[INST]``, not Meta's ``▁[INST]``)."""
    from tokenizers import trainers

    corpus = [f"[INST] {q} [/INST] {a} " for q, a in PAIRS] * 10
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")  # merges within words
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=list("▁")))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = LLAMA2_CHAT
    return tok


def test_llama2_chat_on_a_non_legacy_llama2_tokenizer_is_not_warned(caplog):
    """The template's literal ``<s>`` changes the next word's tokens on a non-legacy tokenizer; the
    format adds BOS as an id and tokenises ``[INST] ...`` as Meta did. Only the BOS text differs, so no
    warning (which would advise prompt_format=chat, the ids the model was not trained on)."""
    tok = _llama2_non_legacy()
    fmt = get_prompt_format("llama2_chat")
    text = tok.apply_chat_template([{"role": "user", "content": PAIRS[0][0]}], tokenize=False, add_generation_prompt=True)
    assert tok(text, add_special_tokens=False)["input_ids"][1:] != fmt.prompt_ids(tok, PAIRS[0][0])[1:]  # the pitfall
    assert tok.convert_ids_to_tokens(fmt.prompt_ids(tok, PAIRS[0][0]))[:2] == ["<s>", "▁[INST]"]
    cfg = OmegaConf.structured(RunConfig)
    cfg.model.prompt_format = "llama2_chat"
    with caplog.at_level("WARNING"):
        checked_prompt_format(cfg, tok, ["training"])
        cfg.model.system_prompt = "Be brief."
        checked_prompt_format(cfg, tok, ["training"])
    assert "renders prompts differently" not in caplog.text


def test_the_log_says_how_raw_text_rows_start():
    """Raw-text rows (MUSE / WMDP corpora) get the tokenizer's BOS whenever it has one; a model whose
    tokenizer adds none itself (SmolLM2's <|im_start|>) may not expect it: the log says which."""
    from tokenizers.processors import TemplateProcessing

    from pipeline.data.formatting import raw_text_bos

    tok = make_tokenizer(["<unk>", "<bos>", "<eos>"], bos_token="<bos>", eos_token="<eos>")
    assert raw_text_bos(tok) == "raw text starts with BOS <bos> (prepended; the tokenizer itself adds none)"
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    assert raw_text_bos(tok) == "raw text starts with BOS <bos>"
    assert raw_text_bos(make_tokenizer(["<unk>", "<eos>"], eos_token="<eos>")) == \
        "raw text starts without BOS (the tokenizer has none)"


def test_the_log_says_when_the_prompt_format_is_not_applied(toks, caplog):
    """MUSE / WMDP runs train on raw text and evaluate with their own prompts: the log (and results.json's
    prompt_format.applied_to) must not claim the model's chat format ran."""
    from pipeline.data.common import UnlearningData
    from pipeline.inputs import prompt_format_uses

    text = UnlearningData("wmdp:bio", [{"text": "a b"}], [{"text": "c d"}])
    qa = UnlearningData("tofu", [{"question": "q", "answer": "a"}], [{"question": "q", "answer": "a"}])
    assert prompt_format_uses(text, training=True, evaluating=True) == []
    assert prompt_format_uses(qa, training=True, evaluating=True) == ["training", "evaluation", "generation"]
    assert prompt_format_uses(qa, training=False, evaluating=True) == ["evaluation", "generation"]
    cfg = OmegaConf.structured(RunConfig)
    cfg.model.prompt_format = "llama2_chat"
    cfg.data.name = "wmdp"
    with caplog.at_level("INFO"):
        checked_prompt_format(cfg, toks["llama2"], [])
    assert "prompt format: llama2_chat not applied (wmdp: raw-text rows" in caplog.text
    assert "raw text starts with BOS <s> (prepended; the tokenizer itself adds none)" in caplog.text, caplog.text
    # a format this tokenizer cannot express (zephyr needs </s>; wmdp_7b's default on another model)
    # stops the run only where it is applied
    cfg.model.prompt_format = "zephyr"
    checked_prompt_format(cfg, toks["plain"], [])
    with pytest.raises(ConfigError, match="model.prompt_format"):
        checked_prompt_format(cfg, toks["plain"], ["training"])


def test_a_runs_export_used_in_another_prompt_format_is_warned(toks, tmp_path, caplog):
    """eval.py model.path=runs/x/model with the default plain format for a model unlearned in chat
    scored it on prompts it was never trained on, with only a generic "this tokenizer has a chat
    template" note."""
    run = tmp_path / "x"
    (run / "model").mkdir(parents=True)
    (run / "exported_from.json").write_text('{"checkpoint": null, "step": 4}')
    trained = OmegaConf.structured(RunConfig)
    trained.model.prompt_format, trained.model.system_prompt = "llama2_chat", "Be brief."
    (run / "config.yaml").write_text(OmegaConf.to_yaml(trained))
    cfg = OmegaConf.structured(RunConfig)
    cfg.model.path = str(run / "model")
    with caplog.at_level("WARNING"):
        checked_prompt_format(cfg, toks["llama2"], ["evaluation", "generation"])
    assert (f"model.path={run / 'model'} was unlearned with model.prompt_format='llama2_chat', "
            "model.system_prompt='Be brief.'") in caplog.text and "this job uses model.prompt_format='plain'" in caplog.text
    caplog.clear()
    cfg.model.prompt_format, cfg.model.system_prompt = "llama2_chat", "Be brief."
    with caplog.at_level("WARNING"):
        checked_prompt_format(cfg, toks["llama2"], ["evaluation", "generation"])
    assert "was unlearned with" not in caplog.text


def test_the_log_shows_the_first_row_as_the_model_reads_it(toks, caplog):
    """The format's name does not say what a template adds (a chat template's own system prompt): the
    log shows the first training row's prompt and answer as decoded from the ids the model gets."""
    from pipeline.data.formatting import encode_qa
    from pipeline.inputs import log_first_prompt

    enc = encode_qa(toks["llama2"], "Who wrote it?", "Basil Mahfouz.", 64,
                    template=get_prompt_format("llama2_chat", "Be brief."))
    with caplog.at_level("INFO"):
        log_first_prompt(toks["llama2"], {"input_ids": enc.input_ids, "labels": enc.labels}, "forget")
    line = next(r.getMessage() for r in caplog.records if "first forget row" in r.getMessage())
    # (the toy vocabulary spells unknown words <unk>)
    assert "'<s>[INST] <<SYS>>\\nBe brief.\\n<</SYS>>\\n\\nWho wrote" in line, line
    assert line.index("[/INST]") < line.index("answer (loss tokens) ' Basil") < line.index("</s>'")


def test_results_record_the_chat_prompt_as_rendered_with_the_templates_own_system_turn(toks):
    """model.prompt_format=chat without model.system_prompt: SmolLM2's template adds a system turn of
    its own, which results.json hid (system_prompt null, nothing else); it now shows the prompt as
    rendered, the template's hash and the token that ends an answer."""
    desc = get_prompt_format("chat").describe(toks["chatml"])
    assert desc["system_prompt"] is None
    assert desc["example_prompt"].startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert desc["example_prompt"].endswith("<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
    assert desc["stop_token"] == "<|im_end|>" and len(desc["chat_template_sha256"]) == 64
    assert "example_prompt" not in get_prompt_format("chat").describe()  # no tokenizer: the settings only
