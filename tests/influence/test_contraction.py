"""The scoring contraction gives the same scores in the original basis and in the eigenbasis."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from secondorder import influence
from secondorder.influence.collect import LayerRecorder
from secondorder.influence.contraction import PreparedQuery
from secondorder.influence.statistics import per_example_gradients


def _conv_problem():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 4, 3, padding=1, groups=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 6),
        nn.Tanh(),
        nn.Linear(6, 3),
    ).double()
    x = torch.randn(14, 2, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (14,))
    return model, TensorDataset(x[:10], y[:10]), TensorDataset(x[10:], y[10:])


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
@pytest.mark.parametrize("eigen", [False, True])
@pytest.mark.parametrize("rows_first", [False, True])
def test_both_bases_equal_dense_preconditioned_dot_products(
    strategy, eigen, rows_first, monkeypatch
):
    model, train, query = _conv_problem()
    task = influence.ClassificationTask()
    factors = influence.fit_factors(model, task, train, strategy=strategy, progress=False)
    preconditioners = factors.preconditioners(1e-3)
    query_batch = (query.tensors[0], query.tensors[1])
    train_batch = (train.tensors[0], train.tensors[1])
    monkeypatch.setattr(PreparedQuery, "_rows_first", staticmethod(lambda *_: rows_first))
    with LayerRecorder(model, task) as recorder:
        measured = recorder.measurement_pass(query_batch)
        trained = recorder.loss_pass(train_batch)
        for name, rows in measured.items():
            expected = (
                preconditioners[name].apply(per_example_gradients(rows)).flatten(1)
                @ per_example_gradients(trained[name]).flatten(1).T
            )
            for per_token in (False, True):
                prepared = PreparedQuery(preconditioners[name], rows, num_train=10)
                # force the basis of the pass instead of the cost choice
                monkeypatch.setattr(
                    prepared, "_choose", lambda *_, p=prepared: _force(p, eigen), raising=False
                )
                scores, tokens = prepared.scores(trained[name], per_token)
                torch.testing.assert_close(scores, expected, rtol=1e-10, atol=1e-12)
                if per_token:
                    torch.testing.assert_close(tokens.sum(-1), expected, rtol=1e-10, atol=1e-12)
            low = PreparedQuery(preconditioners[name], rows, num_train=10, rank=10_000)
            monkeypatch.setattr(low, "_choose", lambda *_, q=low: _force(q, eigen), raising=False)
            for per_token in (False, True):
                torch.testing.assert_close(low.scores(trained[name], per_token)[0], expected)
            for rows_cheaper in (False, True):
                monkeypatch.setattr(
                    PreparedQuery, "_low_rank_rows_cheaper", lambda *_, c=rows_cheaper: c
                )
                low = PreparedQuery(preconditioners[name], rows, num_train=10, rank=10_000)
                torch.testing.assert_close(low.scores(trained[name], False)[0], expected)


def _force(prepared: PreparedQuery, eigen: bool) -> None:
    prepared.eigen = eigen
    if prepared.rank is not None:
        if not eigen:
            prepared.left = prepared.gradient_basis @ prepared.left
            prepared.right = prepared.activation_basis @ prepared.right
        return
    if eigen:
        prepared._finish(prepared.matrices)
    else:
        prepared._finish(
            prepared.gradient_basis
            @ prepared.matrices
            @ prepared.activation_basis.transpose(-1, -2)
        )
    del prepared.matrices


def test_cost_choice_prefers_the_eigenbasis_for_single_position_layers():
    model, train, query = _conv_problem()
    task = influence.ClassificationTask()
    factors = influence.fit_factors(model, task, train, strategy="ekfac", progress=False)
    preconditioners = factors.preconditioners(1e-3)
    with LayerRecorder(model, task) as recorder:
        measured = recorder.measurement_pass(query.tensors)
        trained = recorder.loss_pass(train.tensors)
        prepared = PreparedQuery(preconditioners["5"], measured["5"], num_train=1)
        prepared.scores(trained["5"], False)
        # one training example: rotating its rows is cheaper than unprojecting 4 queries
        assert prepared.eigen


@pytest.mark.parametrize("rank", [None, 2])
def test_stacked_query_batches_score_as_their_concatenation(rank):
    """Streaming stacks every query batch of a layer into one operand; the stacked scores are
    the per-batch scores in order, and stacking an already scored batch is refused."""
    model, train, query = _conv_problem()
    task = influence.ClassificationTask()
    factors = influence.fit_factors(model, task, train, strategy="ekfac", progress=False)
    preconditioners = factors.preconditioners(1e-3)
    x, y = query.tensors
    with LayerRecorder(model, task) as recorder:
        first = recorder.measurement_pass((x[:2], y[:2]))
        second = recorder.measurement_pass((x[2:], y[2:]))
        trained = recorder.loss_pass(train.tensors)
        for name in first:

            def prepare(rows, name=name):
                generator = torch.Generator().manual_seed(0)
                return PreparedQuery(
                    preconditioners[name], rows, num_train=10, rank=rank, generator=generator
                )

            expected = torch.cat(
                [prepare(first[name]).scores(trained[name], False)[0],
                 prepare(second[name]).scores(trained[name], False)[0]]
            )
            stacked = PreparedQuery.stack([prepare(first[name]), prepare(second[name])])
            torch.testing.assert_close(
                stacked.scores(trained[name], False)[0], expected, rtol=1e-10, atol=1e-12
            )
            with pytest.raises(ValueError, match="before scoring"):
                PreparedQuery.stack([stacked, prepare(second[name])])
