"""A ``token_mean`` term is one mean over the optimizer step's tokens: split a batch of rows of different
lengths into micro-batches (or ranks), reduce each with the step's :class:`StepTokens` as the trainer
does, average the pieces as DeepSpeed averages their gradients — and get the whole batch's token mean,
for every mask a term reduces over (loss positions, loss positions after each row's first, labelled
tokens) and in the fused KL kernel's row weights. Each rank's own count (the old reduction) does not.

The end-to-end check (1 vs 2 ranks, grad_accum=2 vs one bigger micro-batch, the real trainer and
DeepSpeed) is tests/test_sharded_equality.py; this is the arithmetic it relies on.
"""

from __future__ import annotations

import pytest
import torch

from kernels.reference import row_weights
from pipeline.data.formatting import IGNORE_INDEX
from pipeline.methods.loss_math import StepTokens, reduce
from pipeline.methods.model_io import without_first

# four rows, right-padded, with 1, 4, 2 and 6 labelled answer tokens after a 2-token prompt
LENGTHS = [1, 4, 2, 6]
T = 2 + max(LENGTHS)


def _rows() -> dict:
    labels = torch.full((len(LENGTHS), T), IGNORE_INDEX)
    attn = torch.zeros(len(LENGTHS), T, dtype=torch.long)
    for i, n in enumerate(LENGTHS):
        labels[i, 2:2 + n] = 10 + i
        attn[i, :2 + n] = 1
    return {"labels": labels, "attention_mask": attn}


def _masks(inputs: dict) -> dict[str, torch.Tensor]:
    loss = inputs["labels"][:, 1:] != IGNORE_INDEX
    labelled = (inputs["labels"] != IGNORE_INDEX) & inputs["attention_mask"].bool()
    return {"loss": loss, "after_first": without_first(loss), "labelled": labelled}


def test_counts_of_one_group():
    assert StepTokens.counts(_rows()) == [13.0, 9.0, 13.0]  # 13 answer tokens; minus each row's first


@pytest.mark.parametrize("kind", ["loss", "after_first", "labelled"])
@pytest.mark.parametrize("pieces", [2, 4])
def test_step_token_mean_of_pieces_equals_the_whole_batch_mean(kind, pieces):
    torch.manual_seed(0)
    whole = _rows()
    values = torch.rand(len(LENGTHS), T)  # per-position values; masks cut them to (B, T-1) where needed
    mask = _masks(whole)[kind]
    v = values[:, :mask.shape[1]]
    expected = reduce(v, mask, "token_mean")
    split = [slice(i * len(LENGTHS) // pieces, (i + 1) * len(LENGTHS) // pieces) for i in range(pieces)]
    totals = [sum(c) for c in zip(*(StepTokens.counts({k: t[s] for k, t in whole.items()}) for s in split))]
    step = StepTokens(*(c / pieces for c in totals))
    mine = sum(reduce(v[s], mask[s], "token_mean", getattr(step, kind)) for s in split) / pieces
    own = sum(reduce(v[s], mask[s], "token_mean") for s in split) / pieces
    assert float(mine) == pytest.approx(float(expected), rel=1e-6)
    assert abs(float(own) - float(expected)) > 1e-3  # rows differ in length: the per-piece mean is another number
    # the fused KL's row weights (kernels.kl=fused): the same denominator
    w = sum(float((row_weights(mask[s].reshape(-1), None, "token_mean", getattr(step, kind))
                   * v[s].reshape(-1)).sum()) for s in split) / pieces
    assert w == pytest.approx(float(expected), rel=1e-6)


def test_a_step_without_loss_tokens_gives_zero_not_nan():
    v = torch.rand(2, 5)
    assert float(reduce(v, torch.zeros(2, 5, dtype=torch.bool), "token_mean", 0.0)) == 0.0
