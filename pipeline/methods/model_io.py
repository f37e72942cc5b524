"""How a loss sees a model: through its wrappers, at a temperature, at the positions that carry loss.

Shared by the materialised losses (:mod:`pipeline.methods.losses`), the streaming KL
(:mod:`pipeline.methods.passes`) and the teacher cache, which is why it lives apart from both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Optional

import torch
from torch import nn

from pipeline.data.formatting import IGNORE_INDEX
from pipeline.models.peft_student import adapters_off
from pipeline.models.submodules import swapped
from pipeline.models.tempered_attention import temperature


def logits_of(model: nn.Module, inputs: dict) -> torch.Tensor:
    """The model's logits on ``inputs`` (no KV cache)."""
    return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False).logits


def shifted_mask(labels: torch.Tensor, skip_first: bool = False) -> torch.Tensor:
    """(B, T-1) bool mask of positions whose next token carries loss.

    ``skip_first`` drops each row's first loss token (ASU+IDK excludes it from the KL).
    """
    mask = labels[:, 1:] != IGNORE_INDEX
    return without_first(mask) if skip_first else mask


def without_first(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` (B, T-1) without each row's first True position."""
    return mask & ~(mask.float().cumsum(1) == 1)


@contextlib.contextmanager
def tempered(model: nn.Module, tau: Optional[float], layers: Optional[Sequence[int]]) -> Iterator[None]:
    """Run ``model`` at attention temperature ``tau`` in ``layers`` (as is when ``tau`` is None or 1).

    ``tau`` may be a (B, 1) tensor: one temperature per row of the batch (the joint frozen pass)."""
    # A LoRA student's frozen view (model.peft) runs everything inside with the adapters off, also
    # code that calls the base model's submodules directly (the fused KL's last hidden state).
    with adapters_off(model):
        if tau is None or (not isinstance(tau, torch.Tensor) and float(tau) == 1.0):
            yield
        else:
            with temperature(model, tau, layers):
                yield


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a DeepSpeed engine / DDP wrapper (``.module``) / peft LoRA model, else ``model``."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if hasattr(model, "get_base_model") and hasattr(model, "disable_adapter"):  # a peft LoRA student
        model = model.get_base_model()
    return model


def output_head(model: nn.Module) -> Optional[nn.Module]:
    """The model's output head (``get_output_embeddings()`` of :func:`unwrap`), or None when it has none."""
    get_head = getattr(unwrap(model), "get_output_embeddings", None)
    return get_head() if get_head is not None else None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM, found generically: ``model.model.layers`` (Llama, Mistral,
    Qwen, Gemma, ...) or ``model.layers`` (a bare decoder). Anything else raises a clear error."""
    m = unwrap(model)
    for owner in (getattr(m, "model", None), m):
        layers = getattr(owner, "layers", None) if owner is not None else None
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise ValueError(
        f"{type(m).__name__}: cannot find the decoder layers (expected a Llama-like model with "
        f"`model.model.layers`); layer-wise methods (RMU, asu_wmdp, RNA) need one")


def check_layer(model: nn.Module, layer: int, key: str) -> nn.Module:
    """Decoder layer ``layer`` of ``model``; a clear error naming ``key`` when out of range."""
    layers = decoder_layers(model)
    if not 0 <= int(layer) < len(layers):
        raise ValueError(f"{key}={layer} out of range: the model has {len(layers)} layers "
                         f"(allowed 0..{len(layers) - 1})")
    return layers[int(layer)]


@contextlib.contextmanager
def layer_output(model: nn.Module, layer: int, into: list) -> Iterator[None]:
    """Append the output hidden state of decoder layer ``layer`` to ``into`` on every forward inside
    the block (a forward hook: it sees an activation only, so it works under ZeRO-3; removed on exit,
    so a gradient-checkpointing recompute in backward does not fire it again)."""
    block = check_layer(model, layer, "layer")
    handle = block.register_forward_hook(
        lambda _m, _i, out: into.append(out[0] if isinstance(out, (tuple, list)) else out))
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def stopped_after(model: nn.Module, layer: int) -> Iterator[None]:
    """Inside the block a forward of ``model`` runs decoder layers 0..``layer`` only, and its output
    head is a pass-through: for losses that read the hidden state at ``layer`` and nothing after it.

    The model's own (root) forward still runs from start to end on a truncated layer list, rather than
    being cut off by an exception from a hook on ``layer``: under DeepSpeed ZeRO-3 every module that
    starts also finishes, so its post-forward hooks release what they gathered, its module stack stays
    balanced and the engine registers its output hooks. Each step then runs the same modules on every
    rank (ZeRO-3's recorded trace stays complete). The final norm runs on the layer-``layer`` state (a
    few element-wise operations); the head's weights are never gathered.
    """
    m = unwrap(model)
    layers, head = decoder_layers(m), output_head(m)
    with swapped(m, layers, nn.ModuleList(layers[: int(layer) + 1])):
        with swapped(m, head, nn.Identity()) if head is not None else contextlib.nullcontext():
            yield
