"""kernels.kl=fused under a real DeepSpeed ZeRO-3 engine keeps DeepSpeed's per-pass bookkeeping.

The fused KL needs the final-norm hidden states, not logits. Both the student's and the frozen
model's pass must still go through the *root* module's forward: ZeRO-3's root forward pre-hook
(``_start_of_forward_hook``) resets the parameter coordinator's step, without which its module trace
never completes and DeepSpeed never prefetches (GPUs). Calling the inner decoder directly skipped it.

One 1-rank ZeRO-3 process (gloo, CPU, every weight partitioned): a student engine and a frozen engine,
3 asu_kl steps with the fused KL (tempered forget rows and τ = 1 retain rows in one frozen pass).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import launch

pytestmark = pytest.mark.distributed

STEPS = 3


def _coordinator(engine):
    """The ZeRO-3 parameter coordinator of a DeepSpeed engine (with or without an optimizer)."""
    offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)
    return offload.get_param_coordinator()


def _fused_steps_under_zero3() -> dict:
    """Runs in the child process: what the coordinators saw over ``STEPS`` fused training steps."""
    import copy

    import deepspeed
    import torch
    from omegaconf import OmegaConf
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.engine.distributed import init_distributed
    from pipeline.methods import METHODS, build_method
    from pipeline.models.tempered_attention import enable_tempered_attention
    from tests.helpers.batches import padded_batch

    init_distributed()  # the pipeline's own: gloo on CPU, without the shm op's JIT build (~30 s)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=23, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32, initializer_range=0.4, pad_token_id=0)
    student = enable_tempered_attention(LlamaForCausalLM(cfg))
    frozen = copy.deepcopy(student).requires_grad_(False)
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
    engine = deepspeed.initialize(model=student, model_parameters=list(student.parameters()), config={
        "train_micro_batch_size_per_gpu": 2, "zero_optimization": zero, "zero_allow_untested_optimizer": True,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}, "steps_per_print": 10**9})[0]
    reference = deepspeed.initialize(model=frozen, config={
        "train_micro_batch_size_per_gpu": 2, "zero_optimization": zero, "steps_per_print": 10**9})[0]
    reference.eval()
    resets = {}
    for name, eng in (("student", engine), ("frozen", reference)):
        coord, calls = _coordinator(eng), []
        original = coord.reset_step
        coord.reset_step = lambda original=original, calls=calls: (calls.append(1), original())[1]
        resets[name] = calls
    mcfg = OmegaConf.structured(METHODS.get("asu_kl").config_cls(tau=2.5))
    method = build_method(mcfg, kl_impl="fused")
    batch = {"forget": padded_batch([([1, 5, 6, 2, 7, 8, 9], 3), ([1, 4, 2, 10, 3], 3)]),
             "retain": padded_batch([([1, 6, 6, 2, 11, 3], 4), ([1, 9, 2, 12, 7, 8, 4, 5, 3, 13], 3)])}
    per_step, losses = [], []
    for _ in range(STEPS):
        before = {k: len(v) for k, v in resets.items()}
        out = method.compute_loss(engine, reference, batch)
        engine.backward(out.loss)
        engine.step()
        per_step.append({k: len(v) - before[k] for k, v in resets.items()})
        losses.append(float(out.loss.detach()))
    return {"per_step": per_step, "losses": losses,
            "complete": {"student": _coordinator(engine).is_complete_trace(),
                         "frozen": _coordinator(reference).is_complete_trace()}}


def test_fused_kl_passes_run_zero3_root_forward_hooks_every_step(tmp_path):
    """Each fused step runs each engine's root forward once (its coordinator reset once), so after
    3 steps both ZeRO-3 module traces are complete (what DeepSpeed's prefetching needs)."""
    out = tmp_path / "trace.json"
    code = ("import json, sys; from tests.test_fused_zero3_trace import _fused_steps_under_zero3 as f; "
            f"open({str(out)!r}, 'w').write(json.dumps(f()))")
    p = subprocess.run([sys.executable, "-c", code], cwd=launch.ROOT, capture_output=True, text=True, timeout=300,
                       env=launch.env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT=str(launch.free_port())))
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["per_step"] == [{"student": 1, "frozen": 1}] * STEPS, rec
    assert rec["complete"] == {"student": True, "frozen": True}, rec
    # the steps trained for real (a finite loss that moves)
    assert all(x == x for x in rec["losses"]) and rec["losses"][0] != rec["losses"][-1], rec
