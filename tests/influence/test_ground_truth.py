"""Ground-truth regression on sklearn digits (slow): EK-FAC tracks the exact block-GGN solve."""

import pytest
import torch

from benchmarks import influence_quality as quality
from secondorder.influence.evaluation import spearman_columns

pytestmark = pytest.mark.slow


def _pearson(a, b):
    a, b = a - a.mean(0), b - b.mean(0)
    return float(((a * b).sum(0) / (a.square().sum(0) * b.square().sum(0)).sqrt()).mean())


def test_ekfac_tracks_exact_block_ggn_on_digits():
    train, query = quality.load(300, 40)
    model = quality.train(quality.make_model(), *train)
    exact, _, _ = quality.exact(model, train, query, "ggn", block_diagonal=True)
    correlations = {}
    for strategy, fisher in (("ekfac", "exact"), ("identity", "empirical")):
        scores, _, _ = quality.ours(model, train, query, strategy, fisher)
        correlations[strategy] = _pearson(scores.T, exact.T)
    # measured 0.92 (ekfac) and 0.86 (identity) at 300 training points; influence.md §6.3: 0.91
    assert correlations["ekfac"] >= 0.88, correlations
    assert correlations["ekfac"] > correlations["identity"], correlations
    assert torch.isfinite(exact).all()
    assert float(spearman_columns(exact.T, exact.T).mean()) == pytest.approx(1.0)
