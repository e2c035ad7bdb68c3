"""LayerCapture against dense per-example gradients (float64) and its bookkeeping."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secondorder.precond.capture import LayerCapture
from secondorder.precond.kfac import per_example_gradients
from tests.oracles import per_example_gradients as oracle_per_example


def _ce_sum(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")


def _check_layers(model, capture, stats, x, y, loss_fn=_ce_sum, layers=None):
    """Σ_t g aᵀ from the capture equals each example's own gradient, for every tracked layer."""
    layers = capture.layers if layers is None else layers
    params = [p for layer in layers for p in (layer.weight, layer.bias) if p is not None]
    dense_grads = oracle_per_example(model, loss_fn, x, y, params)
    dense = dict(zip(map(id, params), dense_grads, strict=True))
    assert set(stats) == set(layers)
    for layer in layers:
        matrices = per_example_gradients(layer, stats[layer])
        for n in range(x.shape[0]):
            weight, bias = layer.split_matrix(matrices[n])
            torch.testing.assert_close(weight, dense[id(layer.weight)][n])
            if layer.bias is not None:
                torch.testing.assert_close(bias, dense[id(layer.bias)][n])


def _run(model, capture, x, y, reduction="mean"):
    out = model(x)
    loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")
    if reduction == "mean":
        loss = loss / x.shape[0]
    loss.backward()
    return capture.pop()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_2d_and_3d(reduction, bias):
    torch.manual_seed(1)
    for shape in [(5, 4), (5, 3, 4)]:
        model = nn.Sequential(
            nn.Linear(4, 6, bias=bias), nn.Tanh(), nn.Linear(6, 3, bias=bias)
        ).double()
        capture = LayerCapture(model, loss_reduction=reduction)
        x = torch.randn(*shape, dtype=torch.float64)
        y = torch.randint(0, 3, shape[:-1])
        stats = _run(model, capture, x, y, reduction)
        assert stats[capture.layers[0]].inputs.shape == (5, 1 if len(shape) == 2 else 3, 4 + bias)
        assert stats[capture.layers[0]].num_examples == 5
        _check_layers(model, capture, stats, x, y)


@pytest.mark.parametrize(
    "conv_kwargs",
    [
        dict(kernel_size=3),
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=3, padding="same", dilation=2),
        dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 0), bias=False),
        dict(kernel_size=3, groups=2, padding=1),
        dict(kernel_size=1, groups=4, stride=2),
    ],
)
def test_conv2d_matches_dense(conv_kwargs):
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(4, 8, **conv_kwargs), nn.ReLU(inplace=True), nn.Flatten(), nn.LazyLinear(3)
    )
    model(torch.randn(1, 4, 7, 7))
    model = model.double()
    capture = LayerCapture(model)
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64)
    y = torch.randint(0, 3, (3,))
    stats = _run(model, capture, x, y)
    conv = capture.layers[0]
    assert conv.kind == "conv2d"
    if conv.groups > 1:
        assert stats[conv].inputs.dim() == 4 and stats[conv].inputs.shape[2] == conv.groups
    _check_layers(model, capture, stats, x, y)


class _TinyLM(nn.Module):
    def __init__(self, padding_idx=None):
        super().__init__()
        self.embed = nn.Embedding(7, 4, padding_idx=padding_idx)
        self.head = nn.Linear(4, 7)

    def forward(self, idx):
        return self.head(torch.tanh(self.embed(idx)))


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_matches_dense(padding_idx):
    model = _TinyLM(padding_idx).double()
    capture = LayerCapture(model)
    x = torch.tensor([[0, 1, 1, 3], [2, 0, 6, 6], [5, 5, 5, 0]])
    y = torch.randint(0, 7, x.shape)
    stats = _run(model, capture, x, y)
    assert [layer.kind for layer in capture.layers] == ["embedding", "linear"]
    assert stats[capture.layers[0]].inputs.dtype == torch.long
    _check_layers(model, capture, stats, x, y)


def test_weight_sharing_sums_calls_before_squaring():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(3, 3)
            self.out = nn.Linear(3, 2)

        def forward(self, x):
            return self.out(self.layer(torch.tanh(self.layer(x))))

    model = Shared().double()
    capture = LayerCapture(model)
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (4,))
    stats = _run(model, capture, x, y)
    assert stats[capture.layers[0]].inputs.shape[:2] == (4, 2)  # two calls -> two positions
    _check_layers(model, capture, stats, x, y)


def test_accumulation_equals_one_batch():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    capture = LayerCapture(model)
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    whole = _run(model, capture, x, y)
    for part in (slice(0, 2), slice(2, 6)):  # unequal micro-batches, losses scaled by N_i/N
        F.cross_entropy(model(x[part]), y[part], reduction="sum").div(6).backward()
    parts = capture.pop()
    for layer in capture.layers:
        torch.testing.assert_close(parts[layer].inputs, whole[layer].inputs)
        torch.testing.assert_close(parts[layer].output_grads, whole[layer].output_grads)
        assert parts[layer].num_examples == 6


def test_unequal_sequence_lengths_are_padded():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 2)).double()
    capture = LayerCapture(model, loss_reduction="sum")
    for length in (2, 5):
        model(torch.randn(3, length, 3, dtype=torch.float64)).sum().backward()
    stats = capture.pop()[capture.layers[0]]
    assert stats.inputs.shape == (6, 5, 4)
    assert stats.num_positions == 3 * 2 + 3 * 5
    assert torch.all(stats.inputs[:3, 2:] == 0) and torch.all(stats.output_grads[:3, 2:] == 0)


def test_recording_switch_no_grad_and_unfinished_passes():
    model = nn.Sequential(nn.Linear(3, 2))
    capture = LayerCapture(model)
    x = torch.randn(4, 3)
    with capture.recording(False):
        model(x).sum().backward()
    assert capture.pop() == {}
    with torch.no_grad():
        model(x)
    model(x)  # forward with grad but no backward: dropped
    assert not capture.has_records()
    assert capture.pop() == {}
    assert capture.enabled
    capture.remove()
    model(x).sum().backward()
    assert capture.pop() == {}


def test_inplace_activation_gives_same_statistics():
    torch.manual_seed(5)
    x = torch.randn(5, 4, dtype=torch.float64)
    results = []
    for inplace in (False, True):
        torch.manual_seed(6)
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=inplace), nn.Linear(6, 2)).double()
        capture = LayerCapture(model)
        model(x).pow(2).mean().backward()
        results.append(capture.pop())
    for stats_a, stats_b in zip(results[0].values(), results[1].values(), strict=True):
        torch.testing.assert_close(stats_a.output_grads, stats_b.output_grads)
        torch.testing.assert_close(stats_a.inputs, stats_b.inputs)


def test_identity_matching_frozen_unsupported_and_attention():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.alpha = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.alpha

    attention = nn.MultiheadAttention(4, 2, batch_first=True)
    frozen = nn.Linear(4, 4)
    frozen.weight.requires_grad_(False)
    model = nn.ModuleDict(
        {
            "scale": Scale(),
            "frozen": frozen,
            "attn": attention,
            "norm": nn.LayerNorm(4),
            "head": nn.Linear(4, 2),
        }
    )
    params = [p for p in model.parameters() if p.requires_grad]
    capture = LayerCapture(model, params, kinds=("linear", "conv2d", "embedding"))
    assert [layer.name for layer in capture.layers] == ["head"]
    head = capture.layers[0]
    assert (
        capture.layer_for(model["head"].weight) is head
        and capture.layer_for(model["head"].bias) is head
    )
    assert capture.layer_for(frozen.weight) is None
    fallback = capture.fallback_params(params)
    assert {id(p) for p in fallback} == {id(p) for p in params} - {id(head.weight), id(head.bias)}
    # the frozen layer's trainable bias has no weight to pair with: it is a fallback parameter
    assert any(p is frozen.bias for p in fallback)
    norm_capture = LayerCapture(model, params, kinds=("linear", "layernorm"))
    assert [layer.kind for layer in norm_capture.layers] == ["layernorm", "linear"]


def test_bad_arguments():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="loss_reduction"):
        LayerCapture(model, loss_reduction="none")
    with pytest.raises(ValueError, match="kinds"):
        LayerCapture(model, kinds=("conv3d",))
    with pytest.raises(TypeError, match="model"):
        LayerCapture([model.weight])


def test_broadcast_layer_is_not_reported():
    """A positional embedding called on arange(T) and broadcast has no per-example gradients."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos, self.head = nn.Embedding(5, 3), nn.Embedding(4, 3), nn.Linear(3, 5)

        def forward(self, idx):
            return self.head(self.tok(idx) + self.pos(torch.arange(idx.shape[1])))

    model = Model().double()
    capture = LayerCapture(model)
    x = torch.randint(0, 5, (6, 4))
    stats = _run(model, capture, x, x)
    assert {layer.name for layer in stats} == {"tok", "head"}
    assert capture.describe()["pos.weight"]["status"] == "fallback"
    assert "broadcast" in capture.describe()["pos.weight"]["reason"]
    assert [name for name, _ in capture.untracked_matrices()] == ["pos.weight"]
    assert all(s.num_examples == 6 for s in stats.values())
    _check_layers(
        model,
        capture,
        stats,
        x,
        x,
        layers=[layer for layer in capture.layers if layer.name != "pos"],
    )


def test_deep_copy_of_the_model_does_not_record_into_the_original_capture():
    import copy

    model = nn.Sequential(nn.Linear(3, 2))
    capture = LayerCapture(model)
    clone = copy.deepcopy(model)  # carries the hooks along
    clone(torch.randn(4, 3)).sum().backward()
    assert not capture.has_records()
    model(torch.randn(5, 3)).sum().backward()
    assert capture.pop()[capture.layers[0]].num_examples == 5
