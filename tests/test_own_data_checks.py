"""A user's own data, the own-data recipe (+exp=own_qa_7b), chat templates that
refuse a conversation, unknown MUSE/WMDP split names, data.path with `~` or relative to the repository,
stale cached rows, configured columns, rows without loss tokens and the file formats of data.name=json."""

import json
import logging
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.config import DataConfig
from pipeline.data.loaders import DataError, encode_rows, load_unlearning_data
from pipeline.data.prompt_formats import PromptFormatError, get_prompt_format
from pipeline.errors import USER_ERRORS
from tests.test_prompt_formats import CHATML_SMOLLM2, make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"
ROWS = [{"question": "Who wrote Emma?", "answer": "Jane Austen."}]
OTHER = [{"question": "Where was Basil born?", "answer": "Jane Austen."}]


def _cfg(**over):
    base = {"name": "json", "forget_split": "forget", "retain_split": "retain", "eval_splits": ["forget"]}
    return OmegaConf.merge(OmegaConf.structured(DataConfig), base, over)


def _write(d: Path, name: str, rows: list[dict]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


# ---------------------------------------------------------------- 1. the own-data recipe


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    from pipeline.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_own_qa_experiment_is_a_real_model_recipe():
    from pipeline.config import validate

    cfg = _compose(["+exp=own_qa_7b", "model.path=/some/model", f"data.path={FIX / 'own_qa'}"])
    validate(cfg)
    assert (cfg.data.name, cfg.data.truth_ratio_reference, cfg.data.max_length) == ("json", "paraphrased_answer", 512)
    assert (cfg.model.source, cfg.model.prompt_format) == ("pretrained", "chat")
    assert (cfg.method.name, cfg.method.tau, cfg.method.gamma, cfg.method.alpha) == ("asu_kl", 2.3, 0.1, 1.0)
    assert cfg.trainer.lr == 1e-5 and cfg.run_name == "own_qa_7b/asu_kl"
    section = (ROOT / "README.md").read_text().split("### Your own data")[1].split("###")[0]
    assert "+exp=own_qa_7b" in section


def test_plain_format_on_a_chat_tokenizer_warns_once(caplog, monkeypatch):
    import pipeline.data.prompt_formats as pf

    monkeypatch.setattr(pf, "_warned_plain", [], raising=False)
    chat = make_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML_SMOLLM2,
                          bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    plain_tok = make_tokenizer(["<unk>", "<bos>", "<eos>"], bos_token="<bos>", eos_token="<eos>")
    with caplog.at_level(logging.WARNING):
        get_prompt_format("plain").check(plain_tok)
        assert not caplog.records  # no chat template: plain is the only format there is
        get_prompt_format("plain").check(chat)
        get_prompt_format("plain").check(chat)
    assert len(caplog.records) == 1 and "model.prompt_format=chat" in caplog.records[0].getMessage()


# ---------------------------------------------------------------- 2. templates that raise

GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
         "{% endif %}{% for message in messages %}{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] "
         "+ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
NEVER = "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"


def _gemma(template: str = GEMMA):
    return make_tokenizer(["<unk>", "<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"], template,
                          bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def test_chat_template_refusing_the_system_prompt_is_a_one_line_error_naming_it():
    from pipeline.config_base import ConfigError
    from pipeline.inputs import checked_prompt_format

    cfg = OmegaConf.create({"model": {"prompt_format": "chat", "system_prompt": "Be brief.",
                                      "chat_template_kwargs": None}, "data": {"name": "json"}})
    with pytest.raises(ConfigError, match=r"'model.system_prompt'.*System role not supported"):
        checked_prompt_format(cfg, _gemma(), ["training"])
    # rendering during encoding (a format built without check) is the same user error, not a TemplateError
    with pytest.raises(PromptFormatError, match="System role not supported") as e:
        encode_rows(_gemma(), ROWS, 64, True, "forget", get_prompt_format("chat", "Be brief."))
    assert isinstance(e.value, USER_ERRORS) and e.value.key == "model.system_prompt"
    get_prompt_format("chat").check(_gemma())  # without a system prompt the template renders


def test_chat_template_refusing_any_conversation_names_the_prompt_format():
    with pytest.raises(PromptFormatError, match="roles must alternate") as e:
        get_prompt_format("chat").check(_gemma(NEVER))
    assert e.value.key == "model.prompt_format"


# ---------------------------------------------------------------- 3. unknown MUSE / WMDP split names


@pytest.mark.parametrize("over", [
    {"name": "wmdp", "path": str(FIX / "wmdp"), "forget_split": "cyber-forget-corpus",
     "retain_split": "cyber-retain-corpus", "eval_splits": ["wmdp_cyberr"]},
    {"name": "muse", "path": str(FIX / "muse_news"), "forget_split": "forget", "retain_split": "retain1",
     "eval_splits": ["knowmem_forgett"]},
])
def test_unknown_eval_split_names_are_data_errors_before_loading(over):
    from pipeline.inputs import check_data_path

    cfg = _cfg(**over)
    with pytest.raises(DataError, match=r"data.eval_splits: unknown .* eval split '(wmdp_cyberr|knowmem_forgett)'"):
        check_data_path(OmegaConf.create({"data": cfg}))  # the early check, before a run directory
    with pytest.raises(DataError, match="unknown"):
        load_unlearning_data(cfg)


# ---------------------------------------------------------------- 4. data.path: ~ and the repository root


def test_home_relative_path_is_read_by_the_loader(tmp_path, monkeypatch):
    _write(tmp_path / "own", "forget.jsonl", ROWS)
    _write(tmp_path / "own", "retain.jsonl", OTHER)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_unlearning_data(_cfg(path="~/own")).forget == ROWS


def test_repository_relative_package_data_is_found_from_another_directory(tmp_path, monkeypatch):
    from pipeline.inputs import check_data_path

    data = OmegaConf.load(ROOT / "conf" / "data" / "realworld_facts.yaml")
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), data)
    monkeypatch.chdir(tmp_path)
    check_data_path(OmegaConf.create({"data": cfg}))
    assert load_unlearning_data(cfg).forget
    # a directory of that name under the working directory is what the user means: it wins
    _write(tmp_path / cfg.path, "forget.jsonl", ROWS)
    _write(tmp_path / cfg.path, "retain.jsonl", OTHER)
    _write(tmp_path / cfg.path, "world_facts.jsonl", ROWS)
    assert load_unlearning_data(cfg).forget == ROWS


# ---------------------------------------------------------------- 5. a rewritten file is read again


def test_rewritten_file_with_the_same_mtime_is_not_served_from_the_cache(tmp_path):
    _write(tmp_path, "retain.jsonl", OTHER)
    f = _write(tmp_path, "forget.jsonl", [{"question": "q1", "answer": "OLD"}])
    os.utime(f, (1700000000, 1700000000))
    assert load_unlearning_data(_cfg(path=str(tmp_path))).forget[0]["answer"] == "OLD"
    _write(tmp_path, "forget.jsonl", [{"question": "q1", "answer": "NEW ANSWER"}])
    os.utime(f, (1700000000, 1700000000))
    assert load_unlearning_data(_cfg(path=str(tmp_path))).forget[0]["answer"] == "NEW ANSWER"


# ---------------------------------------------------------------- 6. configured columns


def _renamed(d: Path) -> None:
    _write(d, "forget.jsonl", [{"prompt": r["question"], "response": r["answer"]} for r in ROWS])
    _write(d, "retain.jsonl", [{"prompt": r["question"], "response": r["answer"]} for r in OTHER])


def test_configured_column_missing_from_the_file_names_the_setting(tmp_path):
    _renamed(tmp_path)
    with pytest.raises(DataError, match=r"data.question_column='promt': no such column in .*forget.jsonl; present "
                                        r"columns: \['prompt', 'response'\]"):
        load_unlearning_data(_cfg(path=str(tmp_path), question_column="promt", answer_column="response"))
    with pytest.raises(DataError, match=r"data.columns.answer='respons': no such column"):
        load_unlearning_data(_cfg(path=str(tmp_path), columns={"question": "prompt", "answer": "respons"}))


def test_json_loader_applies_data_columns(tmp_path):
    _renamed(tmp_path)
    d = load_unlearning_data(_cfg(path=str(tmp_path), columns={"question": "prompt", "answer": "response"}))
    assert d.forget == ROWS and d.eval["forget"] == ROWS


def test_a_mapped_optional_column_may_be_missing_from_some_splits(tmp_path):
    """paraphrased_answer / perturbed_answer / facts are optional per split: a mapping for one is applied
    where a split has the column and not demanded from the others (only question/answer/text are)."""
    _write(tmp_path, "forget.jsonl", [{**ROWS[0], "para": "Austen wrote it."}])
    _write(tmp_path, "retain.jsonl", OTHER)
    d = load_unlearning_data(_cfg(path=str(tmp_path), columns={"paraphrased_answer": "para"},
                                  eval_splits=["forget", "retain"]))
    assert d.forget[0]["paraphrased_answer"] == "Austen wrote it." and "paraphrased_answer" not in d.retain[0]


# ---------------------------------------------------------------- 7. rows without loss tokens


def test_prompt_longer_than_max_length_is_blamed_on_the_prompt(caplog):
    tok = make_tokenizer(["<unk>", "<bos>", "<eos>"], bos_token="<bos>", eos_token="<eos>")
    n_prompt = len(get_prompt_format("plain").prompt_ids(tok, ""))
    with caplog.at_level(logging.WARNING), pytest.raises(
            DataError, match=rf"split 'forget': no row has a loss token: the prompt alone .*{n_prompt} "
                             rf"tokens.* fills data.max_length={n_prompt - 1}"):
        encode_rows(tok, ROWS * 2, n_prompt - 1, True, "forget", get_prompt_format("plain"))
    assert not any("answers kept" in r.getMessage() for r in caplog.records)  # no row kept its answer
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # one answer token fits: the answer is cut, and said so
        rows = encode_rows(tok, ROWS, n_prompt + 1, True, "forget", get_prompt_format("plain"))
    assert sum(lab != -100 for lab in rows[0]["labels"]) == 1
    said = [r.getMessage() for r in caplog.records]
    # the cause is the prompt's length, not the answer's (it said "answer(s) alone are longer"), and the
    # row is not also counted as "answers kept"
    assert (f"split 'forget': 1 of 1 row(s) do not fit data.max_length={n_prompt + 1} even with their whole question "
            f"dropped: the prompt (the template and system prompt: {n_prompt} tokens with an empty question)") in said[-1]
    assert "shorten model.system_prompt" in said[-1] and not any("answers kept" in m for m in said), said


# ---------------------------------------------------------------- 8. .json / .parquet files, unread formats


def test_json_array_and_parquet_splits_are_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "forget.json").write_text(json.dumps(ROWS))
    pq.write_table(pa.Table.from_pylist(OTHER), tmp_path / "retain.parquet")
    d = load_unlearning_data(_cfg(path=str(tmp_path)))
    assert d.forget == ROWS and d.retain == OTHER


def test_split_in_an_unread_format_is_named(tmp_path):
    (tmp_path / "forget.csv").write_text("question,answer\nq,a\n")
    _write(tmp_path, "retain.jsonl", OTHER)
    with pytest.raises(DataError, match=r"split 'forget' not found .*available splits: \['retain'\]; "
                                        r"\['forget.csv'\] cannot be read"):
        load_unlearning_data(_cfg(path=str(tmp_path)))


# ---------------------------------------------------------------- 9. special-token text in user data


def test_special_token_text_in_rows_is_reported(caplog):
    tok = make_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML_SMOLLM2,
                         bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    rows = ROWS + [{"question": "Who wrote Emma?", "answer": "Jane <|im_end|> Austen."}]
    with caplog.at_level(logging.WARNING):
        encode_rows(tok, ROWS, 256, True, "forget", get_prompt_format("chat"))
        assert not caplog.records
        encode_rows(tok, rows, 256, True, "forget", get_prompt_format("chat"))
    msg = [r.getMessage() for r in caplog.records if "special-token text" in r.getMessage()]
    assert len(msg) == 1 and "1 row(s)" in msg[0] and "'<|im_end|>'" in msg[0] and "(first: row 2)" in msg[0]
