"""Each shipped total loss (asu_kl, asu_gd, the MUSE News/Books weights) on one fixed tiny batch with
padding equals the value written out by hand from the formulas in docs/methods.md, in plain torch:

    KL_seq(t, s)  = mean over sequences of [ mean over the sequence's loss tokens of
                    sum_v p_t(v) (log p_t(v) - log p_s(v)) ]          (forget KL, retain KL)
    NLL_tok(s)    = sum over all loss tokens of -log p_s(y) / number of loss tokens   (retain NLL)
    asu_kl = gamma * KL_seq(teacher_tau, student; forget) + alpha * KL_seq(original, student; retain)
    asu_gd = gamma * KL_seq(teacher_tau, student; forget) + alpha * NLL_tok(student; retain)

The tempered teacher is built by hand too: dividing every layer's q_proj by tau divides QK^T by tau
(RoPE is linear in q), i.e. softmax(QK^T / (tau * sqrt(d))), with the model's ordinary eager attention.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.config import register_configs
from pipeline.methods import build_method
from pipeline.models.tempered_attention import enable_tempered_attention
from tests.helpers.batches import padded_batch

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
PAD = 0


def _llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=13, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32, initializer_range=0.5, pad_token_id=PAD)
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg).eval()


def _batch(rows: list[tuple[list[int], int]]) -> dict:
    """Right-padded rows ``(ids, n_prompt)``: loss on the tokens after the first ``n_prompt``."""
    return padded_batch(rows, PAD)


# answers of different lengths, so per-sequence and per-token means differ
FORGET = _batch([([1, 5, 6, 2, 7, 8, 9, 3], 4), ([1, 4, 2, 10, 3], 3)])
RETAIN = _batch([([1, 6, 6, 2, 11, 3], 4), ([1, 9, 2, 12, 7, 8, 4, 5, 3], 3), ([1, 8, 2, 3], 3)])
TEXT = _batch([([1, 5, 6, 7, 8, 9, 10], 1), ([1, 11, 12, 4], 1)])  # MUSE: raw text, loss after BOS
TEXT_RETAIN = _batch([([1, 4, 4, 9, 10, 11, 2, 3, 5], 1), ([1, 7, 3], 1)])


def _logp(model, b) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].double(), -1)


def kl_seq(t: torch.Tensor, s: torch.Tensor, b: dict) -> float:
    mask = (b["labels"][:, 1:] != -100).double()
    kl = (t.exp() * (t - s)).sum(-1)
    return float(((kl * mask).sum(1) / mask.sum(1)).mean())


def nll_tok(s: torch.Tensor, b: dict) -> float:
    tgt = b["labels"][:, 1:]
    mask = (tgt != -100).double()
    lp = s.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return float(-(lp * mask).sum() / mask.sum())


def nll_seq(s: torch.Tensor, b: dict) -> float:
    tgt = b["labels"][:, 1:]
    mask = (tgt != -100).double()
    lp = s.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return float((-(lp * mask).sum(1) / mask.sum(1)).mean())


def _hand_teacher(original: LlamaForCausalLM, tau: float) -> LlamaForCausalLM:
    t = copy.deepcopy(original)
    with torch.no_grad():
        for layer in t.model.layers:
            layer.self_attn.q_proj.weight /= tau
    return t


def _compose(exp: str, *overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=[f"+exp={exp}", *overrides])


@pytest.fixture(scope="module")
def models():
    original, student = _llama(0), _llama(1)
    reference = enable_tempered_attention(copy.deepcopy(original))  # what the method gets
    return original, student, reference


def _total(cfg_method, student, reference, forget, retain) -> tuple[float, dict]:
    m = build_method(cfg_method)
    out = m.compute_loss(student, reference, {"forget": forget, "retain": retain})
    return float(out.loss.detach()), m.reductions()


@pytest.mark.parametrize("name", ["asu_kl", "asu_gd"])
def test_tofu_total_losses_equal_the_documented_formulas(models, name):
    original, student, reference = models
    cfg = _compose("tofu_7b", f"method={name}")  # the paper's TOFU setting: tau 2.3, gamma 0.1, alpha 1
    tau, gamma, alpha = float(cfg.method.tau), float(cfg.method.gamma), float(cfg.method.alpha)
    assert (tau, gamma, alpha) == (2.3, 0.1, 1.0)
    got, reductions = _total(cfg.method, student, reference, FORGET, RETAIN)
    s_f, s_r = _logp(student, FORGET), _logp(student, RETAIN)
    l_f = kl_seq(_logp(_hand_teacher(original, tau), FORGET), s_f, FORGET)
    if name == "asu_kl":
        want = gamma * l_f + alpha * kl_seq(_logp(original, RETAIN), s_r, RETAIN)
        assert reductions == {"forget": "sequence_mean", "retain": "sequence_mean"}
    else:
        want = gamma * l_f + alpha * nll_tok(s_r, RETAIN)
        assert reductions == {"forget": "sequence_mean", "retain": "token_mean"}
        # the batch tells the reductions apart: the per-sequence retain NLL would be a different loss
        assert abs(nll_seq(s_r, RETAIN) - nll_tok(s_r, RETAIN)) > 1e-2 * nll_tok(s_r, RETAIN)
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("exp,tau,gamma", [("muse_news_7b", 2.0, 0.35), ("muse_books_7b", 2.35, 0.001)])
def test_muse_weights_are_the_authors(models, exp, tau, gamma):
    """MUSE: the authors' total is alpha_paper * L_F + 1 * L_R; the shipped configs give exactly that."""
    original, student, reference = models
    cfg = _compose(exp)
    assert (float(cfg.method.tau), float(cfg.method.gamma), float(cfg.method.alpha)) == (tau, gamma, 1.0)
    got, reductions = _total(cfg.method, student, reference, TEXT, TEXT_RETAIN)
    s_f, s_r = _logp(student, TEXT), _logp(student, TEXT_RETAIN)
    want = gamma * kl_seq(_logp(_hand_teacher(original, tau), TEXT), s_f, TEXT) + \
        1.0 * kl_seq(_logp(original, TEXT_RETAIN), s_r, TEXT_RETAIN)
    assert reductions == {"forget": "sequence_mean", "retain": "sequence_mean"}
    assert got == pytest.approx(want, rel=1e-5)
