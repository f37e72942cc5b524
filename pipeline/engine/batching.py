"""Deterministic, resumable batch plan for (forget, retain) pairs across ranks.

The batch at global micro-step ``s`` depends only on ``(seed, s, rank, world_size)``, so a resumed
run sees exactly the batches the uninterrupted run would have seen, with no dataloader state to
save. The forget set is walked epoch by epoch in a seeded permutation (wrapping at the epoch end so
every rank always gets a full batch); the retain set is an endless seeded stream.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from pipeline.config_base import require


def resolve_grad_accum(batch_size: int, grad_accum: int, effective_batch: int | None, world_size: int) -> tuple[int, str]:
    """``(grad_accum, what the step is)``: with ``effective_batch`` (``trainer.effective_batch``, forget
    rows per optimizer step over all ranks) the micro-batches per step that make it on ``world_size``
    ranks of ``batch_size`` rows; otherwise ``grad_accum`` as configured. The text says it for the log."""
    per_pass = batch_size * world_size
    if effective_batch is not None:
        ranks = f"{world_size} rank{'s' * (world_size != 1)}"
        require(effective_batch % per_pass == 0, "trainer.effective_batch",
                f"{effective_batch} forget rows per step is not a multiple of trainer.batch_size={batch_size} x "
                f"{ranks} = {per_pass}; set trainer.batch_size so that it divides {effective_batch} / {world_size}")
        derived = effective_batch // per_pass
        require(grad_accum in (1, derived), "trainer.grad_accum",
                f"{grad_accum} contradicts trainer.effective_batch={effective_batch} ({derived} micro-batches of "
                f"{batch_size} rows on {ranks}); set one of them")
        grad_accum = derived
    how = (f"{batch_size} forget rows per rank x {grad_accum} micro-batch{'es' * (grad_accum != 1)} x {world_size} "
           f"rank{'s' * (world_size != 1)} = {per_pass * grad_accum} forget rows per optimizer step")
    if effective_batch is not None:
        how += f" (trainer.effective_batch={effective_batch})"
    return grad_accum, how


@functools.lru_cache(maxsize=64)
def _perm(n: int, seed: int, stream: int, epoch: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed((seed * 1_000_003 + stream * 7_919 + epoch) & 0x7FFFFFFF)
    return tuple(torch.randperm(n, generator=g).tolist())


@dataclass
class BatchPlan:
    n_forget: int
    n_retain: int
    forget_batch: int  # per rank
    retain_batch: int  # per rank
    world_size: int
    rank: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.n_forget / (self.forget_batch * self.world_size)))

    def total_steps(self, epochs: float, max_steps: int, grad_accum: int = 1) -> int:
        """Optimizer steps: ``max_steps`` when > 0, else enough for ``epochs`` passes over the forget set
        with ``grad_accum`` micro-batches (micro-steps ``s * grad_accum + k``) per optimizer step."""
        if max_steps and max_steps > 0:
            return int(max_steps)
        return max(1, math.ceil(epochs * self.steps_per_epoch / max(1, grad_accum)))

    def forget_indices(self, step: int) -> list[int]:
        epoch, b = divmod(step, self.steps_per_epoch)
        perm = _perm(self.n_forget, self.seed, 0, epoch)
        g = self.forget_batch * self.world_size
        start = b * g + self.rank * self.forget_batch
        return [perm[(start + j) % self.n_forget] for j in range(self.forget_batch)]

    def retain_indices(self, step: int) -> list[int]:
        g = self.retain_batch * self.world_size
        out = []
        for j in range(self.retain_batch):
            pos = step * g + self.rank * self.retain_batch + j
            cycle, k = divmod(pos, self.n_retain)
            out.append(_perm(self.n_retain, self.seed, 1, cycle)[k])
        return out
