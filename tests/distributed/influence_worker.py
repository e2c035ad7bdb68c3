"""EK-FAC trained data-parallel, then its influence factors: the per-rank body of
``test_influence_distributed`` (also run under ``torchrun``: ``python -m`` this module with an
output folder; each rank writes ``rank_<r>.pt``)."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from secondorder.influence import InfluenceFactors
from secondorder.optimizers.ekfac import EKFAC
from tests.distributed.training import make_batches, make_model, train, wrap_ddp

STEPS = 6


def train_ekfac(world_size: int) -> EKFAC:
    """EK-FAC (statistics every step, bases every 2) on the toy MLP in float64; each rank on its
    share of every batch (one process: the whole batch)."""
    model = make_model(dtype=torch.float64)
    # The body only: the toy model's unused layer would never get factors.
    optimizer = EKFAC(model.body.parameters(), model=model.body, lr=1e-2, damping=1e-2, stats_every=1,
                      precondition_frequency=2, distributor=world_size > 1)
    train(wrap_ddp(model) if world_size > 1 else model, optimizer,
          make_batches(STEPS, torch.float64), same_data=False)
    return optimizer


def main(folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    optimizer = train_ekfac(dist.get_world_size())
    owned = sum(1 for state in optimizer.state.values() if "gradient_basis" in state)
    layers = InfluenceFactors.from_optimizer(optimizer).layers
    torch.save({"owned": owned, "layers": layers}, os.path.join(folder, f"rank_{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
