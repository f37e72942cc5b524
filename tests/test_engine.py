"""The DeepSpeed ZeRO-3 engine end to end on a tiny random model (CPU, gloo): 1 and 2 ranks."""

import json
import math
import subprocess
import sys

import pytest
import torch

from tests.helpers.launch import ROOT, env, free_port, run
from tests.helpers.tiny import build, build_wider, train_overrides, wider_config


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
                 + ["method=grad_diff", "kernels.attention=triton", "trainer.lr_scheduler=linear",
                    "trainer.warmup_ratio=0.67", "trainer.epochs=7", "model.dtype=bfloat16"], interpret="0")
    assert out.returncode == 0, out.stderr[-3000:]
    # max_steps decides: an epochs override alone changed nothing, silently
    assert "trainer.epochs=7 is not used: trainer.max_steps=3 sets the step count" in out.stderr
    assert "lr schedule: linear, peak lr 0.001, 2 warm-up steps of 3 (trainer.warmup_ratio=0.67)" in out.stderr
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
    # the LR each step trained with (2 warm-up steps of 3, then linear decay): lr x [0.5, 1, 1]; logged
    # after the optimizer step it read the next step's [1, 1, 1/1] (warm-up never showed)
    assert [h["lr"] for h in hist] == pytest.approx([5e-4, 1e-3, 1e-3])
    res = json.loads((run / "results.json").read_text())
    assert res["method"] == "grad_diff" and "retain_fact_recall" in res["metrics"]
    assert res["precision"] == {"training": "fp32", "weights": "float32", "device": "cpu"}
    # model.dtype=bfloat16 (the 7B configs') on CPU ranks: fp32, and the log says the setting went unused
    assert ("precision: fp32 training (deepspeed.precision=auto), weights loaded in float32 on cpu (model.dtype="
            "bfloat16 not used: fp32 training keeps float32 weights)") in out.stderr
    # GradDiff's terms are token means: the log says over what
    assert ("loss reductions: forget term token_mean, retain term token_mean; token_mean: over the optimizer "
            "step's tokens (every micro-batch and rank)") in out.stderr
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
    check = verify_export(big, ids, logits, rtol=1e-5)
    assert check.max_abs_logit_diff == 0.0 and math.isclose(check.tolerance, 1e-5 * scale)
    # round-off above the absolute 1e-5 but within 1e-5 relative passes ...
    verify_export(big, ids, logits + 0.5e-5 * scale, rtol=1e-5)
    # ... a real mismatch does not, and the message names the bound
    with pytest.raises(ExportError, match=r"max \|logit diff\|.*x max\(1, max \|logit\|"):
        verify_export(big, ids, logits + 3e-5 * scale, rtol=1e-5)


def test_a_failing_export_check_keeps_the_previous_export_and_the_tokenizer_is_saved_as_loaded(tmp_path, umask_022):
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
    assert (out.stat().st_mode & 0o777) == 0o755
    # and its files: atomic writes went through mkstemp's 0600 (results.json, model.safetensors)
    assert {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()} == {f.name: 0o644 for f in out.iterdir()}
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


def test_a_custom_code_model_exports_with_the_runs_trust_remote_code(tmp_path):
    """A model.trust_remote_code=true run's export carries its auto_map and code; the check reload
    passed no trust_remote_code, so transformers refused it: a ValueError traceback after training,
    no model written (and the other ranks waited for the collective timeout)."""
    import importlib.util

    import pipeline.engine.export as export
    from pipeline.models.loading import load_causal_lm

    base = tmp_path / "base"
    base.mkdir()
    (base / "modeling_custom.py").write_text(
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'customllama'\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    spec = importlib.util.spec_from_file_location("modeling_custom", base / "modeling_custom.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.CustomConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2)
    cfg.auto_map = {"AutoConfig": "modeling_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    mod.CustomForCausalLM(cfg).save_pretrained(base)
    model = load_causal_lm(str(base), trust_remote_code=True).eval()

    class StageZeroEngine:
        module = model

        def __call__(self, **kw):
            return model(**kw)

    class NoTokenizer:
        def save_pretrained(self, _):
            pass

    with pytest.raises(export.ExportError, match="ValueError: .*custom code"):  # one line, not a traceback
        export.export_hf(StageZeroEngine(), NoTokenizer(), tmp_path / "refused" / "model")
    assert not (tmp_path / "refused" / "model").exists()
    out = export.export_hf(StageZeroEngine(), NoTokenizer(), tmp_path / "run" / "model", trust_remote_code=True)
    assert (out / "modeling_custom.py").is_file() and (tmp_path / "run" / "export_check.json").is_file()


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


def test_effective_batch_sets_grad_accum_from_the_number_of_ranks():
    """trainer.effective_batch (the recipes' 32) holds on any number of GPUs: before, 4 rows per GPU
    gave 32 on 8 GPUs and 4 on one (8x the optimizer steps at the same lr), with nothing said."""
    from pipeline.config import ConfigError
    from pipeline.engine.batching import resolve_grad_accum

    assert [resolve_grad_accum(4, 1, 32, n)[0] for n in (1, 2, 4, 8)] == [8, 4, 2, 1]
    assert resolve_grad_accum(4, 3, None, 8) == (3, "4 forget rows per rank x 3 micro-batches x 8 ranks = 96 forget "
                                                    "rows per optimizer step")
    assert resolve_grad_accum(4, 8, 32, 1)[0] == 8  # the resolved value, resolved again (continual steps, sweeps)
    with pytest.raises(ConfigError, match=r"'trainer.effective_batch': 32 forget rows per step is not a multiple of "
                                          r"trainer.batch_size=4 x 16 ranks = 64"):
        resolve_grad_accum(4, 1, 32, 16)
    with pytest.raises(ConfigError, match=r"'trainer.grad_accum': 2 contradicts trainer.effective_batch=32"):
        resolve_grad_accum(4, 2, 32, 2)


@pytest.mark.parametrize("n_forget", [5, 37, 40, 64])
def test_an_optimizer_step_draws_the_same_rows_however_it_is_split(n_forget):
    """8 forget rows per optimizer step as 1 rank x 8 micro-batches, 2 x 2 x 2, 8 ranks x 1 or 4 rows x 2
    ranks: the same steps per epoch, the same rows (and retain rows) in each step, every forget row once
    per epoch. Before, epochs were cut per micro-batch: TOFU forget01 (40 rows, 32 per step) ran 7 steps
    in 5 epochs on 1 GPU and 10 on 8."""
    from pipeline.engine.batching import BatchPlan

    def steps(batch, ranks, accum, epochs=3):
        plans = [BatchPlan(n_forget, 11, batch, batch, ranks, r, 7, accum) for r in range(ranks)]
        total = plans[0].total_steps(epochs, 0)
        micro = [[(s * accum + k, p) for k in range(accum) for p in plans] for s in range(total)]  # per step
        rows = [sorted(i for m, p in step for i in p.forget_indices(m)) for step in micro]
        retain = [sorted(i for m, p in step for i in p.retain_indices(m)) for step in micro]
        return plans[0].steps_per_epoch, rows, retain

    splits = [steps(*s) for s in ((1, 1, 8), (2, 2, 2), (1, 8, 1), (4, 2, 1))]
    assert all(s == splits[0] for s in splits[1:])
    per_epoch, rows, _ = splits[0]
    assert per_epoch == -(-n_forget // 8) and len(rows) == 3 * per_epoch
    for e in range(3):
        assert set().union(*rows[e * per_epoch:(e + 1) * per_epoch]) == set(range(n_forget))
    assert BatchPlan(40, 10, 4, 4, 1, 0, 0, 8).total_steps(5, 0) == BatchPlan(40, 10, 4, 4, 8, 0, 0, 1).total_steps(5, 0) == 10


@pytest.mark.distributed
def test_a_run_records_its_batch_and_the_recipes_hold_it_on_any_gpu_count(tiny, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from pipeline.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for exp in ("tofu_7b", "muse_news_7b"):
            assert compose(config_name="config", overrides=[f"+exp={exp}"]).trainer.effective_batch == 32, exp
    root, model_dir, data_dir = tiny
    out = launch(train_overrides(model_dir, data_dir, tmp_path / "runs", "eb", steps=1)
                 + ["trainer.effective_batch=2", "eval.enabled=false", "trainer.export=false"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert ("batch: 1 forget rows per rank x 2 micro-batches x 1 rank = 2 forget rows per optimizer step "
            "(trainer.effective_batch=2)") in out.stderr
    assert "steps: 1 optimizer step (trainer.max_steps=1; 2 forget rows, 1 step per epoch of 2 rows)" in out.stderr
    res = json.loads((tmp_path / "runs" / "eb" / "results.json").read_text())
    assert res["batch"] == {"forget_per_rank": 1, "retain_per_rank": 1, "grad_accum": 2, "forget_per_step": 2}
    assert "grad_accum: 2" in (tmp_path / "runs" / "eb" / "config.yaml").read_text()


@pytest.mark.distributed
def test_into_a_log_file_the_training_bar_is_not_redrawn_every_step(tiny, tmp_path):
    """stderr to a file (a SLURM log): the bar redraws every FILE_INTERVAL_S. Before, its per-step
    loss postfix (tqdm's set_postfix redraws by default) wrote one bar state per step into the log."""
    root, model_dir, data_dir = tiny
    out = launch(train_overrides(model_dir, data_dir, tmp_path / "runs", "bar", steps=20)
                 + ["method=grad_diff", "eval.enabled=false", "trainer.export=false", "logging.progress_bar=true"])
    assert out.returncode == 0, out.stderr[-3000:]
    states = out.stderr.count("unlearn[grad_diff]")
    # the opening state, the last and maybe one more, each a line of its own: not 20, and none redrawn
    # below each loss line (trainer.log_every, 2 here), as tqdm.write did
    loss_lines = out.stderr.count("pipeline.engine.trainer][INFO] - step ")
    assert loss_lines == 2 and 1 <= states <= 3, (states, loss_lines)
    assert all(line.startswith("unlearn[grad_diff]") for line in out.stderr.splitlines() if "unlearn[grad_diff]" in line)


def test_warmup_steps_round_away_float_error():
    """int(0.29 * 100) is 28: a step of warm-up lost to float error."""
    from pipeline.engine.trainer import lr_lambda, warmup_steps

    assert warmup_steps(100, 0.29) == 29 and warmup_steps(3, 0.67) == 2 and warmup_steps(5, 0.1) == 0
    f = lr_lambda(100, 0.29, "constant")
    assert [f(s) for s in (0, 28, 29)] == pytest.approx([1 / 29, 1.0, 1.0])


def test_a_bf16_engines_export_is_bounded_by_bf16s_round_off_measured_on_the_export(tmp_path):
    """A bf16 engine's logits differ from the float32 reload by bf16's round-off, which a fixed 5 % of
    the largest logit did not bound (a 2.6 M random Llama after 3 steps at lr 1e-3: 5.9 %, its export
    refused). The check runs the export's own weights through the probe in bf16 too, and allows 3x that
    round-off; a conversion that swaps two layers' MLPs is still refused, a float32 engine keeps the
    relative bound alone."""
    from transformers import LlamaForCausalLM

    from pipeline.engine.export import PRECISION_NOISE_FACTOR, ExportError, verify_export

    model_dir, _ = build(tmp_path)
    cfg = wider_config(model_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1234))

    def probe(m):  # what the engine's probe holds: the logits of its own dtype's forward
        with torch.no_grad():
            return m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()

    expected = probe(model)
    model.save_pretrained(tmp_path / "good")
    check = verify_export(tmp_path / "good", ids, expected, rtol=5e-2, engine_dtype=torch.bfloat16)
    # measured on the same weights in the same arithmetic as the engine's forward: its whole gap
    assert check.precision_noise == check.max_abs_logit_diff > 0
    assert check.tolerance == max(5e-2 * check.logit_scale, PRECISION_NOISE_FACTOR * check.precision_noise)
    assert check.record()["precision_noise"] == check.precision_noise
    with torch.no_grad():
        first, second = model.model.layers[1].mlp, model.model.layers[2].mlp
        for name in ("gate_proj", "up_proj", "down_proj"):
            a, b = getattr(first, name).weight, getattr(second, name).weight
            swapped = a.clone()
            a.copy_(b)
            b.copy_(swapped)
    model.save_pretrained(tmp_path / "swapped")
    with pytest.raises(ExportError, match=r"or 3 x the round-off .* of the engine.s dtype"):
        verify_export(tmp_path / "swapped", ids, expected, rtol=5e-2, engine_dtype=torch.bfloat16)
    model.float().save_pretrained(tmp_path / "fp32")
    fp32 = verify_export(tmp_path / "fp32", ids, _logits(tmp_path / "fp32", ids), rtol=1e-5, engine_dtype=torch.float32)
    assert fp32.precision_noise is None and "precision_noise" not in fp32.record()


@pytest.mark.distributed
def test_a_bf16_run_at_a_high_learning_rate_exports(tmp_path):
    """The run that failed its export before: bf16 on CPU, 3 GradDiff steps at lr 1e-3 on a 2.6 M random
    Llama (max |logit diff| 0.83 against a bound of 0.71); the check now also allows 3x bf16's round-off
    measured on the export, and says so."""
    model_dir, data_dir = build(tmp_path / "tiny")
    build_wider(model_dir, tmp_path / "model", seed=5)  # on this host: max |logit diff| 0.80 against the old bound's 0.57
    out = launch(train_overrides(tmp_path / "model", data_dir, tmp_path / "runs", "bf16", steps=3) + [
        "method=grad_diff", "eval.enabled=false", "trainer.lr=1e-3", "deepspeed.precision=bf16"])
    assert out.returncode == 0, out.stderr[-2000:]
    check = json.loads((tmp_path / "runs" / "bf16" / "export_check.json").read_text())
    assert 0 < check["max_abs_logit_diff"] <= check["tolerance"] and check["precision_noise"] > 0
    assert "or 3 x the round-off" in out.stderr and "of the engine's dtype)" in out.stderr
