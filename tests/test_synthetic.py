"""The embedded synthetic benchmark: determinism, schema, splits, tokenizer, tiny training, caching."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest

from pipeline.data.synthetic import (
    RETAIN_OF,
    ROW_KEYS,
    SPLITS,
    SyntheticConfig,
    all_texts,
    build_benchmark,
    training_rows,
    write_benchmark,
)

SMALL = SyntheticConfig(seed=3, n_authors=20, qa_per_author=4, n_world_facts=4, n_real_authors=2,
                        preamble_len=4, n_preambles=2)


def _read_bytes(d):
    return {p: open(os.path.join(d, p), "rb").read() for p in sorted(os.listdir(d))}


def test_deterministic_bytes(tmp_path):
    write_benchmark(SMALL, tmp_path / "a")
    write_benchmark(SMALL, tmp_path / "b")
    write_benchmark(replace(SMALL, seed=4), tmp_path / "c")
    a, b, c = _read_bytes(tmp_path / "a"), _read_bytes(tmp_path / "b"), _read_bytes(tmp_path / "c")
    assert sorted(a) == sorted(f"{s}.jsonl" for s in SPLITS)
    assert a == b
    assert a["full.jsonl"] != c["full.jsonl"]
    assert not [p for p in os.listdir(tmp_path / "a") if p.endswith(".tmp")]


def test_does_not_touch_global_rng():
    import random

    random.seed(123)
    x = random.random()
    random.seed(123)
    build_benchmark(SMALL)
    assert random.random() == x


def test_schema_every_split():
    splits = build_benchmark(SMALL)
    assert set(splits) == set(SPLITS)
    for name, rows in splits.items():
        assert rows, name
        for r in rows:
            assert tuple(r) == ROW_KEYS, (name, list(r))
            for k in ("question", "answer", "paraphrased_answer", "paraphrased_question", "author", "attribute"):
                assert isinstance(r[k], str)
            assert isinstance(r["perturbed_answer"], list) and len(r["perturbed_answer"]) == SMALL.n_perturbed
            assert all(isinstance(p, str) and p != r["answer"] for p in r["perturbed_answer"])
            assert len(set(r["perturbed_answer"])) == SMALL.n_perturbed
            assert r["facts"] and all(f in r["answer"] and f in r["paraphrased_answer"] for f in r["facts"])
    assert len(splits["full"]) == SMALL.n_authors * SMALL.qa_per_author
    assert len(splits["world_facts"]) == SMALL.n_world_facts


def test_forget_retain_split_structure():
    splits = build_benchmark(SMALL)
    authors = [r["author"] for r in splits["full"]]
    order = list(dict.fromkeys(authors))
    f = {s: list(dict.fromkeys(r["author"] for r in splits[s])) for s in ("forget01", "forget05", "forget10")}
    assert len(f["forget01"]) == 1 and len(f["forget05"]) == 1 and len(f["forget10"]) == 2
    assert f["forget10"] == order[-2:]  # the last authors, like TOFU
    assert set(f["forget01"]) <= set(f["forget05"]) <= set(f["forget10"])
    for fs, rs in RETAIN_OF.items():
        fq = {r["question"] for r in splits[fs]}
        rq = {r["question"] for r in splits[rs]}
        assert not fq & rq
        assert len(fq) + len(rq) == len(splits["full"])
        assert not {r["author"] for r in splits[fs]} & {r["author"] for r in splits[rs]}
    # the retain model never sees forget10 authors; both models see the utility sets
    tq = {r["question"] for r in training_rows(splits, "retain")}
    assert not tq & {r["question"] for r in splits["forget10"]}
    for u in ("real_authors", "world_facts"):
        assert {r["question"] for r in splits[u]} <= tq


def test_names_need_both_tokens():
    splits = build_benchmark(SyntheticConfig())
    names = sorted({r["author"] for r in splits["full"]})
    firsts = [n.split()[0] for n in names]
    lasts = [n.split()[1] for n in names]
    assert max(firsts.count(x) for x in firsts) > 1 and max(lasts.count(x) for x in lasts) > 1


def test_tokenizer_round_trip_and_reload(tmp_path):
    from transformers import AutoTokenizer

    from pipeline.data.tokenizer import build_word_tokenizer

    splits = build_benchmark(SMALL)
    tok = build_word_tokenizer(all_texts(splits), tmp_path / "tok")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    text = splits["full"][0]["answer"]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    tok2 = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert tok2(text, add_special_tokens=False)["input_ids"] == ids
    assert (tok2.pad_token, tok2.bos_token, tok2.eos_token, tok2.unk_token) == ("<pad>", "<bos>", "<eos>", "<unk>")
    assert tok2("zzzunknownword", add_special_tokens=False)["input_ids"] == [tok2.unk_token_id]


def test_tiny_training_decreases_loss():
    from pipeline.data.tokenizer import build_word_tokenizer
    from pipeline.models.tiny import TinyModelConfig, build_tiny_llama, train_from_scratch

    splits = build_benchmark(SMALL)
    tok = build_word_tokenizer(all_texts(splits))
    cfg = TinyModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                          intermediate_size=64, steps=30, lr=1e-2, batch_size=16, warmup=3)
    model = build_tiny_llama(cfg, tok)
    assert model.config._attn_implementation == "tempered"
    info = train_from_scratch(model, tok, splits["full"][:40], cfg, progress=False)
    assert info["final_loss"] < 0.6 * info["first_loss"]


MINI_DATA = SyntheticConfig(seed=1, n_authors=10, qa_per_author=2, n_world_facts=2, n_real_authors=1,
                            preamble_len=2, n_preambles=1)


@pytest.mark.parametrize("parallel", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_prepare_synthetic_caches(tmp_path, parallel, monkeypatch):
    """parallel=True trains target and retain in two subprocesses (the real path; ~8-16 s of
    interpreter start-up, hence marked slow), given a cache path relative to a working directory
    that is not the repository (the subprocesses run in the repository root)."""
    from pipeline.data.prepare import prepare_synthetic
    from pipeline.models.tiny import TinyModelConfig

    mcfg = TinyModelConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                           intermediate_size=32, steps=2, batch_size=4, warmup=1)
    monkeypatch.chdir(tmp_path)
    art = prepare_synthetic(MINI_DATA, mcfg, "cache" if parallel else tmp_path, parallel=parallel, log=None)
    assert (art.root / "COMPLETE").exists() and art.root.is_absolute()
    for d in (art.target_dir, art.retain_dir):
        assert (d / "model.safetensors").exists() and (d / "tokenizer.json").exists()
    assert (art.data_dir / "forget10.jsonl").exists() and (art.tokenizer_dir / "tokenizer.json").exists()
    assert art.forget_split_authors["forget10"] == [
        json.loads(line)["author"] for line in open(art.data_dir / "forget10.jsonl")][::2]
    mtime = (art.target_dir / "model.safetensors").stat().st_mtime_ns
    art2 = prepare_synthetic(MINI_DATA, mcfg, "cache" if parallel else tmp_path, parallel=parallel, log=None)
    assert art2.root == art.root
    assert (art2.target_dir / "model.safetensors").stat().st_mtime_ns == mtime
    # a different model config is a different cache entry; num_threads is not part of the key
    assert prepare_synthetic.__module__
    from pipeline.data.prepare import config_hash

    assert config_hash(MINI_DATA, mcfg) == config_hash(MINI_DATA, replace(mcfg, num_threads=2))
    assert config_hash(MINI_DATA, mcfg) != config_hash(MINI_DATA, replace(mcfg, steps=3))


def test_prepare_accepts_mappings(tmp_path):
    from omegaconf import OmegaConf

    from pipeline.data.prepare import _as_dataclass
    from pipeline.models.tiny import TinyModelConfig

    node = OmegaConf.structured(TinyModelConfig(steps=5))
    assert _as_dataclass(node, TinyModelConfig).steps == 5
    assert _as_dataclass({"steps": 7}, TinyModelConfig).steps == 7
