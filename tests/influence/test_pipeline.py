"""Invariances, storage, Fisher modes, query batching, subsets, top-k and argument checks."""

import json

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from secondorder import influence
from tests.influence import oracle

DAMPING = 1e-3


def _fit(model, train, **kwargs):
    kwargs.setdefault("progress", False)
    return influence.fit_factors(
        model, influence.ClassificationTask(), TensorDataset(*train), **kwargs
    )


def _pairwise(model, factors, train, query, **kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("damping", DAMPING)
    return influence.compute_pairwise_scores(
        model,
        influence.ClassificationTask(),
        factors,
        TensorDataset(*query),
        TensorDataset(*train),
        **kwargs,
    )


@pytest.mark.parametrize("strategy", ["diagonal", "kfac", "ekfac"])
def test_invariant_to_batch_size_and_partitions(strategy):
    model, train, query = oracle.make_problem(n_train=13)
    reference = _pairwise(
        model, _fit(model, train, strategy=strategy, batch_size=13), train, query
    ).scores
    for kwargs in ({"batch_size": 1}, {"batch_size": 4, "data_partitions": 3}):
        factors = _fit(model, train, strategy=strategy, **kwargs)
        scores = _pairwise(
            model, factors, train, query, train_batch_size=kwargs["batch_size"], query_batch_size=3
        ).scores
        torch.testing.assert_close(scores, reference, rtol=1e-10, atol=1e-12)


def test_partition_sums_add_up():
    """Stats fitted on two disjoint subsets add up to those of the whole set."""
    model, train, _ = oracle.make_problem(n_train=10)
    whole = _fit(model, train, strategy="diagonal").layers
    first = _fit(model, train, strategy="diagonal", indices=range(0, 4)).layers
    second = _fit(model, train, strategy="diagonal", indices=range(4, 10)).layers
    for name in whole:
        torch.testing.assert_close(
            first[name]["lambda"] + second[name]["lambda"], whole[name]["lambda"]
        )


def test_subsets_select_rows_and_columns():
    model, train, query = oracle.make_problem()
    factors = _fit(model, train, strategy="ekfac")
    full = _pairwise(model, factors, train, query).scores
    part = _pairwise(model, factors, train, query, query_indices=[3, 1], train_indices=[0, 7, 5])
    torch.testing.assert_close(part.scores, full[[3, 1]][:, [0, 7, 5]])
    assert part.train_indices == [0, 7, 5] and part.query_indices == [3, 1]


def test_top_k_and_normalisation():
    model, train, query = oracle.make_problem()
    result = _pairwise(model, _fit(model, train, strategy="ekfac"), train, query)
    best = result.top_k(3)
    order = torch.argsort(result.scores, dim=1, descending=True)
    torch.testing.assert_close(best.helpful_indices, order[:, :3])
    torch.testing.assert_close(best.harmful_indices, order.flip(1)[:, :3])
    torch.testing.assert_close(best.helpful_scores, result.scores.gather(1, order[:, :3]))
    assert (best.harmful_scores <= best.helpful_scores[:, -1:]).all()
    torch.testing.assert_close(result.normalized(), result.scores / 12)
    torch.testing.assert_close(result.normalized(1000), result.scores / 1000)


def test_low_rank_full_rank_reproduces_and_error_decreases():
    model, train, query = oracle.make_problem()
    factors = _fit(model, train, strategy="ekfac")
    exact = _pairwise(model, factors, train, query).scores
    full_rank = _pairwise(
        model, factors, train, query, low_rank=5, full_svd=True
    ).scores  # min(d_out, d_in') <= 5
    torch.testing.assert_close(full_rank, exact)
    errors = [
        float((_pairwise(model, factors, train, query, low_rank=k).scores - exact).norm())
        for k in (1, 2, 4)
    ]
    assert errors[0] > errors[1] > errors[2]


def test_low_rank_per_token_matches_full_per_token():
    model, train, query = oracle.make_problem()
    task = influence.ClassificationTask(modules=["fc1"])  # T = 3 positions
    train_set, query_set = TensorDataset(*train), TensorDataset(*query)
    factors = influence.fit_factors(model, task, train_set, strategy="ekfac", progress=False)
    results = [
        influence.compute_pairwise_scores(
            model,
            task,
            factors,
            query_set,
            train_set,
            damping=DAMPING,
            per_token=True,
            low_rank=rank,
            full_svd=True,
            progress=False,
        )
        for rank in (None, 5)
    ]
    torch.testing.assert_close(results[1].per_token, results[0].per_token)
    torch.testing.assert_close(results[1].scores, results[0].scores)


def test_stage_storage_skip_refuse_and_load(tmp_path):
    model, train, query = oracle.make_problem()
    first = _fit(model, train, strategy="ekfac", output_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted(
        f"{stage}.{ext}"
        for stage in ("covariance", "eigendecomposition", "lambda_kronecker")
        for ext in ("json", "safetensors")
    )
    record = json.loads((tmp_path / "covariance.json").read_text())
    assert (
        record["arguments"]["fisher"] == "empirical" and record["arguments"]["num_examples"] == 12
    )
    # same arguments: loaded, not recomputed (a different batch size does not matter)
    mtime = (tmp_path / "lambda_kronecker.safetensors").stat().st_mtime_ns
    again = _fit(model, train, strategy="ekfac", output_dir=tmp_path, batch_size=3)
    assert (tmp_path / "lambda_kronecker.safetensors").stat().st_mtime_ns == mtime
    for name in first.layers:
        for key, value in first.layers[name].items():
            torch.testing.assert_close(again.layers[name][key], value)
    loaded = influence.load_factors(tmp_path, "ekfac")
    torch.testing.assert_close(
        _pairwise(model, loaded, train, query).scores, _pairwise(model, first, train, query).scores
    )
    # different arguments or a different model: refused with the difference named
    with pytest.raises(ValueError, match="fisher"):
        _fit(model, train, strategy="ekfac", output_dir=tmp_path, fisher="exact")
    with pytest.raises(ValueError, match="num_examples"):
        _fit(model, train, strategy="ekfac", output_dir=tmp_path, indices=range(6))
    other_labels = (train[0], (train[1] + 1) % 3)
    with pytest.raises(ValueError, match="data"):
        _fit(model, other_labels, strategy="ekfac", output_dir=tmp_path)
    with torch.no_grad():
        model.fc1.weight.add_(0.1)
    with pytest.raises(ValueError, match="model's weights differ"):
        _fit(model, train, strategy="ekfac", output_dir=tmp_path)
    _fit(model, train, strategy="ekfac", output_dir=tmp_path, overwrite=True)  # recomputes
    with pytest.raises(ValueError, match="lambda_identity"):
        influence.load_factors(tmp_path, "diagonal")


def test_kfac_then_ekfac_share_stages(tmp_path):
    model, train, _ = oracle.make_problem()
    _fit(model, train, strategy="kfac", output_dir=tmp_path)
    assert not (tmp_path / "lambda_kronecker.json").exists()
    _fit(model, train, strategy="ekfac", output_dir=tmp_path)
    assert (tmp_path / "lambda_kronecker.json").exists()


def test_sampled_fisher_is_reproducible_and_differs_from_empirical():
    model, train, _ = oracle.make_problem(n_train=20)
    first = _fit(model, train, strategy="ekfac", fisher="sampled", seed=3, batch_size=7)
    second = _fit(model, train, strategy="ekfac", fisher="sampled", seed=3, batch_size=7)
    other = _fit(model, train, strategy="ekfac", fisher="sampled", seed=4, batch_size=7)
    empirical = _fit(model, train, strategy="ekfac", batch_size=7)
    for name in first.layers:
        assert torch.equal(first.layers[name]["lambda"], second.layers[name]["lambda"])
        assert not torch.equal(first.layers[name]["lambda"], other.layers[name]["lambda"])
        assert not torch.allclose(
            first.layers[name]["gradient_covariance"], empirical.layers[name]["gradient_covariance"]
        )
        # A does not depend on labels
        torch.testing.assert_close(
            first.layers[name]["activation_covariance"],
            empirical.layers[name]["activation_covariance"],
        )


def test_exact_fisher_equals_expectation_over_classes():
    """S and Λ from fisher='exact' equal Σ_c p_c (·) over per-class oracle gradients."""
    model, train, _ = oracle.make_problem(n_train=6)
    x, _ = train
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=-1)
    factors = _fit(model, train, strategy="ekfac", fisher="exact", batch_size=4)
    for name in ("fc1", "fc2"):
        layer = factors.layers[name]
        basis_s = layer["gradient_eigenvectors"][0]
        basis_a = layer["activation_eigenvectors"][0]
        expected_s, expected_lambda = 0, 0
        for label in range(3):
            labels = torch.full((6,), label)
            a, g = oracle.layer_rows(model, x, labels)[name]
            weight = probs[:, label]
            flat = g.reshape(-1, g.shape[-1]) * weight.repeat_interleave(g.shape[1])[:, None].sqrt()
            expected_s = expected_s + flat.T @ flat / flat.shape[0]
            matrices = oracle.per_example_matrices(model, x, labels)[name]
            rotated = basis_s.T @ matrices @ basis_a
            expected_lambda = expected_lambda + (weight[:, None, None] * rotated.square()).mean(0)
        torch.testing.assert_close(
            layer["gradient_covariance"][0] / layer["gradient_count"], expected_s
        )
        torch.testing.assert_close(layer["lambda"][0] / layer["lambda_count"], expected_lambda)


def test_token_mask_excludes_positions():
    """A masked padded position changes nothing: same factors as the unpadded sequences."""

    class MaskedTask(influence.ClassificationTask):
        def token_mask(self, batch):
            return batch[0].abs().sum(-1) != 0

    model, train, _ = oracle.make_problem(tokens=3)
    x, y = train
    x_padded = torch.cat([x, torch.zeros(x.shape[0], 2, 4, dtype=x.dtype)], dim=1)
    # mean pooling over T would see the padding, so compare fc1 factors only (fc1 is per token)
    masked = influence.fit_factors(
        model,
        MaskedTask(modules=["fc1"]),
        TensorDataset(x_padded, y),
        strategy="kfac",
        progress=False,
    ).layers["fc1"]
    plain = influence.fit_factors(
        model,
        influence.ClassificationTask(modules=["fc1"]),
        TensorDataset(x, y),
        strategy="kfac",
        progress=False,
    ).layers["fc1"]
    torch.testing.assert_close(masked["activation_covariance"], plain["activation_covariance"])
    assert float(masked["activation_count"]) == float(plain["activation_count"]) == 36


class ConvEmbed(nn.Module):
    """Embedding → mean, Conv2d and grouped dilated Conv2d branches, Linear head: every kind."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 3)
        self.conv = nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1, dilation=1)
        self.grouped = nn.Conv2d(2, 4, kernel_size=2, groups=2, dilation=2)
        self.head = nn.Linear(3 + 3 + 4, 4)

    def forward(self, batch):
        tokens, image = batch
        text = self.emb(tokens).mean(1)
        pooled = torch.tanh(self.conv(image)).mean(dim=(2, 3))
        grouped = torch.tanh(self.grouped(image)).mean(dim=(2, 3))
        return self.head(torch.cat([text, pooled, grouped], dim=-1))


class PairTask(influence.InfluenceTask):
    def compute_train_loss(self, batch, model, sample=False, generator=None):
        tokens, image, labels = batch
        return F.cross_entropy(model((tokens, image)), labels, reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)


def test_identity_scores_for_embedding_and_conv_equal_gradient_dot_products():
    torch.manual_seed(0)
    model = ConvEmbed().double()
    tokens = torch.randint(0, 7, (9, 5))
    images = torch.randn(9, 2, 6, 6, dtype=torch.float64)
    labels = torch.randint(0, 4, (9,))
    dataset = TensorDataset(tokens, images, labels)
    task = PairTask()
    factors = influence.fit_factors(model, task, dataset, strategy="identity", progress=False)
    result = influence.compute_pairwise_scores(
        model, task, factors, dataset, dataset, per_layer=True, train_batch_size=4, progress=False
    )
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, t, i, y):
        return F.cross_entropy(
            functional_call(model, p, ((t[None], i[None]),)), y[None], reduction="sum"
        )

    grads = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, tokens, images, labels)
    flat = torch.cat([g.flatten(1) for g in grads.values()], dim=1)
    torch.testing.assert_close(result.scores, flat @ flat.T)
    assert set(result.per_layer) == {"emb", "conv", "grouped", "head"}
    ekfac = influence.fit_factors(
        model, task, dataset, strategy="ekfac", batch_size=4, progress=False
    )
    layer = ekfac.layers["emb"]  # one-hot inputs: a diagonal A holding the token counts
    torch.testing.assert_close(
        layer["activation_covariance"][0], torch.bincount(tokens.flatten(), minlength=7).double()
    )
    scores = influence.compute_pairwise_scores(
        model, task, ekfac, dataset, dataset, damping=1e-2, progress=False, train_batch_size=4
    )
    # dense oracle: K diag(diag(Kᵀ EF K)) Kᵀ per layer with the fitted bases, EF from torch.func
    matrices = {  # (N, groups, d_out, d_in')
        "emb": grads["emb.weight"].transpose(1, 2)[:, None],
        "conv": torch.cat([grads["conv.weight"].flatten(2), grads["conv.bias"][..., None]], -1)[
            :, None
        ],
        "grouped": torch.cat(
            [grads["grouped.weight"].flatten(2), grads["grouped.bias"][..., None]], -1
        ).reshape(9, 2, 2, 5),
        "head": torch.cat([grads["head.weight"], grads["head.bias"][..., None]], dim=-1)[:, None],
    }
    expected = 0
    for name, matrices_of_layer in matrices.items():
        fitted = ekfac.layers[name]
        for group in range(matrices_of_layer.shape[1]):
            matrix = matrices_of_layer[:, group]
            flat = matrix.reshape(matrix.shape[0], -1)
            eye = torch.eye(matrix.shape[-1], dtype=torch.float64)
            basis_a = fitted["activation_eigenvectors"][group] if name != "emb" else eye
            basis = torch.kron(
                fitted["gradient_eigenvectors"][group].contiguous(), basis_a.contiguous()
            )
            corrected = (basis.T @ (flat.T @ flat / flat.shape[0]) @ basis).diagonal()
            block = basis @ torch.diag(corrected) @ basis.T
            block = block + 1e-2 * torch.eye(flat.shape[1], dtype=torch.float64)
            expected = expected + torch.linalg.solve(block, flat.T).T @ flat.T
    torch.testing.assert_close(scores.scores, expected, rtol=1e-9, atol=1e-9)


def test_bad_arguments_name_the_argument():
    model, train, query = oracle.make_problem()
    dataset = TensorDataset(*train)
    task = influence.ClassificationTask()
    with pytest.raises(ValueError, match="strategy"):
        influence.fit_factors(model, task, dataset, strategy="lissa")
    with pytest.raises(ValueError, match="fisher"):
        influence.fit_factors(model, task, dataset, fisher="true")
    with pytest.raises(ValueError, match="batch_size"):
        influence.fit_factors(model, task, dataset, batch_size=0)
    with pytest.raises(ValueError, match="indices"):
        influence.fit_factors(model, task, dataset, indices=[100])
    with pytest.raises(ValueError, match="tracked module"):
        influence.fit_factors(model, influence.ClassificationTask(modules=["nope"]), dataset)
    with pytest.raises(TypeError, match="task"):
        influence.fit_factors(model, object(), dataset)
    factors = influence.fit_factors(model, task, dataset, strategy="kfac", progress=False)
    with pytest.raises(ValueError, match="damping"):
        influence.compute_pairwise_scores(model, task, factors, dataset, dataset, damping=-1.0)
    with pytest.raises(ValueError, match="low_rank"):
        influence.compute_pairwise_scores(model, task, factors, dataset, dataset, low_rank=0)
    only_fc1 = influence.fit_factors(
        model,
        influence.ClassificationTask(modules=["fc1"]),
        dataset,
        strategy="kfac",
        progress=False,
    )
    with pytest.raises(ValueError, match="factors"):
        influence.compute_pairwise_scores(model, task, only_fc1, dataset, dataset)


def test_frozen_model_is_scored_and_stays_frozen():
    model, train, query = oracle.make_problem()
    expected = _pairwise(model, _fit(model, train, strategy="kfac"), train, query).scores
    model.requires_grad_(False)
    scores = _pairwise(model, _fit(model, train, strategy="kfac"), train, query).scores
    torch.testing.assert_close(scores, expected)
    assert not any(p.requires_grad for p in model.parameters())


def test_model_and_grads_untouched():
    model, train, query = oracle.make_problem()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    factors = _fit(model, train, strategy="ekfac")
    _pairwise(model, factors, train, query)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.fc1._forward_hooks and not model._forward_pre_hooks


@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_correction_from_cached_rows_equals_a_second_pass(fisher, monkeypatch):
    import secondorder.influence.factors as factors_module

    model, train, _ = oracle.make_problem(n_train=11)
    task = influence.ClassificationTask()
    fit = lambda: influence.fit_factors(  # noqa: E731
        model, task, TensorDataset(*train), strategy="ekfac", fisher=fisher, batch_size=4,
        progress=False,
    )
    cached = fit()
    calls = []
    original = factors_module.LayerRecorder.train_passes
    monkeypatch.setattr(
        factors_module.LayerRecorder,
        "train_passes",
        lambda self, *a, **k: (calls.append(1), original(self, *a, **k))[1],
    )
    monkeypatch.setattr(factors_module, "ROW_CACHE_BYTES", 0)  # no cache: two passes
    recomputed = fit()
    assert len(calls) == 2 * 3  # 3 batches per pass
    for name in ("fc1", "fc2"):
        torch.testing.assert_close(cached.layers[name]["lambda"], recomputed.layers[name]["lambda"])
