"""The DeepSpeed ZeRO-3 engine end to end on a tiny random model (CPU, gloo): 1 and 2 ranks."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers.launch import ROOT, env, free_port, run
from tests.helpers.tiny import build, train_overrides


def launch(args, ranks=1, timeout=300, interpret=None):
    extra = {} if interpret is None else {"TRITON_INTERPRET": interpret}
    return run(args, ranks=ranks, timeout=timeout, **extra)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model_dir, data_dir = build(root)
    return root, model_dir, data_dir


def _logits(model_dir, ids):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return m(input_ids=ids).logits


@pytest.mark.distributed
def test_single_process_trains_exports_and_evaluates(tiny):
    root, model_dir, data_dir = tiny
    # kernels.attention=triton on CPU without TRITON_INTERPRET: falls back to sdpa, said in the log and results.json
    out = launch(train_overrides(model_dir, data_dir, root / "runs", "single", steps=3)
                 + ["method=grad_diff", "kernels.attention=triton"], interpret="0")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "kernels.attention=triton -> sdpa" in out.stderr and "TRITON_INTERPRET" in out.stderr, out.stderr[-3000:]
    run = root / "runs" / "single"
    exported = run / "model"
    assert (exported / "model.safetensors").exists() and (exported / "tokenizer.json").exists()
    assert not list(run.glob("*.tmp*")), "temporary files left behind"
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    # trained weights differ from the initial ones, and the export reloads with plain transformers
    assert (_logits(exported, ids) - _logits(model_dir, ids)).abs().max() > 1e-4
    check = json.loads((run / "export_check.json").read_text())
    assert check["max_abs_logit_diff"] <= 1e-5
    hist = json.loads((run / "train_history.json").read_text())
    assert [h["step"] for h in hist] == [1, 2, 3]
    res = json.loads((run / "results.json").read_text())
    assert res["method"] == "grad_diff" and "retain_fact_recall" in res["metrics"]
    assert res["precision"] == {"training": "fp32", "weights": "float32", "device": "cpu"}
    assert "precision: fp32 training (deepspeed.precision=auto), weights loaded in float32 on cpu" in out.stderr
    att = res["attention_backend"]
    assert att["requested"] == "triton" and att["resolved"] == "sdpa" and "falls back to sdpa" in att["reason"]
    assert set(att["ran"]["llama"]) == {"sdpa"}


# The 2-rank vs 1-rank trajectory equality and the fused-KL / Triton-attention path under ZeRO-3
# live in tests/test_sharded_equality.py (one launch per world size for every method, every weight
# partitioned).


def test_export_check_tolerance_is_relative_to_the_logit_scale(tmp_path):
    """Large logits (e.g. after gradient ascent) carry proportionally larger float32 round-off: the
    export check scales its bound with max |logit|, and still refuses a real mismatch."""
    from transformers import AutoModelForCausalLM

    from pipeline.engine.export import ExportError, verify_export

    model_dir, _ = build(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(1000.0)  # logits in the hundreds
    big = tmp_path / "big"
    model.save_pretrained(big)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    logits = _logits(big, ids)
    scale = float(logits.abs().max())
    assert scale > 10
    diff, tol = verify_export(big, ids, logits, rtol=1e-5)
    assert diff == 0.0 and math.isclose(tol, 1e-5 * scale)
    # round-off above the absolute 1e-5 but within 1e-5 relative passes ...
    verify_export(big, ids, logits + 0.5e-5 * scale, rtol=1e-5)
    # ... a real mismatch does not, and the message names the bound
    with pytest.raises(ExportError, match=r"max \|logit diff\|.*x max\(1, max \|logit\|"):
        verify_export(big, ids, logits + 3e-5 * scale, rtol=1e-5)


def test_a_failing_export_check_keeps_the_previous_export_and_the_tokenizer_is_saved_as_loaded(tmp_path):
    """The export is checked in its temporary directory, before it replaces anything: a check that
    fails leaves the previous (good) export in place (before: the new directory was renamed over it
    first). The tokenizer is written as it was loaded (no pad token borrowed from EOS) and the
    directory is readable by others (mkdtemp made it 0700)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import pipeline.engine.export as export
    from pipeline.models.loading import load_tokenizer

    model_dir, _ = build(tmp_path)
    no_pad = AutoTokenizer.from_pretrained(model_dir)
    no_pad.pad_token = None  # as Llama-2/3 ship
    no_pad.save_pretrained(model_dir)
    tok = load_tokenizer(model_dir)
    assert tok.pad_token == tok.eos_token  # batching needs one
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()

    class StageZeroEngine:  # what an engine without partitioning exposes to the export
        module = model

        def __call__(self, **kw):
            return model(**kw)

    out = tmp_path / "run" / "model"
    export.export_hf(StageZeroEngine(), tok, out)
    good = (out / "model.safetensors").read_bytes()
    assert AutoTokenizer.from_pretrained(out).pad_token is None and tok.pad_token == tok.eos_token
    assert (out.stat().st_mode & 0o777) == 0o777 & ~_umask()
    # and its files: atomic writes went through mkstemp's 0600 (results.json, model.safetensors)
    assert {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()} == {
        f.name: 0o666 & ~_umask() for f in out.iterdir()}
    with torch.no_grad():
        model.model.norm.weight.mul_(2.0)  # trained on: the next export writes other weights ...
    probe = export._probe_logits
    try:  # ... and its check compares against logits it cannot reproduce
        export._probe_logits = lambda engine, vocab: (probe(engine, vocab)[0], probe(engine, vocab)[1] + 1.0)
        with pytest.raises(export.ExportError, match=rf"{out} does not reproduce .*previous export there is kept"):
            export.export_hf(StageZeroEngine(), tok, out)
    finally:
        export._probe_logits = probe
    assert (out / "model.safetensors").read_bytes() == good
    assert sorted(p.name for p in out.parent.iterdir()) == ["export_check.json", "model"]  # no temp dir left


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_collective_timeout_is_the_configured_one(tmp_path):
    """deepspeed.timeout_minutes reaches the process group (DeepSpeed's own default is 10 minutes,
    shorter than rank 0's export of a 7B model while the other ranks wait in a barrier)."""
    script = (
        "import torch, torch.distributed as d\n"
        "from pipeline.engine.distributed import init_distributed\n"
        "init_distributed(7)\n"
        "print(d.group.WORLD._get_backend(torch.device('cpu')).options._timeout.total_seconds())\n")
    one_rank = env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=one_rank, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "420.0"
