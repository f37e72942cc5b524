"""Prompt formats: how a QA pair becomes token ids, one setting for training, evaluation and generation.

``model.prompt_format`` names one entry of :data:`PROMPT_FORMATS`; the same object encodes the
training rows (:func:`pipeline.data.loaders.encode_rows`, IdkDPO's refusal view), scores answers and
builds the generation prompt in evaluation (:mod:`pipeline.eval.tofu`), so the text a model is
trained on and the text it is evaluated on are the same string by construction.

* ``plain`` — ``<bos>Question: {q}\\nAnswer: {a}<eos>`` (the embedded benchmark; byte-identical to
  the format its cached models were trained with).
* ``chat`` — the tokenizer's own Jinja chat template (``apply_chat_template``), optional system
  prompt; the answer is the assistant turn.
* named templates of the field's released targets (``llama2_chat``, ``llama2_chat_tofu``,
  ``llama3_instruct``, ``zephyr``): fixed strings around the question and answer, producing the ids
  those models were fine-tuned on. A new format is one :class:`TemplateFormat` entry.

Every format puts the loss on the answer tokens and the end-of-turn / EOS token that closes the
answer, never on the prompt; BOS appears once; over-long pairs lose question words from the left,
never answer tokens (only an answer that cannot fit even with an empty question is cut, and
``Encoded.answer_cut`` says so).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from pipeline.data.formatting import IGNORE_INDEX, PROMPT_TEMPLATE, Encoded, fit_question
from pipeline.logging import SAME_ON_EVERY_RANK
from pipeline.registry import Registry

log = logging.getLogger(__name__)


_warned_plain: list[bool] = []  # the plain-format-on-a-chat-tokenizer warning is logged once per process


class PromptFormatError(ValueError):
    """A prompt format cannot be used with this tokenizer (missing template or special token);
    ``key`` names the setting to change."""

    def __init__(self, message: str, key: str = "model.prompt_format") -> None:
        super().__init__(message)
        self.key = key


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _with_bos(tokenizer, ids: list[int], want_bos: bool) -> list[int]:
    """Prepend BOS once: not when the format has none, nor when the text already began with it."""
    bos = tokenizer.bos_token_id
    if not want_bos or bos is None or (ids and ids[0] == bos):
        return ids
    return [bos] + ids


class PromptFormat:
    """Base class (subclasses are dataclasses of plain values, so settings holding one stay
    ``asdict``/JSON-able): ``prompt_text``/``prompt_ids`` (what generation is conditioned on), ``encode``
    (ids + labels with the loss on the answer and its end token), ``stop_token_id`` (where
    generation stops) and ``check`` (refuse a tokenizer that cannot express the format)."""

    name: str = ""

    def check(self, tokenizer) -> None:
        """Raise :class:`PromptFormatError` when ``tokenizer`` cannot encode this format."""

    def prompt_text(self, tokenizer, question: str) -> str:
        raise NotImplementedError

    def prompt_ids(self, tokenizer, question: str) -> list[int]:
        raise NotImplementedError

    def _encode_full(self, tokenizer, question: str, answer: str) -> Encoded:
        raise NotImplementedError

    def encode(self, tokenizer, question: str, answer: str, max_length: int) -> Encoded:
        """Ids and labels of one QA pair, at most ``max_length`` tokens, answer kept whole if it fits."""
        return fit_question(lambda q: self._encode_full(tokenizer, q, answer), question, max_length)

    def stop_token_id(self, tokenizer) -> Optional[int]:
        """The token that closes an answer in training rows (the loss's last label)."""
        return tokenizer.eos_token_id

    def stop_token_ids(self, tokenizer) -> list[int]:
        """Every token that ends a generated answer: the answer's closing token first, then the
        tokenizer's EOS (a chat model may end with either, e.g. Llama-3-Instruct's ``<|eot_id|>`` or
        ``<|end_of_text|>``, as its generation_config lists both)."""
        ids = [self.stop_token_id(tokenizer), tokenizer.eos_token_id]
        return list(dict.fromkeys(i for i in ids if i is not None))

    def describe(self, tokenizer: Any = None) -> dict[str, Any]:
        """What results.json records about the format (``tokenizer``: the one it renders with)."""
        return {"name": self.name}


@dataclass(kw_only=True)
class PlainFormat(PromptFormat):
    """``<bos>Question: {q}\\nAnswer: {a}<eos>`` — the prompt's ids, then the answer's ids as they
    follow the prompt in the joint text (see :func:`pipeline.data.formatting.answer_ids`; for the
    embedded benchmark's word-level tokenizer the same ids its cached models were trained on)."""

    name: str = "plain"
    template: str = PROMPT_TEMPLATE

    def check(self, tokenizer) -> None:
        # A chat model's tokenizer with model.prompt_format=plain (the schema's default, the embedded
        # benchmark's format) trains it on text it was never tuned on: legal, but rarely meant.
        if getattr(tokenizer, "chat_template", None) and not _warned_plain:
            _warned_plain.append(True)
            log.warning("model.prompt_format=plain, but this tokenizer has a chat template: the model is trained and "
                        "evaluated on 'Question: ...\nAnswer: ...' text, not its chat format; to use its template set "
                        "model.prompt_format=chat (or +exp=own_qa_7b for your own data)", extra=SAME_ON_EVERY_RANK)

    def prompt_text(self, tokenizer, question: str) -> str:
        return self.template.format(question=question)

    def prompt_ids(self, tokenizer, question: str) -> list[int]:
        from pipeline.data.formatting import prompt_ids

        return prompt_ids(tokenizer, question, self.template)

    def encode(self, tokenizer, question: str, answer: str, max_length: int) -> Encoded:
        from pipeline.data.formatting import encode_qa

        return encode_qa(tokenizer, question, answer, max_length, template=self.template)

    def describe(self, tokenizer: Any = None) -> dict[str, Any]:
        return {"name": self.name, "template": self.template}


def _joint(tokenizer, prompt_ids: list[int], full_ids: list[int], stop_id: Optional[int]) -> Encoded:
    """Labels for ``full_ids`` (prompt + answer tokenised together, as the models were trained):
    the loss starts after the prompt's length and ends at the first ``stop_id`` (the end-of-turn
    token; anything the template emits after it, e.g. a newline, is dropped). Without a stop token in
    the answer the tokenizer's EOS is appended, as open-unlearning does."""
    n = len(prompt_ids)
    ans = full_ids[n:]
    if stop_id is not None and stop_id in ans:
        ans = ans[: ans.index(stop_id) + 1]
    elif tokenizer.eos_token_id is not None:
        ans = ans + [tokenizer.eos_token_id]
    ids = full_ids[:n] + ans
    return Encoded(ids, [IGNORE_INDEX] * n + ans, False, prompt_mismatch=full_ids[:n] != prompt_ids)


@dataclass(kw_only=True)
class TemplateFormat(PromptFormat):
    """A fixed chat template: ``prompt`` (with ``{question}``, and ``{system}`` in
    ``prompt_with_system``) followed by ``answer`` (with ``{answer}``, ending in the ``end_token``
    text). Prompt + answer are tokenised as one string (``add_special_tokens=False``), the BOS id
    prepended once when ``bos``; the loss starts after the prompt's token count."""

    name: str
    prompt: str
    answer: str
    end_token: str  # the special token closing the assistant turn (loss + generation stop)
    prompt_with_system: Optional[str] = None  # None: the format has no system slot
    bos: bool = True
    strip: bool = True  # strip question/answer whitespace (the models' own templates do)
    source: str = ""  # where the template comes from (docs, results.json)
    system_prompt: Optional[str] = None
    # Further tokens the model's own generation_config ends generation at (used when the tokenizer has
    # them as one token), e.g. Llama-3-Instruct's <|end_of_text|> beside <|eot_id|>.
    extra_stop_tokens: tuple[str, ...] = ()
    # whether this format means to reproduce the tokenizer's own chat template (checked, warned when
    # not); False for a format that differs on purpose (llama2_chat_tofu: TOFU's fine-tuning text)
    follows_chat_template: bool = True

    def __post_init__(self) -> None:
        if self.system_prompt and self.prompt_with_system is None:
            raise PromptFormatError(f"model.prompt_format={self.name} has no system prompt slot; set model.system_prompt=null",
                                    key="model.system_prompt")

    def check(self, tokenizer) -> None:
        tid = tokenizer.convert_tokens_to_ids(self.end_token)
        if tid is None or tid == tokenizer.unk_token_id or _ids(tokenizer, self.end_token) != [tid]:
            raise PromptFormatError(
                f"model.prompt_format={self.name} needs the special token {self.end_token!r}, which this tokenizer "
                f"does not have as one token (wrong format for this model?)")
        if self.bos and tokenizer.bos_token_id is None:
            raise PromptFormatError(f"model.prompt_format={self.name} starts with BOS, but the tokenizer has no bos_token")
        if self.follows_chat_template:
            self._compare_with_chat_template(tokenizer)

    def _compare_with_chat_template(self, tokenizer) -> None:
        """Warn when the tokenizer's own template renders a prompt otherwise (e.g. llama3_instruct on a
        Llama-3.1/3.2 tokenizer, whose template adds a system header with dates): the model was tuned
        on its template's text, not this format's. BOS is compared apart (added as an id here): a
        template's leading BOS text is cut before tokenising the rest, as the models were trained on
        the BOS id + the text's ids."""
        if not isinstance(getattr(tokenizer, "chat_template", None), str):
            return
        question = "Who wrote this book?"
        msgs = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + [
            {"role": "user", "content": question}]
        try:
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - a template that cannot render this: nothing to compare
            return
        # BOS written as text can change how the next word is split: a non-legacy Llama-2 tokenizer
        # (Metaspace prepend_scheme="first") reads "<s>[INST]" as "<s> [ INST]", while Meta trained on
        # BOS id + sp.encode("[INST] ...") = "▁[INST]", which is what this format gives.
        bos_text = tokenizer.bos_token
        if isinstance(bos_text, str) and bos_text and text.startswith(bos_text):
            text = text[len(bos_text):]
        theirs = _ids(tokenizer, text)
        ours = self.prompt_ids(tokenizer, question)
        bos = tokenizer.bos_token_id
        if [t for t in ours if t != bos] != [t for t in theirs if t != bos]:
            log.warning("model.prompt_format=%s renders prompts differently from this tokenizer's own chat template "
                        "(ours %r, the template's %r): the model was tuned on its template's text; "
                        "model.prompt_format=chat follows the template", self.name,
                        tokenizer.decode(ours[-40:]), tokenizer.decode(theirs[-40:]), extra=SAME_ON_EVERY_RANK)

    def _clean(self, s: str) -> str:
        return s.strip() if self.strip else s

    def prompt_text(self, tokenizer, question: str) -> str:
        if self.system_prompt:
            return self.prompt_with_system.format(system=self.system_prompt, question=self._clean(question))
        return self.prompt.format(question=self._clean(question))

    def prompt_ids(self, tokenizer, question: str) -> list[int]:
        return _with_bos(tokenizer, _ids(tokenizer, self.prompt_text(tokenizer, question)), self.bos)

    def stop_token_id(self, tokenizer) -> Optional[int]:
        return tokenizer.convert_tokens_to_ids(self.end_token)

    def stop_token_ids(self, tokenizer) -> list[int]:
        ids = super().stop_token_ids(tokenizer)
        for text in self.extra_stop_tokens:
            tid = tokenizer.convert_tokens_to_ids(text)
            if tid is not None and tid != tokenizer.unk_token_id and _ids(tokenizer, text) == [tid] and tid not in ids:
                ids.append(tid)
        return ids

    def _encode_full(self, tokenizer, question: str, answer: str) -> Encoded:
        text = self.prompt_text(tokenizer, question) + self.answer.format(answer=self._clean(answer))
        full = _with_bos(tokenizer, _ids(tokenizer, text), self.bos)
        return _joint(tokenizer, self.prompt_ids(tokenizer, question), full, self.stop_token_id(tokenizer))

    def describe(self, tokenizer: Any = None) -> dict[str, Any]:
        return {"name": self.name, "system_prompt": self.system_prompt, "source": self.source,
                "prompt": self.prompt_with_system if self.system_prompt else self.prompt, "answer": self.answer}


@dataclass(kw_only=True)
class ChatFormat(PromptFormat):
    """The tokenizer's own chat template: ``[system?, user q, assistant a]`` rendered with
    ``apply_chat_template(tokenize=False)`` and tokenised with ``add_special_tokens=False`` (the
    template carries BOS if the model wants one); the prompt is the same messages without the
    assistant turn, ``add_generation_prompt=True``. The loss covers the answer and the first special
    token after it (the end of the assistant turn, e.g. ChatML's ``<|im_end|>``)."""

    name: str = "chat"
    system_prompt: Optional[str] = None
    # extra variables of the template (model.chat_template_kwargs), e.g. Llama-3.1/3.2's date_string
    template_kwargs: dict[str, Any] = field(default_factory=dict)

    def check(self, tokenizer) -> None:
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise PromptFormatError("model.prompt_format=chat, but the tokenizer has no chat_template "
                                    "(pick a named format, e.g. llama2_chat, or plain)")
        if "strftime_now" in str(template) and "date_string" not in self.template_kwargs:
            # Llama-3.2's template writes today's date into every prompt: training and evaluation on
            # other days would see other tokens, and results could not be reproduced
            raise PromptFormatError("model.prompt_format=chat: this tokenizer's chat template writes today's date "
                                    "into every prompt (strftime_now); fix it, e.g. +model.chat_template_kwargs.date_string='26 Jul "
                                    "2024' (the template's own fallback; open-unlearning uses '10 Apr 2025'), so "
                                    "every run and evaluation sees the same prompt", key="model.chat_template_kwargs")
        self._render(tokenizer, self._messages("q", "a"))  # a template that raises (below) fails here, up front
        self._render(tokenizer, self._messages("q"), generation_prompt=True)

    def _render(self, tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
        from jinja2 import TemplateError

        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                                 **self.template_kwargs)
        except TemplateError as e:
            # a template's raise_exception (Gemma, Mistral-Instruct: "System role not supported"; role
            # alternation) is the setting's fault, not a crash: name the setting to change
            if self.system_prompt:
                raise PromptFormatError(f"model.prompt_format=chat: the tokenizer's chat template refuses the "
                                        f"conversation with model.system_prompt set ({e}); set model.system_prompt=null",
                                        key="model.system_prompt") from None
            raise PromptFormatError(f"model.prompt_format=chat: the tokenizer's chat template refuses a [user, "
                                    f"assistant] conversation ({e}); pick a named format or plain") from None

    def _messages(self, question: str, answer: Optional[str] = None) -> list[dict]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        msgs.append({"role": "user", "content": question})
        if answer is not None:
            msgs.append({"role": "assistant", "content": answer})
        return msgs

    def prompt_text(self, tokenizer, question: str) -> str:
        return self._render(tokenizer, self._messages(question), generation_prompt=True)

    def prompt_ids(self, tokenizer, question: str) -> list[int]:
        return _ids(tokenizer, self.prompt_text(tokenizer, question))

    def _end_of_turn(self, tokenizer, answer_ids: list[int]) -> Optional[int]:
        special = set(tokenizer.all_special_ids)
        special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
        # <unk> is special but stands for a character of the answer (a tokenizer without byte fallback):
        # the turn does not end there (unless it is also EOS, as GPT-2-style tokenizers have it)
        if tokenizer.unk_token_id != tokenizer.eos_token_id:
            special.discard(tokenizer.unk_token_id)
        return next((t for t in answer_ids if t in special), None)

    def _encode_full(self, tokenizer, question: str, answer: str) -> Encoded:
        prompt = self.prompt_text(tokenizer, question)
        full = self._render(tokenizer, self._messages(question, answer))
        if not full.startswith(prompt):
            raise PromptFormatError("model.prompt_format=chat: the chat template renders the conversation differently "
                                    "with and without the assistant turn; the prompt is not a prefix of the training text")
        p, ids = self.prompt_ids(tokenizer, question), _ids(tokenizer, full)
        return _joint(tokenizer, p, ids, self._end_of_turn(tokenizer, ids[len(p):]))

    def stop_token_id(self, tokenizer) -> Optional[int]:
        # The token that closes an assistant turn: what the template emits after an answer.
        p = self.prompt_ids(tokenizer, "q")
        ids = _ids(tokenizer, self._render(tokenizer, self._messages("q", "a")))
        return self._end_of_turn(tokenizer, ids[len(p):]) or tokenizer.eos_token_id

    def describe(self, tokenizer: Any = None) -> dict[str, Any]:
        """``system_prompt``: the one set (null: the template's own, if it adds one: ``example_prompt``
        shows the prompt as rendered, e.g. SmolLM2's built-in system turn)."""
        out = {"name": self.name, "system_prompt": self.system_prompt, "source": "tokenizer.chat_template",
               "chat_template_kwargs": dict(self.template_kwargs)}
        digest = chat_template_sha256(tokenizer)
        if digest:
            stop = self.stop_token_id(tokenizer)
            out.update(chat_template_sha256=digest,
                       example_prompt=self.prompt_text(tokenizer, "{question}"),
                       stop_token=tokenizer.convert_ids_to_tokens(stop) if stop is not None else None)
        return out


def chat_template_sha256(tokenizer: Any) -> Optional[str]:
    """SHA-256 of the tokenizer's chat template (a string, or a dict of named templates), or None
    without one: what records and cache keys name the template by."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------------ registry
# name -> factory(system_prompt) -> PromptFormat. One entry per format.
PROMPT_FORMATS: Registry[Callable[[Optional[str]], PromptFormat]] = Registry("prompt format")


def _register_template(**kw: Any) -> None:
    PROMPT_FORMATS.register(kw["name"])(lambda system_prompt=None: TemplateFormat(**kw, system_prompt=system_prompt))


def _plain(system_prompt: Optional[str] = None) -> PromptFormat:
    if system_prompt:
        raise PromptFormatError("model.prompt_format=plain has no system prompt; set model.system_prompt=null",
                                key="model.system_prompt")
    return PlainFormat()


PROMPT_FORMATS.register("plain")(_plain)
PROMPT_FORMATS.register("chat")(lambda system_prompt=None: ChatFormat(system_prompt=system_prompt))
# (model.chat_template_kwargs reach ChatFormat through prompt_format_from_config)
# Meta's Llama-2-chat format (their reference chat_completion and the HF tokenizer's template):
# <s>[INST] <<SYS>>\n{sys}\n<</SYS>>\n\n{q} [/INST] {a} </s>
_register_template(
    name="llama2_chat", prompt="[INST] {question} [/INST]",
    prompt_with_system="[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{question} [/INST]",
    answer=" {answer} </s>", end_token="</s>", source="meta-llama/Llama-2-7b-chat-hf chat template")
# TOFU's Llama-2-7b-chat targets (locuslab/tofu and open-unlearning configs/model/Llama-2-7b-chat-hf.yaml:
# user_start_tag "[INST] ", user_end_tag " [/INST]", asst_start_tag "", no system prompt; text tokenised
# with the tokenizer's BOS, EOS appended): <s>[INST] {q} [/INST]{a}</s> — no space before the answer.
_register_template(
    name="llama2_chat_tofu", prompt="[INST] {question} [/INST]", answer="{answer}</s>", end_token="</s>",
    strip=False, follows_chat_template=False, source="open-unlearning configs/model/Llama-2-7b-chat-hf.yaml (TOFU fine-tuning format)")
# Meta-Llama-3(-8B)-Instruct's template (no default system prompt, no date lines; Llama-3.1 adds those).
_register_template(
    name="llama3_instruct",
    prompt="<|start_header_id|>user<|end_header_id|>\n\n{question}<|eot_id|>"
           "<|start_header_id|>assistant<|end_header_id|>\n\n",
    prompt_with_system="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
                       "<|start_header_id|>user<|end_header_id|>\n\n{question}<|eot_id|>"
                       "<|start_header_id|>assistant<|end_header_id|>\n\n",
    answer="{answer}<|eot_id|>", end_token="<|eot_id|>", extra_stop_tokens=("<|end_of_text|>",),
    source="meta-llama/Meta-Llama-3-8B-Instruct chat template (BOS = <|begin_of_text|>)")
# HuggingFaceH4/zephyr-7b-beta's template; BOS prepended as in its SFT/DPO tokenisation.
_register_template(
    name="zephyr", prompt="<|user|>\n{question}</s>\n<|assistant|>\n",
    prompt_with_system="<|system|>\n{system}</s>\n<|user|>\n{question}</s>\n<|assistant|>\n",
    answer="{answer}</s>", end_token="</s>", strip=False, source="HuggingFaceH4/zephyr-7b-beta chat template")


def get_prompt_format(name: str, system_prompt: Optional[str] = None) -> PromptFormat:
    """The registered format ``name`` (``KeyError`` listing the known ones otherwise)."""
    return PROMPT_FORMATS.get(name)(system_prompt)


def prompt_format_from_config(model_cfg: Any) -> PromptFormat:
    """The format selected by ``model.prompt_format`` / ``model.system_prompt`` /
    ``model.chat_template_kwargs`` (read by ``chat`` only; set with another format, an error)."""
    get = model_cfg.get if hasattr(model_cfg, "get") else (lambda k, d=None: getattr(model_cfg, k, d))
    fmt = get_prompt_format(str(get("prompt_format", "plain") or "plain"), get("system_prompt", None))
    kwargs = get("chat_template_kwargs", None) or {}
    if kwargs:
        if not isinstance(fmt, ChatFormat):
            raise PromptFormatError(f"model.chat_template_kwargs is set, but model.prompt_format={fmt.name} does not "
                                    f"render the tokenizer's chat template (only prompt_format=chat reads it)", key="model.chat_template_kwargs")
        fmt.template_kwargs = {str(k): v for k, v in dict(kwargs).items()}
    return fmt
