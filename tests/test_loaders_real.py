"""TOFU / MUSE / WMDP loaders on the shipped fixtures (same schema as the hub datasets), the hub
code path (``datasets.load_dataset`` arguments), and data errors naming dataset, split and column."""

import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.config import DataConfig
from pipeline.data.loaders import DataError, encode_rows, load_unlearning_data

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"


def cfg(yaml_name: str, **over):
    base = OmegaConf.structured(DataConfig)
    return OmegaConf.merge(base, OmegaConf.load(ROOT / "conf" / "data" / f"{yaml_name}.yaml"), over)


def read_jsonl(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def write_jsonl(p: Path, rows: list[dict]) -> None:
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("name", ["tofu_forget01", "tofu_forget05", "tofu_forget10", "muse_news", "muse_books",
                                  "wmdp_bio", "wmdp_cyber"])
def test_data_configs_merge_into_the_schema(name):
    c = cfg(name)
    assert c.name in ("tofu", "muse", "wmdp") and c.hub_id and c.forget_split != c.retain_split


# ------------------------------------------------------------------------------------------ TOFU
def test_tofu_fixture_rows_columns_and_splits():
    d = load_unlearning_data(cfg("tofu_forget01", path=str(FIX / "tofu")))
    assert (d.name, d.forget_split, d.retain_split) == ("tofu", "forget01", "retain99")
    assert len(d.forget) == 2 and len(d.retain) == 6
    assert sorted(d.forget[0]) == ["answer", "question"]
    assert list(d.eval) == ["forget01", "retain99", "real_authors", "world_facts"]
    f = d.eval["forget01"]  # read from forget01_perturbed
    assert len(f) == 2 and sorted(f[0]) == ["answer", "paraphrased_answer", "paraphrased_question",
                                            "perturbed_answer", "question"]
    assert isinstance(f[0]["perturbed_answer"], list) and all(isinstance(x, str) for x in f[0]["perturbed_answer"])
    assert len(d.eval["retain99"]) == 3  # retain_perturbed
    ra = d.eval["real_authors"]
    assert ra[0]["answer"] == "Jane Austen" and ra[0]["paraphrased_answer"] == "Jane Austen"  # filled from answer
    assert len(d.eval["world_facts"][1]["perturbed_answer"]) == 3


def test_tofu_hub_code_path_arguments(monkeypatch):
    import datasets

    calls = []

    def fake(path, name=None, split=None, revision=None, **kw):
        calls.append((path, name, split, revision))
        row = {"question": f"q {name}", "answer": f"a {name}"}
        if "perturbed" in name:
            row.update(paraphrased_answer="p", paraphrased_question="pq", perturbed_answer=["x", "y"])
            if name.startswith(("real", "world")):
                del row["paraphrased_answer"], row["paraphrased_question"]
        return datasets.Dataset.from_list([row])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    d = load_unlearning_data(cfg("tofu_forget10", revision="abc123"))
    assert calls == [("locuslab/TOFU", s, "train", "abc123") for s in
                     ["forget10", "retain90", "forget10_perturbed", "retain_perturbed", "real_authors_perturbed",
                      "world_facts_perturbed"]]
    assert d.forget[0]["question"] == "q forget10"


def test_tofu_missing_column_names_dataset_split_column(tmp_path):
    shutil.copytree(FIX / "tofu", tmp_path / "tofu")
    p = tmp_path / "tofu" / "forget01_perturbed" / "train.jsonl"
    write_jsonl(p, [{k: v for k, v in r.items() if k != "perturbed_answer"} for r in read_jsonl(p)])
    with pytest.raises(DataError, match=r"dataset 'tofu', split 'forget01_perturbed': missing column\(s\) "
                                        r"\['perturbed_answer'\]"):
        load_unlearning_data(cfg("tofu_forget01", path=str(tmp_path / "tofu")))


def test_tofu_missing_split_lists_available(tmp_path):
    shutil.copytree(FIX / "tofu", tmp_path / "tofu")
    shutil.rmtree(tmp_path / "tofu" / "retain99")
    with pytest.raises(DataError, match=r"dataset 'tofu': split 'retain99/train' not found .*available splits: \[\]"):
        load_unlearning_data(cfg("tofu_forget01", path=str(tmp_path / "tofu")))


def test_tofu_perturbed_answer_must_be_a_list(tmp_path):
    shutil.copytree(FIX / "tofu", tmp_path / "tofu")
    p = tmp_path / "tofu" / "retain_perturbed" / "train.jsonl"
    write_jsonl(p, [{**r, "perturbed_answer": "one string"} for r in read_jsonl(p)])
    with pytest.raises(DataError, match=r"split 'retain_perturbed', column 'perturbed_answer': row 1 must hold a list"):
        load_unlearning_data(cfg("tofu_forget01", path=str(tmp_path / "tofu")))


def test_hub_failure_becomes_data_error(monkeypatch):
    import datasets

    def fake(*a, **k):
        raise ValueError('Unknown split "train". Should be one of [].')

    monkeypatch.setattr(datasets, "load_dataset", fake)
    with pytest.raises(DataError, match=r"dataset 'tofu': cannot load split 'forget01/train' of 'locuslab/TOFU'"):
        load_unlearning_data(cfg("tofu_forget01"))


# ------------------------------------------------------------------------------------------ MUSE
def test_muse_fixture_rows_columns_and_splits():
    d = load_unlearning_data(cfg("muse_news", path=str(FIX / "muse_news")))
    assert d.name == "muse:MUSE-News" and d.train_columns == ("text",)
    assert len(d.forget) == 2 and list(d.forget[0]) == ["text"] and len(d.retain) == 2
    assert sorted(d.eval) == ["knowmem_forget", "knowmem_forget_icl", "knowmem_retain", "knowmem_retain_icl",
                              "privleak_forget", "privleak_holdout", "verbmem_forget"]
    assert sorted(d.eval["verbmem_forget"][0]) == ["gt", "prompt"]
    assert sorted(d.eval["knowmem_forget"][0]) == ["answer", "question"] and len(d.eval["knowmem_retain"]) == 1
    assert list(d.eval["privleak_holdout"][0]) == ["text"] and len(d.eval["privleak_holdout"]) == 2


def test_muse_hub_code_path_arguments(monkeypatch):
    import datasets

    calls = []

    def fake(path, name=None, split=None, revision=None, **kw):
        calls.append((path, name, split, revision))
        row = {"raw": {"text": f"t {split}"}, "verbmem": {"prompt": "p", "gt": "g"},
               "knowmem": {"question": f"q {split}", "answer": "a"}, "privleak": {"text": f"t {split}"}}[name]
        return datasets.Dataset.from_list([row])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    load_unlearning_data(cfg("muse_books", eval_splits=["verbmem_forget", "knowmem_retain", "privleak_holdout"]))
    hub = "muse-bench/MUSE-Books"
    assert calls == [(hub, "raw", "forget", None), (hub, "raw", "retain1", None), (hub, "verbmem", "forget", None),
                     (hub, "knowmem", "retain_qa", None), (hub, "privleak", "holdout", None),
                     (hub, "knowmem", "retain_qa_icl", None)]


def test_muse_missing_column(tmp_path):
    shutil.copytree(FIX / "muse_news", tmp_path / "m")
    p = tmp_path / "m" / "verbmem" / "forget.jsonl"
    write_jsonl(p, [{"prompt": r["prompt"], "continuation": r["gt"]} for r in read_jsonl(p)])
    with pytest.raises(DataError, match=r"dataset 'muse:MUSE-News', split 'verbmem/forget': missing column\(s\) "
                                        r"\['gt'\]"):
        load_unlearning_data(cfg("muse_news", path=str(tmp_path / "m")))
    # column mapping fixes it
    d = load_unlearning_data(cfg("muse_news", path=str(tmp_path / "m"), columns={"gt": "continuation"}))
    assert d.eval["verbmem_forget"][0]["gt"].startswith("the old ferry pier")


@pytest.mark.parametrize(("split_file", "row", "problem"), [
    ("knowmem/forget_qa.jsonl", {"question": "Which pier?"}, "holds no value"),  # key left out of one row
    ("knowmem/forget_qa.jsonl", {"question": "Which pier?", "answer": 7}, "must hold a string, got int"),
    ("verbmem/forget.jsonl", {"prompt": "The council", "gt": " "}, "is empty"),
])
def test_a_muse_eval_row_without_a_usable_value_is_refused_at_load(tmp_path, split_file, row, problem):
    """A second row lacking what the first has (its metric's scorer failed on it after training)."""
    shutil.copytree(FIX / "muse_news", tmp_path / "m")
    p = tmp_path / "m" / split_file
    rows = read_jsonl(p)
    write_jsonl(p, [rows[0], row, *rows[2:]])
    col = "gt" if "gt" in row else "answer"
    with pytest.raises(DataError, match=rf"split '{split_file[:-6]}', column '{col}': row 2 {problem}"):
        load_unlearning_data(cfg("muse_news", path=str(tmp_path / "m")))


def test_text_rows_encode_with_loss_on_every_token():
    from tests.test_muse_wmdp_metrics import word_tokenizer

    tok = word_tokenizer(["a", "b", "c"])
    enc = encode_rows(tok, [{"text": "a b c"}], max_length=16, truncate=True, split="forget")
    assert enc[0]["input_ids"] == [1, tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b"),
                                   tok.convert_tokens_to_ids("c")]  # no EOS: a document, not an answer
    assert enc[0]["labels"] == [-100] + enc[0]["input_ids"][1:]


def test_texts_encoded_in_batches_equal_one_at_a_time():
    """encode_texts (what encode_rows uses for raw-text rows: one tokenizer call per batch, spread over
    the fast tokenizer's threads) gives encode_text's ids, labels and truncation, across batch borders."""
    from pipeline.data.formatting import encode_text, encode_texts
    from tests.test_muse_wmdp_metrics import word_tokenizer

    tok = word_tokenizer("a b c d e".split())
    texts = ["a b c", "", "d e a b c d e a", "e", "b b b b b b b b b b", "c d"]
    for max_length in (3, 6, 64):
        want = [encode_text(tok, t, max_length) for t in texts]
        assert encode_texts(tok, texts, max_length, batch_size=4) == want
        assert any(e.truncated for e in want) == (max_length < 12)
    rows = [{"text": t} for t in texts]
    assert [r["input_ids"] for r in encode_rows(tok, rows, 6, True, "forget")] == [
        e.input_ids for e in (encode_text(tok, t, 6, add_eos=False) for t in texts if t)]  # "" is dropped


def test_cut_documents_are_reported_as_documents_not_questions(caplog):
    """A raw-text row over data.max_length loses its end (not question words): the warning says so."""
    from tests.test_muse_wmdp_metrics import word_tokenizer

    tok = word_tokenizer(["a", "b", "c"])
    rows = [{"text": "a b c a b c"}, {"text": "a"}]
    with caplog.at_level("WARNING"):
        enc = encode_rows(tok, rows, 4, True, "forget")
    assert [len(r["input_ids"]) for r in enc] == [4, 2]
    assert "split 'forget': 1 of 2 documents cut at their end to data.max_length=4 tokens" in caplog.text
    assert "question words" not in caplog.text
    # question/answer rows keep their own line
    caplog.clear()
    with caplog.at_level("WARNING"):
        encode_rows(tok, [{"question": "a b c a b c a b c", "answer": "a"}], 8, True, "forget")
    assert "question words dropped from the left" in caplog.text and "documents cut" not in caplog.text


def test_empty_documents_are_dropped_with_a_warning(caplog):
    """An empty text row would be <bos> alone: no loss token, trains nothing. It is dropped and counted
    (the other rows keep their index into the split); a split of empty documents only is a data error."""
    from tests.test_muse_wmdp_metrics import word_tokenizer

    tok = word_tokenizer(["a", "b"])
    with caplog.at_level("WARNING"):
        enc = encode_rows(tok, [{"text": "a b"}, {"text": ""}, {"text": "b"}], 16, True, "forget")
    assert [r["index"] for r in enc] == [0, 2]
    assert all(any(lab != -100 for lab in r["labels"]) for r in enc)
    assert "split 'forget': dropped 1 of 3 text row(s): empty documents" in caplog.text
    with pytest.raises(DataError, match=r"split 'retain': all 2 text row\(s\) are empty documents"):
        encode_rows(tok, [{"text": ""}, {"text": ""}], 16, True, "retain")
    # packed (data.pack_text=true): no rows at all, which stopped training with a ZeroDivisionError
    with pytest.raises(DataError, match=r"split 'retain': all 2 text row\(s\) are empty documents"):
        encode_rows(tok, [{"text": ""}, {"text": ""}], 16, True, "retain", pack_text=True)


@pytest.mark.parametrize("max_length", [4, 7, 64])
def test_packed_text_rows_cover_the_corpus_once(max_length):
    """data.pack_text (the MUSE configs): the raw texts joined with a blank line, tokenised once and cut
    into rows of BOS + (max_length - 1) tokens, as MUSE's trainer does; each token of the corpus is a
    label exactly once, in order, and no row is longer than max_length."""
    from tests.test_muse_wmdp_metrics import word_tokenizer

    data_cfg = cfg("muse_news", path=str(FIX / "muse_news"))
    assert data_cfg.pack_text and cfg("muse_books").pack_text and not cfg("wmdp_bio").pack_text
    d = load_unlearning_data(data_cfg)
    texts = [r["text"] for r in d.forget]
    tok = word_tokenizer(sorted({w for t in texts for w in t.replace(".", " .").split()}))
    stream = tok("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    rows = encode_rows(tok, d.forget, max_length, True, "forget", pack_text=True)
    assert len(rows) == -(-len(stream) // (max_length - 1)) and len(rows) < len(stream)
    assert all(r["input_ids"][0] == tok.bos_token_id and len(r["input_ids"]) <= max_length for r in rows)
    assert all(len(r["input_ids"]) == max_length for r in rows[:-1])
    assert [t for r in rows for t in r["labels"] if t != -100] == stream
    assert [r["labels"][0] for r in rows] == [-100] * len(rows) and [r["index"] for r in rows] == list(range(len(rows)))
    # one row per text (data.pack_text=false, the WMDP configs): <bos> + the text cut at max_length, no EOS
    # (the WMDP authors' RMU tokenises with the tokenizer's defaults: BOS only)
    per_text = encode_rows(tok, d.forget, max_length, True, "forget")
    assert [r["input_ids"] for r in per_text] == [
        ([tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"])[:max_length] for t in texts]
    assert all(r["labels"][1:] == r["input_ids"][1:] and r["labels"][0] == -100 for r in per_text)


def test_packing_question_answer_rows_is_a_data_error():
    from tests.test_muse_wmdp_metrics import word_tokenizer

    tok = word_tokenizer(["a", "b"])
    with pytest.raises(DataError, match=r"split 'forget' row 2: data.pack_text=true packs raw-text rows .*"
                                        r"\['answer', 'question'\]; set data.pack_text=false"):
        encode_rows(tok, [{"text": "a"}, {"question": "a", "answer": "b"}], 8, True, "forget", pack_text=True)


def test_text_overlap_between_forget_and_retain(tmp_path):
    shutil.copytree(FIX / "muse_news", tmp_path / "m")
    forget = read_jsonl(tmp_path / "m" / "raw" / "forget.jsonl")
    write_jsonl(tmp_path / "m" / "raw" / "retain1.jsonl", forget[:1])
    with pytest.raises(DataError, match=r"1 example\(s\) appear in both forget split 'forget' and retain split 'retain1'"):
        load_unlearning_data(cfg("muse_news", path=str(tmp_path / "m")))


# ------------------------------------------------------------------------------------------ WMDP
def test_wmdp_fixture_rows_columns_and_splits():
    d = load_unlearning_data(cfg("wmdp_cyber", path=str(FIX / "wmdp")))
    assert d.name == "wmdp" and len(d.forget) == 2 and len(d.retain) == 2 and list(d.forget[0]) == ["text"]
    cy = d.eval["wmdp-cyber"]  # read from parquet
    assert len(cy) == 3 and sorted(cy[0]) == ["answer", "choices", "question"]
    assert isinstance(cy[0]["answer"], int) and cy[0]["answer"] == 2 and len(cy[0]["choices"]) == 4
    mm = d.eval["mmlu"]
    assert len(mm) == 2 and mm[0]["subject"] == "elementary_mathematics" and mm[1]["answer"] == 2


def test_wmdp_hub_code_path_arguments(monkeypatch):
    import datasets

    calls = []

    def fake(path, name=None, split=None, revision=None, **kw):
        calls.append((path, name, split, revision))
        if path == "cais/wmdp-corpora":
            return datasets.Dataset.from_list([{"text": f"t {name}"}])
        return datasets.Dataset.from_list([{"question": "q", "choices": ["a", "b", "c", "d"], "answer": 3}])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    load_unlearning_data(cfg("wmdp_cyber", revision="r1", eval_splits=["wmdp-cyber", "wmdp_chem", "mmlu",
                                                                       "mmlu-anatomy"]))
    assert calls == [("cais/wmdp-corpora", "cyber-forget-corpus", "train", "r1"),
                     ("cais/wmdp-corpora", "cyber-retain-corpus", "train", "r1"),
                     ("cais/wmdp", "wmdp-cyber", "test", None), ("cais/wmdp", "wmdp-chem", "test", None),
                     ("cais/mmlu", "all", "test", None), ("cais/mmlu", "anatomy", "test", None)]


def test_wmdp_bad_answer_and_missing_column(tmp_path):
    shutil.copytree(FIX / "wmdp", tmp_path / "w")
    p = tmp_path / "w" / "wmdp-bio" / "test.jsonl"
    rows = read_jsonl(p)
    write_jsonl(p, [{**rows[0], "answer": 4}])
    with pytest.raises(DataError, match=r"split 'wmdp-bio/test', column 'answer': row 1 must be an int index in \[0, 4\)"):
        load_unlearning_data(cfg("wmdp_cyber", path=str(tmp_path / "w"), eval_splits=["wmdp-bio"]))
    write_jsonl(p, [{k: v for k, v in rows[0].items() if k != "choices"}])
    with pytest.raises(DataError, match=r"dataset 'wmdp', split 'wmdp-bio/test': missing column\(s\) \['choices'\]"):
        load_unlearning_data(cfg("wmdp_cyber", path=str(tmp_path / "w"), eval_splits=["wmdp-bio"]))


def test_wmdp_bio_forget_corpus_missing_locally():
    with pytest.raises(DataError, match=r"dataset 'wmdp': split 'bio-forget-corpus/train' not found"):
        load_unlearning_data(cfg("wmdp_bio", path=str(FIX / "wmdp")))


# ------------------------------------------------------------------------- hub snapshots (data.path)
# tests/fixtures/*_snapshot: the file layouts `hf download <repo> --repo-type dataset` produces, with the
# dataset cards' `configs:` front matter in the real cards' shape (a few rows each, some files left out as in
# a partial download).
@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection fails the test: a local snapshot must never be resolved on the hub."""
    import socket

    def refuse(*a, **k):
        raise AssertionError(f"network access attempted: {a}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_tofu_hub_snapshot_root_level_files_through_the_card(no_network):
    snap = FIX / "tofu_snapshot"
    assert not (snap / "full.json").exists()  # the card's first (default) config: absent, as in a partial download
    d = load_unlearning_data(cfg("tofu_forget01", path=str(snap), eval_splits=["forget01", "retain99", "real_authors",
                                                                                "world_facts", "holdout01"]))
    mirror = load_unlearning_data(cfg("tofu_forget01", path=str(FIX / "tofu"), eval_splits=[
        "forget01", "retain99", "real_authors", "world_facts", "holdout01"]))
    assert d.forget == mirror.forget and d.retain == mirror.retain and d.eval == mirror.eval
    assert len(d.forget) == 2 and len(d.eval["forget01"]) == 2 and sorted(d.eval["holdout01"][0]) == ["answer",
                                                                                                     "question"]


def test_muse_hub_snapshot_parquet_shards_named_by_the_card(no_network):
    snap = FIX / "muse_snapshot"
    d = load_unlearning_data(cfg("muse_news", path=str(snap), eval_splits=["knowmem_forget"]))
    assert d.forget == [{"text": r["text"]} for r in read_jsonl(FIX / "muse_news" / "raw" / "forget.jsonl")]
    assert all("STALE" not in r["text"] for r in d.forget)  # raw/forget.json sits there, but the card names the parquet
    assert len(d.retain) == 2 and sorted(d.eval) == ["knowmem_forget", "knowmem_forget_icl"]
    assert d.eval["knowmem_forget"] == read_jsonl(FIX / "muse_news" / "knowmem" / "forget_qa.jsonl")


def test_wmdp_hub_snapshot_multi_shard_corpus_and_merged_mcq_folders(no_network):
    d = load_unlearning_data(cfg("wmdp_cyber", path=str(FIX / "wmdp_snapshot")))
    assert d.forget == read_jsonl(FIX / "wmdp" / "cyber-forget-corpus" / "train.jsonl")  # both shards, in order
    assert len(d.retain) == 2 and len(d.eval["wmdp-cyber"]) == 3 and d.eval["mmlu"][1]["answer"] == 2
    # the cais/wmdp-corpora card lists bio-retain-corpus, whose files were not downloaded
    with pytest.raises(DataError, match=r"dataset 'wmdp': split 'bio-retain-corpus/train': no file under .* matches "
                                        r"\['bio-retain-corpus/train-\*'\] \(the data files .*README.md names"):
        load_unlearning_data(cfg("wmdp_cyber", path=str(FIX / "wmdp_snapshot"), retain_split="bio-retain-corpus"))


def test_snapshot_without_its_card_reads_hub_named_shards(tmp_path):
    shutil.copytree(FIX / "wmdp_snapshot", tmp_path / "w")
    (tmp_path / "w" / "README.md").unlink()
    d = load_unlearning_data(cfg("wmdp_cyber", path=str(tmp_path / "w")))
    assert d.forget == read_jsonl(FIX / "wmdp" / "cyber-forget-corpus" / "train.jsonl")


def test_snapshot_unknown_config_or_split_lists_what_there_is(tmp_path):
    with pytest.raises(DataError, match=r"dataset 'tofu': split 'forget07/train' not found under .*; available "
                                        r"splits: \[\]; configs in .*README.md: \['forget01', .*'world_facts_perturbed'\]"):
        load_unlearning_data(cfg("tofu_forget01", path=str(FIX / "tofu_snapshot"), forget_split="forget07"))
    with pytest.raises(DataError, match=r"dataset 'muse:MUSE-News': split 'raw/retain3' not found: config 'raw' of "
                                        r".*README.md has splits \['forget', 'holdout', 'retain1', 'retain2'\]"):
        load_unlearning_data(cfg("muse_news", path=str(FIX / "muse_snapshot"), retain_split="retain3"))
    with pytest.raises(DataError, match=r"dataset 'tofu': data.path='.*nowhere' is not a directory"):
        load_unlearning_data(cfg("tofu_forget01", path=str(tmp_path / "nowhere")))


def test_empty_eval_split_is_refused(tmp_path):
    shutil.copytree(FIX / "tofu", tmp_path / "tofu")
    (tmp_path / "tofu" / "forget01_perturbed" / "train.jsonl").write_text("")  # e.g. a truncated download
    with pytest.raises(DataError, match=r"dataset 'tofu': evaluation split 'forget01' is empty"):
        load_unlearning_data(cfg("tofu_forget01", path=str(tmp_path / "tofu")))
