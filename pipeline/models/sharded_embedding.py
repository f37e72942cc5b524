"""A frozen model's token embeddings looked up in its ZeRO-3 shards, without gathering the table.

Under ZeRO-3 a forward through ``nn.Embedding`` all-gathers its whole V×H weight on every rank, though
a step reads only its own tokens' rows. A frozen model (no gradient) can look its tokens up in the
shards instead: every rank fills, for the tokens of *all* ranks, the elements of the table that its
shard holds (zeros elsewhere), and one reduce-scatter hands each rank the sum for its own tokens. Each
element is held by exactly one rank and the others add zeros, so the result equals the gathered
lookup exactly. It moves N×H values (N: the step's token slots over all ranks) instead of V×H, and is
used only when that is less (N < V): at the benchmark's 7 M model (V = 8192, 2 ranks × 512 tokens)
1 MiB instead of 8 MiB; for Llama-3's V = 128256 (1 GiB in bf16 at H = 4096) whenever a step has fewer
than 128k tokens over all ranks.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.submodules import swapped

log = logging.getLogger(__name__)
_LOGGED: set[str] = set()
# outcomes where no table is gathered anyway (not ZeRO-3, or whole on this rank): nothing to log
NOT_SHARDED, WHOLE, ONE_RANK = "not a frozen ZeRO-3 parameter", "the table is whole on this rank", "one rank"
NO_EMBEDDINGS = "no input embeddings"
NOTHING_GATHERED = (NOT_SHARDED, WHOLE, ONE_RANK, NO_EMBEDDINGS)


def fill_from_shard(shard: torch.Tensor, start: int, numel: int, dim: int, ids: torch.Tensor) -> torch.Tensor:
    """``table[ids]`` restricted to one shard, zeros elsewhere: (*ids.shape, dim).

    ``table`` is a row-major (numel // dim, dim) matrix flattened and cut into equal shards (ZeRO-3's
    layout); ``shard`` holds its flat elements ``[start, start + len(shard))`` (the last shard padded
    past ``numel``). A shard may begin or end inside a row: those rows get only the columns it holds.
    """
    out = shard.new_zeros(ids.numel(), dim)
    stop = min(start + shard.numel(), numel)
    if stop <= start:
        return out.view(*ids.shape, dim)
    flat = ids.reshape(-1)
    first = -(-start // dim)  # first row wholly inside the shard
    last = stop // dim  # one past the last such row
    if last > first:
        rows = shard[first * dim - start:last * dim - start].view(-1, dim)
        hit = (flat >= first) & (flat < last)
        out[hit] = rows[flat[hit] - first]
    if start % dim:  # the shard begins inside row start // dim: its columns from start % dim on
        col = start % dim
        n = min(dim - col, stop - start)
        out[flat == start // dim, col:col + n] = shard[:n]
    if stop % dim and last >= first:  # the shard ends inside row last (another row than the first)
        out[flat == last, :stop % dim] = shard[last * dim - start:stop - start]
    return out.view(*ids.shape, dim)


def _problem(emb: nn.Module, device: torch.device) -> Optional[str]:
    """Why the shard lookup cannot serve ``emb`` (then DeepSpeed gathers the table as usual), or None."""
    w = getattr(emb, "weight", None)
    if w is None or not hasattr(w, "ds_tensor") or w.requires_grad:
        return NOT_SHARDED
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    shard = w.ds_tensor
    if w.ds_status != ZeroParamStatus.NOT_AVAILABLE or shard is None:
        return WHOLE
    if torch.distributed.get_world_size(group=w.ds_process_group) < 2:
        return ONE_RANK
    if type(emb) is not nn.Embedding or emb.max_norm is not None:  # e.g. Gemma-3's scaled embedding
        return f"{type(emb).__name__} is not a plain nn.Embedding"
    if getattr(shard, "final_location", None) is not None or hasattr(shard, "ds_quant_scale"):
        return "its shard is offloaded to NVMe or quantized"
    if shard.device != device:
        return f"its shard is on {shard.device}, the tokens on {device}"
    return None


def lookup(emb: nn.Embedding, input_ids: torch.Tensor) -> Optional[torch.Tensor]:
    """``emb(input_ids)`` from the shards of every rank of ``emb``'s ZeRO-3 group (a collective: every
    rank calls it, each with its own tokens); None, on every rank alike, when gathering the table
    would move less."""
    import deepspeed.comm as dist

    w = emb.weight
    group = w.ds_process_group
    world, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
    dev = input_ids.device
    sizes = torch.empty(world, dtype=torch.long, device=dev)
    dist.all_gather_into_tensor(sizes, torch.tensor([input_ids.numel()], device=dev), group=group)
    width = int(sizes.max())
    if world * width >= emb.num_embeddings:
        return None
    ids = torch.empty(world * width, dtype=input_ids.dtype, device=dev)
    dist.all_gather_into_tensor(ids, F.pad(input_ids.reshape(-1), (0, width - input_ids.numel())), group=group)
    if int(ids.max()) >= emb.num_embeddings or int(ids.min()) < 0:
        raise IndexError(f"token id out of range for the embedding table of {emb.num_embeddings} rows")
    part = fill_from_shard(w.ds_tensor, rank * w.ds_tensor.ds_numel, w.ds_numel, emb.embedding_dim, ids)
    mine = part.new_empty(width, emb.embedding_dim)
    dist.reduce_scatter_tensor(mine, part, op=dist.ReduceOp.SUM, group=group)
    return mine[:input_ids.numel()].view(*input_ids.shape, emb.embedding_dim)


class _LookedUp(nn.Module):
    """Stands in for the embedding during one forward: returns the rows already looked up for exactly
    these ``input_ids``. No parameters, so ZeRO-3 gathers nothing for it."""

    def __init__(self, input_ids: torch.Tensor, rows: torch.Tensor) -> None:
        super().__init__()
        self.input_ids, self.rows = input_ids, rows

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.shape != self.input_ids.shape or not torch.equal(input_ids, self.input_ids):
            raise RuntimeError("the model embedded other tokens than those looked up from the shards")
        return self.rows


@contextlib.contextmanager
def embeddings_from_shards(model: nn.Module, input_ids: torch.Tensor) -> Iterator[bool]:
    """Inside the block a forward of the frozen ZeRO-3 ``model`` (a transformers model, unwrapped) on
    ``input_ids`` takes its token embeddings from :func:`lookup` instead of gathering the table.
    Yields whether it does (False: the model is left as it is). A collective when it applies: every
    rank enters the block with its own tokens."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    problem = NO_EMBEDDINGS if emb is None else _problem(emb, input_ids.device)
    rows = lookup(emb, input_ids) if problem is None else None
    if problem is None and rows is None:
        problem = "the step's token slots over all ranks outnumber the table's rows"
    key = f"{type(model).__name__}:{problem}"
    if key not in _LOGGED and problem not in NOTHING_GATHERED:  # say once per model and outcome what runs
        _LOGGED.add(key)
        if problem is None:
            log.info("frozen model's token embeddings: looked up in the ZeRO-3 shards (a reduce-scatter of "
                     "the step's tokens × %d) instead of gathering the %d × %d table",
                     emb.embedding_dim, emb.num_embeddings, emb.embedding_dim)
        else:
            log.info("frozen model's token embeddings: ZeRO-3 gathers the table (%s)", problem)
    if problem is not None:
        yield False
        return
    with swapped(model, emb, _LookedUp(input_ids, rows)):
        yield True
