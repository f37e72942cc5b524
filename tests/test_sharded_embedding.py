"""The frozen model's token embeddings looked up in its ZeRO-3 shards (pipeline/models/sharded_embedding.py).

In-process: the shards of a table laid out as ZeRO-3 lays it out (flat, equal pieces, the last padded)
give back exactly ``table[ids]`` when summed, for shards that begin or end inside a row or lie inside
one. Two ranks (real DeepSpeed ZeRO-3 engine, gloo): the frozen forward with the lookup equals the one
that gathers the table, bit for bit, never calls the embedding module (so ZeRO-3 gathers nothing for
it), and falls back to the gather when the step has more token slots than the table has rows; the
training step's joint frozen pass (``passes.run_step``, per-row τ) takes the shards and equals the same
pass on a whole copy of the model.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from pipeline.models.sharded_embedding import fill_from_shard
from tests.helpers import launch


@pytest.mark.parametrize("rows,dim,world", [(37, 10, 3), (3, 100, 8), (5, 7, 2), (11, 1, 4), (2, 5, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shards_add_up_to_the_table(rows, dim, world, dtype):
    torch.manual_seed(rows * dim + world)
    table = torch.randn(rows, dim).to(dtype)
    part = -(-rows * dim // world)  # ZeRO-3: equal pieces of the flattened table, the last one padded
    flat = torch.cat([table.reshape(-1), torch.full((part * world - rows * dim,), 7.0, dtype=dtype)])
    ids = torch.cat([torch.arange(rows), torch.randint(0, rows, (13,))]).view(-1, 1)  # (N, 1): any shape
    total = sum(fill_from_shard(flat[r * part:(r + 1) * part], r * part, rows * dim, dim, ids) for r in range(world))
    assert total.shape == (ids.shape[0], 1, dim)
    assert torch.equal(total, table[ids])
    for r in range(world):  # each element from exactly one shard: the others contribute exact zeros
        alone = fill_from_shard(flat[r * part:(r + 1) * part], r * part, rows * dim, dim, ids)
        held = torch.zeros(part * world, dtype=torch.bool)
        held[r * part:(r + 1) * part] = True
        mask = held[:rows * dim].view(rows, dim)[ids]
        assert torch.equal(alone[~mask], torch.zeros_like(alone[~mask]))


def _two_ranks() -> dict:
    """Runs on each of 2 ranks: a frozen ZeRO-3 Llama whose table (37 × 12) splits inside row 18."""
    import copy

    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.engine.distributed import init_distributed
    from pipeline.methods.passes import LOGITS, StepPlan, run_step
    from pipeline.models.sharded_embedding import embeddings_from_shards
    from pipeline.models.tempered_attention import enable_tempered_attention
    from tests.helpers.batches import padded_batch

    init_distributed()  # the pipeline's own: gloo on CPU, without the shm op's JIT build (~30 s)
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=37, hidden_size=12, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0, tie_word_embeddings=False)
    model = enable_tempered_attention(LlamaForCausalLM(cfg).requires_grad_(False))  # same weights on both ranks
    whole_model = copy.deepcopy(model)  # a whole copy: the pipeline's frozen pass without ZeRO-3
    engine = deepspeed.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": 1, "steps_per_print": 10**9,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})[0]
    engine.eval()
    emb = model.get_input_embeddings()
    calls = []
    emb.register_forward_pre_hook(lambda *_: calls.append(1))
    # different token counts per rank; rows 17, 18, 19 (around the cut) on both
    few = [torch.tensor([[1, 18, 17, 19, 36, 0, 5]]), torch.tensor([[18, 2, 19], [17, 3, 0], [36, 18, 1]])][rank]
    many = torch.arange(20).view(1, 20) + rank  # 2 ranks × 20 slots ≥ 37 rows: the gather moves less
    out = {}
    for name, ids in (("few", few), ("many", many)):
        mask = torch.ones_like(ids)
        with torch.no_grad():
            plain = engine(input_ids=ids, attention_mask=mask).logits
            before = len(calls)
            with embeddings_from_shards(model, ids) as used:
                shard = engine(input_ids=ids, attention_mask=mask).logits
        out[name] = {"used": used, "embedding_calls": len(calls) - before, "equal": bool(torch.equal(plain, shard)),
                     "max_diff": float((plain - shard).abs().max())}
    # the training step's frozen pass (passes.run_step): teacher rows at tau = 2, reference rows at 1, in one
    # forward; 2 ranks x (1 + 1) rows x <= 8 tokens < 37 rows, so it takes the shards
    batch = {"forget": padded_batch([([1, 18, 5, 17, 2, 19], 2), ([3, 18, 19, 4, 36, 2, 7, 8], 3)][rank:rank + 1]),
             "retain": padded_batch([([1, 9, 17, 2], 1), ([1, 18, 6, 6, 2, 11, 3], 2)][rank:rank + 1])}
    plan = StepPlan().need_frozen("forget", LOGITS, tau=2.0).need_frozen("retain", LOGITS, tau=1.0)
    before = len(calls)
    sharded = run_step(plan, None, engine, batch).frozen
    calls_in_step = len(calls) - before
    whole = run_step(plan, None, whole_model, batch).frozen
    out["step"] = {"embedding_calls": calls_in_step,
                   "max_diff": max(float((sharded[g].logits - whole[g].logits).abs().max()) for g in batch)}
    out["partitioned"] = emb.weight.ds_tensor.numel() < emb.weight.ds_numel
    return out


@pytest.mark.distributed
def test_frozen_zero3_forward_takes_embeddings_from_shards(tmp_path):
    p = launch.run([str(tmp_path)], ranks=2, script="tests/test_sharded_embedding.py", timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    for rank in (0, 1):
        rec = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert rec["partitioned"], rec
        # few tokens: the lookup ran, the embedding module never did (ZeRO-3 gathered nothing for it)
        assert rec["few"] == {"used": True, "embedding_calls": 0, "equal": True, "max_diff": 0.0}, rec
        # more token slots than table rows: left to ZeRO-3's gather, same logits
        assert rec["many"] == {"used": False, "embedding_calls": 1, "equal": True, "max_diff": 0.0}, rec
        # the training step's joint frozen pass (per-row tau) takes the shards and equals a whole model's
        assert rec["step"]["embedding_calls"] == 0 and rec["step"]["max_diff"] < 1e-6, rec


if __name__ == "__main__":  # one rank of the 2-rank test above
    from pathlib import Path

    result = _two_ranks()
    Path(sys.argv[-1], f"rank{torch.distributed.get_rank()}.json").write_text(json.dumps(result))

    from pipeline.engine.distributed import leave_together

    leave_together()  # a teardown with gloo's threads running aborted a rank now and then
