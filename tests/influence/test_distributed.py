"""Fitting and scoring sharded over 2 gloo ranks equal the single-process results."""

import pytest
import torch
from torch.utils.data import TensorDataset

from secondorder import influence
from tests.distributed.launcher import run_forked
from tests.influence import oracle

pytestmark = pytest.mark.distributed


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
