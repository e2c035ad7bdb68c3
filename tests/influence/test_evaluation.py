"""Exact solver and LDS / leave-one-out evaluation, against brute force on small models."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from secondorder import influence
from tests.influence import oracle

WD = 1e-2


def _brute_gradients(model, x, y, reduction_loss):
    """Loop of single-example backward passes: ``(N, P)`` over all parameters."""
    rows = []
    for xi, yi in zip(x, y, strict=True):
        model.zero_grad()
        reduction_loss(model(xi[None]), yi[None]).backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return torch.stack(rows)


def test_empirical_fisher_solve_equals_brute_force():
    model, train, query = oracle.make_problem(n_train=9, n_query=3, tokens=2)
    task = influence.ClassificationTask()

    def loss(logits, y):
        return F.cross_entropy(logits, y, reduction="sum")

    g_train = _brute_gradients(model, *train, loss)
    g_query = _brute_gradients(model, *query, loss)
    fisher = g_train.T @ g_train / len(g_train)
    eye = torch.eye(fisher.shape[0], dtype=torch.float64)
    expected = torch.linalg.solve(fisher + 1e-2 * eye, g_query.T).T @ g_train.T
    result = influence.exact_scores(
        model,
        task,
        TensorDataset(*query),
        TensorDataset(*train),
        damping=1e-2,
        curvature="empirical_fisher",
    )
    torch.testing.assert_close(result.scores, expected)
    # block-diagonal: each layer alone, summed
    sizes = [model.fc1.weight.numel() + model.fc1.bias.numel()]
    sizes.append(fisher.shape[0] - sizes[0])
    pieces = torch.arange(fisher.shape[0]).split(sizes)
    blocks = sum(
        torch.linalg.solve(
            fisher[p][:, p] + 1e-2 * torch.eye(len(p), dtype=torch.float64), g_query[:, p].T
        ).T
        @ g_train[:, p].T
        for p in pieces
    )
    block = influence.exact_scores(
        model,
        task,
        TensorDataset(*query),
        TensorDataset(*train),
        damping=1e-2,
        curvature="empirical_fisher",
        block_diagonal=True,
    )
    torch.testing.assert_close(block.scores, blocks)
    torch.testing.assert_close(sum(block.per_layer.values()), block.scores)


def test_ggn_equals_hessian_for_a_linear_softmax_model_and_brute_force_hessian():
    torch.manual_seed(0)
    model = nn.Linear(3, 4).double()
    x = torch.randn(7, 3, dtype=torch.float64)
    y = torch.randint(0, 4, (7,))
    task = influence.ClassificationTask()
    data = TensorDataset(x, y)
    ggn, _ = influence.exact_curvature(model, task, data, curvature="ggn")
    hessian, _ = influence.exact_curvature(model, task, data, curvature="hessian")
    # convex loss of logits linear in the parameters: GGN = Hessian
    torch.testing.assert_close(ggn, hessian)
    # brute-force Hessian of the mean loss
    weight, bias = model.weight.detach(), model.bias.detach()

    def mean_loss(flat):
        w, b = flat[:12].reshape(4, 3), flat[12:]
        return F.cross_entropy(x @ w.T + b, y)

    brute = torch.autograd.functional.hessian(mean_loss, torch.cat([weight.flatten(), bias]))
    torch.testing.assert_close(hessian, brute)


def test_hessian_of_a_hidden_layer_model_equals_brute_force():
    model, train, _ = oracle.make_problem(n_train=6, n_query=2, tokens=2)
    task = influence.ClassificationTask()
    hessian, slices = influence.exact_curvature(
        model, task, TensorDataset(*train), curvature="hessian"
    )
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])

    def mean_loss(vector):
        params, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            params[name] = vector[start : start + shape.numel()].reshape(shape)
            start += shape.numel()
        logits = torch.func.functional_call(model, params, (train[0],))
        return F.cross_entropy(logits, train[1])

    torch.testing.assert_close(hessian, torch.autograd.functional.hessian(mean_loss, flat))
    assert [name for name, _ in slices] == ["fc1", "fc2"]


def test_bad_arguments_name_the_argument():
    model, train, query = oracle.make_problem(n_train=4, n_query=2)
    task = influence.ClassificationTask()
    with pytest.raises(ValueError, match="Invalid curvature"):
        influence.exact_curvature(model, task, TensorDataset(*train), curvature="fisher")
    with pytest.raises(ValueError, match="Invalid damping"):
        influence.exact_scores(
            model, task, TensorDataset(*query), TensorDataset(*train), damping=-1.0
        )
    with pytest.raises(ValueError, match="Invalid masks"):
        influence.linear_datamodeling_score(
            torch.zeros(2, 4), torch.zeros(3, 5), torch.zeros(3, 2)
        )
    with pytest.raises(ValueError, match="Invalid measurements"):
        influence.linear_datamodeling_score(
            torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(2, 3)
        )
    with pytest.raises(TypeError, match="Invalid train_fn"):
        influence.evaluate_lds(torch.zeros(2, 4), None, 4, count=3)


def test_lds_is_one_for_a_linear_ground_truth_and_spearman_by_brute_force():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 20, generator=generator, dtype=torch.float64)
    masks = influence.subset_masks(20, 15, seed=1)
    truth = -masks.double() @ scores.T + 5.0
    value, per_query = influence.linear_datamodeling_score(scores, masks, truth)
    assert value == pytest.approx(1.0)
    noisy = truth + torch.randn(truth.shape, generator=generator, dtype=torch.float64)
    value, per_query = influence.linear_datamodeling_score(scores, masks, noisy)
    predicted = -masks.double() @ scores.T
    for q in range(3):  # Spearman = Pearson of ranks (no ties)
        a = predicted[:, q].argsort().argsort().double()
        b = noisy[:, q].argsort().argsort().double()
        expected = torch.corrcoef(torch.stack([a, b]))[0, 1]
        assert float(per_query[q]) == pytest.approx(float(expected))


def _logistic_problem():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=generator, dtype=torch.float64)
    w = torch.tensor([[1.5, -2.0, 0.5]], dtype=torch.float64)
    y = (torch.rand(40, generator=generator, dtype=torch.float64) < torch.sigmoid(x @ w.T)[:, 0])
    query_x = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    query_y = (query_x @ w.T)[:, 0] > 0
    return (x, y.long()), (query_x, query_y.long())


def _fit(model, x, y, weights=None):
    weights = torch.ones(len(x), dtype=torch.float64) if weights is None else weights
    optimizer = torch.optim.LBFGS(
        model.parameters(), max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        losses = F.cross_entropy(model(x), y, reduction="none")
        objective = (weights * losses).sum() / len(weights) + 0.5 * WD * sum(
            p.square().sum() for p in model.parameters()
        )
        objective.backward()
        return objective

    optimizer.step(closure)
    return model


def test_exact_hessian_influence_predicts_leave_one_out_and_lds():
    (x, y), (qx, qy) = _logistic_problem()
    torch.manual_seed(0)
    model = _fit(nn.Linear(3, 2).double(), x, y)
    task = influence.ClassificationTask()

    def measure(m):
        with torch.no_grad():
            return F.cross_entropy(m(qx), qy, reduction="none")

    scores = influence.exact_scores(
        model, task, TensorDataset(qx, qy), TensorDataset(x, y), damping=WD, curvature="hessian"
    ).scores

    def retrain_without(index):
        weights = torch.ones(len(x), dtype=torch.float64)
        weights[index] = 0
        return measure(_fit(copy.deepcopy(model), x, y, weights))

    loo, changes = influence.evaluate_leave_one_out(
        scores, retrain_without, measure(model), removed=range(12)
    )
    assert changes.shape == (12, 6)
    # first-order influence with the exact Hessian of a smooth convex problem
    assert loo.pearson > 0.95 and loo.pooled_pearson > 0.95, loo

    def train_fn(indices, seed):
        torch.manual_seed(seed)
        fresh = nn.Linear(3, 2).double()
        weights = torch.zeros(len(x), dtype=torch.float64)
        weights[indices] = 1.0
        return measure(_fit(fresh, x, y, weights))

    result = influence.evaluate_lds(scores, train_fn, len(x), count=12, seeds=2)
    assert result.measurements.shape == (2, 12, 6)
    # a convex problem: both seeds reach the same optimum
    assert result.seed_to_seed > 0.99
    assert result.lds > 0.6, result.per_seed
    shuffled = scores[:, torch.randperm(40, generator=torch.Generator().manual_seed(3))]
    assert result.score(shuffled) < result.lds - 0.3
