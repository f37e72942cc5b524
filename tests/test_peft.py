"""LoRA students (``model.peft``) whose frozen base is their own teacher and reference.

In-process: the frozen view (adapters off, tau) is the base model's tempered network, for every
path a method uses (logits, naive/fused KL, hidden states); every method trains the adapters only.
Launched (one fixture, four runs): 1-rank vs 2-rank ZeRO-3 with base weights partitioned and
activation checkpointing, kill-and-resume, the exported adapter and merged model.
"""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers.launch import command, env
from tests.helpers.models import model_roots
from tests.helpers.tiny import build, train_overrides

ROOT = Path(__file__).resolve().parents[1]
PEFT = OmegaConf.create({"enabled": True, "r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": None,
                         "layers": None})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    return (root, *build(root))


def _trained_adapters(student, std: float):
    """``student`` with non-zero lora_B weights (peft starts them at zero), as after some training."""
    for n, p in student.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=std)
    return student


def _student_and_base(model_dir, peft=PEFT):
    from pipeline.models.loading import load_causal_lm
    from pipeline.models.peft_student import wrap_lora

    torch.manual_seed(0)
    student = _trained_adapters(wrap_lora(load_causal_lm(model_dir), peft), std=0.3)  # adapters change the output
    return student.train(), load_causal_lm(model_dir).eval()


def test_the_adapter_records_the_base_revision_it_trained_on(tiny, tmp_path):
    """adapter_config.json named the base without its revision: a reload took the hub's main."""
    from pipeline.models.loading import load_causal_lm
    from pipeline.models.peft_student import wrap_lora

    _, model_dir, _ = tiny
    student = wrap_lora(load_causal_lm(model_dir), PEFT, revision="0123abcd")
    student.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["revision"] == "0123abcd"


def test_fused_kl_refuses_a_lora_adapter_on_the_output_head(tiny):
    """kernels.kl=fused forms logits from the head's base weight: an lm_head adapter was left out of
    every loss and never trained, silently (the naive KL was right)."""
    from pipeline.methods.passes import fused_head_problem
    from pipeline.models.loading import load_causal_lm
    from pipeline.models.peft_student import wrap_lora

    _, model_dir, _ = tiny
    assert fused_head_problem(wrap_lora(load_causal_lm(model_dir), PEFT)) is None
    on_head = OmegaConf.merge(PEFT, {"target_modules": ["q_proj", "lm_head"]})
    assert "LoRA adapter on it" in fused_head_problem(wrap_lora(load_causal_lm(model_dir), on_head))


def _inputs():
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11], [1, 12, 13, 14, 15, 0, 0, 0]])
    mask = (torch.arange(8)[None] < torch.tensor([[8], [5]])).long()
    labels = ids.clone()
    labels[:, :3] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_frozen_view_is_the_tempered_base_model(tiny):
    """Teacher = the student's own weights with adapters off at tau: equals the separately loaded
    base model with tempered attention (logits, KL naive and fused, hidden states), while the
    student itself (adapters on, tau=1) differs and is left exactly as it was."""
    from pipeline.methods import losses
    from pipeline.models.peft_student import FrozenBaseView
    from pipeline.models.tempered_attention import get_temperatures, temperature

    _, model_dir, _ = tiny
    before = model_roots()
    student, base = _student_and_base(model_dir)
    view = FrozenBaseView(student)
    assert model_roots() == before + 2  # the launched runs' "one model" probe counts what it should
    x = _inputs()
    kw = {"input_ids": x["input_ids"], "attention_mask": x["attention_mask"]}
    s_before = student(**kw).logits.detach()
    with torch.no_grad(), temperature(base, 3.0):
        b_tau = base(**kw).logits
    with temperature(view, 3.0):
        v_tau = view(**kw).logits
    assert not v_tau.requires_grad
    torch.testing.assert_close(v_tau, b_tau, atol=1e-6, rtol=0)
    assert (s_before - base(**kw).logits).abs().max() > 1e-2  # the adapters matter: the test can fail
    assert (v_tau - base(**kw).logits).abs().max() > 1e-3  # and so does tau
    # the student is untouched: train mode, adapters on, tau back to 1
    assert student.training and all(t == 1.0 for t in get_temperatures(student))
    torch.testing.assert_close(student(**kw).logits, s_before, atol=0, rtol=0)
    # the losses' teacher paths: materialised and streamed KL, hidden states (asu_wmdp / RMU)
    for impl in ("naive", "fused"):
        got = losses.distill_kl(student, view, x, tau=3.0, layers=[0], kl_impl=impl)
        want = losses.distill_kl(student, base, x, tau=3.0, layers=[0], kl_impl="naive")
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    with temperature(losses.unwrap(view), 2.0):
        h_v = losses.hidden_state_at(view, x, 1)
    with torch.no_grad(), temperature(base, 2.0):
        h_b = losses.hidden_state_at(base, x, 1)
    torch.testing.assert_close(h_v, h_b, atol=1e-6, rtol=0)


def test_activation_checkpointing_still_trains_the_adapters(tiny):
    """open-unlearning issue #178: with reentrant checkpointing and a frozen embedding, no input of a
    checkpointed block requires grad and the adapters inside get no gradient. Shown first (so the
    check can fail), then fixed by ``enable_activation_checkpointing``."""
    import warnings

    from pipeline.methods import losses
    from pipeline.models.activation_checkpointing import enable_activation_checkpointing
    from pipeline.models.peft_student import FrozenBaseView

    _, model_dir, _ = tiny
    student, _ = _student_and_base(model_dir)
    x = _inputs()

    def lora_grads():
        student.zero_grad(set_to_none=True)
        loss = losses.distill_kl(student, FrozenBaseView(student), x, tau=3.0)
        if loss.requires_grad:  # with every layer checkpointed the loss may not even need a backward
            loss.backward()
        return [p.grad for n, p in student.named_parameters() if "lora_" in n]

    base = student.get_base_model()
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    base.disable_input_require_grads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that no checkpoint input requires grad
        assert all(g is None for g in lora_grads())  # the pitfall: adapters silently untrained
    assert enable_activation_checkpointing(student) == student.config.num_hidden_layers
    assert all(g is not None and g.abs().max() > 0 for g in lora_grads())


METHOD_ARGS = {
    "asu_kl": ["method.tau=3.0"], "asu_gd": ["method.tau=3.0"], "asu_idk": ["method.tau=3.0"],
    "asu_wmdp": ["method.layer=1", "method.tau=3.0"], "rmu": ["method.layer=1", "method.alpha=1.0"],
    "grad_ascent": [], "grad_diff": [], "npo": [], "simnpo": [], "idk_dpo": [],
}


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    from pipeline.config import register_configs

    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("name", sorted(METHOD_ARGS))
def test_every_method_trains_only_the_adapters(tiny, name):
    """Each method's loss on a LoRA student (reference = its frozen view) gives gradients to
    adapters only; the base weights get none."""
    from pipeline.data.collate import pad_batch
    from pipeline.data.loaders import encode_rows
    from pipeline.methods import build_method
    from pipeline.models.loading import load_tokenizer
    from pipeline.models.peft_student import reference_for

    _, model_dir, data_dir = tiny
    cfg = _compose([f"method={name}", *METHOD_ARGS[name]])
    method = build_method(cfg.method)
    student, _ = _student_and_base(model_dir)
    method.select_trainable(student)
    tok = load_tokenizer(model_dir)
    rows = [json.loads(line) for line in (data_dir / "forget.jsonl").read_text().splitlines()]
    retain = [json.loads(line) for line in (data_dir / "retain.jsonl").read_text().splitlines()][:2]
    batch = {"forget": pad_batch(encode_rows(tok, rows, 64, True, "forget"), tok.pad_token_id),
             "retain": pad_batch(encode_rows(tok, retain, 64, True, "retain"), tok.pad_token_id)}
    for view, vrows in method.forget_views(tok, rows, 64).items():
        batch[view] = pad_batch(vrows, tok.pad_token_id)
    out = method.compute_loss(student, reference_for(student, method.uses_reference), batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads), sorted(grads)[:3]
    assert any(g.abs().max() > 0 for g in grads.values())
    if name in ("rmu", "asu_wmdp"):  # the layer update maps onto the adapters of mlp.down_proj
        assert all(".mlp.down_proj.lora_" in n for n in grads)


def test_layerwise_method_without_a_matching_adapter_is_a_config_error(tiny):
    from pipeline.config import ConfigError
    from pipeline.methods import build_method

    _, model_dir, _ = tiny
    student, _ = _student_and_base(model_dir, OmegaConf.merge(PEFT, {"target_modules": ["q_proj"]}))
    method = build_method(_compose(["method=rmu", "method.layer=1"]).method)
    with pytest.raises(ConfigError, match="model.peft.target_modules"):
        method.select_trainable(student)
    from pipeline.models.loading import load_causal_lm
    from pipeline.models.peft_student import wrap_lora

    with pytest.raises(ConfigError, match="'model.peft.target_modules'.*nope"):  # a user error: exit 2
        wrap_lora(load_causal_lm(model_dir), OmegaConf.merge(PEFT, {"target_modules": ["nope"]}))


def test_peft_config_validation_and_preflight():
    from pipeline.config import ConfigError, validate
    from pipeline.engine.preflight import ArchSpec, lora_param_count, plan_memory

    with pytest.raises(ConfigError, match="model.peft.layers"):
        validate(_compose(["model.peft.enabled=true", "model.peft.layers=[0,99]"]))
    with pytest.raises(ConfigError, match="model.peft.r"):
        validate(_compose(["model.peft.enabled=true", "model.peft.r=0"]))
    arch = ArchSpec(32000, 4096, 32, 11008, 32, 32)  # Llama-2-7B
    cfg = _compose(["model.peft.enabled=true", "model.peft.r=8"])
    n = lora_param_count(arch, cfg.model)
    assert n == 8 * 32 * (4 * 2 * 4096 + 3 * (4096 + 11008))  # 19,988,480: peft's count for Llama-2-7B r=8
    kw = dict(precision="bf16", zero_stage=3, offload_optimizer="none", offload_param="none", uses_reference=True,
              batch_size=4, retain_batch_size=4, seq_len=512, kl_impl="fused", activation_checkpointing=True)
    full, lora = plan_memory(arch, 8, 8, **kw), plan_memory(arch, 8, 8, **kw, lora_params=n)
    assert "teacher params (frozen)" in full.per_gpu and "teacher params (frozen)" not in lora.per_gpu
    assert lora.per_gpu["optimizer states"] * 100 < full.per_gpu["optimizer states"]


def test_demo_row_asu_kl_lora_is_asu_with_a_lora_student():
    from pipeline.config import validate
    from pipeline.demo import plan_jobs

    (job,) = plan_jobs(["asu_kl_lora"], "demo", ROOT / "conf", references=())
    cfg = _compose(["+exp=tofu_tiny", *job.overrides])
    validate(cfg)
    assert cfg.model.peft.enabled and cfg.method.name == "asu_kl" and cfg.method.tau == 4.0  # asu_kl_tiny's values
    assert cfg.run_name == "demo/asu_kl_lora" and cfg.trainer.lr > 3e-4


# -- launched: ZeRO-3, 1 vs 2 ranks, activation checkpointing, kill-and-resume, export ------------------

STEPS = 5


def _args(tiny, name):
    root, model_dir, data_dir = tiny
    return train_overrides(model_dir, data_dir, root / "runs", name, steps=STEPS) + [
        "eval.enabled=false", "method=asu_kl", "method.tau=2.0", "model.peft.enabled=true", "model.peft.r=4",
        "deepspeed.activation_checkpointing=true", "deepspeed.param_persistence_threshold=0",
        "trainer.lr=1e-2", "trainer.save_every=2", "trainer.keep_checkpoints=5"]


def _launch(args, ranks, spy=None, **extra):
    cmd = command(args, ranks, script="tests/helpers/spy_train.py")
    e = env(**extra, **({"ASU_SPY_OUT": str(spy)} if spy else {}))
    return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=400)


@pytest.fixture(scope="module")
def runs(tiny):
    root = tiny[0]
    r1 = _launch(_args(tiny, "one") + ["trainer.batch_size=2", "trainer.retain_batch_size=2"], 1, root / "spy1")
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = _launch(_args(tiny, "two"), 2, root / "spy2")
    assert r2.returncode == 0, r2.stderr[-3000:]
    # one rank is SIGKILLed while writing the step-4 checkpoint; the rerun resumes from step 2
    killed = _launch(_args(tiny, "killed"), 2, ASU_INJECT="kill_in_save@4:1")
    assert killed.returncode != 0 and not (root / "runs" / "killed" / "model").exists()
    resumed = _launch(_args(tiny, "killed"), 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr + resumed.stdout and "step 2/5" in resumed.stderr + resumed.stdout
    return root / "runs"


@pytest.mark.distributed
def test_lora_zero3_one_model_adapters_only_and_two_ranks_equal_one(tiny, runs):
    root = tiny[0]
    for spy in ("spy1/rank0", "spy2/rank0", "spy2/rank1"):
        rec = json.loads((root / f"{spy}.json").read_text())
        # one transformers model in the process: the frozen base is the student's, adapters off
        assert rec["models"] == 1 and rec["reference"] == "FrozenBaseView", rec
        assert rec["optimizer_numel"] == rec["lora_numel"] > 0 and rec["trainable_non_lora"] == [], rec
    h1 = json.loads((runs / "one" / "train_history.json").read_text())
    h2 = json.loads((runs / "two" / "train_history.json").read_text())
    assert len(h1) == len(h2) == STEPS
    for a, b in zip(h1, h2):
        for k in ("loss", "forget_loss", "retain_loss"):
            assert abs(a[k] - b[k]) <= 1e-5, (k, a, b)
    assert h1[-1]["retain_loss"] > 0 and h1[0]["retain_loss"] == 0  # adapters start at 0, then move
    from safetensors.torch import load_file

    a1 = load_file(runs / "one" / "adapter" / "adapter_model.safetensors")
    a2 = load_file(runs / "two" / "adapter" / "adapter_model.safetensors")
    assert a1.keys() == a2.keys()
    assert max((a1[k] - a2[k]).abs().max().item() for k in a1) <= 1e-5
    # activation checkpointing + frozen base: every lora_B trained (open-unlearning issue #178)
    lora_b = [k for k in a2 if "lora_B" in k]
    assert len(lora_b) == 2 * 7, sorted(a2)
    assert all(a2[k].abs().max() > 0 for k in lora_b), [k for k in lora_b if a2[k].abs().max() == 0]


@pytest.mark.distributed
def test_lora_kill_and_resume_is_exact(runs):
    from safetensors.torch import load_file

    a = load_file(runs / "two" / "adapter" / "adapter_model.safetensors")
    b = load_file(runs / "killed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    ha = json.loads((runs / "two" / "train_history.json").read_text())
    hb = json.loads((runs / "killed" / "train_history.json").read_text())
    assert [h["loss"] for h in ha] == pytest.approx([h["loss"] for h in hb], abs=1e-6)


@pytest.mark.distributed
def test_lora_exports_reload_and_evaluate_equal(tiny, runs):
    """The adapter (peft layout) on the base and the merged model reload with plain transformers /
    peft and give the same evaluation metrics (1e-5)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.eval.runner import evaluate_splits
    from pipeline.eval.tofu import EvalSettings

    _, model_dir, data_dir = tiny
    run = runs / "two"
    assert {p.name for p in (run / "adapter").iterdir()} >= {"adapter_model.safetensors", "adapter_config.json"}
    check = json.loads((run / "export_check.json").read_text())
    assert check["lora"] and check["max_abs_logit_diff"] <= check["tolerance"]
    # results.json names the modules peft adapted (model.peft.target_modules: null = the defaults)
    adapted = json.loads((run / "results.json").read_text())["peft"]["adapted_modules"]
    assert adapted == sorted(json.loads((run / "adapter" / "adapter_config.json").read_text())["target_modules"])
    assert "q_proj" in adapted
    # and how many parameters trained, of how many (the log said it; results.json and report.md did not)
    peft = json.loads((run / "results.json").read_text())["peft"]
    from safetensors.torch import load_file

    adapter_numel = sum(t.numel() for t in load_file(run / "adapter" / "adapter_model.safetensors").values())
    assert peft["trainable_params"] == adapter_numel and peft["total_params"] > adapter_numel
    from pipeline.eval.report import lora_setting

    assert f"({adapter_numel:,} of {peft['total_params']:,} parameters trained" in lora_setting(peft)
    assert check["adapter_max_abs_logit_diff"] <= check["tolerance"]
    # rank 0 loaded the base + adapter once for both outputs (a 7B load costs minutes); other ranks never
    assert json.loads((tiny[0] / "spy2" / "export_rank0.json").read_text()) == {"base_loads": 1}
    assert not (tiny[0] / "spy2" / "export_rank1.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(run / "adapter")).eval()
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(run / "model")
    splits = {name: [json.loads(line) for line in (data_dir / f"{name}.jsonl").read_text().splitlines()]
              for name in ("forget", "eval_retain")}
    settings = EvalSettings(batch_size=4, max_new_tokens=8, max_length=64)
    res = [{k: r.means() for k, r in evaluate_splits(m, tok, splits, settings, "answer").items()}
           for m in (merged, lora, base)]
    for split in splits:
        for k, v in res[0][split].items():
            assert v == pytest.approx(res[1][split][k], abs=1e-5, nan_ok=True), (split, k)
    assert res[0]["forget"]["prob"] != pytest.approx(res[2]["forget"]["prob"], abs=1e-4)  # it did train



@pytest.mark.distributed
def test_lora_checkpoints_hold_the_adapters_not_the_frozen_base(runs):
    """A LoRA checkpoint holds the adapters and their optimizer state; the frozen base is model.path's,
    reloaded by every attempt (before: the whole base in every save, ~13 GiB at 7B; ZeRO-3 as
    frozen_param_fragments). Stage 0 (1 rank) and ZeRO-3 (2 ranks); the resume above is exact with it."""
    import torch

    for name, pattern in (("one", "mp_rank_00_model_states.pt"), ("two", "zero_pp_rank_*_model_states.pt")):
        files = sorted((runs / name / "checkpoints").glob(f"step_*/{pattern}"))
        assert files, name
        for f in files:
            state = torch.load(f, map_location="cpu", weights_only=False)
            module = state.get("module") or {}
            assert module and all("lora_" in k for k in module), (f, [k for k in module if "lora_" not in k][:3])
            assert not state.get("frozen_param_fragments"), f


def test_lora_checkpoint_of_a_tied_embedding_model_leaves_the_frozen_head_out(tiny):
    """Input embedding tied to lm_head (SmolLM2, Llama-3.2, Gemma), one rank: DeepSpeed's frozen-parameter
    exclusion lists a tied tensor once, so the frozen head stayed in every checkpoint as lm_head.weight
    (137 MB per save at SmolLM2-135M). Now only adapters are saved, and the run resumes from them."""
    from transformers import AutoModelForCausalLM

    root, model_dir, data_dir = tiny
    tied_dir = root / "tied_model"
    m = AutoModelForCausalLM.from_pretrained(model_dir)
    m.config.tie_word_embeddings = True
    m.tie_weights()
    assert m.lm_head.weight is m.model.embed_tokens.weight
    m.save_pretrained(tied_dir, safe_serialization=True)
    for f in model_dir.glob("tokenizer*"):
        (tied_dir / f.name).write_bytes(f.read_bytes())
    args = train_overrides(tied_dir, data_dir, root / "runs", "tied", steps=2) + [
        "eval.enabled=false", "method=grad_diff", "model.peft.enabled=true", "model.peft.r=4",
        "trainer.lr=1e-2", "trainer.save_every=1", "trainer.keep_checkpoints=5"]
    # killed right after the step-1 checkpoint; the re-run resumes from it (the adapters onto the tied base)
    killed = _launch(args, 1, ASU_INJECT="kill_after_save@1")
    assert killed.returncode != 0
    again = _launch(args, 1)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "step 1/2" in again.stderr, again.stderr[-3000:]
    from safetensors.torch import load_file

    run = root / "runs" / "tied"
    files = sorted((run / "checkpoints").glob("step_*/mp_rank_00_model_states.pt"))
    assert len(files) == 2, files
    # by bytes too: the saved module is exactly the adapters the run exported (here the adapters outweigh
    # the tiny embedding, so "smaller than the base" would not tell; a left-in head adds its 35x32 floats)
    adapter_numel = sum(t.numel() for t in load_file(run / "adapter" / "adapter_model.safetensors").values())
    for f in files:
        state = torch.load(f, map_location="cpu", weights_only=False)
        module = state["module"]
        assert module and all("lora_" in k for k in module), (f, [k for k in module if "lora_" not in k][:3])
        size = next(iter(module.values())).element_size()
        assert sum(t.numel() * t.element_size() for t in module.values()) == adapter_numel * size, f
        assert not state.get("frozen_param_fragments"), f


@pytest.mark.parametrize("kind", ["phi3", "mixtral"])
def test_default_targets_adapt_the_layers_the_architecture_has(kind, caplog):
    """transformers 5's Phi-3 fuses q/k/v and gate/up (qkv_proj, gate_up_proj) and Mixtral's experts
    are 3-D parameters: with Llama's names LoRA adapted o/down (Phi-3) or attention (Mixtral) only,
    silently. Now the defaults name what is there; a target that matches nothing stops the run."""
    import logging

    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.models.peft_student import DEFAULT_TARGETS, wrap_lora

    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0)
    if kind == "mixtral":
        small.update(num_local_experts=2, num_experts_per_tok=1)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **small))
    with caplog.at_level(logging.WARNING, logger="pipeline.models.peft_student"):
        student = wrap_lora(model, PEFT)
    adapted = {n.rsplit(".", 1)[-1] for n, m in student.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(DEFAULT_TARGETS[kind]) and "match no linear layer" not in caplog.text
    # a name among them that matches nothing (a typo, another architecture's name) stops the run: a
    # warning left it training fewer modules than asked
    from pipeline.models.peft_student import PeftSetupError

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **small))
    with pytest.raises(PeftSetupError, match=r"\['up_proj'\] match no linear layer of this .* model \(the others "
                                             r"match: \['o_proj'\]\)"):
        wrap_lora(model, OmegaConf.merge(PEFT, {"target_modules": ["o_proj", "up_proj"]}))


def test_lora_on_a_tied_head_or_embedding_is_refused_before_training():
    """Qwen2 ties its embeddings to its head: an adapter on lm_head or embed_tokens trained to the end and
    then the merged export failed its check (max |logit diff| 4.49), keeping nothing of the run."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from pipeline.models.peft_student import PeftSetupError, wrap_lora

    cfg = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=1, max_position_embeddings=32)
    for target in ("lm_head", "embed_tokens"):
        tied = Qwen2ForCausalLM(Qwen2Config(**cfg, tie_word_embeddings=True))
        with pytest.raises(PeftSetupError, match=rf"\['{target}'\] share one weight matrix .* qwen2 model ties"):
            wrap_lora(tied, OmegaConf.merge(PEFT, {"target_modules": ["q_proj", target]}))
    untied = Qwen2ForCausalLM(Qwen2Config(**cfg, tie_word_embeddings=False))
    student = wrap_lora(untied, OmegaConf.merge(PEFT, {"target_modules": ["q_proj", "lm_head"]}))
    assert hasattr(student.base_model.model.lm_head, "lora_A")


def test_a_full_model_learning_rate_on_a_lora_student_is_warned(tiny):
    """Adapters start at zero: at tofu_7b's lr 1e-5 they barely move, and the run would report a
    model that forgot little without a word. The warning is in the run's log; LoRA rates are not warned."""
    from pipeline.models.peft_student import low_lr_warning

    assert low_lr_warning(3e-3) is None and low_lr_warning(1e-4) is None
    assert "trainer.lr=1e-05" in low_lr_warning(1e-5)
    root, model_dir, data_dir = tiny
    args = train_overrides(model_dir, data_dir, root / "runs", "low_lr", steps=1) + [
        "eval.enabled=false", "trainer.export=false", "method=grad_diff", "model.peft.enabled=true", "trainer.lr=1e-5"]
    out = subprocess.run(command(args, 1), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LoRA student with trainer.lr=1e-05, a full-model learning rate" in out.stderr


class _Engine:
    """What export_lora reads of a DeepSpeed engine (``module``, a forward) around a plain model."""

    def __init__(self, module):
        self.module = module

    def __call__(self, **kw):
        return self.module(**kw)


EXPORT_MODEL_CFG = OmegaConf.create({"trust_remote_code": False, "allow_pickle": False, "revision": None})



def test_a_bf16_lora_runs_merged_model_keeps_adapter_changes_below_bf16_resolution(tmp_path):
    """The merge ran in the training dtype: W + ΔW rounded to bf16, and unlearning's small adapter
    changes (here |ΔW|/|W| ~ 1e-3) mostly vanished from model/ while the export check, bounded at bf16's
    resolution, passed. The merged model is now float32 and holds W + ΔW."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from pipeline.engine.export_peft import export_lora
    from pipeline.models.loading import load_causal_lm
    from pipeline.models.peft_student import wrap_lora

    model_dir, _ = build(tmp_path / "src")
    base_dir = tmp_path / "base_bf16"
    load_causal_lm(model_dir, "bfloat16").save_pretrained(base_dir, safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.save_pretrained(base_dir)
    torch.manual_seed(0)
    # adapters in the base's dtype, as trained
    student = _trained_adapters(wrap_lora(load_causal_lm(base_dir, "bfloat16"), PEFT), std=3e-4)
    cfg = EXPORT_MODEL_CFG
    export_lora(_Engine(student), tok, tmp_path / "run" / "model", tmp_path / "run" / "adapter", base_dir,
                "bfloat16", cfg)
    merged = load_file(tmp_path / "run" / "model" / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj"
    layer = student.get_submodule(f"base_model.model.{name}")
    w = layer.base_layer.weight.float()
    delta = (layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float()) * layer.scaling["default"]
    got = merged[f"{name}.weight"]
    assert got.dtype == torch.float32
    assert torch.allclose(got, w + delta, rtol=0, atol=1e-6), float((got - (w + delta)).abs().max())
    # the test has teeth: a bf16 merge would have kept fewer than half of the changes
    kept = ((w + delta).bfloat16().float() != w).float().mean()
    assert kept < 0.5, float(kept)
    # the bf16 engine's logits were checked within its measured round-off, both reloads
    check = json.loads((tmp_path / "run" / "export_check.json").read_text())
    assert check["precision_noise"] > 0 and check["tolerance"] >= 3 * check["precision_noise"]
    assert max(check["max_abs_logit_diff"], check["adapter_max_abs_logit_diff"]) <= check["tolerance"]
    # model.peft.merged_dtype=model: model/ in the training dtype (half the disk), the changes rounded
    lossy = OmegaConf.merge(cfg, {"peft": {"merged_dtype": "model"}})
    export_lora(_Engine(student), tok, tmp_path / "run2" / "model", tmp_path / "run2" / "adapter", base_dir,
                "bfloat16", lossy)
    assert load_file(tmp_path / "run2" / "model" / "model.safetensors")[f"{name}.weight"].dtype == torch.bfloat16


def test_an_adapter_on_the_head_saves_the_adapter_alone(tmp_path):
    """With lm_head adapted, peft's save_pretrained also wrote the whole base head (V x H: ~1 GB at a
    128k vocabulary) into every adapter_model.safetensors."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from pipeline.engine.export_peft import export_lora
    from pipeline.models.loading import load_causal_lm
    from pipeline.models.peft_student import wrap_lora

    model_dir, _ = build(tmp_path / "src")
    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    student = _trained_adapters(wrap_lora(load_causal_lm(model_dir),
                                          OmegaConf.merge(PEFT, {"target_modules": ["q_proj", "lm_head"]})), std=1e-2)
    export_lora(_Engine(student), tok, tmp_path / "run" / "model", tmp_path / "run" / "adapter", model_dir,
                "float32", EXPORT_MODEL_CFG)
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert saved and all("lora_A" in k or "lora_B" in k for k in saved), [k for k in saved if "lora_" not in k]
    assert any("lm_head.lora_B" in k for k in saved)
