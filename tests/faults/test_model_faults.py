"""Unsafe or mismatched models are refused before training: pickle-only weights, remote code,
tokenizer/model vocab mismatch, teacher/student architecture mismatch, over-long sequences."""

import json
import re
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


def test_an_unsafe_retain_model_is_refused_before_anything_runs(tiny, tmp_path):
    """eval.retain_model with only pickle weights, or asking for custom code, loads for the evaluation
    only: the run trained and exported, then stopped; a dry run passed it; and the refused launch had
    already set a finished run's results aside. One line, exit 2, before the run directory exists."""
    _, model_dir, data_dir = tiny
    pickled, remote = tmp_path / "pickled", tmp_path / "remote"
    shutil.copytree(model_dir, pickled)
    torch.save(LlamaForCausalLM.from_pretrained(pickled).state_dict(), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    shutil.copytree(model_dir, remote)
    cfg = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModelForCausalLM": "m.Evil"}}))
    for retain, why in ((pickled, "only pickle weights"), (remote, "requires custom code")):
        for dry in ("true", "false"):
            out = launch.run(train_overrides(model_dir, data_dir, tmp_path / "runs", "r") +
                             [f"eval.retain_model={retain}", f"trainer.dry_run={dry}"])
            assert out.returncode == 2, out.stderr[-2000:]
            lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error (")]
            assert len(lines) == 1 and "ModelLoadError" in lines[0] and why in lines[0] and str(retain) in lines[0]
            assert "Traceback" not in out.stderr and not (tmp_path / "runs" / "r").exists()


def test_a_home_relative_model_path_loads_as_it_was_checked(tiny, tmp_path, monkeypatch):
    """A quoted model.path='~/models/x' passed the location check (which expands ~) and then failed in
    transformers: "tokenizer ~/models/x cannot be loaded: Repo id must be in the form ..."."""
    from pipeline.models.loading import check_model_location, load_tokenizer, model_config_file

    _, model_dir, _ = tiny
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(model_dir, tmp_path / "models" / "x")
    check_model_location("~/models/x")
    assert load_tokenizer("~/models/x").eos_token == "<eos>"
    assert load_causal_lm("~/models/x").config.num_hidden_layers >= 1
    assert model_config_file("~/models/x") == tmp_path / "models" / "x" / "config.json"


def test_a_runs_adapter_directory_as_a_model_path_names_the_merged_export(tmp_path):
    """eval.py model.path=<run>/adapter said "has no config.json: not a Hugging Face model directory"."""
    from pipeline.models.loading import check_model_location

    (tmp_path / "run" / "adapter").mkdir(parents=True)
    (tmp_path / "run" / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=rf"is a LoRA adapter \(adapter_config.json\), not a model: .*"
                                             rf"\({tmp_path / 'run' / 'model'}\)"):
        check_model_location(str(tmp_path / "run" / "adapter"))


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
    # launchers/eval.py alike (it raised an IndexError traceback in the first scored batch, exit 1)
    out = launch.run(train_overrides(d, data_dir, root / "runs", "vocab_eval"), script="launchers/eval.py")
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == (
        f"error (ModelLoadError, rank 0): model {d}: tokenizer has {len(tok)} tokens but the model's embedding has "
        f"{len(tok) - 3} rows"), out.stderr[-2000:]
    assert "Traceback" not in out.stderr and not (root / "runs" / "vocab_eval").exists()


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
    with pytest.raises(ModelLoadError, match="has no config.json: not a Hugging Face model directory$"):
        check_model_location(str(tmp_path))
    # a training run's directory given as the model: its export, or that it has none yet
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(ModelLoadError, match=r"not a Hugging Face model directory; a run directory without its "
                                             r"exported model/ \(stopped before the export\?"):
        check_model_location(str(run))
    (run / "model").mkdir()
    (run / "model" / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=rf"; a run directory: its exported model is {run / 'model'} "
                                             rf"\(model.path={run / 'model'}\)$"):
        check_model_location(str(run))
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


def _broken_copy(model_dir, dst, what):
    """A copy of the tiny model with one thing broken, as a download or copy cut short leaves it."""
    shutil.copytree(model_dir, dst)
    st = dst / "model.safetensors"
    if what == "truncated safetensors":
        st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    elif what == "empty safetensors":
        st.write_bytes(b"")
    elif what == "garbled safetensors header":
        raw = bytearray(st.read_bytes())
        raw[10:14] = b"\xff\xfe\xff\xfe"  # inside the JSON header: not UTF-8
        st.write_bytes(bytes(raw))
    elif what == "malformed config.json":
        (dst / "config.json").write_text((dst / "config.json").read_text() + "}{")
    elif what == "no tokenizer files":
        for f in dst.glob("tokenizer*"):
            f.unlink()
    elif what == "remote-code tokenizer":
        cfg = json.loads((dst / "tokenizer_config.json").read_text())
        cfg.update(auto_map={"AutoTokenizer": ["tok_evil.EvilTokenizer", None]}, tokenizer_class="EvilTokenizer")
        (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("what, cause", [("truncated safetensors", "incomplete metadata, file not fully covered"),
                                         ("empty safetensors", "header too small"),
                                         ("garbled safetensors header", "invalid UTF-8 in header")])
def test_an_unreadable_safetensors_file_is_named_before_loading(tiny, tmp_path, what, cause):
    from pipeline.models.loading import check_model_location

    d = _broken_copy(tiny[1], tmp_path / "m", what)
    with pytest.raises(ModelLoadError, match=rf"^model.path={d}: model.safetensors is not a readable safetensors "
                                             rf"file \(.*{cause}.*\): a download or copy cut short\?$"):
        check_model_location(str(d))
    # loading it anyway (no early check): one line naming the directory, not a SafetensorError
    with pytest.raises(ModelLoadError, match=rf"^model {d} cannot be loaded: .*{cause}"):
        load_causal_lm(d)


def test_a_sharded_model_missing_a_shard_is_named_before_loading(tiny, tmp_path):
    from pipeline.models.loading import check_model_location

    d = tmp_path / "sharded"
    shutil.copytree(tiny[1], d)
    (d / "model.safetensors").unlink()
    LlamaForCausalLM.from_pretrained(tiny[1]).save_pretrained(d, max_shard_size="40KB")
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 1 and (d / "model.safetensors.index.json").is_file()
    check_model_location(str(d))  # whole: passes
    shards[-1].unlink()
    with pytest.raises(ModelLoadError, match=rf"^model.path={d}: model.safetensors.index.json names 1 shard\(s\) "
                                             rf"that are not there \({shards[-1].name}\): a download or copy cut short"):
        check_model_location(str(d))


def test_a_shard_index_that_misplaces_a_tensor_is_named_and_the_weights_are_counted_once(tiny, tmp_path):
    """An index from another download places a weight in a shard that lacks it: named before loading
    (it was found only after the data and the memory plan, or not at all for a weight the model does not
    have). A ``consolidated.safetensors`` beside the shards (hub Mistral repos) is not counted again."""
    from safetensors.torch import save_file

    from pipeline.models.loading import check_model_location, weights_bytes

    d = tmp_path / "sharded"
    shutil.copytree(tiny[1], d)
    (d / "model.safetensors").unlink()
    model = LlamaForCausalLM.from_pretrained(tiny[1])
    model.save_pretrained(d, max_shard_size="40KB")
    one_file = weights_bytes(tiny[1], "float32")
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              str(d / "consolidated.safetensors"))
    assert weights_bytes(d, "float32") == one_file
    check_model_location(str(d))  # whole: passes
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    tensor = next(t for t, s in sorted(index["weight_map"].items()) if s == shards[0])
    index["weight_map"][tensor] = shards[-1]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=rf"^model.path={d}: model.safetensors.index.json places 1 tensor\(s\) in "
                                             rf"shards that do not hold them \(first: {re.escape(tensor)} in "
                                             rf"{shards[-1]}\): shards and index from different downloads"):
        check_model_location(str(d))


def test_an_unknown_model_type_is_named_before_loading(tiny, tmp_path):
    """transformers stopped on it only after the data, the tokenizer and the memory plan, with a stray warning."""
    from pipeline.models.loading import check_model_location

    d = tmp_path / "m"
    shutil.copytree(tiny[1], d)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "model_type": "llamazzz"}))
    with pytest.raises(ModelLoadError, match=rf"^model.path={d}: config.json's model_type 'llamazzz' is not an "
                                             rf"architecture transformers .* knows: a newer transformers, or a typo "
                                             rf"in config.json\?$"):
        check_model_location(str(d))
    (d / "config.json").write_text(json.dumps({**config, "model_type": "llamazzz", "auto_map": {}}))
    check_model_location(str(d))  # its own code: trust_remote_code decides, at the load


def test_a_malformed_config_json_is_named_before_loading(tiny, tmp_path):
    from pipeline.models.loading import check_model_location

    d = _broken_copy(tiny[1], tmp_path / "m", "malformed config.json")
    with pytest.raises(ModelLoadError, match=rf"^model.path={d}: config.json is not readable JSON \(Extra data"):
        check_model_location(str(d))
    with pytest.raises(ModelLoadError, match=rf"^model {d}: config.json is not readable JSON"):
        load_causal_lm(d)


def test_a_model_directory_without_its_tokenizer_is_named(tiny, tmp_path):
    from pipeline.models.loading import TOKENIZER_FILES, check_model_location, load_tokenizer

    d = _broken_copy(tiny[1], tmp_path / "m", "no tokenizer files")
    check_model_location(str(d))  # a whole model directory
    # config.json is no tokenizer: the early check of the directory the tokenizer is read from
    with pytest.raises(ModelLoadError, match=rf"^model.path={d} has no tokenizer_config.json or tokenizer.json .*"
                                             r"not a Hugging Face tokenizer directory \(the tokenizer is read from "
                                             r"model.path while model.tokenizer_path is not set\)$"):
        check_model_location(str(d), "model.path", needs=TOKENIZER_FILES)
    with pytest.raises(ModelLoadError, match=rf"^tokenizer {d} has no tokenizer_config.json or tokenizer.json .*"
                                             r"Set model.tokenizer_path to the tokenizer's directory$"):
        load_tokenizer(d)


def test_remote_code_tokenizer_refused_unless_trusted(tiny, tmp_path):
    from pipeline.models.loading import load_tokenizer

    d = _broken_copy(tiny[1], tmp_path / "m", "remote-code tokenizer")
    with pytest.raises(ModelLoadError, match=rf"^tokenizer {d} requires custom code \(\['AutoTokenizer'\]\); "
                                             r"refusing to run it. Set model.trust_remote_code=true"):
        load_tokenizer(d)
    # an auto_map next to a built-in tokenizer class: transformers uses the built-in one, no code runs
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "PreTrainedTokenizerFast"}))
    assert load_tokenizer(d).eos_token == "<eos>"


def test_other_load_failures_are_one_line_and_bugs_stay_tracebacks(tiny, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from pipeline.models.loading import load_tokenizer

    d = tmp_path / "m"
    shutil.copytree(tiny[1], d)
    tj = d / "tokenizer.json"
    tj.write_text(tj.read_text()[:500])  # a copy cut short
    with pytest.raises(ModelLoadError, match=rf"^tokenizer {d} cannot be loaded: Unterminated string") as err:
        load_tokenizer(d)
    assert "\n" not in str(err.value)

    def bug(*a, **k):
        raise TypeError("a programming error")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", bug)
    with pytest.raises(TypeError, match="a programming error"):  # not hidden as a ModelLoadError
        load_causal_lm(tiny[1])


@pytest.mark.parametrize("what, message, early", [
    ("truncated safetensors", "model.safetensors is not a readable safetensors file", True),
    ("malformed config.json", "config.json is not readable JSON", True),
    ("no tokenizer files", "has no tokenizer_config.json or tokenizer.json", False),
    ("remote-code tokenizer", "requires custom code (['AutoTokenizer']); refusing to run it", False)])
def test_cli_broken_model_directory_stops_with_one_line(tiny, tmp_path, what, message, early):
    root, model_dir, data_dir = tiny
    d = _broken_copy(model_dir, tmp_path / "m", what)
    name = what.replace(" ", "_").replace(".", "_")
    out = launch.run(train_overrides(d, data_dir, tmp_path / "runs", name) + ["eval.enabled=false"],
                     script="launchers/eval.py" if what == "remote-code tokenizer" else "launchers/train.py")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "error (ModelLoadError, rank 0): " in out.stderr and message in out.stderr
    assert "Traceback" not in out.stderr
    if early:  # checked by the Hydra callback: no run directory
        assert not (tmp_path / "runs" / name).exists()


def _resaved(src, dst, edit):
    """A copy of the model at ``src`` whose weights file holds ``edit(state_dict)``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    save_file(edit(sd), dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_weights_missing_or_named_otherwise_are_refused_not_started_random(tiny, tmp_path, caplog):
    """transformers fills a weight its files lack with a random one, reports it in a table that scrolls
    past, and the run unlearned a random model with exit 0; a PEFT-wrapped state dict (every name
    prefixed) did the same for every weight. Refused in one line naming them; tensors the architecture
    does not use are only a warning."""
    _, model_dir, _ = tiny
    prefixed = _resaved(model_dir, tmp_path / "prefixed", lambda sd: {f"base_model.model.{k}": v for k, v in sd.items()})
    with pytest.raises(ModelLoadError, match=rf"^model {prefixed}: \d+ weight\(s\) of LlamaForCausalLM are not in its "
                                             r"files and would start random \(lm_head.weight, .*\); its files name them "
                                             r"with the prefix 'base_model.model.' \(a wrapped model's state dict"):
        load_causal_lm(prefixed)
    lost = "model.layers.1.mlp.down_proj.weight"
    cut = _resaved(model_dir, tmp_path / "cut", lambda sd: {k: v for k, v in sd.items() if k != lost})
    with pytest.raises(ModelLoadError, match=rf"^model {cut}: 1 weight\(s\) of LlamaForCausalLM are not in its files "
                                             rf"and would start random \({lost}\); a download or copy cut short"):
        load_causal_lm(cut)
    extra = _resaved(model_dir, tmp_path / "extra", lambda sd: {**sd, "extra.foo": torch.ones(4)})
    with caplog.at_level("WARNING", logger="pipeline.models.weight_report"):
        model = load_causal_lm(extra)  # loads, every weight from the files, and says what it left out
    assert f"model {extra}: 1 tensor(s) in its files are not used by LlamaForCausalLM and were left out (extra.foo)" \
        in caplog.text
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, load_causal_lm(model_dir).model.layers[1].mlp.down_proj.weight)


def test_a_config_json_whose_shapes_differ_from_the_weights_is_one_line(tiny, tmp_path):
    """A config.json from another model (here vocab_size edited, as after resizing the embeddings) was
    transformers' RuntimeError traceback, exit 1. One line naming the first weight and both shapes, exit 2."""
    _, model_dir, data_dir = tiny
    d = tmp_path / "vocab"
    shutil.copytree(model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] + 1}))
    with pytest.raises(ModelLoadError, match=rf"^model {d}: 2 weight\(s\) in its files have other shapes than its "
                                             rf"config.json gives LlamaForCausalLM \(lm_head.weight: \({cfg['vocab_size']}, "
                                             rf"\d+\) in the files, \({cfg['vocab_size'] + 1}, \d+\) from config.json; "
                                             r"also model.embed_tokens.weight\)"):
        load_causal_lm(d)
    # a run, and one under ZeRO-3 (transformers loads on rank 0 alone there, and reports the mismatch
    # only as its RuntimeError: before, a traceback on rank 0 while any other rank went on)
    for stage in ("auto", "3"):
        out = launch.run(train_overrides(d, data_dir, tmp_path / "runs", f"r{stage}", steps=1) +
                         ["eval.enabled=false", f"deepspeed.zero_stage={stage}"])
        lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error (")]
        assert out.returncode == 2 and len(lines) == 1 and "ModelLoadError" in lines[0], out.stderr[-2000:]
        # (ZeRO-3: transformers' own line for the first, with both shapes)
        assert "other shapes than its config.json gives" in lines[0] and ".weight" in lines[0], lines[0]
        assert str(cfg["vocab_size"]) in lines[0] and str(cfg["vocab_size"] + 1) in lines[0], lines[0]
        assert "Traceback" not in out.stderr and "LOAD REPORT" not in out.stderr


@pytest.mark.distributed
def test_a_prefixed_state_dict_is_named_under_zero3_too(tiny, tmp_path):
    """ZeRO-3's loading reports no unused tensors: the hint reads the names from the files' headers."""
    _, model_dir, data_dir = tiny
    prefixed = _resaved(model_dir, tmp_path / "prefixed", lambda sd: {f"base_model.model.{k}": v for k, v in sd.items()})
    out = launch.run(train_overrides(prefixed, data_dir, tmp_path / "runs", "r", steps=1) +
                     ["eval.enabled=false", "deepspeed.zero_stage=3"], ranks=2)
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error (")]
    assert out.returncode != 0 and lines and lines[0].startswith("error (ModelLoadError, rank 0): "), out.stderr[-2000:]
    assert "would start random" in lines[0] and "its files name them with the prefix 'base_model.model.'" in lines[0]
    # no rank's traceback (torchrun's own summary of the failed launch has one of its own process)
    assert "]: Traceback" not in out.stderr
