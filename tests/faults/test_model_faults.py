"""Unsafe or mismatched models are refused before training: pickle-only weights, remote code,
tokenizer/model vocab mismatch, teacher/student architecture mismatch, over-long sequences."""

import json
import shutil

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from pipeline.models.loading import ModelLoadError, check_same_architecture, check_vocab, load_causal_lm
from tests.helpers import launch
from tests.helpers.tiny import train_overrides


def test_pickle_only_weights_refused_unless_allowed(tiny, tmp_path):
    _, model_dir, _ = tiny
    d = tmp_path / "pickled"
    shutil.copytree(model_dir, d)
    model = LlamaForCausalLM.from_pretrained(d)
    (d / "model.safetensors").unlink()
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"only pickle weights .* model.allow_pickle=true"):
        load_causal_lm(d)
    loaded = load_causal_lm(d, allow_pickle=True)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())


def test_remote_code_model_refused_unless_trusted(tiny, tmp_path):
    _, model_dir, _ = tiny
    d = tmp_path / "remote"
    shutil.copytree(model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"requires custom code .* model.trust_remote_code=true"):
        load_causal_lm(d)


def test_vocab_mismatch_names_both_sizes(tiny):
    _, model_dir, _ = tiny
    tok = AutoTokenizer.from_pretrained(model_dir)
    small = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok) - 5, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ModelLoadError, match=rf"tokenizer has {len(tok)} tokens but the model's embedding has "
                                             rf"{len(tok) - 5} rows"):
        check_vocab(small, tok, "model x")


def test_teacher_student_architecture_mismatch_names_both():
    def mk(layers):
        return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=layers, num_attention_heads=2))

    with pytest.raises(ModelLoadError, match="num_hidden_layers student=2 teacher=3"):
        check_same_architecture(mk(2), mk(3))


def test_cli_vocab_mismatch_stops_before_training(tiny, tmp_path):
    root, model_dir, data_dir = tiny
    d = tmp_path / "smallvocab"
    shutil.copytree(model_dir, d)
    tok = AutoTokenizer.from_pretrained(d)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok) - 3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(d)
    out = launch.run(train_overrides(d, data_dir, root / "runs", "vocab"))
    assert out.returncode == 2
    assert f"tokenizer has {len(tok)} tokens but the model's embedding has {len(tok) - 3} rows" in out.stderr
    assert not (root / "runs" / "vocab" / "model").exists()


def test_sequences_longer_than_context_truncate_or_stop(tiny):
    root, model_dir, data_dir = tiny  # the tiny model's context is 64 tokens; questions are ~10
    ok = launch.run(train_overrides(model_dir, data_dir, root / "runs", "ctx_ok") +
                    ["data.max_length=500", "eval.enabled=false", "trainer.max_steps=1"])
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "exceeds the model's context (64 tokens)" in ok.stderr
    bad = launch.run(train_overrides(model_dir, data_dir, root / "runs", "ctx_bad") +
                     ["data.max_length=12", "data.truncate=false", "eval.enabled=false"])
    assert bad.returncode == 2
    assert "sequence longer than 12 tokens" in bad.stderr and "data.truncate=false" in bad.stderr
    assert not (root / "runs" / "ctx_bad" / "model").exists()


def test_a_model_path_that_cannot_load_is_named_before_loading(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from pipeline.models.loading import TOKENIZER_FILES, check_model_location

    with pytest.raises(ModelLoadError, match=r"^model.path=/nonexistent/m: no such directory$"):
        check_model_location("/nonexistent/m")
    with pytest.raises(ModelLoadError, match="no such directory"):
        check_model_location("./runs/typo/model")  # relative, not a hub id
    (tmp_path / "m.gguf").write_text("")
    with pytest.raises(ModelLoadError, match="is a file, not a model directory .*model.source=gguf_package"):
        check_model_location(str(tmp_path / "m.gguf"))
    with pytest.raises(ModelLoadError, match="has no config.json: not a Hugging Face model directory"):
        check_model_location(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{}")
    check_model_location(str(tmp_path), "model.tokenizer_path", needs=TOKENIZER_FILES)  # a tokenizer dir
    (tmp_path / "config.json").write_text("{}")
    check_model_location(str(tmp_path))

    # a hub id: offline, it must be in the hub cache (the cache layout huggingface_hub reads)
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match=r"someone/model-7b: .* not in the hub cache .*hf download someone/model-7b"):
        check_model_location("someone/model-7b")
    snap = cache / "models--someone--model-7b" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (cache / "models--someone--model-7b" / "refs").mkdir()
    (cache / "models--someone--model-7b" / "refs" / "main").write_text("abc123")
    check_model_location("someone/model-7b")
    with pytest.raises(ModelLoadError, match="revision v2"):
        check_model_location("someone/model-7b", revision="v2")
    # the hub resolves ids in any case (MUSE's targets circulate as MUSE-News_target and MUSE-news_target),
    # its cache folders do not: the error names the cached spelling
    with pytest.raises(ModelLoadError, match=r"^model.path=Someone/Model-7B: not in the hub cache under this "
                                             r"spelling, but someone/model-7b is .*set model.path=someone/model-7b$"):
        check_model_location("Someone/Model-7B")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # online: the hub answers for itself
    check_model_location("someone/other-7b")
