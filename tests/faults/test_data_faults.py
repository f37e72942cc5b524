"""Bad data stops before any model is loaded, with a message naming dataset, split and column."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.config import DataConfig
from pipeline.data.loaders import DataError, encode_rows, load_unlearning_data
from tests.helpers.tiny import qa_row, unloadable_model

ROOT = Path(__file__).resolve().parents[2]


def write(d: Path, split: str, rows):
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"{split}.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def cfg(path, **over):
    base = OmegaConf.structured(DataConfig)
    return OmegaConf.merge(base, {"name": "json", "path": str(path), "forget_split": "forget",
                                  "retain_split": "retain", "eval_splits": [], **over})


def test_loads_valid_data(tmp_path):
    write(tmp_path, "forget", [qa_row("alice", "paris")])
    write(tmp_path, "retain", [qa_row("bob", "rome")])
    data = load_unlearning_data(cfg(tmp_path))
    assert len(data.forget) == 1 and data.retain[0]["answer"].startswith("bob")


def test_missing_column_names_dataset_split_and_column(tmp_path):
    bad = qa_row("bob", "rome")
    del bad["answer"]
    write(tmp_path, "forget", [qa_row("alice", "paris")])
    write(tmp_path, "retain", [bad])
    with pytest.raises(DataError) as e:
        load_unlearning_data(cfg(tmp_path))
    msg = str(e.value)
    assert "'retain'" in msg and "answer" in msg and "json:" in msg


def test_eval_columns_optional_but_never_half_filled(tmp_path):
    # A user's plain QA split (no perturbed answers) loads; its truth-ratio metrics are skipped at
    # evaluation. A column present in some rows only is a data bug and is refused, naming the rows.
    ev = qa_row("bob", "rome")
    del ev["perturbed_answer"]
    write(tmp_path, "forget", [qa_row("alice", "paris")])
    write(tmp_path, "retain", [qa_row("bob", "rome")])
    write(tmp_path, "ev", [ev])
    assert "perturbed_answer" not in load_unlearning_data(cfg(tmp_path, eval_splits=["ev"])).eval["ev"][0]
    write(tmp_path, "ev", [qa_row("carol", "oslo"), ev])
    with pytest.raises(DataError, match=r"split 'ev', column 'perturbed_answer': missing in 1 of 2 rows \(first: row 2\)"):
        load_unlearning_data(cfg(tmp_path, eval_splits=["ev"]))
    write(tmp_path, "ev", [{**ev, "perturbed_answer": "one string"}])
    with pytest.raises(DataError, match=r"column 'perturbed_answer': row 1 must hold a non-empty list of strings, got str"):
        load_unlearning_data(cfg(tmp_path, eval_splits=["ev"]))
    write(tmp_path, "ev", [{**ev, "perturbed_answer": []}])  # was logged as "no perturbed_answer column"
    with pytest.raises(DataError, match=r"column 'perturbed_answer': row 1 must hold a non-empty list of strings, got an "
                                        r"empty list"):
        load_unlearning_data(cfg(tmp_path, eval_splits=["ev"]))
    # the forget split is scored after training: a number there was a TypeError traceback once it had trained
    write(tmp_path, "ev", [ev])
    write(tmp_path, "forget", [{**qa_row("alice", "paris"), "paraphrased_answer": 3}])
    with pytest.raises(DataError, match=r"split 'forget', column 'paraphrased_answer': row 1 must hold a non-empty "
                                        r"string, got int"):
        load_unlearning_data(cfg(tmp_path, eval_splits=["ev"]))


def test_two_files_for_one_split_are_refused_naming_both(tmp_path):
    """forget.jsonl beside forget.json: the .jsonl was read without a word (a stale copy trained on)."""
    write(tmp_path, "forget", [qa_row("alice", "paris")])
    write(tmp_path, "retain", [qa_row("bob", "rome")])
    (tmp_path / "forget.json").write_text(json.dumps([qa_row("carol", "oslo")]))
    with pytest.raises(DataError, match=rf"split 'forget': 2 files for it in {re.escape(str(tmp_path))} "
                                        r"\(forget.jsonl, forget.json\); keep one"):
        load_unlearning_data(cfg(tmp_path))


def test_malformed_json_line_names_file_and_line(tmp_path, capfd):
    # was a datasets DatasetGenerationError traceback naming neither file nor line
    write(tmp_path, "forget", [qa_row("alice", "paris")])
    write(tmp_path, "retain", [qa_row("bob", "rome"), qa_row("carol", "oslo")])
    with open(tmp_path / "retain.jsonl", "a") as f:
        f.write("\n" + json.dumps(qa_row("dave", "lima"))[:-9] + "\n")  # line 4 (after a blank line) cut short
    with pytest.raises(DataError, match=r"split 'retain': cannot read .*retain\.jsonl: line 4 is not valid JSON"):
        load_unlearning_data(cfg(tmp_path))
    assert "Failed to load JSON" not in capfd.readouterr().err  # the library's own error line is not printed first
    write(tmp_path, "retain", [qa_row("bob", "rome"), ["not", "an", "object"]])
    with pytest.raises(DataError, match=r"line 2 holds a JSON list, not an object"):
        load_unlearning_data(cfg(tmp_path))
    # a line cut right after a key's colon, rows after it: the reader raised a bare ValueError ("Expected
    # object or value"), a traceback with exit 1
    write(tmp_path, "retain", [qa_row("bob", "rome")])
    text = (tmp_path / "retain.jsonl").read_text()
    (tmp_path / "retain.jsonl").write_text(text + '{"question": "x", "answer": \n' + text)
    with pytest.raises(DataError, match=r"split 'retain': cannot read .*retain\.jsonl: line 2 is not valid JSON"):
        load_unlearning_data(cfg(tmp_path))


def test_a_parquet_split_cut_short_names_its_file(tmp_path):
    """A truncated parquet shard (an interrupted download) was pyarrow's ArrowInvalid traceback."""
    from pipeline.data.common import _load_local_file

    (tmp_path / "forget.parquet").write_bytes(b"PAR1" + b"x" * 20 + b"PAR1")
    with pytest.raises(DataError, match=r"split 'forget': cannot read .*forget\.parquet \(ArrowInvalid: .*\): a "
                                        r"download or copy cut short\?"):
        _load_local_file(tmp_path / "forget.parquet", "parquet", "tofu", "forget")


def test_non_utf8_file_names_file_and_byte(tmp_path):
    # was a UnicodeDecodeError traceback; hub-layout directories (data.path of tofu/muse/wmdp) read the same way
    write(tmp_path, "forget", [qa_row("alice", "paris")])
    (tmp_path / "retain.jsonl").write_bytes(json.dumps(qa_row("bob", "rome")).encode().replace(b"rome", b"r\xf4me"))
    with pytest.raises(DataError, match=r"split 'retain': .*retain\.jsonl is not UTF-8 \(byte 0xf4 at offset \d+, "
                                        r"line 1\); JSON data must be UTF-8"):
        load_unlearning_data(cfg(tmp_path))
    from pipeline.data.loaders import load_hf_split

    (tmp_path / "sub").mkdir()
    (tmp_path / "retain.jsonl").rename(tmp_path / "sub" / "train.jsonl")
    with pytest.raises(DataError, match=r"dataset 'tofu', split 'sub/train': .*train\.jsonl is not UTF-8"):
        load_hf_split("tofu", "locuslab/TOFU", "sub", "train", path=tmp_path)


@pytest.mark.parametrize("split,column,value,expect", [
    ("retain", "answer", None, "row 2 holds no value (the key is missing or null there)"),  # was a TypeError inside tokenisation
    ("forget", "question", 7, "row 2 must hold a string, got int"),
    ("forget", "question", " ", "row 2 is empty"),  # was accepted: trains on the prompt template alone
    ("retain", "answer", "", "row 2 is empty"),
    ("ev", "answer", None, "row 2 holds no value (the key is missing or null there)"),  # evaluation splits too
])
def test_text_cells_must_be_non_empty_strings(tmp_path, split, column, value, expect):
    rows = {"forget": [qa_row("alice", "paris"), qa_row("carol", "oslo")],
            "retain": [qa_row("bob", "rome"), qa_row("dave", "lima")], "ev": [qa_row("erin", "kyiv")] * 2}
    rows[split][1] = {**rows[split][1], column: value}
    for s, r in rows.items():
        write(tmp_path, s, r)
    with pytest.raises(DataError, match=rf"split '{split}', column '{column}': {re.escape(expect)}"):
        load_unlearning_data(cfg(tmp_path, eval_splits=["ev"]))


def test_facts_must_be_a_list_of_strings(tmp_path):
    # a plain string was kept, and fact recall then scored it character by character
    write(tmp_path, "forget", [qa_row("alice", "paris"), {**qa_row("carol", "oslo"), "facts": "oslo"}])
    write(tmp_path, "retain", [qa_row("bob", "rome")])
    with pytest.raises(DataError, match=r"split 'forget', column 'facts': row 2 must hold a list of strings .*got str"):
        load_unlearning_data(cfg(tmp_path))
    write(tmp_path, "forget", [qa_row("alice", "paris"), {**qa_row("carol", "oslo"), "facts": ["oslo", None]}])
    with pytest.raises(DataError, match=r"column 'facts': row 2 must hold a list of strings .*got a list holding null"):
        load_unlearning_data(cfg(tmp_path))
    write(tmp_path, "forget", [qa_row("alice", "paris"), {**qa_row("carol", "oslo"), "facts": None}])
    assert load_unlearning_data(cfg(tmp_path)).forget[1]["facts"] is None  # optional: null is no facts


def test_unknown_dataset_name_lists_registered(tmp_path):
    # was KeyError: "unknown dataset 'jsonl'; ..." with a traceback
    with pytest.raises(DataError, match=r"data.name='jsonl': unknown dataset; registered: json, .*synthetic"):
        load_unlearning_data(cfg(tmp_path, name="jsonl"))


def test_data_path_with_the_synthetic_dataset_is_refused(tmp_path):
    # the embedded benchmark never reads data.path: the run used to train on it, ignoring the user's files
    from hydra import compose, initialize_config_dir

    from pipeline.config import ConfigError, register_configs, validate

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        c = compose("config", overrides=[f"data.path={tmp_path}", f"output_dir={tmp_path / 'runs'}"])
    with pytest.raises(ConfigError, match=r"data.path.*data.name=synthetic.*data.name=json"):
        validate(c)


def test_missing_split_lists_available(tmp_path):
    write(tmp_path, "forget", [qa_row("alice", "paris")])
    with pytest.raises(DataError, match=r"split 'retain' not found .* available splits: \['forget'\]"):
        load_unlearning_data(cfg(tmp_path))


def test_a_split_file_that_is_a_directory_or_a_looping_link_is_named(tmp_path):
    """A directory named retain.jsonl was an IsADirectoryError traceback; a link to itself, "not found"
    with retain listed among the available splits."""
    write(tmp_path, "forget", [qa_row("alice", "paris")])
    (tmp_path / "retain.jsonl").mkdir()
    with pytest.raises(DataError, match=r"split 'retain': .*retain.jsonl is a directory, not a data file"):
        load_unlearning_data(cfg(tmp_path))
    (tmp_path / "retain.jsonl").rmdir()
    (tmp_path / "retain.jsonl").symlink_to(tmp_path / "retain.jsonl")
    with pytest.raises(DataError, match=r"split 'retain': .*retain.jsonl is a link that leads to no file"):
        load_unlearning_data(cfg(tmp_path))


def test_overlap_between_forget_and_retain_is_refused(tmp_path):
    shared = qa_row("carol", "oslo")
    write(tmp_path, "forget", [qa_row("alice", "paris"), shared])
    write(tmp_path, "retain", [qa_row("bob", "rome"), shared])
    with pytest.raises(DataError) as e:
        load_unlearning_data(cfg(tmp_path))
    assert "1 example(s) appear in both" in str(e.value) and "forget row 2 == retain row 2" in str(e.value)
    assert "where was carol born" in str(e.value)


def test_empty_forget_set(tmp_path):
    (tmp_path / "forget.jsonl").parent.mkdir(parents=True, exist_ok=True)
    write(tmp_path, "forget", [])
    write(tmp_path, "retain", [qa_row("bob", "rome")])
    with pytest.raises(DataError, match="forget split 'forget' is empty"):
        load_unlearning_data(cfg(tmp_path))


def test_forget_fraction_is_deterministic(tmp_path):
    rows = [qa_row(p, c) for p, c in [("a", "x"), ("b", "y"), ("c", "z"), ("d", "w")]]
    write(tmp_path, "forget", rows)
    write(tmp_path, "retain", [qa_row("bob", "rome")])
    a = load_unlearning_data(cfg(tmp_path, forget_fraction=0.5), seed=3).forget
    b = load_unlearning_data(cfg(tmp_path, forget_fraction=0.5), seed=3).forget
    assert len(a) == 2 and a == b


def test_truncation_counted_or_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.helpers.tiny import CITIES, PEOPLE  # noqa: F401

    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", "question", ":", "answer", "x"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                  unk_token="<unk>")
    rows = [{"question": "x " * 20, "answer": "x x"}, {"question": "x", "answer": "x"}]
    enc = encode_rows(tok, rows, max_length=10, truncate=True, split="forget")
    assert len(enc[0]["input_ids"]) == 10 and len(enc[1]["input_ids"]) < 10
    with pytest.raises(DataError, match=r"split 'forget' row 1: sequence longer than 10 tokens"):
        encode_rows(tok, rows, max_length=10, truncate=False, split="forget")


def test_cli_overlap_stops_with_one_line_and_exit_2(tmp_path):
    shared = qa_row("carol", "oslo")
    write(tmp_path / "data", "forget", [shared])
    write(tmp_path / "data", "retain", [shared])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    out = subprocess.run(
        [sys.executable, "launchers/train.py", "model.source=pretrained", f"model.path={unloadable_model(tmp_path)}",
         "data.name=json", f"data.path={tmp_path / 'data'}", "data.forget_split=forget", "data.retain_split=retain",
         "data.eval_splits=[]", f"output_dir={tmp_path / 'runs'}", "logging=none"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "error (DataError" in out.stderr and "appear in both" in out.stderr
    assert not list((tmp_path / "runs").rglob("model")), "a model was exported by a refused run"



def test_empty_eval_split_is_refused(tmp_path):
    # forget / retain were checked for emptiness, an evaluation split was not: it scored nothing, silently
    write(tmp_path, "forget", [qa_row("alice", "paris")])
    write(tmp_path, "retain", [qa_row("bob", "rome")])
    write(tmp_path, "ev", [])
    with pytest.raises(DataError, match=r"evaluation split 'ev' is empty"):
        load_unlearning_data(cfg(tmp_path, eval_splits=["ev"]))
