"""Fitting and scoring sharded over 2 gloo ranks equal the single-process results.

Ownership is checked by counting, inside each forked rank, the layers it eigendecomposed (the
module-level ``eigendecompose`` of :mod:`secondorder.influence.factors` is wrapped in the child
only); the expected owners are the LPT assignment of hand-computed ``groups·(d_out³ + d_in'³)``.
"""

from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

import secondorder.influence.factors as factors_module
from secondorder import influence
from secondorder.distributed.distributor import AllGatherDistributor, assign_owners
from tests.distributed.launcher import run_forked
from tests.influence import oracle
from tests.influence.test_pipeline import ConvEmbed, PairTask

pytestmark = pytest.mark.distributed

# TokenMLP: fc1 = Linear(4, 5) + bias (d_out 5, d_in' 5), fc2 = Linear(5, 3) + bias (3, 6).
TOKEN_MLP_COSTS = {"fc1": 5**3 + 5**3, "fc2": 3**3 + 6**3}
# ConvEmbed: emb (V 7 → 3; diagonal A), conv (3 out, 2·3·3 + 1 in), grouped (2 groups of
# 2 out, 1·2·2 + 1 in), head (4 out, 10 + 1 in).
CONV_EMBED_COSTS = {
    "emb": 3**3,
    "conv": 3**3 + 19**3,
    "grouped": 2 * (2**3 + 5**3),
    "head": 4**3 + 11**3,
}


def _run(n_train: int) -> dict:
    model, train, query = oracle.make_problem(n_train=n_train)
    task = influence.ClassificationTask(modules=["fc1"])  # one layer: per-token scores apply
    train_set, query_set = TensorDataset(*train), TensorDataset(*query)
    factors = influence.fit_factors(
        model, task, train_set, strategy="ekfac", batch_size=4, progress=False
    )
    pairwise = influence.compute_pairwise_scores(
        model,
        task,
        factors,
        query_set,
        train_set,
        damping=1e-3,
        per_token=True,
        per_layer=True,
        train_batch_size=3,
        progress=False,
    )
    self_scores = influence.compute_self_scores(
        model, task, factors, train_set, damping=1e-3, batch_size=3, progress=False
    )
    return {
        "lambda": factors.layers["fc1"]["lambda"],
        "covariance": factors.layers["fc1"]["gradient_covariance"],
        "scores": pairwise.scores,
        "tokens": pairwise.per_token,
        "self": self_scores.scores,
    }


@pytest.mark.parametrize("n_train", [13, 1])
def test_two_ranks_equal_one_process(n_train):
    expected = _run(n_train)
    results = run_forked(lambda rank, world_size: _run(n_train), world_size=2)
    for result in results:
        for key, value in expected.items():
            torch.testing.assert_close(result[key], value, rtol=1e-10, atol=1e-12)


def _counted_fit(*args, **kwargs) -> tuple[dict, list[str]]:
    """``fit_factors`` and the names of the layers this process eigendecomposed."""
    calls: list[str] = []
    original = factors_module.eigendecompose

    def counting(activation, gradient, name):
        calls.append(name)
        return original(activation, gradient, name)

    factors_module.eigendecompose = counting
    try:
        factors = influence.fit_factors(*args, progress=False, **kwargs)
    finally:
        factors_module.eigendecompose = original
    return factors.layers, calls


def _assert_layers_equal(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for name, tensors in expected.items():
        assert set(got[name]) == set(tensors), name
        for key, value in tensors.items():
            assert got[name][key].dtype == value.dtype, (name, key)
            torch.testing.assert_close(got[name][key], value, rtol=1e-10, atol=1e-12)


def _owned(costs: dict[str, float], names: list[str]) -> list[list[str]]:
    owners = assign_owners([costs[name] for name in names], 2)
    return [[name for name, owner in zip(names, owners) if owner == rank] for rank in range(2)]


@pytest.mark.parametrize("modules", [None, ["fc1"]], ids=["two-layers", "one-layer"])
def test_each_rank_eigendecomposes_only_the_layers_it_owns(modules):
    model, train, _ = oracle.make_problem(n_train=13)
    task = influence.ClassificationTask(modules=modules)
    dataset = TensorDataset(*train)
    expected, single_calls = _counted_fit(model, task, dataset, strategy="ekfac", batch_size=4)
    names = list(expected)
    assert single_calls == names  # one process owns every layer
    results = run_forked(
        lambda rank, world_size: _counted_fit(
            model, task, dataset, strategy="ekfac", batch_size=4
        ),
        world_size=2,
    )
    owned = _owned(TOKEN_MLP_COSTS, names)
    # two layers: one each; one layer: rank 1 owns nothing and still fits and receives it
    assert owned == ([["fc1"], ["fc2"]] if modules is None else [["fc1"], []])
    for rank, (layers, calls) in enumerate(results):
        assert calls == owned[rank]
        _assert_layers_equal(layers, expected)


def _conv_embed_problem():
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = ConvEmbed().double()
    tokens = torch.randint(0, 7, (11, 5), generator=generator)
    images = torch.randn(11, 2, 6, 6, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 4, (11,), generator=generator)
    return model, PairTask(), TensorDataset(tokens, images, labels)


def test_every_layer_kind_sharded_over_two_ranks():
    # a diagonal (embedding) activation factor and grouped convolutions travel through the
    # owner's gather with the shapes the non-owners expect
    model, task, dataset = _conv_embed_problem()
    expected, _ = _counted_fit(model, task, dataset, strategy="ekfac", batch_size=4)
    results = run_forked(
        lambda rank, world_size: _counted_fit(
            model, task, dataset, strategy="ekfac", batch_size=4, distributor=True
        ),
        world_size=2,
    )
    owned = _owned(CONV_EMBED_COSTS, list(expected))
    assert owned == [["conv"], ["emb", "grouped", "head"]]
    assert "activation_eigenvectors" not in expected["emb"]
    for rank, (layers, calls) in enumerate(results):
        assert calls == owned[rank]
        _assert_layers_equal(layers, expected)


def _stored_runs(rank: int, world_size: int, directory: str, model, dataset) -> dict:
    """Fit with partitions into ``directory``; refit (all loaded); refit after removing one
    computed partition and the final stage of the correction (resume)."""
    task = influence.ClassificationTask()
    kwargs = {"strategy": "ekfac", "batch_size": 4, "data_partitions": 2, "output_dir": directory}
    out = {}
    out["first"], out["first_calls"] = _counted_fit(model, task, dataset, **kwargs)
    out["again"], out["again_calls"] = _counted_fit(model, task, dataset, **kwargs)
    if rank == 0:  # a JSON marks a finished stage: without it the stage counts as missing
        for stage in ("lambda_kronecker", "lambda_kronecker.part1of2"):
            (Path(directory) / f"{stage}.json").unlink()
    torch.distributed.barrier()
    out["resumed"], out["resumed_calls"] = _counted_fit(model, task, dataset, **kwargs)
    return out


def test_partitions_and_stored_stages_on_two_ranks(tmp_path):
    model, train, _ = oracle.make_problem(n_train=13)
    dataset = TensorDataset(*train)
    expected, _ = _counted_fit(
        model, influence.ClassificationTask(), dataset, strategy="ekfac", batch_size=4
    )
    results = run_forked(_stored_runs, world_size=2, args=(str(tmp_path), model, dataset))
    for stage in ("covariance", "eigendecomposition", "lambda_kronecker"):
        assert (tmp_path / f"{stage}.json").is_file()
        for part in range(2):
            assert (tmp_path / f"{stage}.part{part}of2.json").is_file() == (
                stage != "eigendecomposition"
            )
    saved = influence.load_factors(tmp_path, "ekfac").layers
    _assert_layers_equal(saved, expected)  # rank 0 saved every layer
    # lambda_kronecker.part1of2 was removed before the resumed fit: it computed it again
    for rank, out in enumerate(results):
        assert out["first_calls"] == [["fc1"], ["fc2"]][rank]
        assert out["again_calls"] == out["resumed_calls"] == []  # the basis is loaded
        for key in ("first", "again", "resumed"):
            _assert_layers_equal(out[key], expected)


def _alone_and_explicit(rank: int, world_size: int, model, dataset) -> dict:
    task = influence.ClassificationTask()
    alone = _counted_fit(model, task, dataset, strategy="ekfac", batch_size=4, distributor=False)
    explicit = _counted_fit(
        model, task, dataset, strategy="ekfac", batch_size=4, distributor=AllGatherDistributor()
    )
    return {"alone": alone, "explicit": explicit}


def test_distributor_argument_on_two_ranks():
    model, train, _ = oracle.make_problem(n_train=13)
    dataset = TensorDataset(*train)
    expected, _ = _counted_fit(
        model, influence.ClassificationTask(), dataset, strategy="ekfac", batch_size=4
    )
    results = run_forked(_alone_and_explicit, world_size=2, args=(model, dataset))
    for rank, out in enumerate(results):
        layers, calls = out["alone"]  # distributor=False: this rank fits everything alone
        assert calls == ["fc1", "fc2"]
        _assert_layers_equal(layers, expected)
        layers, calls = out["explicit"]
        assert calls == [["fc1"], ["fc2"]][rank]
        _assert_layers_equal(layers, expected)


def test_invalid_distributor_is_named():
    model, train, _ = oracle.make_problem(n_train=4)
    dataset = TensorDataset(*train)
    task = influence.ClassificationTask()
    with pytest.raises(TypeError, match="distributor"):
        influence.fit_factors(model, task, dataset, distributor="gloo", progress=False)
    with pytest.raises(ValueError, match="process_group"):  # True needs torch.distributed
        influence.fit_factors(model, task, dataset, distributor=True, progress=False)
