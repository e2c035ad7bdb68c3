"""Tied weights, describe(), copies and pickling of a model with a capture attached."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

from secondorder.precond.capture import KRONECKER_KINDS, LayerCapture
from secondorder.precond.fisher_diagonal import diagonal_statistics
from secondorder.precond.kfac import (
    KroneckerEigenbasis,
    eigenvalue_correction,
    kronecker_factors,
    per_example_gradients,
)
from tests.precond.test_capture_kinds import ce_sum, dense_per_example


class TiedLM(nn.Module):
    """Embedding and lm_head sharing one (V, D) weight, as in GPT-2 / tied Llama."""

    def __init__(self, vocab=7, dim=4, head_bias=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=head_bias)
        self.lm_head.weight = self.embed.weight

    def forward(self, idx):
        return self.lm_head(torch.tanh(self.mix(self.embed(idx))))


@pytest.mark.parametrize("head_bias", [False, True])
@pytest.mark.parametrize("kinds", [KRONECKER_KINDS, ("linear", "layernorm")])
def test_tied_embedding_and_head_match_the_dense_fisher(head_bias, kinds):
    """Σ_t g aᵀ over both uses is each example's gradient of the shared weight; so the
    empirical Fisher built from the captured rows equals the dense one."""
    torch.manual_seed(0)
    model = TiedLM(head_bias=head_bias).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both uses modelled: no warning
        capture = LayerCapture(model, kinds=kinds)
    shared = capture.layer_for(model.embed.weight)
    assert shared.name == "lm_head" and shared.kind == "linear"
    assert capture.describe()["embed.weight"]["status"] == "tracked"
    assert "all uses" in capture.describe()["embed.weight"]["reason"]
    x = torch.tensor([[0, 1, 1, 3], [2, 0, 6, 6], [5, 5, 4, 0]])
    y = torch.randint(0, 7, x.shape)
    (ce_sum(model(x), y) / x.shape[0]).backward()
    stats = capture.pop()[shared]
    assert stats.inputs.shape[1] == 2 * x.shape[1]  # head positions, then embedding positions
    matrices = per_example_gradients(shared, stats)
    weight, bias = shared.split_matrix(matrices)
    params = [model.embed.weight] + ([model.lm_head.bias] if head_bias else [])
    dense = dense_per_example(model, ce_sum, x, y, params)
    torch.testing.assert_close(weight, dense[0])
    if head_bias:
        torch.testing.assert_close(bias, dense[1])
    flat = dense[0].reshape(x.shape[0], -1)
    fisher = flat.T @ flat / x.shape[0]
    captured = weight.reshape(x.shape[0], -1)
    torch.testing.assert_close(captured.T @ captured / x.shape[0], fisher)
    # EK-FAC's correction from all uses is the dense Fisher's diagonal in the K-FAC basis
    basis = KroneckerEigenbasis.from_factors(*kronecker_factors(shared, stats))
    correction = eigenvalue_correction(
        shared, stats, basis.gradient_basis, basis.activation_basis
    )
    rotation = basis.dense_basis()
    full = torch.cat([dense[0], dense[1].unsqueeze(-1)], -1) if head_bias else dense[0]
    full = full.reshape(x.shape[0], -1)
    dense_fisher = full.T @ full / x.shape[0]
    torch.testing.assert_close(
        correction.reshape(-1), torch.diagonal(rotation.T @ dense_fisher @ rotation)
    )
    # AdaFisher's diagonals see both uses' positions
    h, s = diagonal_statistics(shared, stats, torch.float64)
    assert h.shape == (4 + head_bias,) and s.shape == (7,)


def test_layers_sharing_weight_and_bias_across_modules():
    """ALBERT-style sharing: two nn.Linear modules holding the same weight and bias."""
    torch.manual_seed(3)
    first, second, head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
    second.weight, second.bias = first.weight, first.bias
    model = nn.Sequential(first, nn.Tanh(), second, nn.Tanh(), head).double()
    capture = LayerCapture(model)
    assert [layer.name for layer in capture.layers] == ["0", "4"]
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    (ce_sum(model(x), y) / 5).backward()
    stats = capture.pop()
    shared = capture.layers[0]
    weight, bias = shared.split_matrix(per_example_gradients(shared, stats[shared]))
    dense = dense_per_example(model, ce_sum, x, y, [first.weight, first.bias])
    torch.testing.assert_close(weight, dense[0])
    torch.testing.assert_close(bias, dense[1])


def test_tied_weight_that_cannot_be_merged_warns_once_and_names_it():
    model = TiedLM().double()
    with pytest.warns(UserWarning, match="'embed.weight'.*'lm_head' \\(linear\\)") as record:
        capture = LayerCapture(model, kinds=("embedding",))
    assert len(record) == 1
    assert capture.layer_for(model.embed.weight).kind == "embedding"
    assert "not modelled" in capture.describe()["embed.weight"]["reason"]


@pytest.mark.parametrize("head_bias", [False, True])
def test_fallback_ties_leave_the_tied_weight_and_only_it_untracked(head_bias):
    """``transposed_ties="fallback"``: a weight tied between an embedding and a linear head is
    tracked by neither use (its reason says why, its bias follows it); other layers are tracked
    as with the other settings; an unknown setting is refused."""
    model = TiedLM(head_bias=head_bias)
    capture = LayerCapture(model, model.parameters(), transposed_ties="fallback")
    assert [layer.name for layer in capture.layers] == ["mix"]
    assert capture.layer_for(model.embed.weight) is None
    described = capture.describe()
    assert "tied between an embedding and a linear head" in described["embed.weight"]["reason"]
    if head_bias:
        assert "its layer's weight is untracked" in described["lm_head.bias"]["reason"]
    untied = TiedLM(head_bias=head_bias)
    untied.lm_head.weight = nn.Parameter(untied.embed.weight.detach().clone())
    names = [layer.name for layer in LayerCapture(untied, untied.parameters(), transposed_ties="fallback").layers]
    assert names == ["embed", "mix", "lm_head"]
    with pytest.raises(ValueError, match="Invalid transposed_ties"):
        LayerCapture(model, model.parameters(), transposed_ties="both")


def test_describe_and_untracked_matrices():
    model = nn.ModuleDict(
        {
            "embed": nn.Embedding(5, 4),
            "norm": nn.LayerNorm(4),
            "block": nn.Linear(4, 4),
            "frozen": nn.Linear(4, 4),
        }
    )
    model["frozen"].weight.requires_grad_(False)
    capture = LayerCapture(model, kinds=("linear", "layernorm"))
    described = capture.describe()
    assert described["block.weight"] == {
        "status": "tracked", "kind": "linear", "layer": "block", "role": "weight",
        "reason": "", "aliases": [],
    }
    assert described["block.bias"]["role"] == "bias"
    assert described["norm.weight"]["kind"] == "layernorm"
    assert described["embed.weight"]["status"] == "fallback"
    assert "'embedding' is not in kinds" in described["embed.weight"]["reason"]
    assert "frozen" in described["frozen.weight"]["reason"]
    assert described["frozen.bias"]["status"] == "fallback"
    assert "frozen" in described["frozen.bias"]["reason"]
    assert [name for name, _ in capture.untracked_matrices()] == ["embed.weight"]
    assert capture.untracked_matrices([model["block"].weight]) == []


def _records_nothing(model, capture):
    model(torch.randn(3, 4)).sum().backward()
    return not capture.has_records()


def test_deep_copy_and_pickle_of_a_model_with_a_capture():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    capture = LayerCapture(model)
    clone = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    unpickled = pickle.loads(pickle.dumps(model))
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (clone, unpickled, loaded):
        other(torch.randn(3, 4)).sum().backward()  # its inert hooks record nothing anywhere
        assert not capture.has_records()
    # a copy of model and capture together: the copied capture is inert too
    model_copy, capture_copy = copy.deepcopy((model, capture))
    assert _records_nothing(model_copy, capture_copy) and not capture.has_records()
    model_copy, capture_copy = pickle.loads(pickle.dumps((model, capture)))
    assert _records_nothing(model_copy, capture_copy) and not capture.has_records()
    assert capture_copy.describe() == capture.describe()
    model(torch.randn(5, 4)).sum().backward()
    assert capture.pop()[capture.layers[0]].num_examples == 5
    # a fresh capture on the copy works
    fresh = LayerCapture(clone)
    clone(torch.randn(2, 4)).sum().backward()
    assert fresh.pop()[fresh.layers[0]].num_examples == 2


def test_pickle_of_attention_model_with_capture():
    model = nn.MultiheadAttention(4, 2, batch_first=True, dropout=0.1)
    capture = LayerCapture(model)
    clone = pickle.loads(pickle.dumps(model))
    x = torch.randn(2, 3, 4)
    clone(x, x, x)[0].sum().backward()
    assert not capture.has_records()


@pytest.mark.parametrize("model_name", ["tied", "conv1d", "attention"])
def test_batch_gradient_equals_grad(model_name):
    """What an optimizer compares with .grad to detect a loss scale: exact for every kind."""
    from secondorder.precond.kfac import batch_gradient

    torch.manual_seed(2)
    if model_name == "tied":
        model, x = TiedLM(head_bias=True).double(), torch.randint(0, 7, (3, 5))
        loss = lambda: ce_sum(model(x), x)  # noqa: E731
    elif model_name == "conv1d":
        model = nn.Sequential(nn.Conv1d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(12, 2))
        model, x = model.double(), torch.randn(3, 2, 5, dtype=torch.float64)
        loss = lambda: model(x).pow(2).sum()  # noqa: E731
    else:
        model, x = nn.MultiheadAttention(4, 2).double(), torch.randn(5, 3, 4, dtype=torch.float64)
        loss = lambda: model(x, x, x)[0].pow(2).sum()  # noqa: E731
    capture = LayerCapture(model, loss_reduction="sum")
    loss().backward()
    for layer, stats in capture.pop().items():
        expected = layer.gradient_matrix(layer.weight.grad, None if layer.bias is None else layer.bias.grad)
        torch.testing.assert_close(batch_gradient(layer, stats), expected)


def test_module_parameters():
    from secondorder.precond.capture_layers import module_parameters

    attention = nn.MultiheadAttention(4, 2)
    assert [tuple(p.shape) for p in module_parameters(attention)] == [(12, 4), (12,), (4, 4), (4,)]
    assert module_parameters(nn.Embedding(3, 2))[0].shape == (3, 2)
    assert module_parameters(nn.ReLU()) == []
