"""Turning QA pairs and raw text into token ids with loss masks.

One prompt format is used everywhere (training, evaluation, generation) so that the loss mask
and the evaluated continuation always agree: ``<bos>Question: {q}\\nAnswer: {a}<eos>`` with the
loss on the answer tokens (and ``<eos>``) only. Models with a chat template can be given their own
template through ``encode_qa(..., template=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100
PROMPT_TEMPLATE = "Question: {question}\nAnswer:"


def build_prompt(question: str, template: str = PROMPT_TEMPLATE) -> str:
    """The text the model sees before the answer."""
    return template.format(question=question)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def attention_mask(self) -> list[int]:
        return [1] * len(self.input_ids)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_ids(tokenizer, question: str, template: str = PROMPT_TEMPLATE) -> list[int]:
    """Token ids of ``<bos> + prompt`` (what generation is conditioned on)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + _ids(tokenizer, build_prompt(question, template))


def encode_qa(
    tokenizer,
    question: str,
    answer: str,
    max_length: int,
    template: str = PROMPT_TEMPLATE,
    add_eos: bool = True,
) -> Encoded:
    """Encode one QA pair with the loss on the answer (and EOS) only.

    When the pair is longer than ``max_length`` the prompt keeps its start and the answer is cut
    from the end; ``truncated`` tells the caller so it can count and report it.
    """
    p = prompt_ids(tokenizer, question, template)
    a = _ids(tokenizer, " " + answer)
    if add_eos and tokenizer.eos_token_id is not None:
        a = a + [tokenizer.eos_token_id]
    ids = p + a
    labels = [IGNORE_INDEX] * len(p) + a
    truncated = len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return Encoded(ids, labels, truncated)


def encode_text(tokenizer, text: str, max_length: int, add_eos: bool = True) -> Encoded:
    """Encode raw text (MUSE-style corpora) with the loss on every token after ``<bos>``."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = bos + _ids(tokenizer, text)
    if add_eos and tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    labels = [IGNORE_INDEX] * len(bos) + ids[len(bos):]
    truncated = len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return Encoded(ids, labels, truncated)


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
