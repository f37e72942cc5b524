"""The tempered-attention probe: ASU's tau must provably reach every attention layer it tempers.

transformers reports ``attn_implementation="tempered"`` from a heuristic on the modeling source, so a
model whose attention code ignores the configured function (remote code; a subclass that hard-codes
eager or sdpa) was reported pluggable while tau never reached it: ASU then distilled from an
untempered teacher (KL ≈ 0, no unlearning) without a word. The probe (a 3-token forward that records
which attention modules call the "tempered" function) refuses it, naming the layers; stock models pass,
also with their weights partitioned by ZeRO-3's ``zero.Init`` (2 ranks, before any engine exists).
"""

from __future__ import annotations

import json
import logging
import sys
import types
from pathlib import Path

import pytest
import torch
import transformers

from pipeline.models.tempered_attention import (
    PLUGGABLE_ATTR,
    attention_modules,
    enable_tempered_attention,
    get_temperatures,
    probe_tempered_attention,
    set_temperature,
    tempered_attention_problem,
)
from tests.helpers import launch


def _llama(layers: int = 3, **kw):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3, **kw)).eval()


def _qwen2(layers: int = 3):
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).eval()


def hard_eager_forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                       **kwargs):
    """LlamaAttention.forward with eager attention hard-coded (as remote code or a subclass might)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

    shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    q, k, v = (p(hidden_states).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
    q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
    out, weights = eager_attention_forward(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling)
    return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


def _hard_code_eager(model, layer: int):
    attn = model.model.layers[layer].self_attn
    attn.forward = types.MethodType(hard_eager_forward, attn)
    return model


@pytest.mark.parametrize("build", [_llama, _qwen2], ids=["llama", "qwen2"])
def test_stock_models_pass_the_probe_and_log_one_line(build, caplog):
    m = enable_tempered_attention(build())
    with caplog.at_level(logging.INFO, logger="pipeline.models.tempered_attention"):
        assert tempered_attention_problem(m) is None
    lines = [r.getMessage() for r in caplog.records if "probe passed" in r.getMessage()]
    assert len(lines) == 1 and "attention layers 0-2 (3 of 3)" in lines[0], lines
    assert probe_tempered_attention(m) == []
    assert get_temperatures(m) == [1.0, 1.0, 1.0]  # the probe runs at tau = 1 and changes none
    set_temperature(m, 2.0)  # still allowed


def test_a_layer_whose_attention_ignores_the_interface_refuses_asu_naming_it():
    """Layer 1 hard-codes eager attention: transformers still reports "tempered", and before the probe
    a tau of 2 was set on it and read by nothing."""
    m = _hard_code_eager(enable_tempered_attention(_llama()), 1)
    assert m.config._attn_implementation == "tempered"  # what the old check trusted
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the defect itself: tau on layer 1 changes nothing
        plain = m(input_ids=ids).logits
        set_temperature(m, 50.0, layers=[1])
        assert torch.equal(m(input_ids=ids).logits, plain)
        set_temperature(m, 1.0)

    problem = tempered_attention_problem(m)
    assert problem is not None and problem.startswith("LlamaForCausalLM: attention layer(s) 1 of 3 never called"), problem
    assert "tau would be ignored" in problem and "\n" not in problem
    with pytest.raises(ValueError, match=r"attention layer\(s\) 1 of 3 never called"):
        set_temperature(m, 2.0)  # the per-step guard now knows too
    with pytest.raises(ValueError, match=r"attention layer\(s\) 1 of 3"):
        set_temperature(m, 2.0, layers=[1, 2])
    # teacher_layers without the bypassing layer: the tau reaches every tempered layer
    assert tempered_attention_problem(m, layers=[0, 2]) is None
    set_temperature(m, 2.0, layers=[0, 2])
    assert probe_tempered_attention(m) == [1]


def test_several_layers_are_named_as_ranges():
    m = enable_tempered_attention(_llama(layers=5))
    for i in (0, 1, 2, 4):
        _hard_code_eager(m, i)
    assert "attention layer(s) 0-2, 4 of 5 never called" in tempered_attention_problem(m)
    _hard_code_eager(m, 3)  # every layer: still named (the model did report "tempered")
    assert "attention layer(s) 0-4 of 5 never called" in tempered_attention_problem(m)
    with pytest.raises(ValueError, match=r"attention layer\(s\) 0-4 of 5"):
        set_temperature(m, 2.0)


def test_a_model_that_cannot_run_the_probe_is_refused_in_one_line():
    m = enable_tempered_attention(_llama())

    def broken(self, *a, **k):
        raise RuntimeError("boom\nsecond line")

    m.model.layers[2].mlp.forward = types.MethodType(broken, m.model.layers[2].mlp)
    problem = tempered_attention_problem(m)
    assert problem.endswith("failed: RuntimeError: boom"), problem


# --- remote code: the realistic case, through the CLI (one line, exit 2, before training) ---------

REMOTE_MODELING = '''
import types

from transformers.models.llama.modeling_llama import (LlamaAttention, LlamaForCausalLM, apply_rotary_pos_emb,
                                                      eager_attention_forward)


class HardEagerLlamaAttention(LlamaAttention):
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q, k, v = (p(hidden_states).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        out, w = eager_attention_forward(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling)
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), w


class HardEagerLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self.model.layers[1].self_attn = HardEagerLlamaAttention(config, layer_idx=1)
'''


def _remote_code_model(model_dir: Path) -> None:
    (model_dir / "modeling_hard_eager.py").write_text(REMOTE_MODELING)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_hard_eager.HardEagerLlamaForCausalLM"}
    (model_dir / "config.json").write_text(json.dumps(cfg))


@pytest.mark.distributed
def test_cli_asu_on_remote_code_that_bypasses_the_interface_is_one_line_before_training(tmp_path):
    """The stock model passes the probe on 2 ranks (ZeRO-3: weights partitioned by zero.Init when the
    probe runs) and trains; the remote-code model that hard-codes eager in layer 1 is refused."""
    from tests.helpers.tiny import build, train_overrides

    model_dir, data_dir = build(tmp_path / "m", layers=2)
    ok = launch.run(train_overrides(model_dir, data_dir, tmp_path / "runs", "stock", steps=1)
                    + ["method=asu_gd", "eval.enabled=false"], ranks=2, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "tempered attention probe passed: LlamaForCausalLM attention layers 0-1 (2 of 2)" in ok.stderr + ok.stdout

    _remote_code_model(model_dir)
    args = train_overrides(model_dir, data_dir, tmp_path / "runs", "remote", steps=1) + ["model.trust_remote_code=true"]
    out = launch.run(args + ["method=asu_gd"], timeout=300)  # 1 rank: the launcher's own exit code
    assert out.returncode == 2, out.stderr[-3000:]
    assert ("config error at 'model.path': HardEagerLlamaForCausalLM: attention layer(s) 1 of 2 never called "
            "the 'tempered' attention function") in out.stderr, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and not (tmp_path / "runs" / "remote" / "checkpoints").exists()


# --- ZeRO-3: weights partitioned by zero.Init, no engine yet (where run.py probes) ---------------

def _two_ranks() -> dict:
    """Runs on each of 2 ranks: tiny Llamas built inside deepspeed.zero.Init, probed before any engine."""
    import deepspeed

    from pipeline.engine.distributed import init_distributed

    init_distributed()  # the pipeline's own: gloo on CPU, without the shm op's JIT build (~30 s)
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    import transformers.models.llama.modeling_llama  # noqa: F401 - not imported lazily inside zero.Init
    with deepspeed.zero.Init(config_dict_or_path=ds):
        stock = enable_tempered_attention(_llama())
        bad = _hard_code_eager(enable_tempered_attention(_llama()), 2)
    w = stock.model.layers[0].self_attn.q_proj.weight
    out = {"partitioned_before": w.ds_tensor.numel() < w.ds_numel and w.numel() == 0,
           "stock": tempered_attention_problem(stock), "bad": tempered_attention_problem(bad),
           "flags": [getattr(m, PLUGGABLE_ATTR) for m in attention_modules(bad)]}
    out["partitioned_after"] = w.numel() == 0 and all(p.numel() == 0 for p in stock.parameters())
    # the models still train under an engine after the probe
    engine = deepspeed.initialize(model=stock, model_parameters=list(stock.parameters()), config={
        **ds, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_allow_untested_optimizer": True, "steps_per_print": 10**9})[0]
    ids = torch.tensor([[1, 5, 7, 9]])
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    out["loss_finite"] = bool(torch.isfinite(loss))
    return out


@pytest.mark.distributed
def test_probe_gathers_zero3_partitioned_weights_one_module_at_a_time(tmp_path):
    p = launch.run([str(tmp_path)], ranks=2, script="tests/test_pluggable_probe.py", timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    for rank in (0, 1):
        rec = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert rec["partitioned_before"] and rec["partitioned_after"], rec
        assert rec["stock"] is None, rec
        assert rec["bad"].startswith("LlamaForCausalLM: attention layer(s) 2 of 3 never called"), rec
        assert rec["flags"] == [True, True, False], rec
        assert rec["loss_finite"], rec


if __name__ == "__main__":  # one rank of the 2-rank test above
    result = _two_ranks()
    Path(sys.argv[-1], f"rank{torch.distributed.get_rank()}.json").write_text(json.dumps(result))
    from pipeline.engine.distributed import leave_together

    leave_together()  # a teardown with gloo's threads running aborted a rank now and then
