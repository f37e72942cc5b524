"""RNA (Random Noise Augmentation) add-on: Gaussian noise on the retain branch's hidden state.

With ``method.rna_noise = nu > 0`` every method's retain forward runs with a forward hook on decoder
layer ``method.rna_layer`` that adds ``N(0, nu^2)`` to that layer's output hidden state (training
mode only; the frozen reference's forward is untouched, and the hook is removed right after the
retain loss is computed, so forget forwards and evaluation never see it). Typical nu: 0.01-0.1.

When the retain batch carries ``rna_seed`` (one integer per row; the trainer derives it from
``(seed, the row's position in the retain stream)``), each row's noise comes from its own generator, in blocks of
``BLOCK`` positions: a row gets the same noise whichever rank, batch or padding length it is in, so a
run on N ranks equals one on 1 rank and a resumed run equals an uninterrupted one (no RNG state to
carry). Without it the global RNG is used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Optional

import torch
from torch import nn

from pipeline.methods.model_io import check_layer, unwrap

BLOCK = 64  # positions per generator draw: a row's noise at position t does not depend on its length


def row_noise(like: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Standard normal noise shaped like ``like`` (B, T, H), row ``b`` drawn from ``seeds[b]`` alone.

    Position block ``j`` of row ``b`` comes from a generator seeded with ``(seeds[b], j)``, so a
    prefix of a row (right padding) gets the same values whatever the padded length.
    """
    b, t = like.shape[0], like.shape[1]
    out = torch.empty(like.shape, dtype=torch.float32, device=like.device)
    g = torch.Generator(device=like.device)
    for i in range(b):
        base = int(seeds[i])
        for j in range(0, t, BLOCK):
            g.manual_seed((base * 1_000_003 + j // BLOCK) & 0x7FFF_FFFF_FFFF_FFFF)
            block = torch.randn((BLOCK, *like.shape[2:]), generator=g, device=like.device)
            out[i, j:j + BLOCK] = block[: min(BLOCK, t - j)]
    return out.to(like.dtype)


def _add_noise(nu: float, seeds: Optional[torch.Tensor] = None, rows: Optional[slice] = None):
    def noise(h: torch.Tensor) -> torch.Tensor:
        return (row_noise(h, seeds) if seeds is not None else torch.randn_like(h)) * nu

    def noisy(h: torch.Tensor) -> torch.Tensor:
        if rows is None or (rows.start == 0 and rows.stop == h.shape[0]):
            return h + noise(h)
        # the joint student pass: only this group's rows get noise
        return torch.cat([h[:rows.start], h[rows] + noise(h[rows]), h[rows.stop:]])

    def hook(module: nn.Module, _inputs, output):
        if not module.training:  # a LoRA student's frozen view shares this layer and runs in eval mode
            return output
        if isinstance(output, (tuple, list)):
            return type(output)((noisy(output[0]), *output[1:]))
        return noisy(output)

    return hook


@contextlib.contextmanager
def rows_noise(model: nn.Module, nu: float, layer: int, rows: Optional[slice] = None,
               seeds: Optional[torch.Tensor] = None) -> Iterator[None]:
    """Add N(0, nu^2) to decoder layer ``layer``'s output of ``model`` inside the block, on the batch
    rows ``rows`` only (None: every row). ``seeds`` (one per noised row): per-row noise
    (:func:`row_noise`); None: the global RNG. A no-op when ``nu`` is 0 or the model is in eval mode."""
    if nu <= 0.0 or not unwrap(model).training:
        yield
        return
    handle = check_layer(model, layer, "method.rna_layer").register_forward_hook(_add_noise(nu, seeds, rows))
    try:
        yield
    finally:
        handle.remove()
