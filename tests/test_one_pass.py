"""The one-pass step (pipeline/methods/passes.py) equals the per-group step for every method: same
loss, same student gradients (fp32, 1e-5), on one fixed batch whose groups have different lengths
and padding; and its passes are really one per model (counted with forward hooks).

The per-group step (``trainer.passes=per_group``: one forward per row group and model) is the step
structure from before the joint pass; its losses are tied to hand-written formulas by
tests/test_loss_formulas.py. The 2-rank (partitioned) side is tests/test_sharded_equality.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.methods import METHODS, build_method
from pipeline.methods.idk_dpo import IDK_VIEW
from pipeline.methods.passes import KLTerm, StepPlan, join, run_step
from pipeline.models.tempered_attention import enable_tempered_attention
from tests.helpers.batches import padded_batch

PAD = 0
V = 17


def _llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32, initializer_range=0.4, pad_token_id=PAD)
    return enable_tempered_attention(LlamaForCausalLM(cfg))


def _batch(rows: list[tuple[list[int], int]], index0: int = 0) -> dict:
    return padded_batch(rows, PAD, index0)


def _step_batch(forget_longest: bool = False) -> dict:
    # three groups, three padded lengths (7, 10, 6), answers of different lengths; forget_longest:
    # (11, 6, 6), so that a model pass over the forget rows is longer than one over the retain rows
    forget = [([1, 5, 6, 2, 7, 8, 9], 3), ([1, 4, 2, 10, 3], 3), ([1, 9, 9, 2, 4, 3], 4)]
    retain = [([1, 6, 6, 2, 11, 3], 4), ([1, 9, 2, 12, 7, 8, 4, 5, 3, 13], 3)]
    if forget_longest:
        forget[0] = ([1, 5, 6, 2, 7, 8, 9, 12, 13, 4, 3], 3)
        retain[1] = ([1, 9, 2, 12, 7, 8], 3)
    return {
        "forget": _batch(forget),
        "retain": _batch(retain, 10),
        IDK_VIEW: _batch([([1, 5, 6, 2, 14, 15], 3), ([1, 4, 2, 16, 3], 3), ([1, 9, 9, 2, 14], 4)]),
    }


def _cache_rows(teacher, forget: dict, tau: float, topk: int) -> dict:
    """Cached-teacher rows at the forget loss positions, built from the teacher directly."""
    from pipeline.methods.model_io import shifted_mask
    from pipeline.models.tempered_attention import temperature

    with torch.no_grad(), temperature(teacher, tau):
        lp = torch.log_softmax(teacher(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"]).logits
                               [:, :-1].float(), -1)[shifted_mask(forget["labels"])]
    if not topk:
        return {"logprobs": lp}
    top, ids = lp.topk(topk, -1)
    return {"logprobs": top, "ids": ids, "tail": torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6))}


# name -> (method, overrides, kl_impl)
CASES = {
    "grad_ascent": ("grad_ascent", {}, "naive"),
    "grad_diff": ("grad_diff", {}, "naive"),
    "grad_diff_kl": ("grad_diff", {"retain_loss": "kl", "alpha": 0.7}, "naive"),
    "npo": ("npo", {}, "naive"),
    "simnpo": ("simnpo", {"delta": 0.3}, "naive"),
    "idk_dpo": ("idk_dpo", {}, "naive"),
    "asu_kl": ("asu_kl", {"tau": 2.3}, "naive"),
    "asu_kl_fused": ("asu_kl", {"tau": 2.3}, "fused"),
    "asu_kl_layers": ("asu_kl", {"tau": 3.0, "teacher_layers": [0, 2]}, "naive"),
    "asu_gd": ("asu_gd", {"tau": 2.3}, "naive"),
    "asu_gd_fused": ("asu_gd", {"tau": 2.3}, "fused"),
    "asu_gd_cached": ("asu_gd", {"tau": 2.3, "teacher": "cached"}, "naive"),
    "asu_gd_cached_fused": ("asu_gd", {"tau": 2.3, "teacher": "cached"}, "fused"),
    "asu_gd_cached_topk": ("asu_gd", {"tau": 2.3, "teacher": "cached", "cache_topk": 4}, "naive"),
    "asu_idk": ("asu_idk", {"tau": 2.0}, "naive"),
    "asu_idk_fused": ("asu_idk", {"tau": 2.0}, "fused"),
    "asu_kl_rna": ("asu_kl", {"tau": 2.3, "rna_noise": 0.3, "rna_layer": 1}, "naive"),
    "rmu": ("rmu", {"layer": 1, "steering_coeff": 2.0}, "naive"),
    "asu_wmdp": ("asu_wmdp", {"layer": 1, "tau": 2.5}, "naive"),
    # hidden-state terms whose student pass (all groups) is longer than the frozen pass (one group)
    "asu_wmdp_nll": ("asu_wmdp", {"layer": 1, "tau": 2.5, "retain_loss": "nll"}, "naive"),
    "rmu_forget_longest": ("rmu", {"layer": 1, "steering_coeff": 2.0}, "naive"),
}
FORGET_LONGEST = {"rmu_forget_longest"}  # these run on _step_batch(forget_longest=True)


def _method(name: str, overrides: dict, kl_impl: str, joint: bool):
    cfg = OmegaConf.structured(METHODS.get(name).config_cls(**overrides))
    return build_method(cfg, kl_impl=kl_impl, joint_pass=joint)


def _loss_and_grads(case: str, joint: bool, dtype: torch.dtype = torch.float32):
    name, overrides, kl_impl = CASES[case]
    student = _llama(0).to(dtype).train()
    reference = copy.deepcopy(student).eval().requires_grad_(False)
    with torch.no_grad():  # the student has moved away from the reference
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    method = _method(name, overrides, kl_impl, joint)
    method.select_trainable(student)
    batch = _step_batch(forget_longest=case in FORGET_LONGEST)
    if overrides.get("rna_noise"):
        batch["retain"]["rna_seed"] = torch.tensor([11, 12])
    if overrides.get("teacher") == "cached":
        batch["forget_teacher"] = _cache_rows(reference, batch["forget"], overrides["tau"],
                                              overrides.get("cache_topk", 0))
    out = method.compute_loss(student, reference, batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return out, grads


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[n].double() - b[n].double()).abs().max()) for n in a)


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_pass_step_equals_the_per_group_step(case):
    joint, g_joint = _loss_and_grads(case, joint=True)
    split, g_split = _loss_and_grads(case, joint=False)
    assert torch.isfinite(joint.loss)
    for key in split.logs:
        assert joint.logs[key] == pytest.approx(split.logs[key], rel=1e-5, abs=1e-6), key
    worst = _max_diff(g_joint, g_split)
    scale = max(float(g.abs().max()) for g in g_split.values())
    # fp32 cannot do better than its own round-off: the per-group step's distance from the same step in
    # float64. With the IdkDPO-style log-ratios (differences of summed sequence log-probs) that reaches
    # 1e-5 x max|grad| on some hosts (asu_idk: 1.85e-5 of 1.91 on an AMD EPYC, where the two steps differ
    # by 2.0e-5); the float64 test below shows the math is the same.
    _, g_exact = _loss_and_grads(case, joint=False, dtype=torch.float64)
    assert worst <= max(1e-5 * max(1.0, scale), 2 * _max_diff(g_split, g_exact)), (case, worst, scale)
    # the loss is not trivially zero: both terms moved the gradient
    assert scale > 1e-6


@pytest.mark.parametrize("case", sorted(CASES))
def test_in_float64_the_one_pass_step_equals_the_per_group_step(case):
    """The same model and batch in float64: the steps agree to 1e-6 x max|grad| (most methods to
    ~1e-16; up to ~2e-7 where a loss upcasts with ``.float()``, which in a float64 run rounds to fp32)."""
    _, g_joint = _loss_and_grads(case, joint=True, dtype=torch.float64)
    _, g_split = _loss_and_grads(case, joint=False, dtype=torch.float64)
    assert next(iter(g_split.values())).dtype == torch.float64
    scale = max(float(g.abs().max()) for g in g_split.values())
    assert _max_diff(g_joint, g_split) <= 1e-6 * max(1.0, scale), case


def _count_forwards(model) -> list:
    calls: list = []
    model.model.register_forward_hook(lambda m, i, o: calls.append(1))
    return calls


@pytest.mark.parametrize("joint,student_calls,frozen_calls", [(True, 1, 1), (False, 3, 2)])
def test_asu_idk_runs_one_forward_per_model(joint, student_calls, frozen_calls):
    """asu_idk with a retain KL needs forget + idk + retain rows from the student and forget (at tau)
    + retain (at 1) from the frozen model: one forward each in the joint step."""
    student = _llama(0).train()
    reference = copy.deepcopy(student).eval().requires_grad_(False)
    s_calls, f_calls = _count_forwards(student), _count_forwards(reference)
    method = _method("asu_idk", {"tau": 2.0, "retain_loss": "kl"}, "naive", joint)
    method.compute_loss(student, reference, _step_batch()).loss.backward()
    assert (len(s_calls), len(f_calls)) == (student_calls, frozen_calls)


def test_frozen_pass_runs_each_row_at_its_own_temperature():
    """One frozen forward over rows at tau = 3 and tau = 1 gives each row what a pass at its own tau gives."""
    model = _llama(1).eval()
    batch = _step_batch()
    plan = StepPlan(teacher_layers=[1, 2])
    plan.need_frozen("forget", "logits", 3.0).need_frozen("retain", "logits", 1.0)
    joint = run_step(plan, model, model, batch).frozen
    for group, tau in (("forget", 3.0), ("retain", 1.0)):
        alone = StepPlan(teacher_layers=[1, 2]).need_frozen(group, "logits", tau)
        ref = run_step(alone, model, model, {group: batch[group]}).frozen[group]
        assert torch.allclose(joint[group].logits, ref.logits, atol=1e-5)
    # and tau matters: the forget rows at 1 differ
    plain = run_step(StepPlan().need_frozen("forget", "logits", 1.0), model, model, batch).frozen["forget"]
    assert (plain.logits - joint["forget"].logits).abs().max() > 1e-3


def test_head_runs_at_the_loss_positions_only():
    """The output head computes one row per loss position of the groups that need logits, not B x T."""
    model = _llama(2).eval()
    batch = _step_batch()
    seen: list = []
    model.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    plan = StepPlan().need_student("forget", "logits").need_student("retain", "logits")
    out = run_step(plan, model, None, batch)
    n_loss = sum(int((batch[g]["labels"][:, 1:] != -100).sum()) for g in ("forget", "retain"))
    assert seen == [(n_loss, V)]
    assert out.student["forget"].logits.shape == (int((batch["forget"]["labels"][:, 1:] != -100).sum()), V)
    # equals the model's own logits at those positions
    full = model(input_ids=batch["forget"]["input_ids"], attention_mask=batch["forget"]["attention_mask"]).logits
    mask = batch["forget"]["labels"][:, 1:] != -100
    assert torch.allclose(out.student["forget"].logits, full[:, :-1][mask], atol=1e-5)


def test_join_pads_right_and_keeps_group_rows():
    batch = _step_batch()
    joint, rows = join(batch, ["forget", "retain"])
    assert joint["input_ids"].shape == (5, 10)
    assert rows == {"forget": slice(0, 3), "retain": slice(3, 5)}
    assert bool((joint["labels"][:3, 7:] == -100).all()) and int(joint["attention_mask"][:3, 7:].sum()) == 0


def test_plan_refuses_one_group_at_two_temperatures():
    plan = StepPlan().need_frozen("forget", "logits", 2.0)
    with pytest.raises(ValueError, match="two temperatures"):
        plan.need_frozen("forget", "hidden", 1.0)
    with pytest.raises(ValueError, match="two KL terms"):
        plan.need_kl("retain", KLTerm()).need_kl("retain", KLTerm())


@pytest.mark.parametrize("arch", ["llama", "gemma2", "granite", "gpt_neox", "qwen3", "gpt_oss"])
def test_loss_position_logits_equal_the_models_own_logits_across_architectures(arch):
    """The head narrowed to the loss positions keeps each architecture's logit post-processing
    (Gemma-2's final soft-cap, Granite's scaling); the fused KL refuses such models and equals the
    naive KL on the others."""
    from tests.test_attention_backends import _build

    model = _build(arch)
    if arch == "gemma2":
        model.config.final_logit_softcapping = 2.0
    if arch == "granite":
        model.config.logits_scaling = 4.0
    enable_tempered_attention(model)
    batch = {"forget": _batch([([5, 6, 7, 8, 9, 10, 11], 3), ([5, 9, 12, 13], 2), ([4, 4, 20, 21, 22, 23, 30, 31], 5)])}
    with torch.no_grad():
        out = run_step(StepPlan().need_student("forget", "logits"), model, None, batch)
        full = model(input_ids=batch["forget"]["input_ids"], attention_mask=batch["forget"]["attention_mask"]).logits
    mask = batch["forget"]["labels"][:, 1:] != -100
    assert torch.allclose(out.student["forget"].logits, full[:, :-1][mask], atol=1e-5)
    teacher = copy.deepcopy(model)
    plan = StepPlan().need_kl("forget", KLTerm(tau=2.0))
    if arch in ("gemma2", "granite"):
        with pytest.raises(ValueError, match="post-processes its logits"):
            run_step(plan, model, teacher, batch, kl_impl="fused")
        return
    naive = run_step(plan, model, teacher, batch).kl["forget"]
    fused = run_step(plan, model, teacher, batch, kl_impl="fused").kl["forget"]
    assert float(naive) > 1e-4 and float(fused) == pytest.approx(float(naive), rel=1e-4)
