"""Influence quality on scikit-learn digits: leave-one-out and LDS ground truth (influence.md §6).

    python -m benchmarks.influence_quality [--quick] [--loo N] [--lds M] [--out FILE]

Set-up (reference/influence.md §6.1 and Run B of §6.3): ``load_digits`` standardised, 600
training and 200 query examples, MLP 64→32→32→10 with tanh and biases (3,466 parameters),
float64, trained by full-batch L-BFGS on ``mean CE + ½·wd·‖θ‖²`` with ``wd = 1e-2`` (a regime
where curvature matters; an interpolating toy makes every method look alike). Damping = ``wd``
for every method.

Methods: ``secondorder.influence`` identity / diagonal / kfac / ekfac (true Fisher with seeded
sampled labels, and ekfac also with the exact expectation over the 10 classes and with the
empirical Fisher), the exact **block-diagonal** GGN solve (one block per layer, what EK-FAC
approximates), the exact full GGN and the full Hessian solves, and kronfluence 1.0.1's ekfac
when it is installed.

Ground truth:

* **LOO** (warm-started): remove example ``m``, re-minimise ``Σ_{n≠m} L_n / N + ½·wd·‖θ‖²`` from
  θ*, record the change of every query loss; prediction ``+score/N``. Removed points: the most
  negative and most positive by aggregate EK-FAC influence plus random ones.
* **LDS**: ``M`` random 50% subsets retrained from the fixed initialisation; per query,
  Spearman between ``−mask @ scoresᵀ`` and the retrained query losses.

Cost: the default (30 LOO, 40 LDS retrains) took 36 minutes on a heavily shared 2-core machine
(~19 min of it LOO, ~10 min LDS); ``--quick`` (20 + 20) roughly halves the retraining.

Reported: mean over queries of per-query Pearson/Spearman (LOO), pooled LOO Pearson, LDS, the
correlation with the exact block-GGN scores, and wall times of fitting and scoring. The
kronfluence timing comparison uses identical settings on both sides (empirical Fisher, float64,
explicit damping), where the two agree to ~1e-14.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
import warnings

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vmap
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from benchmarks.data import load_digits_split
from secondorder import influence

WD = 1e-2


def make_model(seed: int = 0) -> nn.Sequential:
    """MLP 64→32→32→10, tanh, float64, PyTorch's default initialisation under ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10)
    ).double()


def load(n_train: int, n_query: int):
    """``(train_x, train_y), (query_x, query_y)`` in float64 from the digits split."""
    split = load_digits_split()
    return (split.train_x[:n_train].double(), split.train_y[:n_train]), (
        split.test_x[:n_query].double(),
        split.test_y[:n_query],
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


# ---------------------------------------------------------------------------- exact solves
def _flat_gradients(model, x, y) -> torch.Tensor:
    """Per-example loss gradients ``(N, P)`` in ``named_parameters`` order."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None], reduction="sum")

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g.flatten(1) for g in grads.values()], dim=1)


def _layer_slices(model) -> list[slice]:
    """Parameter index ranges of each Linear layer (weight and bias together)."""
    slices, start = [], 0
    for module in model:
        if isinstance(module, nn.Linear):
            size = module.weight.numel() + module.bias.numel()
            slices.append(slice(start, start + size))
            start += size
    return slices


def exact_matrices(model, train, hessian: bool = True) -> dict[str, torch.Tensor]:
    """Full GGN ``(1/N) Σ J_nᵀ(diag p − p pᵀ)J_n`` and Hessian of mean CE (no wd), ``(P, P)``."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = list(params)
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]
    flat = torch.cat([params[k].flatten() for k in names])

    def unflatten(vector):
        return {
            k: piece.reshape(s)
            for k, piece, s in zip(names, vector.split(sizes), shapes, strict=True)
        }

    def logits(vector, xi):
        return functional_call(model, unflatten(vector), (xi[None],))[0]

    x, y = train
    jac = vmap(jacrev(logits), in_dims=(None, 0))(flat, x)  # (N, C, P)
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=-1)
    curvature = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    ggn = torch.einsum("ncp,ncd,ndq->pq", jac, curvature, jac) / len(x)

    if not hessian:
        return {"ggn": ggn}

    def objective(vector):
        return F.cross_entropy(functional_call(model, unflatten(vector), (x,)), y)

    gradient = grad(objective)

    def hvp(tangent):
        return jvp(gradient, (flat,), (tangent,))[1]

    eye = torch.eye(len(flat), dtype=torch.float64)
    matrix = torch.cat([vmap(hvp)(chunk) for chunk in eye.split(256)], dim=0)
    return {"ggn": ggn, "hessian": (matrix + matrix.T) / 2}


def exact_scores(model, train, query, matrices) -> dict[str, torch.Tensor]:
    """Scores ``∇f_qᵀ (B + wd·I)⁻¹ ∇L_m`` for block-GGN, full GGN and full Hessian ``B``."""
    train_grads = _flat_gradients(model, *train)
    query_grads = _flat_gradients(model, *query)
    eye = torch.eye(train_grads.shape[1], dtype=torch.float64)
    result = {}
    block = torch.zeros_like(matrices["ggn"])
    for piece in _layer_slices(model):
        block[piece, piece] = matrices["ggn"][piece, piece]
    candidates = [("exact block-GGN solve", block), ("exact full GGN solve", matrices["ggn"])]
    if "hessian" in matrices:
        candidates.append(("exact full Hessian solve", matrices["hessian"]))
    for name, matrix in candidates:
        solved = torch.linalg.solve(matrix + WD * eye, query_grads.T).T
        result[name] = solved @ train_grads.T
    return result


# ---------------------------------------------------------------------------- influence runs
def ours(model, train, query, strategy: str, fisher: str, seed: int = 0):
    """``(scores (Q, N), fit seconds, score seconds)`` from ``secondorder.influence``."""
    task = influence.ClassificationTask()
    train_set, query_set = TensorDataset(*train), TensorDataset(*query)
    start = time.perf_counter()
    factors = influence.fit_factors(
        model,
        task,
        train_set,
        strategy=strategy,
        fisher=fisher,
        seed=seed,
        batch_size=200,
        progress=False,
    )
    fitted = time.perf_counter()
    scores = influence.compute_pairwise_scores(
        model,
        task,
        factors,
        query_set,
        train_set,
        damping=WD,
        query_batch_size=200,
        train_batch_size=200,
        progress=False,
    ).scores
    return scores, fitted - start, time.perf_counter() - fitted


def kronfluence_run(model, train, query, strategy: str, use_empirical_fisher: bool, directory: str):
    """kronfluence 1.0.1 with matched float64 settings; ``None`` when it is not installed."""
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
        strategy=strategy,
        use_empirical_fisher=use_empirical_fisher,
        covariance_max_examples=None,
        lambda_max_examples=None,
        activation_covariance_dtype=f64,
        gradient_covariance_dtype=f64,
        eigendecomposition_dtype=f64,
        per_sample_gradient_dtype=f64,
        lambda_dtype=f64,
    )
    score_args = ScoreArguments(
        damping_factor=WD,
        query_gradient_svd_dtype=f64,
        per_sample_gradient_dtype=f64,
        precondition_dtype=f64,
        score_dtype=f64,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analyzer = kronfluence.Analyzer(
            analysis_name="quality",
            model=wrapped,
            task=KfTask(),
            cpu=True,
            disable_tqdm=True,
            output_dir=directory,
            log_level=logging.ERROR,
        )
        start = time.perf_counter()
        analyzer.fit_all_factors(
            factors_name=strategy,
            dataset=TensorDataset(*train),
            per_device_batch_size=200,
            factor_args=factor_args,
            overwrite_output_dir=True,
        )
        fitted = time.perf_counter()
        analyzer.compute_pairwise_scores(
            scores_name=strategy,
            factors_name=strategy,
            query_dataset=TensorDataset(*query),
            train_dataset=TensorDataset(*train),
            per_device_query_batch_size=200,
            per_device_train_batch_size=200,
            score_args=score_args,
            overwrite_output_dir=True,
        )
        done = time.perf_counter()
        return (
            analyzer.load_pairwise_scores(strategy)["all_modules"].double(),
            fitted - start,
            done - fitted,
        )


# ---------------------------------------------------------------------------- ground truth
def loo_truth(model, train_data, query, removed: list[int]) -> torch.Tensor:
    """``(R, Q)`` change of each query loss when each removed example is dropped (warm start)."""
    base = query_losses(model, query)
    changes = []
    for index in removed:
        retrained = copy.deepcopy(model)
        weights = torch.ones(len(train_data[0]), dtype=torch.float64)
        weights[index] = 0
        train(retrained, train_data[0], train_data[1], weights)
        changes.append(query_losses(retrained, query) - base)
    return torch.stack(changes)


def lds_truth(init_state, train_data, query, masks: torch.Tensor) -> torch.Tensor:
    """``(M, Q)`` query losses of models retrained from ``init_state`` on each 50% subset."""
    losses = []
    for mask in masks:
        model = make_model()
        model.load_state_dict(init_state)
        keep = mask.bool()
        train(model, train_data[0][keep], train_data[1][keep])
        losses.append(query_losses(model, query))
    return torch.stack(losses)


def _ranks(values: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(values, axis=0), axis=0).astype(np.float64)


def _pearson_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(0)
    b = b - b.mean(0)
    return (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0) + 1e-300)


def evaluate(
    scores: torch.Tensor, n_train: int, removed, loo: torch.Tensor, masks, lds, reference
) -> dict:
    """Correlations of one method's ``(Q, N)`` scores with the ground truths."""
    predicted = (scores[:, removed].T / n_train).numpy()  # (R, Q): +score/N
    actual = loo.numpy()
    result = {
        "loo_pearson": float(np.nanmean(_pearson_columns(predicted, actual))),
        "loo_spearman": float(np.nanmean(_pearson_columns(_ranks(predicted), _ranks(actual)))),
        "loo_pooled_pearson": float(np.corrcoef(predicted.ravel(), actual.ravel())[0, 1]),
        "lds": float(
            np.nanmean(
                _pearson_columns(_ranks((-masks.double() @ scores.T).numpy()), _ranks(lds.numpy()))
            )
        ),
    }
    mine, exact = scores.T.numpy(), reference.T.numpy()  # (N, Q): per query across training points
    result["vs_block_ggn_pearson"] = float(np.nanmean(_pearson_columns(mine, exact)))
    result["vs_block_ggn_spearman"] = float(
        np.nanmean(_pearson_columns(_ranks(mine), _ranks(exact)))
    )
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smaller ground truth (CI-sized, ~minutes)"
    )
    parser.add_argument("--loo", type=int, default=None, help="number of leave-one-out retrains")
    parser.add_argument("--lds", type=int, default=None, help="number of LDS subsets")
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n_loo = args.loo if args.loo is not None else (20 if args.quick else 30)
    n_lds = args.lds if args.lds is not None else (20 if args.quick else 40)
    train_data, query = load(args.train, args.queries)
    n_train = len(train_data[0])

    start = time.perf_counter()
    model = make_model()
    init_state = copy.deepcopy(model.state_dict())
    train(model, *train_data)
    with torch.no_grad():
        train_ce = float(F.cross_entropy(model(train_data[0]), train_data[1]))
    query_ce = float(query_losses(model, query).mean())
    print(
        f"trained in {time.perf_counter() - start:.1f}s: "
        f"train CE {train_ce:.3f}, query CE {query_ce:.3f}"
    )

    methods: dict[str, dict] = {}
    scores: dict[str, torch.Tensor] = {}
    runs = [
        ("identity", "empirical"),
        ("diagonal", "sampled"),
        ("kfac", "sampled"),
        ("ekfac", "sampled"),
        ("ekfac", "exact"),
        ("ekfac", "empirical"),
    ]
    for strategy, fisher in runs:
        name = f"secondorder {strategy}" + ("" if strategy == "identity" else f", {fisher} Fisher")
        scores[name], fit_s, score_s = ours(model, train_data, query, strategy, fisher)
        methods[name] = {"fit_s": fit_s, "score_s": score_s}
    start = time.perf_counter()
    exact = exact_scores(model, train_data, query, exact_matrices(model, train_data))
    exact_seconds = time.perf_counter() - start
    for name, value in exact.items():
        scores[name] = value
        methods[name] = {"fit_s": exact_seconds, "score_s": 0.0}
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        for strategy, empirical in (("ekfac", False), ("ekfac", True)):
            run = kronfluence_run(model, train_data, query, strategy, empirical, directory)
            if run is not None:
                name = f"kronfluence {strategy}, {'empirical' if empirical else 'sampled'} Fisher"
                scores[name], fit_s, score_s = run
                methods[name] = {"fit_s": fit_s, "score_s": score_s}

    aggregate = scores["secondorder ekfac, sampled Fisher"].sum(0)
    order = torch.argsort(aggregate)
    extremes = max(n_loo // 4, 1)
    chosen = order[:extremes].tolist() + order[-extremes:].tolist()
    rest = [
        i
        for i in torch.randperm(n_train, generator=torch.Generator().manual_seed(0)).tolist()
        if i not in chosen
    ]
    removed = chosen + rest[: max(n_loo - len(chosen), 0)]
    start = time.perf_counter()
    loo = loo_truth(model, train_data, query, removed)
    loo_seconds = time.perf_counter() - start
    masks = (torch.rand(n_lds, n_train, generator=torch.Generator().manual_seed(1)) < 0.5).to(
        torch.float64
    )
    start = time.perf_counter()
    lds = lds_truth(init_state, train_data, query, masks)
    lds_seconds = time.perf_counter() - start
    print(
        f"ground truth: {len(removed)} LOO retrains in {loo_seconds:.0f}s, "
        f"{n_lds} LDS retrains in {lds_seconds:.0f}s"
    )

    reference = scores["exact block-GGN solve"]
    for name, value in scores.items():
        methods[name].update(evaluate(value, n_train, removed, loo, masks, lds, reference))
    header = (
        "| method | LOO Pearson | LOO Spearman | LOO pooled | LDS | vs block-GGN (P / S) "
        "| fit s | score s |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    print(header)
    for name, row in methods.items():
        print(
            f"| {name} | {row['loo_pearson']:.2f} | {row['loo_spearman']:.2f} "
            f"| {row['loo_pooled_pearson']:.2f} | "
            f"{row['lds']:.2f} | {row['vs_block_ggn_pearson']:.2f} / "
            f"{row['vs_block_ggn_spearman']:.2f} | "
            f"{row['fit_s']:.2f} | {row['score_s']:.2f} |"
        )
    ours_name, theirs_name = (
        "secondorder ekfac, empirical Fisher",
        "kronfluence ekfac, empirical Fisher",
    )
    if theirs_name in scores:
        difference = float(
            (scores[ours_name] - scores[theirs_name]).norm() / scores[theirs_name].norm()
        )
        ratio = (methods[ours_name]["fit_s"] + methods[ours_name]["score_s"]) / (
            methods[theirs_name]["fit_s"] + methods[theirs_name]["score_s"]
        )
        print(
            f"ekfac vs kronfluence (empirical Fisher, float64): "
            f"relative difference {difference:.1e}, "
            f"wall-time ratio (fit + score) {ratio:.2f}"
        )
        methods["_comparison"] = {"relative_difference": difference, "wall_time_ratio": ratio}
    summary = {
        "train_ce": train_ce,
        "query_ce": query_ce,
        "n_train": n_train,
        "n_queries": len(query[0]),
        "n_loo": len(removed),
        "n_lds": n_lds,
        "methods": methods,
    }
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2)
    return summary


if __name__ == "__main__":
    main()
