"""Hand-written right-padded batches for loss tests."""

from __future__ import annotations

from typing import Optional

import torch


def padded_batch(rows: list[tuple[list[int], int]], pad: int = 0, index0: Optional[int] = None) -> dict:
    """Right-padded rows ``(ids, n_prompt)``: loss on the tokens after the first ``n_prompt``.
    ``index0``: also an ``index`` tensor (dataset rows index0, index0 + 1, ...)."""
    T = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), T), pad)
    att = torch.zeros(len(rows), T, dtype=torch.long)
    lab = torch.full((len(rows), T), -100)
    for i, (r, n) in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        att[i, :len(r)] = 1
        lab[i, n:len(r)] = torch.tensor(r[n:])
    out = {"input_ids": ids, "attention_mask": att, "labels": lab}
    if index0 is not None:
        out["index"] = torch.arange(index0, index0 + len(rows))
    return out
