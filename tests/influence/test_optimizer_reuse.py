"""secondorder.EKFAC's accumulated statistics, handed to influence, equal a fresh fit."""

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import secondorder.optimizers.ekfac as ekfac_module
from secondorder import influence
from tests.influence import oracle

DAMPING = 1e-3


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_optimizer_factors_equal_fitted_factors(strategy):
    model, train, query = oracle.make_problem(n_train=12)
    x, y = train
    fitted = influence.fit_factors(
        model,
        influence.ClassificationTask(),
        TensorDataset(*train),
        strategy=strategy,
        batch_size=5,
        progress=False,
    )
    # one statistics step over the same data, fed as three accumulated micro-batches of mean losses
    # the paper's per-example correction: what a fresh EK-FAC fit computes
    optimizer = ekfac_module.EKFAC(model, lr=0.0, stat_decay=0.0, correction="per_example")
    for chunk in torch.arange(12).split(4):
        (F.cross_entropy(model(x[chunk]), y[chunk]) * len(chunk) / 12).backward()
    optimizer.step()
    reused = influence.InfluenceFactors.from_optimizer(optimizer, strategy=strategy)
    for name in ("fc1", "fc2"):
        mine, theirs = fitted.layers[name], reused.layers[name]
        torch.testing.assert_close(
            mine["activation_covariance"] / mine["activation_count"],
            theirs["activation_covariance"],
        )
        torch.testing.assert_close(
            mine["gradient_covariance"] / mine["gradient_count"], theirs["gradient_covariance"]
        )
        for key in ("activation_eigenvalues", "gradient_eigenvalues"):
            torch.testing.assert_close(mine[key], theirs[key])
        if strategy == "ekfac":
            # Λ squares the rotated gradients, so it does not depend on the eigenvectors' signs
            torch.testing.assert_close(mine["lambda"] / mine["lambda_count"], theirs["lambda"])
    task = influence.ClassificationTask()
    scores = [
        influence.compute_pairwise_scores(
            model,
            task,
            factors,
            TensorDataset(*query),
            TensorDataset(*train),
            damping=DAMPING,
            progress=False,
        ).scores
        for factors in (fitted, reused)
    ]
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-10, atol=1e-12)


def test_optimizer_without_steps_is_refused():
    model, _, _ = oracle.make_problem()
    optimizer = ekfac_module.EKFAC(model, lr=0.0)
    with pytest.raises(ValueError, match="eigenbasis"):
        influence.InfluenceFactors.from_optimizer(optimizer)
    with pytest.raises(TypeError, match="optimizer"):
        influence.InfluenceFactors.from_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
