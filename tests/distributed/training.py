"""Shared pieces of the multi-rank tests: a toy model, fixed batches, a training loop.

The same loop runs in one process (the reference) and on each forked rank (DDP-wrapped
model, ``AllGatherDistributor``). Two data modes:

* ``same_data=True``: every rank trains on the full batch. DDP averages identical gradients
  exactly (``g/2 + g/2 = g``), so a correct distributor must reproduce the single-process
  run **bitwise**;
* ``same_data=False``: rank ``r`` trains on its half of each batch, the realistic case; the
  single-process reference trains on the whole batch, so the runs agree up to summation
  order (float64 models, tolerance checks).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

BATCH = 16


class ToyNet(nn.Module):
    """6 → 16 → 16 → 3 tanh MLP plus a layer that is never used (its params get no grad)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(6, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 3)
        )
        self.unused = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32, width: int = 16) -> ToyNet:
    """A :class:`ToyNet` with a fixed initialisation."""
    torch.manual_seed(seed)
    return ToyNet(width).to(dtype)


def make_batches(
    steps: int, dtype: torch.dtype = torch.float32, seed: int = 1
) -> list[tuple[Tensor, Tensor]]:
    """``steps`` regression batches ``(x: (16, 6), y: (16, 3))`` from a fixed generator."""
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    batches = []
    for _ in range(steps):
        x = torch.randn(BATCH, 6, generator=generator, dtype=torch.float64)
        y = torch.tanh(x @ teacher) + 0.1 * torch.randn(
            BATCH, 3, generator=generator, dtype=torch.float64
        )
        batches.append((x.to(dtype), y.to(dtype)))
    return batches


def wrap_ddp(model: nn.Module) -> nn.Module:
    """DDP on CPU/gloo; the unused layer needs ``find_unused_parameters``."""
    return DistributedDataParallel(model, find_unused_parameters=True)


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[tuple[Tensor, Tensor]],
    same_data: bool = True,
) -> list[float]:
    """Run one step per batch; return the per-step loss (averaged over ranks when sharded).

    ``model`` may be DDP-wrapped; with ``same_data=False`` rank ``r`` of ``W`` uses the
    ``r``-th of ``W`` contiguous chunks of each batch (rows ``[r·B/W, (r+1)·B/W)``).
    """
    distributed = dist.is_initialized() and isinstance(model, DistributedDataParallel)
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    losses = []
    for x, y in batches:
        if not same_data and world > 1:
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        value = loss.detach().clone()
        if distributed and not same_data:
            dist.all_reduce(value)
            value /= world
        losses.append(float(value))
    return losses


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (nested dicts included)."""

    def walk(value) -> int:
        if isinstance(value, Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(walk(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(walk(v) for v in value)
        return 0

    return sum(walk(state) for state in optimizer.state.values())


def parameters_of(model: nn.Module) -> list[Tensor]:
    """Detached copies of the (unwrapped) model's parameters, in order."""
    module = model.module if isinstance(model, DistributedDataParallel) else model
    return [p.detach().clone() for p in module.parameters()]


OptimizerFactory = Callable[..., torch.optim.Optimizer]
