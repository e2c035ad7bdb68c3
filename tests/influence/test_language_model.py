"""Language-model tasks: prompt masking, sampled tokens, per-token scores, untracked positions."""

import warnings

import pytest
import torch
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from benchmarks.models import ByteTransformer
from secondorder import influence
from secondorder.precond.linalg import NumericalWarning


def _problem():
    torch.manual_seed(0)
    model = ByteTransformer(d_model=8, n_layers=1, n_heads=2, d_ff=16, context=6, vocab=256)
    model = model.double().eval()
    windows = torch.randint(0, 256, (7, 7))
    train = TensorDataset(windows[:, :-1], windows[:, 1:])
    query_targets = windows[:2, 1:].clone()
    query_targets[:, :3] = -100  # the prompt's positions do not count
    query = TensorDataset(windows[:2, :-1], query_targets)
    modules = [
        name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
    ]
    return model, train, query, modules + ["tok"]


def _flat_gradients(model, inputs, targets, modules):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, y):
        logits = functional_call(model, p, (x[None],))
        return F.cross_entropy(logits.flatten(0, 1), y, ignore_index=-100, reduction="sum")

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, inputs, targets)
    keep = [k for k in grads if k.rsplit(".", 1)[0] in modules]
    return torch.cat([grads[k].flatten(1) for k in keep], dim=1)


def test_identity_scores_and_tokens_for_a_transformer():
    model, train, query, modules = _problem()
    task = influence.LanguageModelTask(modules=modules)
    factors = influence.fit_factors(model, task, train, strategy="identity", progress=False)
    result = influence.compute_pairwise_scores(
        model, task, factors, query, train, per_token=True, train_batch_size=3, progress=False
    )
    expected = (
        _flat_gradients(model, *query.tensors, modules)
        @ _flat_gradients(model, *train.tensors, modules).T
    )
    torch.testing.assert_close(result.scores, expected)
    assert result.per_token.shape == (2, 7, 6)
    torch.testing.assert_close(result.per_token.sum(-1), result.scores)
    # for the output layer alone a position's score is the loss term predicting that token:
    # scoring targets truncated after position 3 reproduces the first three positions
    head = influence.LanguageModelTask(modules=["head"])
    head_factors = influence.fit_factors(model, head, train, strategy="ekfac", progress=False)
    full = influence.compute_pairwise_scores(
        model, head, head_factors, query, train, per_token=True, damping=1e-3, progress=False
    )
    truncated = train.tensors[1].clone()
    truncated[:, 3:] = -100
    partial = influence.compute_pairwise_scores(
        model,
        head,
        head_factors,
        query,
        TensorDataset(train.tensors[0], truncated),
        damping=1e-3,
        progress=False,
    )
    torch.testing.assert_close(partial.scores, full.per_token[:, :, :3].sum(-1))


def test_ekfac_fit_with_sampled_tokens_keeps_ignored_positions():
    model, train, query, modules = _problem()
    task = influence.LanguageModelTask(modules=modules)
    inputs, targets = train.tensors
    targets = targets.clone()
    targets[:, :2] = -100
    masked = TensorDataset(inputs, targets)
    factors = influence.fit_factors(
        model, task, masked, strategy="ekfac", fisher="sampled", seed=1, progress=False
    )
    # positions with ignored targets get no output gradient at the head, sampled or not
    empirical = influence.fit_factors(model, task, masked, strategy="ekfac", progress=False)
    for layer in (factors.layers["head"], empirical.layers["head"]):
        assert torch.isfinite(layer["lambda"]).all()
    scores = influence.compute_pairwise_scores(model, task, factors, query, masked, progress=False)
    assert torch.isfinite(scores.scores).all()


def test_position_embedding_without_batch_dimension_is_refused():
    model, train, _, modules = _problem()
    task = influence.LanguageModelTask(modules=modules + ["pos"])
    with pytest.raises(ValueError, match="pos"):
        influence.fit_factors(model, task, train, strategy="kfac", progress=False)


def test_non_finite_statistics_warn_and_do_not_crash():
    model, train, _, modules = _problem()
    task = influence.LanguageModelTask(modules=["head"])
    with torch.no_grad():
        model.head.bias[0] = float("inf")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        factors = influence.fit_factors(model, task, train, strategy="kfac", progress=False)
    assert any(issubclass(w.category, NumericalWarning) for w in caught)
    layer = factors.layers["head"]
    eye = torch.eye(layer["activation_eigenvectors"].shape[-1], dtype=torch.float64)
    torch.testing.assert_close(layer["activation_eigenvectors"][0], eye)
