"""Influence quality on scikit-learn data: LDS (two retraining seeds) and leave-one-out.

    python -m benchmarks.influence_quality [--datasets breast_cancer digits] [--lds M]
        [--loo N] [--kronfluence] [--sweep] [--out FILE]

Set-up (reference/influence.md §6): standardised features, an MLP ``d→32→32→C`` with tanh and
biases in float64, trained by full-batch L-BFGS on ``mean CE + ½·wd·‖θ‖²`` with ``wd = 1e-2``
(a regime where curvature matters). Damping = ``wd`` for every method.

* ``breast_cancer``: 569 × 30, 2 classes; 300 training / 150 query examples (2,146 parameters);
* ``digits``: 1,797 × 64, 10 classes; 600 training / 200 query examples (3,466 parameters).

Methods (every one scored through the public API): ``secondorder.influence`` identity,
diagonal, kfac and ekfac (true Fisher with seeded sampled labels; kfac and ekfac also with the
exact expectation over the classes and with the empirical Fisher), and
:func:`secondorder.influence.exact_scores`: the block-diagonal GGN (what per-layer methods
approximate), the full GGN and the full Hessian solves; kronfluence 1.0.1's ekfac with
``--kronfluence``.

Ground truth (:mod:`secondorder.influence.evaluation`):

* **LDS**: ``M`` random 50% subsets, each retrained from scratch with **two** initialisation
  seeds (``train_fn(indices, seed)``). Reported: the LDS against each seed, their mean, and
  the seed-to-seed Spearman of the retrained losses (the noise ceiling: a perfect linear
  predictor of one seed's losses cannot correlate with the other seed's much better than
  the seeds correlate with each other). ``|LDS(seed 0) − LDS(seed 1)|`` is the noise floor of
  a single-seed LDS.
* **LOO** (``--loo N``, warm-started, off by default: slow): remove the most negative and most
  positive examples by aggregate EK-FAC influence plus random ones, re-minimise from θ*;
  prediction ``+score/N``.

Reported per data set: a table of LDS (mean, per seed), LOO (when run), the correlation with
the exact block-GGN scores, and fit/score wall times.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
import time
import warnings

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from benchmarks.data import load_digits_split
from secondorder import influence
from secondorder.influence.evaluation import spearman_columns

WD = 1e-2
DATASETS = {"breast_cancer": (300, 150), "digits": (600, 200)}


def make_model(d_in: int = 64, classes: int = 10, seed: int = 0) -> nn.Sequential:
    """MLP ``d_in→32→32→classes``, tanh, float64, PyTorch's default initialisation."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d_in, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, classes)
    ).double()


def load(n_train: int, n_query: int, dataset: str = "digits"):
    """``(train_x, train_y), (query_x, query_y)`` in float64."""
    if dataset == "digits":
        split = load_digits_split()
        x_train, y_train, x_test, y_test = split.train_x, split.train_y, split.test_x, split.test_y
    elif dataset == "breast_cancer":
        from sklearn.datasets import load_breast_cancer

        bunch = load_breast_cancer()
        x = np.asarray(bunch.data, dtype=np.float64)
        y = np.asarray(bunch.target, dtype=np.int64)
        order = np.random.RandomState(0).permutation(len(x))
        x, y = x[order], y[order]
        mean, std = x[:n_train].mean(0), x[:n_train].std(0)
        std[std == 0] = 1.0
        x = torch.from_numpy((x - mean) / std)
        y = torch.from_numpy(y)
        x_train, y_train, x_test, y_test = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    else:
        raise ValueError(f"Invalid dataset: {dataset!r} (expected one of {sorted(DATASETS)})")
    return (x_train[:n_train].double(), y_train[:n_train]), (
        x_test[:n_query].double(),
        y_test[:n_query],
    )


def train(
    model: nn.Module, x, y, weights=None, *, tolerance: float = 1e-9, max_iter: int = 3000
) -> nn.Module:
    """Full-batch L-BFGS on ``Σ w_n L_n / N + ½·wd·‖θ‖²`` (``w`` = 1 by default, N = len(x))."""
    weights = torch.ones(len(x), dtype=torch.float64) if weights is None else weights
    optimizer = torch.optim.LBFGS(
        model.parameters(),
        lr=1,
        max_iter=max_iter,
        history_size=50,
        tolerance_grad=tolerance,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        losses = F.cross_entropy(model(x), y, reduction="none")
        objective = (weights * losses).sum() / len(x) + 0.5 * WD * sum(
            p.square().sum() for p in model.parameters()
        )
        objective.backward()
        return objective

    optimizer.step(closure)
    return model


def query_losses(model, query) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(query[0]), query[1], reduction="none")


def ours(model, train, query, strategy: str, fisher: str, seed: int = 0, damping=WD):
    """``(scores (Q, N), fit seconds, score seconds)`` from ``secondorder.influence``."""
    task = influence.ClassificationTask()
    train_set, query_set = TensorDataset(*train), TensorDataset(*query)
    start = time.perf_counter()
    factors = influence.fit_factors(
        model, task, train_set, strategy=strategy, fisher=fisher, seed=seed, batch_size=200,
        progress=False,
    )
    fitted = time.perf_counter()
    scores = influence.compute_pairwise_scores(
        model, task, factors, query_set, train_set, damping=damping, query_batch_size=200,
        train_batch_size=200, progress=False,
    ).scores
    return scores, fitted - start, time.perf_counter() - fitted


def exact(model, train, query, curvature: str, block_diagonal: bool, damping: float = WD):
    start = time.perf_counter()
    scores = influence.exact_scores(
        model, influence.ClassificationTask(), TensorDataset(*query), TensorDataset(*train),
        damping=damping, curvature=curvature, block_diagonal=block_diagonal,
    ).scores
    return scores, time.perf_counter() - start, 0.0


def kronfluence_run(model, train, query, directory: str):
    """kronfluence 1.0.1 ekfac (sampled Fisher, float64); ``None`` when not installed."""
    try:
        import kronfluence
        from kronfluence.arguments import FactorArguments, ScoreArguments
    except ImportError:
        return None

    class KfTask(kronfluence.Task):
        def compute_train_loss(self, batch, model, sample=False):
            inputs, labels = batch
            logits = model(inputs)
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits, -1), 1).flatten()
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            inputs, labels = batch
            return F.cross_entropy(model(inputs), labels, reduction="sum")

    wrapped = kronfluence.prepare_model(copy.deepcopy(model), KfTask())
    f64 = torch.float64
    factor_args = FactorArguments(
        strategy="ekfac", covariance_max_examples=None, lambda_max_examples=None,
        activation_covariance_dtype=f64, gradient_covariance_dtype=f64,
        eigendecomposition_dtype=f64, per_sample_gradient_dtype=f64, lambda_dtype=f64,
    )
    score_args = ScoreArguments(
        damping_factor=WD, query_gradient_svd_dtype=f64, per_sample_gradient_dtype=f64,
        precondition_dtype=f64, score_dtype=f64,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analyzer = kronfluence.Analyzer(
            analysis_name="quality", model=wrapped, task=KfTask(), cpu=True, disable_tqdm=True,
            output_dir=directory, log_level=logging.ERROR,
        )
        start = time.perf_counter()
        analyzer.fit_all_factors(
            factors_name="ekfac", dataset=TensorDataset(*train), per_device_batch_size=200,
            factor_args=factor_args, overwrite_output_dir=True,
        )
        fitted = time.perf_counter()
        analyzer.compute_pairwise_scores(
            scores_name="ekfac", factors_name="ekfac", query_dataset=TensorDataset(*query),
            train_dataset=TensorDataset(*train), per_device_query_batch_size=200,
            per_device_train_batch_size=200, score_args=score_args, overwrite_output_dir=True,
        )
        done = time.perf_counter()
        scores = analyzer.load_pairwise_scores("ekfac")["all_modules"].double()
    return scores, fitted - start, done - fitted


def all_scores(model, train_data, query, with_kronfluence: bool) -> tuple[dict, dict]:
    """Every method's ``(Q, N)`` scores and timings."""
    runs = [
        ("identity", "empirical"),
        ("diagonal", "sampled"),
        ("kfac", "sampled"),
        ("kfac", "exact"),
        ("kfac", "empirical"),
        ("ekfac", "sampled"),
        ("ekfac", "exact"),
        ("ekfac", "empirical"),
    ]
    scores, timings = {}, {}
    for strategy, fisher in runs:
        name = f"{strategy}" + ("" if strategy == "identity" else f", {fisher} Fisher")
        scores[name], *timings[name] = ours(model, train_data, query, strategy, fisher)
    for name, curvature, block in (
        ("exact block-GGN solve", "ggn", True),
        ("exact full GGN solve", "ggn", False),
        ("exact full Hessian solve", "hessian", False),
    ):
        scores[name], *timings[name] = exact(model, train_data, query, curvature, block)
    if with_kronfluence:
        with tempfile.TemporaryDirectory() as directory:
            run = kronfluence_run(model, train_data, query, directory)
        if run is not None:
            scores["kronfluence ekfac, sampled Fisher"], *timings[
                "kronfluence ekfac, sampled Fisher"
            ] = run
    return scores, timings


def damping_sweep(model, train_data, query, truth) -> dict:
    """LDS of the per-layer methods as the damping grows (the EK-FAC vs K-FAC question)."""
    print("damping sweep (LDS, mean of the two seeds):")
    print("| method | " + " | ".join(f"λ={d:g}" for d in SWEEP) + " |")
    print("|---" * (len(SWEEP) + 1) + "|")
    table = {}
    problem = (model, train_data, query)
    for name, make in (
        ("kfac, sampled Fisher", lambda d: ours(*problem, "kfac", "sampled", damping=d)),
        ("ekfac, sampled Fisher", lambda d: ours(*problem, "ekfac", "sampled", damping=d)),
        ("ekfac, exact Fisher", lambda d: ours(*problem, "ekfac", "exact", damping=d)),
        ("exact block-GGN solve", lambda d: exact(model, train_data, query, "ggn", True, d)),
        ("exact full GGN solve", lambda d: exact(model, train_data, query, "ggn", False, d)),
    ):
        table[name] = [truth.score(make(d)[0]) for d in SWEEP]
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in table[name]) + " |", flush=True)
    return table


SWEEP = (1e-2, 3e-2, 1e-1, 3e-1, 1.0)


def run_dataset(
    dataset: str, n_lds: int, n_loo: int, with_kronfluence: bool, sweep: bool = False
) -> dict:
    n_train, n_query = DATASETS[dataset]
    train_data, query = load(n_train, n_query, dataset)
    d_in, classes = train_data[0].shape[1], int(train_data[1].max()) + 1
    start = time.perf_counter()
    model = train(make_model(d_in, classes), *train_data)
    with torch.no_grad():
        train_ce = float(F.cross_entropy(model(train_data[0]), train_data[1]))
    print(
        f"\n## {dataset}: {n_train} train / {n_query} queries, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, trained in "
        f"{time.perf_counter() - start:.1f}s: train CE {train_ce:.3f}, "
        f"query CE {float(query_losses(model, query).mean()):.3f}",
        flush=True,
    )
    scores, timings = all_scores(model, train_data, query, with_kronfluence)

    def train_fn(indices, seed):
        keep = torch.as_tensor(indices)
        fresh = train(make_model(d_in, classes, seed), train_data[0][keep], train_data[1][keep])
        return query_losses(fresh, query)

    start = time.perf_counter()
    truth = influence.evaluate_lds(None, train_fn, n_train, count=n_lds, seeds=2, seed=1)
    lds_seconds = time.perf_counter() - start
    loo = None
    if n_loo > 0:
        aggregate = scores["ekfac, sampled Fisher"].sum(0)
        order = torch.argsort(aggregate)
        extremes = max(n_loo // 4, 1)
        chosen = order[:extremes].tolist() + order[-extremes:].tolist()
        rest = [
            i for i in torch.randperm(n_train, generator=torch.Generator().manual_seed(0)).tolist()
            if i not in chosen
        ]
        removed = chosen + rest[: max(n_loo - len(chosen), 0)]

        def retrain_without(index):
            weights = torch.ones(n_train, dtype=torch.float64)
            weights[index] = 0
            return query_losses(
                train(copy.deepcopy(model), *train_data, weights, tolerance=1e-10), query
            )

        loo = (removed, retrain_without)
    reference = scores["exact block-GGN solve"]
    rows = {}
    loo_changes = None
    for name, value in scores.items():
        per_seed = [
            influence.linear_datamodeling_score(value, truth.masks, m)[0]
            for m in truth.measurements
        ]
        row = {
            "lds": sum(per_seed) / 2,
            "lds_seed0": per_seed[0],
            "lds_seed1": per_seed[1],
            "vs_block_ggn_spearman": float(
                spearman_columns(value.T.double(), reference.T.double()).nanmean()
            ),
            "fit_s": timings[name][0],
            "score_s": timings[name][1],
        }
        if loo is not None:
            if loo_changes is None:
                base = query_losses(model, query)
                result, loo_changes = influence.evaluate_leave_one_out(
                    value, loo[1], base, loo[0]
                )
            else:
                result = influence.leave_one_out_correlation(value, loo[0], loo_changes)
            row.update(
                loo_pearson=result.pearson,
                loo_spearman=result.spearman,
                loo_pooled=result.pooled_pearson,
            )
        rows[name] = row
    print(
        f"LDS ground truth: {n_lds} subsets × 2 seeds retrained in {lds_seconds:.0f}s; "
        f"seed-to-seed Spearman {truth.seed_to_seed:.2f}"
    )
    loo_header = " LOO Pearson | LOO Spearman |" if loo is not None else ""
    print(
        f"| method | LDS (mean) | LDS seed 0 / seed 1 |{loo_header} vs block-GGN Spearman "
        f"| fit s | score s |"
    )
    print("|---" * (6 + (2 if loo is not None else 0)) + "|")
    for name, row in rows.items():
        loo_cells = (
            f" {row['loo_pearson']:.2f} | {row['loo_spearman']:.2f} |" if loo is not None else ""
        )
        print(
            f"| {name} | {row['lds']:.3f} | {row['lds_seed0']:.3f} / {row['lds_seed1']:.3f} |"
            f"{loo_cells} {row['vs_block_ggn_spearman']:.2f} | {row['fit_s']:.2f} "
            f"| {row['score_s']:.2f} |",
            flush=True,
        )
    sweep_table = damping_sweep(model, train_data, query, truth) if sweep else None
    return {
        "damping_sweep": sweep_table,
        "dataset": dataset,
        "n_train": n_train,
        "n_queries": n_query,
        "n_lds": n_lds,
        "lds_seeds": 2,
        "seed_to_seed": truth.seed_to_seed,
        "train_ce": train_ce,
        "methods": rows,
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["breast_cancer", "digits"])
    parser.add_argument("--lds", type=int, default=40, help="LDS subsets (each retrained twice)")
    parser.add_argument("--loo", type=int, default=0, help="leave-one-out retrains (slow)")
    parser.add_argument("--kronfluence", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="LDS against the damping")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [
        run_dataset(dataset, args.lds, args.loo, args.kronfluence, args.sweep)
        for dataset in args.datasets
    ]
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
