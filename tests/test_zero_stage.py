"""``deepspeed.zero_stage=auto``: which stage each world size / offload gets, what the DeepSpeed configs
and the memory plan say, and, launched on one rank, that stage 0 trains exactly like ZeRO-3 (the same
AdamW update, skipped NaN steps included), resumes exactly, and refuses a resume under another stage.

(2 ranks, auto -> ZeRO-3: tests/test_sharded_equality.py checks results.json["zero_stage"] there.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from pipeline.config import ConfigError, register_configs, validate
from pipeline.engine.checkpoint import CheckpointError, check_compatible
from pipeline.engine.ds_config import reference_config, student_config
from pipeline.engine.preflight import plan_for_run
from pipeline.engine.zero_stage import choose_zero_stage

ROOT = Path(__file__).resolve().parents[1]


def _compose(overrides=()):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("requested,world,opt,par,stage,reason", [
    ("auto", 1, "none", "none", 0, "1 rank, no offload"),
    ("auto", 2, "none", "none", 3, "2 ranks"),
    ("auto", 1, "cpu", "none", 3, "1 rank, offload_optimizer=cpu: offload needs ZeRO-3 here"),
    ("auto", 1, "none", "cpu", 3, "1 rank, offload_param=cpu: offload needs ZeRO-3 here"),
    (3, 1, "none", "none", 3, "set explicitly"),
    (0, 8, "none", "none", 0, "set explicitly"),
])
def test_auto_resolves_from_world_size_and_offload(requested, world, opt, par, stage, reason):
    c = choose_zero_stage(requested, world, opt, par)
    assert (c.stage, c.reason) == (stage, reason)
    line = c.describe()
    assert line == (f"deepspeed.zero_stage=auto -> {stage} ({reason})" if requested == "auto"
                    else f"deepspeed.zero_stage={stage} (set explicitly)")
    assert c.record() == {"requested": requested, "resolved": stage, "reason": reason}


def test_default_is_auto_and_bad_values_name_the_key():
    cfg = _compose(["+exp=tofu_tiny"])
    assert cfg.deepspeed.zero_stage == "auto"
    validate(cfg)
    for bad in ("4", "two"):
        with pytest.raises(ConfigError, match=r"deepspeed\.zero_stage.*must be auto or 0\.\.3"):
            validate(_compose([f"deepspeed.zero_stage={bad}"]))


def test_student_and_reference_configs_and_memory_plan_follow_the_resolved_stage():
    cfg = _compose(["+exp=tofu_tiny"])
    ds, tr = cfg.deepspeed, cfg.trainer
    for world, stage in ((1, 0), (2, 3)):  # the frozen reference engine follows the student
        s = student_config(ds, tr, False, world_size=world)["zero_optimization"]
        r = reference_config(ds, tr, False, world_size=world)["zero_optimization"]
        assert s["stage"] == r["stage"] == stage
        assert ("stage3_param_persistence_threshold" in r) == (stage == 3)
    with pytest.raises(ValueError, match="needs the world size"):
        student_config(ds, tr, False)  # auto cannot be resolved without it
    # the preflight plans the stage the run will use: nothing gathered and no ZeRO-3 buffers on 1 rank
    one = plan_for_run(cfg, 1, False, None, True, vocab_size=500)
    two = plan_for_run(cfg, 2, False, None, True, vocab_size=500, local_world_size=2)
    assert not any("ZeRO-3" in k or "reduce buffers" in k for k in one.per_gpu), one.per_gpu
    assert "gathered parameters (ZeRO-3 live set)" in two.per_gpu and "gradient reduce buffers" in two.per_gpu
    assert one.per_gpu["student params"] == 2 * two.per_gpu["student params"]  # whole vs half a model


def test_layers_become_one_fetch_only_where_deepspeed_can_reduce_them():
    """ds_config.gather_per_layer: CPU ZeRO-3 only; a model with trainable weights only when all of them
    train, without checkpointing, one forward per backward (otherwise DeepSpeed's leaf hooks release a
    layer's weights before its backward, or reduce its gradients twice)."""
    from deepspeed.utils import z3_leaf_module
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.engine.ds_config import gather_per_layer

    z3, z0 = {"zero_optimization": {"stage": 3}}, {"zero_optimization": {"stage": 0}}

    def model(frozen: str = ""):
        m = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=1))
        for name, p in m.named_parameters():
            p.requires_grad_(not (frozen == "all" or (frozen and frozen in name)))
        return m

    def marked(m):
        return [z3_leaf_module(layer) for layer in m.model.layers]

    m = model()
    assert gather_per_layer(m, z3, cuda=False) == 3 and marked(m) == [True] * 3
    m = model("all")  # the frozen model: no backward
    assert gather_per_layer(m, z3, cuda=False, joint_pass=False) == 3 and marked(m) == [True] * 3
    for m, kwargs in ((model("layers.1.mlp"), {}),  # partly frozen (as under RMU or LoRA)
                      (model("embed_tokens"), {}),  # layer 0's input needs no gradient
                      (model(), {"checkpointing": True}),
                      (model(), {"joint_pass": False})):  # trainer.passes=per_group
        assert gather_per_layer(m, z3, cuda=False, **kwargs) == 0 and marked(m) == [False] * 3, kwargs
    for config, cuda in ((z3, True), (z0, False)):  # GPUs keep DeepSpeed's per-module fetches
        m = model()
        assert gather_per_layer(m, config, cuda=cuda) == 0 and marked(m) == [False] * 3


def test_resume_under_another_stage_is_refused_and_old_checkpoints_read_as_zero3():
    meta = {"model": "m", "world_size": 1, "zero_stage": 0}
    check_compatible({**meta, "step": 3}, meta, Path("ck"))
    with pytest.raises(CheckpointError, match=r"zero_stage: checkpoint=0 now=3\)\. To resume it, set "
                                              r"deepspeed\.zero_stage=0\."):
        check_compatible(meta, {**meta, "zero_stage": 3}, Path("ck"))
    old = {"model": "m", "world_size": 1}  # written before the stage was recorded: every run was ZeRO-3
    check_compatible(old, {**old, "zero_stage": 3}, Path("ck"))
    with pytest.raises(CheckpointError, match=r"zero_stage: checkpoint=3 now=0"):
        check_compatible(old, {**old, "zero_stage": 0}, Path("ck"))
    # another number of ranks (a requeue on other GPUs): the message says how many to launch
    two = {"model": "m", "world_size": 2, "zero_stage": 3}
    with pytest.raises(CheckpointError, match=r"world_size: checkpoint=2 now=1; zero_stage: checkpoint=3 now=0\)\. "
                                              r"It was written by 2 ranks .*: to resume it, launch 2 ranks\."):
        check_compatible(two, {**two, "world_size": 1, "zero_stage": 0}, Path("ck"))


# -- launched: 1 rank, auto (stage 0) vs explicit ZeRO-3 ----------------------------------------------

INJECT = "nan_loss@2,nan_grad@4"  # a non-finite loss (step 2) and non-finite gradients (step 4): skipped


def _stage0_state(ckpt: Path) -> dict:
    """Weights, Adam's moments and step and the LR schedule of a stage-0 checkpoint (one file)."""
    sd = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    adam = sd["optimizer"]["state"]
    out = {f"w.{k}": v for k, v in sd["module"].items()}
    for i, s in adam.items():
        out.update({f"m.{i}": s["exp_avg"], f"v.{i}": s["exp_avg_sq"], f"t.{i}": torch.as_tensor(s["step"])})
    out["lr"] = torch.tensor(sd["lr_scheduler"]["_last_lr"])
    out["epoch"] = torch.tensor(sd["lr_scheduler"]["last_epoch"])
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tests.helpers import launch
    from tests.helpers.tiny import build, train_overrides

    root = tmp_path_factory.mktemp("zero_stage")
    model_dir, data_dir = build(root)

    def args(name, *extra):
        return train_overrides(model_dir, data_dir, root / "runs", name, steps=6) + [
            "method=asu_kl", "method.tau=2.0", "trainer.batch_size=2", "trainer.retain_batch_size=2",
            "trainer.nan_policy=skip", "trainer.save_every=1", "trainer.keep_checkpoints=10",
            "trainer.lr_scheduler=linear", "eval.enabled=false", *extra]

    jobs = [["auto", args("auto")], ["zero3", args("zero3", "deepspeed.zero_stage=3")],
            # bf16 (CPU bf16 here; the GPU default): DeepSpeed's stage-0 mixed-precision optimizer differs
            # from ZeRO-3's unless prepare_stage0_engine undoes its start-up step
            ["bf16_auto", args("bf16_auto", "deepspeed.precision=bf16")],
            ["bf16_zero3", args("bf16_zero3", "deepspeed.precision=bf16", "deepspeed.zero_stage=3")]]
    spec = root / "jobs.json"
    spec.write_text(json.dumps(jobs))
    both = launch.run([str(spec)], script="tests/helpers/multi_job.py", ASU_INJECT=INJECT)
    assert both.returncode == 0, both.stderr[-3000:]
    # resume the stage-0 run from its step-3 checkpoint into a new run: must end where the first one did
    ck3 = root / "runs" / "auto" / "checkpoints" / "step_00000003"
    # another run's checkpoint: pickles this run did not write, loaded only when trusted
    resumed = launch.run(args("resumed", f"trainer.resume={ck3}", "model.allow_pickle=true"), ASU_INJECT=INJECT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the same checkpoint under ZeRO-3: refused before training, one line, exit 2
    other = launch.run(args("other_stage", f"trainer.resume={ck3}", "model.allow_pickle=true", "deepspeed.zero_stage=3"))
    return root, both, resumed, other


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "model" / "model.safetensors"))


@pytest.mark.distributed
def test_one_rank_auto_runs_stage_0_with_zero3s_update_and_skips(runs):
    root, _, resumed, other = runs
    assert "deepspeed.zero_stage=auto -> 0 (1 rank, no offload)" in resumed.stderr  # the log says what ran
    # refused before any model is loaded (the checkpoint meta is compared first)
    assert "To resume it, set deepspeed.zero_stage=0." in other.stderr and "weights loaded" not in other.stderr
    auto = json.loads((root / "runs" / "auto" / "results.json").read_text())
    z3 = json.loads((root / "runs" / "zero3" / "results.json").read_text())
    assert auto["zero_stage"] == {"requested": "auto", "resolved": 0, "reason": "1 rank, no offload"}
    assert z3["zero_stage"] == {"requested": 3, "resolved": 3, "reason": "set explicitly"}
    assert auto["skipped_steps"] == z3["skipped_steps"] == [2, 4]
    # the training loop's time, and each recorded step's own
    h0 = json.loads((root / "runs" / "auto" / "train_history.json").read_text())
    h3 = json.loads((root / "runs" / "zero3" / "train_history.json").read_text())
    assert [h["step"] for h in h0] == [h["step"] for h in h3] == [1, 3, 5, 6]
    assert all(h["step_seconds"] > 0 for h in h0)
    assert 0 < sum(h["step_seconds"] for h in h0) <= auto["train_seconds"] < auto["job_seconds"]
    for a, b in zip(h0, h3):
        for k in ("loss", "forget_loss", "retain_loss", "lr"):
            assert abs(a[k] - b[k]) <= 1e-6 * max(1.0, abs(a[k])), (k, a, b)
    # same AdamW (torch's), same clipping, same schedule: the same weights after 4 updates and 2 skips
    w0, w3, init = _weights(root / "runs" / "auto"), _weights(root / "runs" / "zero3"), _weights(root)
    assert max((w0[k] - w3[k]).abs().max().item() for k in w0) <= 1e-6
    assert max((w0[k] - init[k]).abs().max().item() for k in w0) > 1e-3  # trained: the comparison can fail
    # stage 0's skip path: weights, Adam moments and step, LR schedule unchanged by a skipped step
    ck = root / "runs" / "auto" / "checkpoints"
    s = {i: _stage0_state(ck / f"step_{i:08d}") for i in range(1, 6)}
    for before, skipped in ((1, 2), (3, 4)):
        assert all(torch.equal(s[before][k], s[skipped][k]) for k in s[before]), skipped
    for before, stepped in ((2, 3), (4, 5)):
        for k in ("w.model.layers.0.mlp.up_proj.weight", "m.3", "v.3", "t.3", "lr", "epoch"):
            assert not torch.equal(s[before][k], s[stepped][k]), (stepped, k)


@pytest.mark.distributed
def test_bf16_stage_0_steps_exactly_like_zero3(runs):
    """bf16: stage 0 keeps fp32 master weights in DeepSpeed's FP16_UnfusedOptimizer, which takes one
    optimizer step on zero gradients when built (Adam's first real update would be ~0.74x ZeRO-3's);
    with that undone (pipeline/engine/zero_stage.py) the trajectories and exported weights are equal."""
    root = runs[0]
    res = {n: json.loads((root / "runs" / n / "results.json").read_text()) for n in ("bf16_auto", "bf16_zero3")}
    assert [r["zero_stage"]["resolved"] for r in res.values()] == [0, 3]
    assert res["bf16_auto"]["skipped_steps"] == res["bf16_zero3"]["skipped_steps"] == [2, 4]
    h0, h3 = (json.loads((root / "runs" / n / "train_history.json").read_text()) for n in ("bf16_auto", "bf16_zero3"))
    assert [(h["step"], h["loss"]) for h in h0] == [(h["step"], h["loss"]) for h in h3]
    w0, w3, init = _weights(root / "runs" / "bf16_auto"), _weights(root / "runs" / "bf16_zero3"), _weights(root)
    assert next(iter(w0.values())).dtype == torch.bfloat16
    assert max((w0[k].float() - w3[k].float()).abs().max().item() for k in w0) <= 1e-6
    assert max((w0[k].float() - init[k]).abs().max().item() for k in w0) > 1e-3


@pytest.mark.distributed
def test_stage_0_resume_is_exact_and_another_stage_is_refused(runs):
    root, _, resumed, other = runs
    assert "resumed from" in resumed.stderr and "step_00000003" in resumed.stderr
    a, b = _weights(root / "runs" / "auto"), _weights(root / "runs" / "resumed")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-7
    ha = json.loads((root / "runs" / "auto" / "train_history.json").read_text())
    hb = json.loads((root / "runs" / "resumed" / "train_history.json").read_text())
    assert [(h["step"], h["loss"]) for h in ha] == [(h["step"], h["loss"]) for h in hb]
    assert other.returncode == 2, other.stderr[-2000:]
    assert "zero_stage: checkpoint=0 now=3). To resume it, set deepspeed.zero_stage=0." in other.stderr
    assert "Traceback" not in other.stderr and not (root / "runs" / "other_stage" / "model").exists()
