"""Activation checkpointing for the student (``deepspeed.activation_checkpointing``).

Each decoder layer keeps only its input in the forward and recomputes its activations in the
backward (transformers' ``activation_checkpointing_enable``). Non-reentrant checkpointing, and the
embedding output made to require grad: with reentrant checkpointing and nothing trainable below a
block (a LoRA student's frozen base, RMU's lower layers) no input of the block requires grad and
the parameters inside silently get no gradient (open-unlearning issue #178). Forward hooks inside a
layer (RNA noise, RMU's captured hidden states) run again in the recompute with the RNG state of the
first run, so they add the same noise.
"""

from __future__ import annotations

from torch import nn

from pipeline.config_base import require


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Checkpoint every decoder layer of ``model`` (a transformers model or a peft wrapper of one);
    returns how many layers now recompute their activations in the backward."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    require(bool(getattr(base, "supports_gradient_checkpointing", False)), "deepspeed.activation_checkpointing",
            f"{type(base).__name__} does not support activation checkpointing; set it to false")
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    base.enable_input_require_grads()
    return checkpointed_layers(base)


def checkpointed_layers(model: nn.Module) -> int:
    """How many decoder layers of ``model`` recompute their activations in the backward (0: none)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return sum(1 for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing)
