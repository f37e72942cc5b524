"""Swapping one submodule of a model for the length of a block."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def swapped(root: nn.Module, old: nn.Module, new: nn.Module) -> Iterator[nn.Module]:
    """Inside the block ``old`` (a submodule of ``root``, found by identity) is replaced by ``new``
    under its name in ``root`` (the first, should a module be registered twice); restored on exit.
    Yields ``new``.

    Used to stand a parameter-free module in for one with ZeRO-3 weights, so DeepSpeed's hooks on the
    original (which gather its weights) do not run for that forward."""
    name = next((n for n, sub in root.named_modules() if sub is old and n), None)
    if name is None:
        raise ValueError(f"{type(old).__name__} is not a submodule of {type(root).__name__}")
    owner_name, _, attr = name.rpartition(".")
    owner = root.get_submodule(owner_name)
    setattr(owner, attr, new)
    try:
        yield new
    finally:
        setattr(owner, attr, old)
