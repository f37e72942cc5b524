"""The student's activation checkpointing helper: every decoder layer, counted; a model without
support is a config error naming the key. (Training under checkpointing equals training without it:
tests/test_sharded_equality.py; LoRA adapters still get gradients: tests/test_peft.py.)"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.config_base import ConfigError
from pipeline.models.activation_checkpointing import checkpointed_layers, enable_activation_checkpointing

CONFIG = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2)


def test_every_layer_recomputes_and_the_gradients_are_unchanged():
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG).train()
    ids = torch.randint(0, 61, (2, 9))

    def grads():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    assert checkpointed_layers(model) == 0
    assert enable_activation_checkpointing(model) == 3 == checkpointed_layers(model)
    ckpt = grads()
    for n, g in plain.items():
        torch.testing.assert_close(ckpt[n], g, atol=1e-6, rtol=1e-5)


def test_a_model_without_support_is_a_config_error():
    class NoCheckpointing(LlamaForCausalLM):
        supports_gradient_checkpointing = False

    with pytest.raises(ConfigError, match="deepspeed.activation_checkpointing.*NoCheckpointing does not support"):
        enable_activation_checkpointing(NoCheckpointing(CONFIG))
