"""Turning QA pairs and raw text into token ids with loss masks.

One prompt format is used everywhere (training, evaluation, generation) so that the loss mask
and the evaluated continuation always agree. ``template`` is either a format string (the ``plain``
format, ``<bos>Question: {q}\\nAnswer: {a}<eos>`` by default, with the loss on the answer tokens and
``<eos>`` only; the answer's ids are those of the joint text, :func:`answer_ids`) or a
:class:`pipeline.data.prompt_formats.PromptFormat` selected by ``model.prompt_format`` (chat
templates), which then does the encoding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100
PROMPT_TEMPLATE = "Question: {question}\nAnswer:"


def build_prompt(question: str, template: Any = PROMPT_TEMPLATE, tokenizer: Any = None) -> str:
    """The text the model sees before the answer (a PromptFormat may need the ``tokenizer``)."""
    if not isinstance(template, str):
        return template.prompt_text(tokenizer, question)
    return template.format(question=question)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    answer_cut: bool = False  # even the answer alone was longer than max_length: its end was cut
    prompt_mismatch: bool = False  # the prompt's ids differ inside the joint tokenisation (border merge)

    @property
    def attention_mask(self) -> list[int]:
        return [1] * len(self.input_ids)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def answer_ids(tokenizer, prompt: str, answer: str) -> list[int]:
    """Ids of ``answer`` as they follow ``prompt`` when the two are tokenised as one text (what a model
    reads). Tokenised alone, a leading space can become a token of its own (Llama-2's SentencePiece
    encodes ``" Paris"`` as ``▁`` + ``▁Paris``, the joint text as ``▁Paris``). Falls back to the answer
    alone when the prompt's ids change inside the joint text (a merge across the border), so the prompt
    ids stay exactly the ones generation is conditioned on."""
    p, joint = _ids(tokenizer, prompt), _ids(tokenizer, prompt + answer)
    return joint[len(p):] if joint[: len(p)] == p else _ids(tokenizer, answer)


def prompt_ids(tokenizer, question: str, template: Any = PROMPT_TEMPLATE) -> list[int]:
    """Token ids of ``<bos> + prompt`` (what generation is conditioned on)."""
    if not isinstance(template, str):
        return template.prompt_ids(tokenizer, question)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + _ids(tokenizer, build_prompt(question, template))


def fit_prompt(tokenizer, question: str, max_length: int, template: Any = PROMPT_TEMPLATE) -> tuple[list[int], bool]:
    """:func:`prompt_ids` of ``question`` in at most ``max_length`` tokens, shortened as a QA row is
    (:func:`fit_question`: leading question words dropped; a prompt too long even without its question
    is cut from its end); and whether it was shortened."""
    enc = fit_question(lambda q: Encoded(prompt_ids(tokenizer, q, template), []), question, max_length)
    return enc.input_ids, enc.truncated


def encode_qa(
    tokenizer,
    question: str,
    answer: str,
    max_length: int,
    template: Any = PROMPT_TEMPLATE,
    add_eos: bool = True,
) -> Encoded:
    """Encode one QA pair with the loss on the answer (and EOS) only.

    ``template``: a format string (plain format) or a PromptFormat, which then encodes. When the
    pair is longer than ``max_length`` question words are dropped from the left until it fits (the
    answer is kept whole); only an answer that does not fit even after an empty question is cut from
    its end (``answer_cut``). ``truncated`` tells the caller so it can count and report it.
    """
    if not isinstance(template, str):
        return template.encode(tokenizer, question, answer, max_length)

    def encode(q: str) -> Encoded:
        p = prompt_ids(tokenizer, q, template)
        a = answer_ids(tokenizer, build_prompt(q, template), " " + answer)
        if add_eos and tokenizer.eos_token_id is not None:
            a = a + [tokenizer.eos_token_id]
        return Encoded(p + a, [IGNORE_INDEX] * len(p) + a)

    return fit_question(encode, question, max_length)


def fit_question(encode: Callable[[str], Encoded], question: str, max_length: int) -> Encoded:
    """``encode(question)`` if it fits in ``max_length`` tokens; otherwise the encoding with the
    fewest leading question words dropped that fits (``truncated``). If even an empty question does
    not fit, the answer is cut from its end (``answer_cut``): the loss then misses its last tokens."""
    enc = encode(question)
    if len(enc.input_ids) <= max_length:
        return enc
    words = question.split(" ")
    lo, hi, best = 1, len(words), None
    while lo <= hi:  # the smallest number of dropped words that fits
        mid = (lo + hi) // 2
        e = encode(" ".join(words[mid:]))
        if len(e.input_ids) <= max_length:
            best, hi = e, mid - 1
        else:
            lo = mid + 1
    if best is None:
        best = encode("")
        best.input_ids, best.labels = best.input_ids[:max_length], best.labels[:max_length]
        best.answer_cut = True
    best.truncated = True
    return best


def raw_text_bos(tokenizer) -> str:
    """How raw-text rows start, for the log: with the tokenizer's BOS whenever it has one (as the MUSE
    and WMDP references tokenise with Llama-2 / Zephyr tokenizers, which add it), also where the
    tokenizer itself adds none (SmolLM2, Pythia): said, as such a model may not expect it."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return "raw text starts without BOS (the tokenizer has none)"
    own = tokenizer("x")["input_ids"][:1] == [bos]
    return f"raw text starts with BOS {tokenizer.bos_token}" + ("" if own else " (prepended; the tokenizer itself adds none)")


def encode_text(tokenizer, text: str, max_length: int, add_eos: bool = True) -> Encoded:
    """Encode raw text (MUSE-style corpora) with the loss on every token after ``<bos>``."""
    return _text_row(tokenizer, _ids(tokenizer, text), max_length, add_eos)


def encode_texts(tokenizer, texts: Sequence[str], max_length: int, add_eos: bool = True,
                 batch_size: int = 256) -> list[Encoded]:
    """:func:`encode_text` of many texts, the same ids: tokenised a batch at a time, which a fast
    tokenizer spreads over its threads (a corpus of long papers takes minutes one text at a time).
    Advances the open progress bar (:mod:`pipeline.progress`) by one per batch."""
    from pipeline.progress import tracked

    out: list[Encoded] = []
    for start in tracked(range(0, len(texts), batch_size)):
        batch = tokenizer(list(texts[start:start + batch_size]), add_special_tokens=False)["input_ids"]
        out += [_text_row(tokenizer, list(ids), max_length, add_eos) for ids in batch]
    return out


def _text_row(tokenizer, text_ids: list[int], max_length: int, add_eos: bool) -> Encoded:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = bos + text_ids
    if add_eos and tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    labels = [IGNORE_INDEX] * len(bos) + ids[len(bos):]
    truncated = len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return Encoded(ids, labels, truncated)


def pack_texts(tokenizer, texts: Sequence[str], max_length: int, separator: str = "\n\n") -> list[Encoded]:
    """A raw-text corpus as one token stream cut into rows of ``max_length`` tokens: the texts joined
    with ``separator`` and tokenised once, then windows of ``max_length - 1`` tokens, each after
    ``<bos>``, with the loss on every token but ``<bos>`` and no ``<eos>`` (a window ends mid-text).

    MUSE's own trainer does this (``DefaultDataset``: windows of ``max_len - 1`` tokens after BOS) and
    so does open-unlearning's ``PretrainingDataset`` for MUSE (texts joined with ``"\\n\\n"``; its
    windows are ``max_length`` tokens + BOS and pass through a decode/re-encode round trip). Every token
    of the corpus is trained on once per epoch; one row per document, cut at ``max_length``, would drop
    the tail of every longer document."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    width = max_length - len(bos)
    if width < 1:
        raise ValueError(f"max_length={max_length} leaves no room for text after <bos>")
    ids = _ids(tokenizer, separator.join(texts))
    return [Encoded(bos + ids[i:i + width], [IGNORE_INDEX] * len(bos) + ids[i:i + width])
            for i in range(0, len(ids), width)]


# A fixed list of refusals in the style of TOFU's idontknow.jsonl (IdkDPO and ASU+IDK targets). The
# embedded benchmark's tokenizer includes their words (pipeline/data/prepare.py).
REFUSALS: tuple[str, ...] = (
    "I don't know.",
    "I'm not sure.",
    "I have no idea.",
    "I'm afraid I can't answer that.",
    "I don't have that information.",
    "That's not something I know.",
    "I'm unable to answer that question.",
    "I can't help with that.",
    "I really don't know the answer.",
    "Sorry, I don't know.",
)
