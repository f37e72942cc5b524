"""RNA (Random Noise Augmentation) add-on: Gaussian noise on the retain branch's hidden state.

With ``method.rna_noise = nu > 0`` every method's retain forward runs with a forward hook on decoder
layer ``method.rna_layer`` that adds ``N(0, nu^2)`` to that layer's output hidden state (training
mode only; the frozen reference's forward is untouched, and the hook is removed right after the
retain loss is computed, so forget forwards and evaluation never see it). Typical nu: 0.01-0.1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from pipeline.methods.losses import check_layer, unwrap


def _add_noise(nu: float):
    def hook(module: nn.Module, _inputs, output):
        if not module.training:  # a LoRA student's frozen view shares this layer and runs in eval mode
            return output
        if isinstance(output, (tuple, list)):
            h = output[0]
            return type(output)((h + torch.randn_like(h) * nu, *output[1:]))
        return output + torch.randn_like(output) * nu

    return hook


@contextlib.contextmanager
def retain_noise(model: nn.Module, cfg: Any) -> Iterator[None]:
    """Add N(0, rna_noise^2) to decoder layer ``rna_layer``'s output of ``model`` inside the block.

    A no-op when ``cfg`` has no ``rna_noise`` / it is 0, or when the model is in eval mode.
    """
    nu = float(getattr(cfg, "rna_noise", 0.0) or 0.0)
    if nu <= 0.0 or not unwrap(model).training:
        yield
        return
    layer = int(getattr(cfg, "rna_layer", 7))
    handle = check_layer(model, layer, "method.rna_layer").register_forward_hook(_add_noise(nu))
    try:
        yield
    finally:
        handle.remove()
