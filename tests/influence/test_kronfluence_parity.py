"""Parity with kronfluence 1.0.1 under matched float64 conventions (influence.md §5).

kronfluence is a test-only dependency, installed without its torchvision requirement::

    pip install --no-deps kronfluence==1.0.1
    pip install accelerate einops einconv opt_einsum safetensors tqdm
"""

import copy
import logging
import warnings

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from secondorder import influence
from tests.influence import oracle

kronfluence = pytest.importorskip("kronfluence")

DAMPING = 1e-3


class _KronfluenceTask(kronfluence.Task):
    def compute_train_loss(self, batch, model, sample=False):
        inputs, labels = batch
        logits = model(inputs)
        if sample:  # never used: the parity runs use the empirical Fisher
            raise AssertionError("sampling is not part of the parity test")
        return F.cross_entropy(logits, labels, reduction="sum")

    def compute_measurement(self, batch, model):
        inputs, labels = batch
        return F.cross_entropy(model(inputs), labels, reduction="sum")


def _kronfluence_scores(model, train, query, strategy, directory, extras=False):
    """kronfluence's pairwise scores; with ``extras`` also per-module and self scores."""
    from kronfluence.arguments import FactorArguments, ScoreArguments

    model = kronfluence.prepare_model(copy.deepcopy(model), _KronfluenceTask())
    float64 = torch.float64
    factor_args = FactorArguments(
        strategy=strategy,
        use_empirical_fisher=True,
        covariance_max_examples=None,
        lambda_max_examples=None,
        activation_covariance_dtype=float64,
        gradient_covariance_dtype=float64,
        eigendecomposition_dtype=float64,
        per_sample_gradient_dtype=float64,
        lambda_dtype=float64,
    )
    score_args = ScoreArguments(
        damping_factor=DAMPING,
        query_gradient_svd_dtype=float64,
        per_sample_gradient_dtype=float64,
        precondition_dtype=float64,
        score_dtype=float64,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analyzer = kronfluence.Analyzer(
            analysis_name="parity",
            model=model,
            task=_KronfluenceTask(),
            cpu=True,
            disable_tqdm=True,
            output_dir=str(directory),
            log_level=logging.WARNING,
        )
        analyzer.fit_all_factors(
            factors_name=strategy,
            dataset=TensorDataset(*train),
            per_device_batch_size=5,
            factor_args=factor_args,
            overwrite_output_dir=True,
        )
        analyzer.compute_pairwise_scores(
            scores_name=strategy,
            factors_name=strategy,
            query_dataset=TensorDataset(*query),
            train_dataset=TensorDataset(*train),
            per_device_query_batch_size=4,
            per_device_train_batch_size=5,
            score_args=score_args,
            overwrite_output_dir=True,
        )
        result = {"pairwise": analyzer.load_pairwise_scores(strategy)["all_modules"]}
        if extras:
            score_args.compute_per_module_scores = True
            analyzer.compute_pairwise_scores(
                scores_name="modules",
                factors_name=strategy,
                query_dataset=TensorDataset(*query),
                train_dataset=TensorDataset(*train),
                per_device_query_batch_size=4,
                per_device_train_batch_size=5,
                score_args=score_args,
                overwrite_output_dir=True,
            )
            result["modules"] = analyzer.load_pairwise_scores("modules")
            score_args.compute_per_module_scores = False
            analyzer.compute_self_scores(
                scores_name="self",
                factors_name=strategy,
                train_dataset=TensorDataset(*train),
                per_device_train_batch_size=5,
                score_args=score_args,
                overwrite_output_dir=True,
            )
            result["self"] = analyzer.load_self_scores("self")["all_modules"]
        return result


@pytest.mark.parametrize("strategy", ["identity", "diagonal", "kfac", "ekfac"])
def test_scores_match_kronfluence(strategy, tmp_path):
    model, train, query = oracle.make_problem(n_train=15, n_query=4, tokens=3)
    task = influence.ClassificationTask()
    factors = influence.fit_factors(
        model, task, TensorDataset(*train), strategy=strategy, batch_size=5, progress=False
    )
    ours = influence.compute_pairwise_scores(
        model,
        task,
        factors,
        TensorDataset(*query),
        TensorDataset(*train),
        damping=DAMPING,
        progress=False,
    ).scores
    theirs = _kronfluence_scores(model, train, query, strategy, tmp_path)["pairwise"]
    relative = float((ours - theirs).norm() / theirs.norm())
    print(f"{strategy}: relative difference {relative:.2e}")
    assert relative < 1e-8, relative


def _relative(ours, theirs):
    return float((ours - theirs).norm() / theirs.norm())


def test_per_module_and_self_scores_match_kronfluence(tmp_path):
    model, train, query = oracle.make_problem(n_train=15, n_query=4, tokens=3)
    task = influence.ClassificationTask()
    train_set = TensorDataset(*train)
    factors = influence.fit_factors(model, task, train_set, strategy="ekfac", progress=False)
    pairwise = influence.compute_pairwise_scores(
        model,
        task,
        factors,
        TensorDataset(*query),
        train_set,
        damping=DAMPING,
        per_layer=True,
        progress=False,
    )
    self_scores = influence.compute_self_scores(
        model, task, factors, train_set, damping=DAMPING, progress=False
    )
    theirs = _kronfluence_scores(model, train, query, "ekfac", tmp_path, extras=True)
    assert set(theirs["modules"]) == {"fc1", "fc2"}
    for name in ("fc1", "fc2"):
        assert _relative(pairwise.per_layer[name], theirs["modules"][name]) < 1e-8
    assert _relative(self_scores.scores, theirs["self"]) < 1e-8
