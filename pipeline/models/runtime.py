"""Where a model runs and in which mode: its device, and evaluation mode for a block."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def model_device(model: Any) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except StopIteration:  # a parameter-less module
        return torch.device("cpu")


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Run the block with ``model.eval()``; put training mode back afterwards if it was on."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()
