"""Padding collator for encoded examples."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.data.formatting import IGNORE_INDEX


def padding_id(tokenizer) -> int:
    """The token id to pad with: the tokenizer's pad token, else its eos token."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")


def pad_batch(
    examples: Sequence[dict], pad_token_id: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad ``input_ids``/``labels`` lists to the longest example; builds ``attention_mask``.

    Extra integer fields (e.g. ``index``) are stacked as tensors so batches can be traced back to
    dataset rows (used when logging a NaN batch).
    """
    if not examples:
        raise ValueError("pad_batch got an empty list of examples")
    longest = max(len(e["input_ids"]) for e in examples)
    ids, labels, mask = [], [], []
    for e in examples:
        n = len(e["input_ids"])
        pad = longest - n
        lab = e.get("labels", e["input_ids"])
        if padding_side == "right":
            ids.append(list(e["input_ids"]) + [pad_token_id] * pad)
            labels.append(list(lab) + [IGNORE_INDEX] * pad)
            mask.append([1] * n + [0] * pad)
        else:
            ids.append([pad_token_id] * pad + list(e["input_ids"]))
            labels.append([IGNORE_INDEX] * pad + list(lab))
            mask.append([0] * pad + [1] * n)
    out = {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
    }
    for k in examples[0]:
        if k not in out and isinstance(examples[0][k], int):
            out[k] = torch.tensor([e[k] for e in examples], dtype=torch.long)
    return out
