"""RMU / asu_wmdp stop each model's forward after ``method.layer`` when its hidden state is all the loss
reads (``retain_loss=mse``): same loss and student gradients as the full forward (fp32, 1e-6), with
and without a LoRA student, on 1 rank and on 2 ranks with every ZeRO-3 weight partitioned.

The 2-rank side (torchrun, gloo, CPU) also checks what DeepSpeed's hooks need: after each step no
weight is left gathered, and several early-exit steps in a row keep ZeRO-3's module trace complete
(its recording asserts the same module order on every rank); switching to the full forward and back
(a trace invalidation) changes nothing.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.methods import METHODS, build_method
from pipeline.methods.passes import run_step
from pipeline.models.tempered_attention import enable_tempered_attention
from tests.helpers import launch
from tests.helpers.batches import padded_batch

N_LAYERS, LAYER = 8, 2
PEFT = OmegaConf.create({"enabled": True, "r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": None,
                         "layers": None})
CASES = {  # name -> (method, overrides)
    "rmu": ("rmu", {"layer": LAYER, "steering_coeff": 2.0, "alpha": 3.0}),
    "asu_wmdp": ("asu_wmdp", {"layer": LAYER, "tau": 2.5}),
    # only the layers below the matched one are tempered, one of them below the trained ones
    "asu_wmdp_teacher_layers": ("asu_wmdp", {"layer": LAYER, "tau": 2.5, "teacher_layers": [0, 2, 5]}),
}


def _llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=23, hidden_size=16, intermediate_size=32, num_hidden_layers=N_LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      initializer_range=0.4, pad_token_id=0)
    return enable_tempered_attention(LlamaForCausalLM(cfg))


def _batch(shift: int = 0) -> dict:
    """Forget and retain rows of different lengths (right padding inside each group and across them)."""
    def row(ids, n):
        return [1] + [(t + shift) % 20 + 2 for t in ids], n

    return {"forget": padded_batch([row([5, 6, 2, 7, 8, 9], 3), row([4, 2, 10, 3], 3), row([9, 9, 2, 4, 3], 4)]),
            "retain": padded_batch([row([6, 6, 2, 11, 3], 4), row([9, 2, 12, 7, 8, 4, 5, 3, 13], 3)])}


def _models(lora: bool):
    """(student, frozen): a moved student and its frozen original; a LoRA student's frozen is its own base."""
    from pipeline.models.peft_student import FrozenBaseView, wrap_lora

    base = _llama(0)
    if lora:
        student = wrap_lora(base, PEFT)
        with torch.no_grad():  # lora_B starts at 0: make the adapters change the output
            for n, p in student.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.3, generator=torch.Generator().manual_seed(p.numel()))
        return student.train(), FrozenBaseView(student)
    frozen = copy.deepcopy(base).eval().requires_grad_(False)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return base.train(), frozen


def _method(case: str, **extra):
    name, overrides = CASES[case]
    return build_method(OmegaConf.structured(METHODS.get(name).config_cls(**{**overrides, **extra})))


def _loss(method, student, frozen, batch: dict, stop: bool) -> torch.Tensor:
    """The method's step loss with the early exit on (``stop``) or off (the full forward)."""
    plan = method.plan(batch)
    plan.stop_after_layer = stop
    out = run_step(plan, student, frozen, batch, method.kl_impl, method.joint_pass)
    return method.combine(out, batch).loss


def _layer_calls(model) -> dict[str, list]:
    """Counts of forwards of the last decoder layer, the layer matched and the output head."""
    from pipeline.methods.model_io import decoder_layers, output_head

    calls: dict[str, list] = {"matched": [], "last": [], "head": []}
    layers = decoder_layers(model)
    for key, mod in (("matched", layers[LAYER]), ("last", layers[-1]), ("head", output_head(model))):
        mod.register_forward_hook(lambda *_a, c=calls[key]: c.append(1))
    return calls


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[n] - b[n]).abs().max()) for n in a)


# -- 1 rank, in process --------------------------------------------------------------------------------


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_early_exit_equals_the_full_forward(case, lora):
    results = {}
    for stop in (False, True):
        student, frozen = _models(lora)
        method = _method(case)
        method.select_trainable(student)
        calls = _layer_calls(student)
        loss = _loss(method, student, frozen, _batch(), stop)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        results[stop] = (float(loss.detach()), grads, {k: len(v) for k, v in calls.items()})
    (l_full, g_full, c_full), (l_stop, g_stop, c_stop) = results[False], results[True]
    assert abs(l_stop - l_full) <= 1e-6 * max(1.0, abs(l_full)), (l_stop, l_full)
    assert _max_diff(g_stop, g_full) <= 1e-6, _max_diff(g_stop, g_full)
    assert max(float(g.abs().max()) for g in g_full.values()) > 1e-4  # the gradients are not trivially 0
    # the full forward ran every layer and the head of each pass; the early exit none above the layer
    # (both models for a LoRA student: its frozen view is the same modules)
    passes = 2 if lora else 1
    assert c_full == {"matched": passes, "last": passes, "head": passes}, c_full
    assert c_stop == {"matched": passes, "last": 0, "head": 0}, c_stop


@pytest.mark.parametrize("retain_loss", ["nll", "kl"])
def test_a_retain_loss_on_logits_runs_the_full_student(retain_loss):
    """With an NLL or KL retain term the student's logits are needed: its pass runs every layer (the
    frozen model still stops early when it gives hidden states only: asu_wmdp + nll)."""
    student, frozen = _models(False)
    method = _method("asu_wmdp", retain_loss=retain_loss)
    method.select_trainable(student)
    s_calls, f_calls = _layer_calls(student), _layer_calls(frozen)
    stopped = _loss(method, student, frozen, _batch(), True)
    full = _loss(method, student, frozen, _batch(), False)
    assert float(stopped) == pytest.approx(float(full), rel=1e-6)
    assert len(s_calls["last"]) == 2 and len(s_calls["head"]) == 2  # both steps ran the whole student
    assert len(f_calls["last"]) == (2 if retain_loss == "kl" else 1)  # kl: the reference's logits too


def test_the_log_says_where_the_step_stops(caplog, monkeypatch):
    from pipeline.methods import passes

    monkeypatch.setattr(passes, "_LOGGED", set())  # said once per process: earlier tests may have said it
    student, frozen = _models(False)
    method = _method("rmu")
    method.select_trainable(student)
    with caplog.at_level(logging.INFO, logger="pipeline.methods.passes"):
        _loss(method, student, frozen, _batch(), True)
    assert f"stops after decoder layer {LAYER} (of {N_LAYERS} layers)" in caplog.text
    assert f"layers {LAYER + 1}..{N_LAYERS - 1} and the output head are not run" in caplog.text


def test_the_log_at_the_last_layer_names_only_the_head(caplog, monkeypatch):
    from pipeline.methods import passes

    monkeypatch.setattr(passes, "_LOGGED", set())
    student, _ = _models(False)
    with caplog.at_level(logging.INFO, logger="pipeline.methods.passes"):
        passes._log_stop(student, N_LAYERS - 1)
    assert "so the output head is not run" in caplog.text and "layers" not in caplog.text.split("so ")[-1]


def test_the_model_is_whole_again_after_the_step():
    from pipeline.methods.model_io import decoder_layers, output_head

    student, frozen = _models(False)
    layers, head = decoder_layers(student), output_head(student)
    method = _method("rmu")
    method.select_trainable(student)
    _loss(method, student, frozen, _batch(), True).backward()
    assert decoder_layers(student) is layers and len(layers) == N_LAYERS and output_head(student) is head
    assert student(input_ids=_batch()["forget"]["input_ids"]).logits.shape[-1] == 23


# -- 2 ranks, ZeRO-3 (launched) ----------------------------------------------------------------------

MODES = [False, True, True, True, False, True]  # full, early x3 (trace recorded, then used), full, early


def _zero3_steps(case: str, lora: bool) -> dict:
    """In a launched rank: ``MODES`` steps (lr 0, so every step sees the same weights) on a ZeRO-3 student
    and frozen engine with every weight partitioned; each step's loss and full student gradients."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.utils import safe_get_full_grad

    from pipeline.engine.ds_config import gather_per_layer
    from pipeline.models.peft_student import FrozenBaseView

    student, frozen = _models(lora)
    method = _method(case)
    method.select_trainable(student)
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
    engine = deepspeed.initialize(model=student, model_parameters=[p for p in student.parameters() if p.requires_grad],
                                  config={"train_micro_batch_size_per_gpu": 3, "zero_optimization": zero,
                                          "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
                                          "optimizer": {"type": "AdamW", "params": {"lr": 0.0, "weight_decay": 0.0,
                                                                                    "torch_adam": True}}})[0]
    if lora:
        reference = FrozenBaseView(engine)
    else:
        config = {"train_micro_batch_size_per_gpu": 3, "zero_optimization": zero, "steps_per_print": 10**9}
        # as the pipeline does on CPU ranks: each frozen decoder layer is one ZeRO-3 leaf module
        assert gather_per_layer(frozen, config, cuda=False) == N_LAYERS
        reference = deepspeed.initialize(model=frozen, config=config)[0]
        reference.eval()
    models = [engine.module] + ([] if lora else [reference.module])
    params = [p for m in models for p in m.parameters()]
    partitioned = all(p.ds_tensor.numel() < p.ds_numel for p in params)
    calls = _layer_calls(engine.module)
    coord = engine.optimizer.parameter_offload.get_param_coordinator()
    batch = _batch(shift=int(os.environ["RANK"]))  # each rank its own rows
    steps = []
    for stop in MODES:
        before = {k: len(v) for k, v in calls.items()}
        loss = _loss(method, engine, reference, batch, stop)
        engine.backward(loss)
        grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters() if p.requires_grad}
        engine.step()
        steps.append({"stop": stop, "loss": float(loss.detach()), "grads": {n: g.tolist() for n, g in grads.items()},
                      "gathered": sum(p.ds_status != ZeroParamStatus.NOT_AVAILABLE for p in params),
                      "calls": {k: len(v) - before[k] for k, v in calls.items()},
                      "trace_complete": coord.is_complete_trace()})
    return {"partitioned": partitioned, "steps": steps}


def _zero3_main(out_dir: str) -> None:
    from pipeline.engine.distributed import init_distributed

    init_distributed()  # the pipeline's own: gloo on CPU, without the shm op's JIT build (~30 s)
    rec = {f"{case}-{'lora' if lora else 'full'}": _zero3_steps(case, lora)
           for case in ("rmu", "asu_wmdp") for lora in (False, True)}
    with open(os.path.join(out_dir, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(rec, f)


@pytest.mark.distributed
def test_early_exit_equals_the_full_forward_on_two_partitioned_zero3_ranks(tmp_path):
    cmd = [launch._venv_tool("torchrun"), "--nproc_per_node", "2", "--master_port", str(launch.free_port()),
           "-m", "tests.test_rmu_early_exit", str(tmp_path)]
    p = subprocess.run(cmd, cwd=launch.ROOT, env=launch.env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for name in ranks[0]:
        for rank, rec in enumerate(ranks):
            assert rec[name]["partitioned"], (name, rank)
            steps = rec[name]["steps"]
            full = steps[0]
            g_full = {n: torch.tensor(g) for n, g in full["grads"].items()}
            assert max(float(g.abs().max()) for g in g_full.values()) > 1e-4, name
            for i, s in enumerate(steps):
                assert abs(s["loss"] - full["loss"]) <= 1e-6 * max(1.0, abs(full["loss"])), (name, rank, i, s["loss"])
                worst = _max_diff({n: torch.tensor(g) for n, g in s["grads"].items()}, g_full)
                assert worst <= 1e-6, (name, rank, i, worst)
                # DeepSpeed's hooks released every weight they gathered, early exit or not
                assert s["gathered"] == 0, (name, rank, i, s["gathered"])
                passes = 2 if name.endswith("lora") else 1  # a LoRA student's frozen view: the same layers
                stop = passes * (not s["stop"])
                assert s["calls"] == {"matched": passes, "last": stop, "head": stop}, (name, rank, i, s["calls"])
            if not name.endswith("lora"):  # (a LoRA student's engine alternates two passes: no one trace)
                # three early-exit steps in a row: the trace is recorded (same on both ranks) and then used
                assert steps[3]["trace_complete"], (name, rank)
        # the gradients are the sum over both ranks' rows: the same on each rank
        assert ranks[0][name]["steps"][0]["grads"] == ranks[1][name]["steps"][0]["grads"], name


if __name__ == "__main__":  # a launched rank of the 2-rank test
    _zero3_main(sys.argv[1])
