"""Evaluation batching: every rank runs the same number of batches (ZeRO-3 gathers per call)."""

import pytest

from pipeline.eval.batching import batch_count, batches, synced_batch_count


def test_the_synced_count_is_what_the_busiest_rank_needs():
    # 7 rows over 2 ranks -> 4 and 3 rows; batch size 2 -> 2 batches each; 9 rows -> 5 and 4 -> 3 and 2
    assert synced_batch_count([4, 3], 2) == 2
    assert synced_batch_count([5, 4], 2) == 3
    assert synced_batch_count([0, 1, 0], 4) == 1
    assert synced_batch_count([5], 2) is None  # one rank: nothing to match


def test_batches_pads_with_empty_batches_up_to_the_synced_count():
    order = [4, 2, 0]
    out = list(batches(order, 2, 3))
    assert out == [[4, 2], [0], []]
    assert len(out) == batch_count(len(order), 2, 3)
    assert list(batches(order, 2, None)) == [[4, 2], [0]]
    assert batch_count(len(order), 2) == 2


def test_batches_refuses_a_count_below_what_the_rows_need():
    with pytest.raises(ValueError, match="smaller than the 2 batches"):
        list(batches([0, 1, 2], 2, 1))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        list(batches([0], 0, None))


def test_scored_batches_equal_each_example_scored_alone_with_plain_torch():
    # odd lengths, so the batches are padded; scores come back per example, in input order
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.data.formatting import IGNORE_INDEX
    from pipeline.eval.batching import score_labelled

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    model.train()  # scoring runs in eval mode and puts training mode back
    g = torch.Generator().manual_seed(1)
    examples = []
    for n, scored in [(5, 2), (9, 4), (3, 0), (7, 7), (11, 1)]:
        ids = torch.randint(1, 50, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n - scored) + ids[n - scored:]})
    dummy = {"input_ids": [0, 0], "labels": [IGNORE_INDEX, 0]}
    got = list(score_labelled(model, examples, 0, 2, 4, dummy))
    assert model.training
    assert sorted(i for b in got for i in b.rows) == list(range(len(examples)))
    assert len(got) == 3  # the fourth batch is the dummy, and yields nothing
    sums = {i: s for b in got for i, s in zip(b.rows, b.row_sums())}
    tokens = {i: t for b in got for i, t in zip(b.rows, b.row_tokens())}
    model.eval()
    with torch.no_grad():
        for i, e in enumerate(examples):
            logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(e["labels"][1:])
            keep = labels != IGNORE_INDEX
            ref = -F.cross_entropy(logits[keep], labels[keep], reduction="none")
            assert tokens[i] == pytest.approx(ref.tolist(), abs=1e-5)
            assert sums[i] == pytest.approx(float(ref.sum()), abs=1e-5)
