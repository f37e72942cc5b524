"""Each method's loss on hand-computed tiny examples, and ASU's zero-at-tau=1 property."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from pipeline.methods import build_method
from pipeline.methods.losses import kl_from_logits, reduce


class BigramLM(nn.Module):
    """logits[t] = table[input_ids[t]]: a real (if attention-free) LM whose losses are easy by hand."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(torch.tensor(table, dtype=torch.float32))

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return SimpleNamespace(logits=self.table[input_ids])


LN3 = math.log(3.0)
# Student: after token 0, p(0)=1/4, p(1)=3/4. Reference/teacher: after token 0, p = (1/2, 1/2).
STUDENT = [[0.0, LN3], [0.0, 0.0]]
REFERENCE = [[0.0, 0.0], [0.0, 0.0]]


def batch(target_token):
    # sequence [0, target]; only the second token carries loss
    return {
        "input_ids": torch.tensor([[0, target_token]]),
        "attention_mask": torch.ones(1, 2, dtype=torch.long),
        "labels": torch.tensor([[-100, target_token]]),
    }


def method(name, **over):
    from pipeline.methods import METHODS

    cls = METHODS.get(name)
    cfg = OmegaConf.merge(OmegaConf.structured(cls.config_cls), {"name": name, **over})
    return build_method(cfg)


def test_reduce_sequence_vs_token_mean():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    # rows: (1+2)/2 = 1.5 and 4/1 = 4 -> mean 2.75; tokens: (1+2+4)/3
    assert reduce(v, m, "sequence_mean").item() == pytest.approx(2.75)
    assert reduce(v, m, "token_mean").item() == pytest.approx(7 / 3)
    assert reduce(v, m, "sum").item() == pytest.approx(7.0)


def test_kl_hand_computed():
    t = torch.tensor([[[0.0, 0.0], [9.0, 9.0]]])
    s = torch.tensor([[[0.0, LN3], [9.0, 9.0]]])
    labels = torch.tensor([[-100, 1]])
    # KL((1/2,1/2) || (1/4,3/4)) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3)
    assert kl_from_logits(t, s, labels).item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)


def test_grad_ascent():
    m = method("grad_ascent")
    out = m.compute_loss(BigramLM(STUDENT), None, {"forget": batch(1), "retain": batch(0)})
    # -NLL = log p(1|0) = ln(3/4)
    assert out.loss.item() == pytest.approx(math.log(0.75), abs=1e-6)


def test_grad_diff():
    m = method("grad_diff")
    out = m.compute_loss(BigramLM(STUDENT), None, {"forget": batch(1), "retain": batch(0)})
    # ln(3/4) (ascent on forget) + ln 4 (NLL of p(0|0)=1/4 on retain) = ln 3
    assert out.loss.item() == pytest.approx(math.log(3.0), abs=1e-6)
    assert out.logs["retain_loss"] == pytest.approx(math.log(4.0), abs=1e-6)


def test_npo():
    m = method("npo", beta=0.1)
    out = m.compute_loss(BigramLM(STUDENT), BigramLM(REFERENCE), {"forget": batch(1), "retain": batch(0)})
    # -(2/beta) logsigmoid(-beta (ln 3/4 - ln 1/2)) = 20 ln(1 + e^{0.1 ln 1.5}) = 14.272518...; + ln 4 retain
    assert out.logs["forget_loss"] == pytest.approx(14.272518486643563, abs=1e-5)
    assert out.loss.item() == pytest.approx(15.658812847763453, abs=1e-5)


def test_asu_kl_hand_computed():
    # tau=1 on an attention-free model: the teacher is just the reference, so L_F = KL(ref || student)
    m = method("asu_kl", tau=1.0, gamma=0.1, alpha=1.0)
    out = m.compute_loss(BigramLM(STUDENT), BigramLM(REFERENCE), {"forget": batch(1), "retain": batch(0)})
    kl = 0.5 * math.log(4 / 3)
    assert out.logs["forget_loss"] == pytest.approx(kl, abs=1e-6)
    assert out.logs["retain_loss"] == pytest.approx(kl, abs=1e-6)
    assert out.loss.item() == pytest.approx(0.1 * kl + kl, abs=1e-6)


def test_asu_gd_uses_nll_retain():
    m = method("asu_gd", tau=1.0, gamma=1.0, alpha=1.0)
    out = m.compute_loss(BigramLM(STUDENT), BigramLM(REFERENCE), {"forget": batch(1), "retain": batch(0)})
    assert out.logs["retain_loss"] == pytest.approx(math.log(4.0), abs=1e-6)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.models.tempered_attention import enable_tempered_attention

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.5)  # large init: sharp attention, so tau matters
    return enable_tempered_attention(LlamaForCausalLM(cfg))


def test_asu_forget_loss_zero_at_step0_when_tau_is_one_and_positive_when_tempered():
    student = _tiny_llama()
    teacher = copy.deepcopy(student).requires_grad_(False)
    ids = torch.randint(0, 50, (3, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    loss_1 = method("asu_kl", tau=1.0).forget_term(student, teacher, b)
    assert loss_1.item() == pytest.approx(0.0, abs=1e-7)
    loss_2 = method("asu_kl", tau=2.0).forget_term(student, teacher, b)
    assert loss_2.item() > 1e-5
    loss_2.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    # the teacher is restored to tau=1 after the tempered forward
    from pipeline.models.tempered_attention import get_temperatures

    assert all(t == 1.0 for t in get_temperatures(teacher))


@pytest.mark.parametrize("retain_loss", ["nll", "kl", "none"])
def test_uses_kl_says_whether_a_step_has_a_kl_term(retain_loss):
    """The log names kernels.kl only for a method whose step has a KL term (ASU's forget term, a KL
    retain loss): checked against the step plan of every registered method."""
    from pipeline.methods import METHODS

    class AnyBatch(dict):  # a batch with every group a plan may ask about
        def __missing__(self, key):
            return {}

        def __contains__(self, key):
            return True

    for name in METHODS.names():
        cfg = OmegaConf.structured(METHODS.get(name).config_cls)
        cfg.name = name
        cfg.retain_loss = retain_loss
        if cfg.get("tau") == "auto":
            cfg.tau = 2.0
        method = build_method(cfg)
        assert method.uses_kl() == bool(method.plan(AnyBatch(forget={}, retain={})).kl), (name, retain_loss)
