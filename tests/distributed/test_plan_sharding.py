"""``benchmarks/plan_sharding``: its state-size formulas match real optimizer state, and the
plan is the real owner assignment."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from benchmarks.plan_sharding import FAMILIES, block_state_floats, build_meta_model, main, plan
from secondorder.distributed.distributor import assign_owners
from secondorder.optimizers.adafisher import AdaFisher
from secondorder.optimizers.ekfac import EKFAC
from secondorder.optimizers.shampoo import Shampoo
from secondorder.optimizers.singd import SINGD

LAYOUT = [
    {"kind": "embedding", "num": 40, "dim": 6},
    {"kind": "linear", "in": 6, "out": 20, "bias": True},
    {"kind": "layernorm", "dim": 20},
    {"kind": "linear", "in": 20, "out": 5, "bias": False},
]
MAX_DIM = 8


def _floats(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() if value.is_floating_point() else 0
    if isinstance(value, dict):
        return sum(_floats(v) for v in value.values())
    return 0


def _real_model() -> nn.Sequential:
    torch.manual_seed(0)
    meta = build_meta_model(LAYOUT)
    return nn.Sequential(*[type(m)(*_arguments(m)) for m in meta])


def _arguments(module: nn.Module) -> tuple:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, module.bias is not None
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return (module.normalized_shape[0],)


def _trained(family: str, model: nn.Module):
    params = list(model.parameters())
    optimizer = {
        "Shampoo": lambda: Shampoo(params, max_preconditioner_dim=MAX_DIM, precondition_frequency=1),
        "SOAP": lambda: Shampoo(params, max_preconditioner_dim=MAX_DIM, precondition_frequency=1,
                                eigenvalue_correction=True),
        "EKFAC": lambda: EKFAC(params, model=model, stats_every=1, precondition_frequency=1),
        "AdaFisher": lambda: AdaFisher(params, model=model, update_freq=1),
        "SINGD": lambda: SINGD(params, model=model, T=1),
    }[family]()
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        optimizer.zero_grad()
        tokens = torch.randint(0, 40, (7, 3), generator=generator)
        model(tokens).pow(2).mean().backward()
        optimizer.step()
    return optimizer


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("family", FAMILIES)
def test_state_formulas_match_real_state(family):
    model = _real_model()
    optimizer = _trained(family, model)
    module_of = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
    if family in ("Shampoo", "SOAP"):
        group = optimizer.param_groups[0]
        for param in model.parameters():
            shapes = optimizer._layout(param, group).shapes
            for index, shape in enumerate(shapes):
                real = _floats(optimizer.state[param][f"block_{index}"])
                assert real == block_state_floats(family, shape=shape), (family, shape)
    else:
        blocks, _ = optimizer._ownership.blocks()
        for block in blocks:
            real = sum(_floats(optimizer.state[p]) for p in block)
            want = block_state_floats(family, block=block, module=module_of[id(block[0])])
            assert real == want, (family, [tuple(p.shape) for p in block])


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("family", FAMILIES)
def test_plan_is_the_real_assignment(family):
    meta = build_meta_model(LAYOUT)
    result = plan(meta, family, 3, MAX_DIM)
    assert result["owners"] == assign_owners(result["costs"], 3, result["sizes"])
    assert len(result["owners"]) == len(result["bytes"]) > 1
    # The costs are the ones the optimizer itself hands its distributor in training.
    real = plan(_real_model(), family, 3, MAX_DIM)
    assert real["costs"] == result["costs"] and real["sizes"] == result["sizes"]


def test_main_prints_every_family_and_rank_count(tmp_path, capsys):
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps(LAYOUT))
    rows = main(["--shapes", str(layout), "--ranks", "2,4", "--max-preconditioner-dim", str(MAX_DIM)])
    assert [(row["family"], row["ranks"]) for row in rows] == [(f, r) for f in FAMILIES for r in (2, 4)]
    for row in rows:
        assert row["cost"]["max_over_bound"] >= 1.0 - 1e-12 and row["bytes"]["max_over_mean"] >= 1.0
    assert "cost max/bound" in capsys.readouterr().out
    with pytest.raises(ValueError, match="Invalid layout"):
        build_meta_model([{"kind": "conv"}])


def test_adafisher_layer_cost_has_no_cubic_term():
    """AdaFisher keeps diagonal factors and decomposes nothing: a layer costs its factors'
    entries plus its parameters (a d³ model would put a 512-input classifier at 98% of the
    digits CNN's cost, its parameters being 53%)."""
    from benchmarks.plan_sharding import PlanningDistributor

    model = nn.Sequential(nn.Linear(512, 10), nn.Linear(10, 30))
    distributor = PlanningDistributor(2)
    AdaFisher(model.parameters(), model=model, distributor=distributor)._ownership.blocks()
    assert distributor.costs == [(513 + 10) + 5130, (11 + 30) + 330]
    distributor = PlanningDistributor(2)
    EKFAC(model.parameters(), model=model, distributor=distributor)._ownership.blocks()
    assert distributor.costs == [513**3 + 10**3 + 5130, 11**3 + 30**3 + 330]


@pytest.mark.parametrize("name", ["EKFAC", "SINGD"])
def test_blocked_layer_footprint_is_its_measured_state(name):
    """A blocked factor (EK-FAC's max_factor_dim, SINGD's block structure) is planned at the
    size its state really has, so a wide classifier no longer counts as dense."""
    from benchmarks.plan_sharding import PlanningDistributor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 10), nn.Tanh(), nn.Linear(10, 3))
    distributor = PlanningDistributor(2)
    if name == "EKFAC":
        optimizer = EKFAC(model, stats_every=1, max_factor_dim=16, distributor=distributor)
        factor_keys = ("activation_factor", "activation_basis", "gradient_factor", "gradient_basis",
                       "correction")
    else:
        optimizer = SINGD(model, T=1, alpha1=0.5, structures=("block16diagonal", "dense"),
                          distributor=distributor)
        factor_keys = ("K", "m_K", "C", "m_C")
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(torch.randn(8, 64)), torch.randint(0, 3, (8,))).backward()
    optimizer.step()
    optimizer._ownership.blocks()
    wide = optimizer.capture.layers[0]
    state = optimizer.state[wide.weight]
    measured = sum(value.numel() for key, value in state.items()
                   if key in factor_keys or key.startswith(tuple(k + "_block_" for k in factor_keys)))
    planned = distributor.sizes[0] - wide.weight.numel() - wide.bias.numel()
    assert planned == measured
    assert measured < 2 * 65 * 65  # far under a dense A and its basis
