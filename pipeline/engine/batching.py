"""Deterministic, resumable batch plan for (forget, retain) pairs across ranks.

Rows are drawn from two global streams of positions. Micro-step ``s`` (optimizer step x grad_accum
+ micro-batch) of rank ``r`` takes positions ``s * batch * ranks + r * batch + j``, so an optimizer
step of G = batch x ranks x grad_accum rows covers the same G positions however G is split into
micro-batches and ranks, and a resumed run sees exactly the batches the uninterrupted run would have
seen, with no dataloader state to save. The forget stream walks the forget set epoch by epoch in a
seeded permutation; epochs are cut per optimizer step (ceil(n / G) steps, the last one wrapping to
the epoch's start), so 1 GPU x 4 micro-batches and 4 GPUs x 1 train the same rows in the same steps.
The retain stream is an endless seeded permutation stream. A draw's position also keys what is drawn
per use (RNA noise, ``idk_draw=per_use`` refusals), so those agree across layouts too.
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
                f"{ranks} = {per_pass}; set trainer.batch_size so that it divides {effective_batch} / {world_size} "
                f"(and trainer.retain_batch_size in proportion: retain rows per step scale with it)")
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
    """Which forget and retain rows rank ``rank`` trains at each micro-step (module docstring)."""

    n_forget: int
    n_retain: int
    forget_batch: int  # per rank and micro-batch
    retain_batch: int  # per rank and micro-batch
    world_size: int
    rank: int
    seed: int
    grad_accum: int = 1  # micro-batches per optimizer step (resolved: trainer.effective_batch applied)

    @property
    def forget_per_step(self) -> int:
        """Forget rows per optimizer step over all ranks and micro-batches."""
        return self.forget_batch * self.world_size * max(1, self.grad_accum)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per pass over the forget set."""
        return max(1, math.ceil(self.n_forget / self.forget_per_step))

    def total_steps(self, epochs: float, max_steps: int) -> int:
        """Optimizer steps: ``max_steps`` when > 0, else enough for ``epochs`` passes over the forget set."""
        if max_steps and max_steps > 0:
            return int(max_steps)
        return max(1, math.ceil(round(epochs * self.steps_per_epoch, 9)))  # 1.1 x 100 -> 110, not 111

    def forget_positions(self, step: int) -> list[int]:
        """This rank's positions in the forget stream at global micro-step ``step``."""
        return _positions(step, self.forget_batch, self.world_size, self.rank)

    def retain_positions(self, step: int) -> list[int]:
        """This rank's positions in the retain stream at global micro-step ``step``."""
        return _positions(step, self.retain_batch, self.world_size, self.rank)

    def forget_indices(self, step: int) -> list[int]:
        """Forget-set rows of global micro-step ``step`` on this rank."""
        per_epoch = self.steps_per_epoch * self.forget_per_step
        out = []
        for pos in self.forget_positions(step):
            epoch, k = divmod(pos, per_epoch)
            out.append(_perm(self.n_forget, self.seed, 0, epoch)[k % self.n_forget])  # the last step wraps
        return out

    def retain_indices(self, step: int) -> list[int]:
        """Retain-set rows of global micro-step ``step`` on this rank."""
        out = []
        for pos in self.retain_positions(step):
            cycle, k = divmod(pos, self.n_retain)
            out.append(_perm(self.n_retain, self.seed, 1, cycle)[k])
        return out


def _positions(step: int, batch: int, world_size: int, rank: int) -> list[int]:
    start = (step * world_size + rank) * batch
    return list(range(start, start + batch))
