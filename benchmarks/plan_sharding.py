"""Plan the sharding of optimizer state at scales this machine cannot run.

    python -m benchmarks.plan_sharding [--ranks 8,64,512] [--d-model 2048] [--layers 16]
                                       [--d-ff 8192] [--vocab 50304] [--shapes layout.json]
                                       [--max-preconditioner-dim 1024]

The model exists only as shapes: its layers are built on the ``meta`` device (no weights, no
memory), and each optimizer family of the suite is constructed on it with a planning
distributor that has the asked-for world size. The owner assignment is then the project's
real one: Shampoo's per-block costs and the capture optimizers' per-layer costs
(:class:`~secondorder.distributed.ownership.LayerOwnership`) reach
:func:`~secondorder.distributed.distributor.assign_owners` exactly as in training; the planning
distributor only records them.

Printed per family and rank count: the number of blocks (units of ownership), the largest
per-rank cost and optimizer-state bytes over their means (1.00 = perfect balance), the same
over the best any assignment of these indivisible units can do (``max(total/ranks, largest
unit)``; the issue's target is ≤ 1.15), the largest per-rank state in GiB, and the share of
ranks that own nothing. Bytes are the float32 state each family keeps per block (formulas in
:func:`block_state_floats`, checked against real optimizer state in
``tests/distributed/test_plan_sharding.py``).

The default layout is a 1.0B-parameter decoder-only transformer (16 layers of
``d_model=2048``, ``d_ff=8192``, untied 50304-token embedding and head). ``--shapes`` reads
another one from JSON: ``[{"kind": "linear", "in": 2048, "out": 8192, "bias": true},
{"kind": "embedding", "num": 50304, "dim": 2048}, {"kind": "layernorm", "dim": 2048}, ...]``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from secondorder.distributed.distributor import Distributor, assign_owners
from secondorder.optimizers.adafisher import AdaFisher
from secondorder.optimizers.ekfac import EKFAC
from secondorder.optimizers.shampoo import Shampoo
from secondorder.optimizers.singd import SINGD

FLOAT_BYTES = 4


class PlanningDistributor(Distributor):
    """A distributor of a given world size that records the costs it is asked to assign."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.costs: list[float] = []
        self.sizes: list[float] | None = None

    def assign(self, costs: Sequence[float], sizes: Sequence[float] | None = None) -> list[int]:
        self.costs, self.sizes = list(costs), None if sizes is None else list(sizes)
        return assign_owners(costs, self.world_size, sizes)


def transformer_layout(d_model: int, layers: int, d_ff: int, vocab: int) -> list[dict[str, Any]]:
    """The layers of a pre-norm decoder-only transformer, as :func:`build_meta_model` takes them."""
    layout: list[dict[str, Any]] = [{"kind": "embedding", "num": vocab, "dim": d_model}]
    for _ in range(layers):
        layout += [
            {"kind": "layernorm", "dim": d_model},
            {"kind": "linear", "in": d_model, "out": 3 * d_model, "bias": True},
            {"kind": "linear", "in": d_model, "out": d_model, "bias": True},
            {"kind": "layernorm", "dim": d_model},
            {"kind": "linear", "in": d_model, "out": d_ff, "bias": True},
            {"kind": "linear", "in": d_ff, "out": d_model, "bias": True},
        ]
    layout += [
        {"kind": "layernorm", "dim": d_model},
        {"kind": "linear", "in": d_model, "out": vocab, "bias": False},
    ]
    return layout


def build_meta_model(layout: Sequence[dict[str, Any]]) -> nn.Sequential:
    """The layout's modules on the ``meta`` device (shapes only)."""
    modules = []
    with torch.device("meta"):
        for spec in layout:
            kind = spec.get("kind")
            if kind == "linear":
                modules.append(nn.Linear(int(spec["in"]), int(spec["out"]), bias=bool(spec.get("bias", True))))
            elif kind == "embedding":
                modules.append(nn.Embedding(int(spec["num"]), int(spec["dim"])))
            elif kind == "layernorm":
                modules.append(nn.LayerNorm(int(spec["dim"])))
            else:
                raise ValueError(f"Invalid layout: unknown layer kind {kind!r} (linear, embedding, layernorm)")
    return nn.Sequential(*modules)


FAMILIES = ("Shampoo", "SOAP", "EKFAC", "AdaFisher", "SINGD")


def plan(model: nn.Module, family: str, world_size: int, max_preconditioner_dim: int) -> dict[str, Any]:
    """Owners, recorded costs and state bytes of every unit of ownership, for one family."""
    distributor = PlanningDistributor(world_size)
    params = list(model.parameters())
    module_of = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
    if family in ("Shampoo", "SOAP"):
        optimizer = Shampoo(params, max_preconditioner_dim=max_preconditioner_dim,
                            eigenvalue_correction=family == "SOAP", distributor=distributor)
        owners = optimizer._ownership()
        group = optimizer.param_groups[0]
        shapes = [shape for p in params for shape in optimizer._layout(p, group).shapes]
        floats = [block_state_floats(family, shape=shape) for shape in shapes]
    else:
        make = {"EKFAC": EKFAC, "AdaFisher": AdaFisher, "SINGD": SINGD}[family]
        with _quiet():
            optimizer = make(params, model=model, distributor=distributor)
        blocks, owners = optimizer._ownership.blocks()
        floats = [block_state_floats(family, block=block, module=module_of[id(block[0])]) for block in blocks]
    return {"owners": owners, "costs": distributor.costs, "sizes": distributor.sizes,
            "bytes": [FLOAT_BYTES * f for f in floats]}


def block_state_floats(
    family: str,
    shape: Sequence[int] | None = None,
    block: Sequence[torch.Tensor] | None = None,
    module: nn.Module | None = None,
) -> int:
    """Float32 numbers of optimizer state one unit of ownership keeps (int64 counters left out).

    Shampoo (a block of ``shape``, ``n`` elements): per dim a factor and its root, ``2·d²``,
    plus the first moment and the graft's second moment, ``2n`` (1-D blocks: ``2n`` only).
    SOAP: per dim a factor and its eigenbasis, plus ``4n`` (the corrected second moment and the
    first moment kept in the eigenbasis too) and 2 (the step-averaged norms of the graft).
    Capture optimizers (a layer, ``a = in + bias`` inputs, ``g = out`` outputs, ``n`` weights
    and bias): EK-FAC keeps ``A``, ``G``, their bases and eigenvalues, the ``g×a`` correction and
    a first moment; AdaFisher diagonal factors (twice) and a first moment; SINGD ``K``, ``C``
    and their momenta and a momentum buffer; each of them also ``n`` for the default Adam-norm
    graft's second moment. Parameters outside such layers: Adam's two moments, ``2n``
    (AdaFisher treats a LayerNorm as a layer with 2 inputs).
    """
    if family in ("Shampoo", "SOAP"):
        n = math.prod(shape)
        if len(shape) < 2:
            return 2 * n
        return sum(2 * d * d for d in shape) + (4 * n + 2 if family == "SOAP" else 2 * n)
    n = sum(p.numel() for p in block)
    has_bias = len(block) > 1
    if isinstance(module, nn.Linear) and block[0] is module.weight:
        a, g = module.in_features + has_bias, module.out_features
        if family == "EKFAC":
            return 2 * (a * a + g * g) + a + g + g * a + 2 * n
        if family == "AdaFisher":
            return 2 * (a + g) + 2 * n
        return 2 * (a * a + g * g) + 2 * n  # SINGD
    if family == "EKFAC" and isinstance(module, nn.Embedding):
        vocab, dim = module.num_embeddings, module.embedding_dim
        return 2 * vocab + 2 * dim * dim + dim + dim * vocab + 2 * n
    if family == "AdaFisher" and isinstance(module, nn.LayerNorm) and block[0] is module.weight:
        return 2 * (2 + module.normalized_shape[0]) + 2 * n
    return 2 * n


def balance(owners: Sequence[int], values: Sequence[float], world_size: int) -> dict[str, float]:
    """Per-rank totals of ``values``: max / mean, max / lower bound, max, empty-rank share."""
    totals = [0.0] * world_size
    for owner, value in zip(owners, values, strict=True):
        totals[owner] += value
    mean = sum(totals) / world_size
    bound = max(mean, max(values, default=0.0))
    return {
        "max_over_mean": max(totals) / mean if mean else 0.0,
        "max_over_bound": max(totals) / bound if bound else 0.0,
        "max": max(totals),
        "empty": sum(1 for t in totals if t == 0) / world_size,
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Print the balance table; returns its rows."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="8,64,512")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--d-ff", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--shapes", default=None, help="JSON layout (see the module docstring)")
    parser.add_argument("--max-preconditioner-dim", type=int, default=1024)
    args = parser.parse_args(argv)
    if args.shapes:
        with open(args.shapes) as handle:
            layout = json.load(handle)
    else:
        layout = transformer_layout(args.d_model, args.layers, args.d_ff, args.vocab)
    model = build_meta_model(layout)
    ranks = [int(r) for r in args.ranks.split(",")]
    families = [f for f in args.families.split(",") if f]
    for family in families:
        if family not in FAMILIES:
            parser.error(f"unknown family {family!r} ({', '.join(FAMILIES)})")
    total = sum(p.numel() for p in model.parameters())
    print(f"{total / 1e9:.3f}B parameters in {len(layout)} layers; Shampoo max_preconditioner_dim "
          f"{args.max_preconditioner_dim}; float32 state")
    print("family     ranks  blocks  cost max/mean  cost max/bound  bytes max/mean  bytes max/bound"
          "  max GiB/rank  empty ranks")
    rows = []
    for family in families:
        for world_size in ranks:
            result = plan(model, family, world_size, args.max_preconditioner_dim)
            cost = balance(result["owners"], result["costs"], world_size)
            size = balance(result["owners"], result["bytes"], world_size)
            row = {"family": family, "ranks": world_size, "blocks": len(result["owners"]),
                   "cost": cost, "bytes": size, "total_bytes": sum(result["bytes"])}
            rows.append(row)
            print(f"{family:<10} {world_size:>5} {row['blocks']:>7} {cost['max_over_mean']:>14.2f}"
                  f" {cost['max_over_bound']:>15.2f} {size['max_over_mean']:>15.2f}"
                  f" {size['max_over_bound']:>16.2f} {size['max'] / 2**30:>13.2f} {size['empty']:>11.0%}")
    return rows


class _quiet:
    """Silence the optimizers' construction warnings (e.g. SINGD's Adam fallback list)."""

    def __enter__(self) -> None:
        import warnings

        self._catcher = warnings.catch_warnings()
        self._catcher.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc: object) -> None:
        self._catcher.__exit__(*exc)


if __name__ == "__main__":
    main()
