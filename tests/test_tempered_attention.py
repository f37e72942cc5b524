"""The registered "tempered" attention: tau=1 is exactly eager attention; tau>1 flattens it."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.models.tempered_attention import (
    attention_modules,
    enable_tempered_attention,
    get_temperatures,
    set_temperature,
    temperature,
    torch_tempered_attention,
)


def _model(attn="eager"):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.3)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).eval()


def _inputs():
    ids = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    am[1, 9:] = 0  # right padding on the second row
    return ids, am


def test_tau_one_equals_eager_and_tau_two_differs():
    m = _model()
    ids, am = _inputs()
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=am).logits
        enable_tempered_attention(m)
        same = m(input_ids=ids, attention_mask=am).logits
        set_temperature(m, 2.0)
        hot = m(input_ids=ids, attention_mask=am).logits
    keep = am.bool()
    assert (same - ref)[keep].abs().max().item() <= 1e-5
    assert (hot - ref)[keep].abs().max().item() > 1e-3


def test_teacher_layers_only_touch_chosen_layers_and_context_restores():
    m = enable_tempered_attention(_model())
    set_temperature(m, 3.0, layers=[0, 2])
    assert get_temperatures(m) == [3.0, 1.0, 3.0]
    with temperature(m, 5.0, layers=[1]):
        assert get_temperatures(m) == [1.0, 5.0, 1.0]
    assert get_temperatures(m) == [3.0, 1.0, 3.0]
    with pytest.raises(ValueError, match="out of range: the model has 3 layers"):
        set_temperature(m, 2.0, layers=[3])


def test_high_temperature_flattens_attention_towards_uniform():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 6, 8) * 3, torch.randn(1, 2, 6, 8) * 3, torch.eye(6)[None, None].repeat(1, 2, 1, 1)
    v = torch.nn.functional.pad(v, (0, 2))  # D=8: output rows are the attention weights (first 6 dims)
    out = torch_tempered_attention(q, k, v, None, 8 ** -0.5, tau=1e6)
    assert torch.allclose(out[0, :, :, :6], torch.full((6, 2, 6), 1 / 6), atol=1e-4)


def test_per_head_and_per_row_tau_match_scalar_calls():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    taus = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 1.0, 1.5, 2.0]])
    out = torch_tempered_attention(q, k, v, None, 8 ** -0.5, tau=taus, num_kv_groups=2)
    for b in range(2):
        for h in range(4):
            one = torch_tempered_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], None, 8 ** -0.5,
                                           tau=float(taus[b, h]), num_kv_groups=2)
            assert torch.allclose(out[b, :, h], one[0, :, h], atol=1e-6)


def test_attention_modules_found_in_layer_order():
    m = _model()
    assert [a.layer_idx for a in attention_modules(m)] == [0, 1, 2]


def test_teacher_layers_are_decoder_layer_indices_on_a_hybrid_model():
    """Granite-4.0-H-style hybrids have attention at some decoder layers only (mamba elsewhere).
    teacher_layers counts decoder layers, as the config check does: [1, 3] tempers both attention
    layers (before: refused as 'out of range: 2 layers'), and [0], a mamba layer, is refused instead
    of tempering nothing (before: ASU distilled from the unmodified model)."""
    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    from pipeline.models.tempered_attention import layers_without_attention

    torch.manual_seed(0)
    cfg = GraniteMoeHybridConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 layer_types=["mamba", "attention", "mamba", "attention"], mamba_n_heads=4,
                                 mamba_d_head=32, mamba_d_state=16, mamba_n_groups=1, mamba_expand=2,
                                 num_local_experts=0, shared_intermediate_size=64)
    m = enable_tempered_attention(GraniteMoeHybridForCausalLM(cfg).eval())
    assert [a.layer_idx for a in attention_modules(m)] == [1, 3]
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = m(input_ids=ids).logits
        set_temperature(m, 3.0, layers=[1, 3])
        assert get_temperatures(m) == [3.0, 3.0]
        assert (m(input_ids=ids).logits - base).abs().max() > 1e-3
        set_temperature(m, 3.0, layers=[3])
        assert get_temperatures(m) == [1.0, 3.0]
    assert layers_without_attention(m, [1, 3]) is None
    with pytest.raises(ValueError, match=r"teacher_layers \[0\] are not attention layers .*\[1, 3\] of 4"):
        set_temperature(m, 3.0, layers=[0, 1])
    with pytest.raises(ValueError, match=r"out of range: the model has 4 layers"):
        set_temperature(m, 3.0, layers=[4])
