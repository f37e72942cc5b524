"""ZeRO-3 with every weight partitioned (2 CPU ranks) equals one rank (stage 0: deepspeed.zero_stage=auto
has nothing to partition there), for each method family; activation checkpointing changes nothing;
a 2-rank run killed right after a checkpoint resumes exactly (grad_accum=2, RNA noise on).

Each run passes ``deepspeed.param_persistence_threshold=0`` (tests.helpers.tiny.train_overrides) and
``ASU_REQUIRE_PARTITIONED=1`` (tests.helpers.launch.env): a 2-rank run that kept any student or
teacher weight whole fails, and ``results.json["zero3_partition"]`` is checked here as well. So the
gather paths run on sharded weights: the fused-KL lm_head read, the RMU / asu_wmdp / RNA forward
hooks, the teacher cache built from a sharded teacher, the export (gathered 16-bit save).

Launches (the expensive part on 2 cores): one 1-rank and one 2-rank launch run all the equality
jobs in sequence (tests/helpers/multi_job.py), then one killed and one resumed 2-rank launch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import launch
from tests.helpers.tiny import build, train_overrides

pytestmark = pytest.mark.distributed

STEPS = 3
# name -> method overrides; every job: 3 optimizer steps, same global batch on 1 and 2 ranks.
JOBS = {
    "asu_kl": ["method=asu_kl", "method.tau=2.0"],
    "asu_kl_fused": ["method=asu_kl", "method.tau=2.0", "kernels.kl=fused", "kernels.attention=triton"],
    # fused KL on forget + NLL logits on retain from one head step (its output is a tuple under ZeRO-3's hooks)
    "asu_gd_fused": ["method=asu_gd", "method.tau=2.0", "kernels.kl=fused"],
    "asu_gd_cached": ["method=asu_gd", "method.tau=2.0", "method.teacher=cached", "method.cache_topk=5",
                      "method.retain_loss=nll"],
    "grad_diff": ["method=grad_diff"],
    "simnpo": ["method=simnpo"],
    "npo": ["method=npo"],
    "idk_dpo": ["method=idk_dpo"],
    # RMU trains one module per layer (frozen parameters under ZeRO-3), with RNA's noise hook on a layer below
    "rmu": ["method=rmu", "method.layer=1", "method.rna_noise=0.05", "method.rna_layer=0"],
    "asu_wmdp": ["method=asu_wmdp", "method.layer=1"],
    # student: forget, refusals, retain in one pass; refusals drawn per use (keyed by step and row, not rank)
    "asu_idk": ["method=asu_idk", "method.tau=2.0", "method.idk_draw=per_use"],
    "asu_kl_rna": ["method=asu_kl", "method.tau=2.0", "method.rna_noise=0.05", "method.rna_layer=0"],
    # token_mean KL terms (forget and retain) streamed by the fused kernel: its weights take the step's count
    "asu_kl_fused_token_mean": ["method=asu_kl", "method.tau=2.0", "kernels.kl=fused", "method.reduction=token_mean"],
}
# one rank, 1-row micro-batches x grad_accum=2 -> the 1-rank job of 2-row micro-batches it must equal:
# token_mean terms are one mean over the optimizer step's tokens, however the step is cut
ACCUM = {"grad_diff_accum": "grad_diff", "asu_kl_fused_token_mean_accum": "asu_kl_fused_token_mean"}
# trained by epochs over 5 forget rows at trainer.effective_batch=2: 1 rank x 2 one-row micro-batches vs
# 2 ranks x 1 -> the same 3 optimizer steps per epoch, the same rows in each, and the same RNA noise and
# per-use refusals (keyed by each row's position in the step's draws, not by micro-batch)
EPOCHS = {
    "epochs_grad_diff_rna": ["method=grad_diff", "method.rna_noise=0.05", "method.rna_layer=0"],
    "epochs_idk_dpo_per_use": ["method=idk_dpo", "method.idk_draw=per_use"],
}
BY_EPOCHS = ["data.forget_split=forget5", "data.retain_split=retain3", "trainer.max_steps=-1", "trainer.epochs=2", "trainer.effective_batch=2"]
# activation checkpointing (the MUSE 7B experiments run with it) -> the 2-rank job it must equal: RNA's
# noise hook runs again in the recompute; RMU trains one layer, so no layer input below it needs grad;
# the fused KL reads the head's weight through the root forward, outside the checkpointed layers
CHECKPOINTED = {"asu_kl_rna_ckpt": "asu_kl_rna", "rmu_ckpt": "rmu", "asu_gd_fused_ckpt": "asu_gd_fused"}
# kill-and-resume: accumulation of 2 micro-batches per optimizer step, RNA noise on, a checkpoint every
# 3 optimizer steps (an odd number of steps: had steps counted micro-batches, it would fall mid-accumulation)
RESUME = ["method=asu_kl", "method.tau=2.0", "method.rna_noise=0.05", "method.rna_layer=0",
          "trainer.grad_accum=2", "trainer.save_every=3", "trainer.keep_checkpoints=5"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run every job on 1 rank (global batch 2 per step) and on 2 ranks (1 per rank)."""
    root = tmp_path_factory.mktemp("sharded")
    # answers of different lengths: each rank's micro-batch has its own token count (token_mean terms)
    model_dir, data_dir = build(root, uneven_answers=True)
    rows = [*(data_dir / "forget.jsonl").read_text().splitlines(), *(data_dir / "retain.jsonl").read_text().splitlines()]
    (data_dir / "forget5.jsonl").write_text("\n".join(rows[:5]) + "\n")  # not a multiple of 2 rows per step
    (data_dir / "retain3.jsonl").write_text("\n".join(rows[5:]) + "\n")
    out = {}
    for ranks, per_rank in ((1, 2), (2, 1)):
        def job(name, extra, ranks=ranks, per_rank=per_rank):
            return [name, train_overrides(model_dir, data_dir, root / f"w{ranks}", name, steps=STEPS) + [
                "eval.enabled=false", f"trainer.batch_size={per_rank}", f"trainer.retain_batch_size={per_rank}",
                f"cache_dir={root / f'cache{ranks}'}", *extra]]

        jobs = [job(name, extra) for name, extra in JOBS.items()]
        jobs += [job(name, [*extra, *BY_EPOCHS], per_rank=1) for name, extra in EPOCHS.items()]
        if ranks == 1:
            jobs += [job(name, [*JOBS[same_as], "trainer.grad_accum=2"], per_rank=1) for name, same_as in ACCUM.items()]
        if ranks == 2:
            # the per-group step (one forward per row group and model), partitioned
            jobs.append(job("asu_kl_per_group", [*JOBS["asu_kl"], "trainer.passes=per_group"]))
            jobs += [job(name, [*JOBS[same_as], "deepspeed.activation_checkpointing=true"])
                     for name, same_as in CHECKPOINTED.items()]
            # the uninterrupted reference of the kill-and-resume test rides along
            jobs.append(["resume_full", train_overrides(model_dir, data_dir, root / "w2", "resume_full", steps=6) + [
                "eval.enabled=false", *RESUME]])
        spec = root / f"jobs{ranks}.json"
        spec.write_text(json.dumps(jobs))
        p = launch.run([str(spec)], ranks=ranks, timeout=900, script="tests/helpers/multi_job.py",
                       TRITON_INTERPRET="1")
        assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-4000:])
        out[ranks] = p
    return root, model_dir, data_dir


def _logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return m(input_ids=ids).logits


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def _trained_alike(model_dir: Path, r1: Path, r2: Path) -> tuple[list[dict], list[dict]]:
    """Runs ``r1`` and ``r2`` logged the same losses each step (1e-5) and exported the same weights
    (1e-5), which training moved (> 1e-4: else the comparison proves nothing); their histories."""
    h1 = json.loads((r1 / "train_history.json").read_text())
    h2 = json.loads((r2 / "train_history.json").read_text())
    for a, b in zip(h1, h2):
        for k in ("loss", "forget_loss", "retain_loss"):
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (k, a, b)
    w0, w1, w2 = load_file(str(model_dir / "model.safetensors")), _weights(r1), _weights(r2)
    assert w1.keys() == w2.keys()
    worst = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert worst <= 1e-5, worst
    moved = max((w1[k] - w0[k]).abs().max().item() for k in w1)
    assert moved > 1e-4, "training did not change the weights: the comparison would prove nothing"
    return h1, h2


@pytest.mark.parametrize("name", list(JOBS))
def test_two_sharded_ranks_equal_one_rank(runs, name):
    root, model_dir, _ = runs
    r1, r2 = root / "w1" / name, root / "w2" / name
    res = json.loads((r2 / "results.json").read_text())
    # eval.enabled=false still records the run: results.json with no metrics, no report.md
    assert res["world_size"] == 2 and res["steps"] == STEPS and res["metrics"] == {}
    # deepspeed.zero_stage=auto: ZeRO-3 on 2 ranks; the 1-rank side had nothing to partition (stage 0)
    assert res["zero_stage"] == {"requested": "auto", "resolved": 3, "reason": "2 ranks"}
    assert json.loads((r1 / "results.json").read_text())["zero_stage"]["resolved"] == 0
    assert res["final_train"]["step"] == STEPS and not (r2 / "report.md").exists()
    # every weight of the student (and of the teacher, where one is loaded) was partitioned
    part = res["zero3_partition"]
    for what, s in part.items():
        assert s["params"] > 0 and s["partitioned"] == s["params"] and not s["whole"], (what, s)
        assert s["local_elements"] < s["full_elements"], (what, s)
    # every job with a frozen original loads it (asu_gd_cached: to build its cache); GradDiff and SimNPO have none
    assert ("reference" in part) == (name not in ("grad_diff", "simnpo")), part
    h1, h2 = _trained_alike(model_dir, r1, r2)
    assert [h["step"] for h in h1] == [h["step"] for h in h2] == list(range(1, STEPS + 1))
    if name == "rmu":  # only its update modules moved, gathered from 2 shards into the export
        w0, w2 = load_file(str(model_dir / "model.safetensors")), _weights(r2)
        assert {k for k in w0 if not torch.equal(w0[k], w2[k])} == {"model.layers.0.mlp.down_proj.weight",
                                                                    "model.layers.1.mlp.down_proj.weight"}
    # the export gathered from 2 shards reloads with plain transformers and gives the in-engine logits
    assert json.loads((r2 / "export_check.json").read_text())["max_abs_logit_diff"] <= 1e-5


@pytest.mark.parametrize("name", list(ACCUM))
def test_grad_accum_equals_one_bigger_micro_batch(runs, name):
    """Two 1-row micro-batches per optimizer step train the weights of one 2-row micro-batch: answers of
    different lengths, token_mean terms reduced over the step's tokens (not each micro-batch's)."""
    root, model_dir, _ = runs
    accum, whole = root / "w1" / name, root / "w1" / ACCUM[name]
    assert json.loads((accum / "results.json").read_text())["batch"]["grad_accum"] == 2
    assert "token_mean" in json.loads((accum / "results.json").read_text())["reductions"].values()
    _trained_alike(model_dir, whole, accum)


@pytest.mark.parametrize("name", list(EPOCHS))
def test_epochs_split_into_ranks_or_micro_batches_train_the_same_steps(runs, name):
    """2 epochs over 5 forget rows, 2 rows per optimizer step: 1 rank x grad_accum=2 and 2 ranks x 1 run
    3 steps per epoch (the last one wrapping) on the same rows, with the same RNA noise / refusals."""
    root, model_dir, _ = runs
    r1, r2 = root / "w1" / name, root / "w2" / name
    res1, res2 = (json.loads((r / "results.json").read_text()) for r in (r1, r2))
    assert (res1["batch"]["grad_accum"], res2["batch"]["grad_accum"]) == (2, 1)
    assert res1["steps"] == res2["steps"] == 6
    h1, h2 = _trained_alike(model_dir, r1, r2)
    assert len(h1) == len(h2) == 6


def test_one_pass_step_equals_the_per_group_step_on_two_partitioned_ranks(runs):
    """The joint step (one forward per model) and the per-group step give the same weights."""
    root = runs[0]
    joint, per_group = root / "w2" / "asu_kl", root / "w2" / "asu_kl_per_group"
    assert json.loads((joint / "results.json").read_text())["step_passes"] == "joint"
    assert json.loads((per_group / "results.json").read_text())["step_passes"] == "per_group"
    a, b = _weights(joint), _weights(per_group)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


@pytest.mark.parametrize("name", list(CHECKPOINTED))
def test_activation_checkpointing_trains_the_same_weights_on_two_partitioned_ranks(runs, name):
    """deepspeed.activation_checkpointing=true recomputes every student layer in the backward and ends
    with the weights and losses of the same job without it."""
    root, model_dir, _ = runs
    ckpt, plain = root / "w2" / name, root / "w2" / CHECKPOINTED[name]
    n_layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    assert json.loads((ckpt / "results.json").read_text())["activation_checkpointing"] == {"layers": n_layers}
    assert json.loads((plain / "results.json").read_text())["activation_checkpointing"] == {"layers": 0}
    _trained_alike(model_dir, plain, ckpt)


def test_kill_after_checkpoint_then_resume_is_exact_with_grad_accum_and_rna(runs):
    """2 sharded ranks, grad_accum=2, RNA noise: SIGKILL right after the step-3 checkpoint is
    published, resume, and end with the uninterrupted run's weights (<= 1e-6) and history."""
    root, model_dir, data_dir = runs
    args = train_overrides(model_dir, data_dir, root / "w2", "resume_killed", steps=6) + ["eval.enabled=false",
                                                                                         *RESUME]
    killed = launch.run(args, ranks=2, ASU_INJECT="kill_after_save@3:1")
    assert killed.returncode != 0
    run = root / "w2" / "resume_killed"
    assert (run / "checkpoints" / "latest").read_text() == "step_00000003" and not (run / "model").exists()
    again = launch.run(args, ranks=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "step_00000003" in again.stderr
    full = root / "w2" / "resume_full"
    a, b = _weights(full), _weights(run)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    ha = json.loads((full / "train_history.json").read_text())
    hb = json.loads((run / "train_history.json").read_text())
    assert [h["step"] for h in ha] == [h["step"] for h in hb] == list(range(1, 7))
    for x, y in zip(ha, hb):
        assert abs(x["loss"] - y["loss"]) <= 1e-6, (x, y)


def test_fused_kl_and_triton_attention_match_the_torch_path(runs):
    """kernels.kl=fused + kernels.attention=triton (interpreter on CPU) under sharded ZeRO-3 gives the
    losses and weights of the materialised-logits KL with torch attention."""
    root = runs[0]
    for ranks in (1, 2):
        ref, fus = root / f"w{ranks}" / "asu_kl", root / f"w{ranks}" / "asu_kl_fused"
        res_ref = json.loads((ref / "results.json").read_text())
        assert res_ref["tau"] == 2.0
        # which attention backend ran is recorded: auto -> sdpa on CPU; triton under the interpreter
        assert res_ref["attention_backend"]["requested"] == "auto"
        assert res_ref["attention_backend"]["resolved"] == "sdpa"
        assert set(res_ref["attention_backend"]["ran"]["llama"]) == {"sdpa"}
        fus_backend = json.loads((fus / "results.json").read_text())["attention_backend"]
        assert fus_backend["resolved"] == "triton" and set(fus_backend["ran"]["llama"]) == {"triton"}, fus_backend
        h_ref = json.loads((ref / "train_history.json").read_text())
        h_fus = json.loads((fus / "train_history.json").read_text())
        for a, b in zip(h_ref, h_fus):
            for k in ("loss", "forget_loss", "retain_loss"):
                assert abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(a[k])), (k, a, b)
        assert h_ref[-1]["forget_loss"] > 0  # tau=2 makes the teacher differ: the comparison can fail
        # logits, not raw weights: Adam turns round-off-sized gradients (lm_head rows of unlikely tokens)
        # into lr-sized steps of either sign, so single weights may differ by ~lr where logits agree; measured
        # against how far training moved them (0.39 here, the two paths 3.6e-4 apart)
        ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
        base, lr, lf = (_logits(m, ids) for m in (root / "model", ref / "model", fus / "model"))
        moved = (lr - base).abs().max().item()
        assert moved > 0.05 and (lr - lf).abs().max().item() <= 2e-3 * moved, ((lr - lf).abs().max().item(), moved)


def test_a_run_that_keeps_weights_whole_fails_when_partitioning_is_required(runs):
    """The guard every distributed test relies on: at the default persistence threshold (1e4) every
    tensor of the tiny model stays whole, and with ASU_REQUIRE_PARTITIONED=1 the run stops at set-up."""
    root, model_dir, data_dir = runs
    args = train_overrides(model_dir, data_dir, root / "w2", "whole", steps=1) + [
        "eval.enabled=false", "method=grad_ascent", "deepspeed.param_persistence_threshold=10000"]
    p = launch.run(args, ranks=2)
    assert p.returncode != 0
    assert "ASU_REQUIRE_PARTITIONED=1: 21 of 21 student parameters are not partitioned across 2 ranks" in p.stderr
    assert not (root / "w2" / "whole" / "train_history.json").exists()


def test_partition_stats_counts_a_persistent_parameter_whole_on_every_rank():
    """A parameter under ``param_persistence_threshold`` keeps a shard *and* its whole tensor on every
    rank: it counts as whole, with all its elements held (before: only its shard was counted, so a
    run with nothing partitioned reported holding half the model)."""
    import torch

    from pipeline.engine.sharding import partition_stats

    lin = torch.nn.Linear(4, 4, bias=False)  # 16 elements, "sharded" over 2 ranks: 8 per rank
    emb = torch.nn.Embedding(6, 4)  # 24 elements, 12 per rank
    for p, persist in ((lin.weight, True), (emb.weight, False)):
        p.ds_numel, p.ds_tensor, p.ds_persist = p.numel(), torch.empty(p.numel() // 2), persist
    s = partition_stats(torch.nn.ModuleDict({"lin": lin, "emb": emb}))
    assert s["params"] == 2 and s["partitioned"] == 1 and s["whole"] == ["lin.weight"]
    assert (s["local_elements"], s["full_elements"]) == (16 + 12, 40)
