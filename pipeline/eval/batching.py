"""Batches of an evaluation loop, how many every rank runs, and the teacher-forced scoring loop
that TOFU, MUSE and the multiple-choice evaluators share.

Under ZeRO-3 each forward pass gathers the sharded weights collectively, so every rank must call
the model equally often: a rank with fewer rows runs empty (dummy) batches up to the count that
:func:`synced_batch_count` computes from all ranks' row counts, without communication.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from pipeline.data.collate import pad_batch
from pipeline.data.formatting import IGNORE_INDEX
from pipeline.models.runtime import eval_mode, model_device
from pipeline.progress import tracked


def batch_count(n_rows: int, batch_size: int, num_batches: Optional[int] = None) -> int:
    """How many batches :func:`batches` yields for ``n_rows`` rows (``num_batches`` if given)."""
    return num_batches if num_batches is not None else math.ceil(n_rows / batch_size)


def synced_batch_count(rows_per_rank: Sequence[int], batch_size: int) -> Optional[int]:
    """The number of batches every rank runs so that all make the same model calls: the most any
    rank needs. None with one rank (nothing to match)."""
    if len(rows_per_rank) <= 1:
        return None
    return max(batch_count(n, batch_size) for n in rows_per_rank)


def batches(order: list[int], batch_size: int, num_batches: Optional[int]) -> Iterator[list[int]]:
    """Chunk ``order`` into batches; pad with empty batches (run as dummies) to ``num_batches``.
    Inside :func:`pipeline.progress.progress` each batch advances the bar."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    out = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if num_batches is not None:
        if num_batches < len(out):
            raise ValueError(f"num_batches={num_batches} is smaller than the {len(out)} batches needed")
        out += [[] for _ in range(num_batches - len(out))]
    return tracked(out)


@dataclass
class ScoredBatch:
    """One batch of teacher-forced scoring: which examples it held, and the negative
    log-likelihood of each of their labelled tokens (float32, row after row)."""

    rows: list[int]
    nll: torch.Tensor
    counts: list[int]

    def row_sums(self) -> list[float]:
        """Each row's summed log-probability of its labelled tokens (0.0 with none)."""
        per_row = torch.zeros(len(self.rows), dtype=torch.float32, device=self.nll.device)
        owner = torch.repeat_interleave(torch.arange(len(self.rows), device=self.nll.device),
                                        torch.tensor(self.counts, device=self.nll.device))
        per_row.index_add_(0, owner, self.nll)
        return [float(v) for v in (-per_row).tolist()]

    def row_tokens(self) -> list[list[float]]:
        """Each row's per-token log-probabilities."""
        lp = (-self.nll).tolist()
        out, pos = [], 0
        for n in self.counts:
            out.append(lp[pos:pos + n])
            pos += n
        return out


def score_labelled(model: Any, examples: Sequence[dict], pad_id: int, batch_size: int,
                   num_batches: Optional[int], dummy: dict) -> Iterator[ScoredBatch]:
    """Teacher-force ``examples`` (``input_ids`` and ``labels``, IGNORE_INDEX where not scored)
    in right-padded batches, longest first to limit padding; no gradients, the model in eval
    mode. Yields each real batch's scores; ``dummy`` fills the empty batches that keep the ranks'
    call counts equal (its results are dropped). Only the labelled positions go through the
    float32 log-softmax (the logits are [B, T, V])."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    device = model_device(model)
    with eval_mode(model), torch.no_grad():
        for idx in batches(order, batch_size, num_batches):
            batch = pad_batch([examples[i] for i in idx] or [dummy], pad_id, "right")
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
            if not idx:
                continue
            labels = batch["labels"].to(logits.device)[:, 1:]
            mask = labels != IGNORE_INDEX
            nll = F.cross_entropy(logits[:, :-1][mask].float(), labels[mask], reduction="none")
            yield ScoredBatch(rows=idx, nll=nll, counts=mask.sum(-1).tolist())
