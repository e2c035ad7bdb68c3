"""Every layer kind of the capture against dense per-example gradients (float64).

For each kind, ``Σ_t g[n, t] a[n, t]ᵀ`` laid out with ``split_matrix`` (dense and embedding
families) or ``Σ_t g ⊙ x̂`` (elementwise family) must equal the gradient of example ``n``'s own
loss, computed by one ``autograd.grad`` per example (works for any module, attention included).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secondorder.precond.capture import LayerCapture
from secondorder.precond.capture_layers import (
    KINDS,
    LayerKind,
    register_layer_kind,
    unregister_layer_kind,
)
from secondorder.precond.fisher_diagonal import elementwise_per_example_gradients
from secondorder.precond.kfac import per_example_gradients


def dense_per_example(model, loss_fn, x, y, params):
    """``[(N, *p.shape)]``: gradient of each example's own loss (one backward per example)."""
    rows = []
    for n in range(x.shape[0]):
        loss = loss_fn(model(x[n : n + 1]), y[n : n + 1])
        rows.append(torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True))
    return [torch.stack(column) for column in zip(*rows, strict=True)]


def ce_sum(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")


def check_capture(model, x, y, *, kinds=KINDS, loss_fn=ce_sum, expect=None, atol=None):
    """Run one mean-loss step through ``model`` and compare every tracked layer with dense."""
    capture = LayerCapture(model, kinds=kinds)
    if expect is not None:
        assert sorted(layer.kind for layer in capture.layers) == sorted(expect)
    (loss_fn(model(x), y) / x.shape[0]).backward()
    stats = capture.pop()
    assert set(stats) == set(capture.layers)
    params = [p for layer in capture.layers for p in (layer.weight, layer.bias) if p is not None]
    dense = dict(zip(map(id, params), dense_per_example(model, loss_fn, x, y, params), strict=True))
    tolerance = {} if atol is None else {"atol": atol, "rtol": atol}
    for layer in capture.layers:
        if layer.family == "elementwise":
            weight, bias = elementwise_per_example_gradients(layer, stats[layer])
            weight = weight.reshape((-1,) + layer.weight.shape)
        else:
            weight, bias = layer.split_matrix(per_example_gradients(layer, stats[layer]))
        torch.testing.assert_close(weight, dense[id(layer.weight)], **tolerance)
        if layer.bias is not None:
            torch.testing.assert_close(
                bias.reshape((-1,) + layer.bias.shape), dense[id(layer.bias)], **tolerance
            )
    capture.remove()
    return capture, stats


class Conv1D(nn.Module):
    """transformers' GPT-2 ``Conv1D`` re-written here (weight stored ``(in, out)``)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


def test_transposed_linear_gpt2_conv1d():
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(6, 4), nn.Tanh(), Conv1D(3, 6)).double()
    x, y = torch.randn(5, 3, 4, dtype=torch.float64), torch.randint(0, 3, (5, 3))
    check_capture(model, x, y, expect=["transposed_linear"] * 2)


def test_transformers_conv1d_if_installed():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(1)
    model = nn.Sequential(pytorch_utils.Conv1D(6, 4), nn.GELU(), pytorch_utils.Conv1D(3, 6))
    model = model.double()
    x, y = torch.randn(4, 2, 4, dtype=torch.float64), torch.randint(0, 3, (4, 2))
    check_capture(model, x, y, expect=["transposed_linear"] * 2)


@pytest.mark.parametrize(
    "conv_kwargs",
    [
        dict(kernel_size=3),
        dict(kernel_size=3, stride=2, padding=1, dilation=2),
        dict(kernel_size=3, padding="same", bias=False),
        dict(kernel_size=3, groups=2, padding=1),
        dict(kernel_size=3, groups=4, padding="valid"),  # depthwise, 2 outputs per channel
    ],
)
def test_conv1d(conv_kwargs):
    torch.manual_seed(2)
    conv = nn.Conv1d(4, 8, **conv_kwargs)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(1, 4, 9))
    model = model.double()
    x, y = torch.randn(3, 4, 9, dtype=torch.float64), torch.randint(0, 3, (3,))
    capture, _ = check_capture(model, x, y, expect=["conv1d", "linear"])
    assert capture.layers[0].groups == conv.groups


def test_depthwise_conv2d():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, groups=3, padding=1), nn.Tanh(), nn.Conv2d(6, 6, 1, groups=6),
        nn.Flatten(), nn.Linear(6 * 25, 2),
    ).double()
    x, y = torch.randn(3, 3, 5, 5, dtype=torch.float64), torch.randint(0, 2, (3,))
    capture, stats = check_capture(model, x, y, expect=["conv2d", "conv2d", "linear"])
    assert stats[capture.layers[1]].inputs.shape == (3, 25, 6, 2)  # 6 groups, 1 input + bias


def test_unsupported_padding_is_described_not_crashing():
    model = nn.Sequential(nn.Conv1d(2, 2, 3, padding=1, padding_mode="reflect"),
                          nn.Conv1d(2, 2, 2, padding="same"))
    capture = LayerCapture(model)
    assert capture.layers == []
    described = capture.describe()
    assert "reflect" in described["0.weight"]["reason"]
    assert "unequal" in described["1.weight"]["reason"]


class LlamaRMSNorm(nn.Module):
    """The RMSNorm of transformers' Llama (computes in float32), re-written here."""

    def __init__(self, hidden, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden) + 0.1 * torch.randn(hidden))
        self.variance_epsilon = eps

    def forward(self, x):
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.variance_epsilon))


@pytest.mark.parametrize("norm", ["rmsnorm", "llama", "layernorm"])
def test_norm_weights(norm):
    torch.manual_seed(4)
    make = {
        "rmsnorm": lambda: nn.RMSNorm(5, eps=1e-5),
        "llama": lambda: LlamaRMSNorm(5),
        "layernorm": lambda: nn.LayerNorm(5),
    }[norm]
    layer = make()
    with torch.no_grad():
        layer.weight.add_(0.2 * torch.randn(5))
    model = nn.Sequential(nn.Linear(3, 5), layer, nn.Linear(5, 4)).double()
    x, y = torch.randn(4, 3, 3, dtype=torch.float64), torch.randint(0, 4, (4, 3))
    expected = "layernorm" if norm == "layernorm" else "rmsnorm"
    check_capture(model, x, y, expect=["linear", expected, "linear"])


def test_embedding_padding_idx():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Embedding(6, 3, padding_idx=2), nn.Tanh(), nn.Linear(3, 6)).double()
    x = torch.tensor([[2, 1, 2], [0, 5, 5], [2, 2, 2]])
    _, stats = check_capture(model, x, x, expect=["embedding", "linear"])
    embedding_stats = next(s for layer, s in stats.items() if layer.kind == "embedding")
    assert torch.all(embedding_stats.output_grads[2] == 0)


class ScaledLinear(nn.Module):
    """A user module: ``y = s · x Wᵀ`` with the weight in a parameter called ``matrix``."""

    def __init__(self, d_in, d_out, scale):
        super().__init__()
        self.matrix = nn.Parameter(torch.randn(d_out, d_in) * 0.4)
        self.scale = scale

    def forward(self, x):
        return self.scale * F.linear(x, self.matrix)


class ScaledLinearKind(LayerKind):
    """The documented protocol for ScaledLinear: ``a = s·x`` (the scale folded into ``a``)."""

    name, family = "scaled_linear", "dense"

    def matches(self, module):
        return isinstance(module, ScaledLinear)

    def parameters(self, module):
        return [("", module.matrix, None)]

    def in_features(self, layer):
        return layer.weight.shape[1]

    def out_features(self, layer):
        return layer.weight.shape[0]

    def inputs(self, layer, x):
        return layer.module.scale * x.reshape(x.shape[0], -1, x.shape[-1])


def test_user_registered_kind():
    torch.manual_seed(6)
    register_layer_kind(ScaledLinearKind())
    try:
        with pytest.raises(ValueError, match="Invalid kind"):
            register_layer_kind(ScaledLinearKind())
        model = nn.Sequential(ScaledLinear(3, 4, 0.5), nn.Tanh(), nn.Linear(4, 2)).double()
        x, y = torch.randn(4, 2, 3, dtype=torch.float64), torch.randint(0, 2, (4, 2))
        check_capture(
            model, x, y, kinds=("scaled_linear", "linear"), expect=["scaled_linear", "linear"]
        )
    finally:
        unregister_layer_kind("scaled_linear")
    with pytest.raises(ValueError, match="Invalid kinds"):
        LayerCapture(nn.Linear(2, 2), kinds=("scaled_linear",))
    with pytest.raises(ValueError, match="Invalid kind"):
        register_layer_kind(LayerKind())


def test_half_precision_scaling_is_float32():
    """g·N/grad_scale overflows float16; the capture scales in float32 and returns float32."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 3)).half()
    reference = nn.Sequential(nn.Linear(4, 3)).double()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(16, 4).half()
    captures = [LayerCapture(m) for m in (model, reference)]
    for m in (model, reference):
        (m(x.to(m[0].weight.dtype)).float().pow(2).sum() * 8.0).backward()
    scale = 2.0**-10  # N / grad_scale = 16384
    half_stats = captures[0].pop(grad_scale=scale)[captures[0].layers[0]]
    exact = captures[1].pop(grad_scale=scale)[captures[1].layers[0]]
    assert half_stats.output_grads.dtype == torch.float32
    assert half_stats.inputs.dtype == torch.float32
    assert torch.isfinite(half_stats.output_grads).all()
    assert float(half_stats.output_grads.abs().max()) > 65504  # beyond float16's range
    torch.testing.assert_close(
        half_stats.output_grads.double(), exact.output_grads, rtol=2e-2, atol=1e-1
    )


def test_transformers_rmsnorms_if_installed():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    torch.manual_seed(8)
    for norm in (llama.LlamaRMSNorm(5, eps=1e-6), t5.T5LayerNorm(5)):
        with torch.no_grad():
            norm.weight.add_(0.3 * torch.randn(5))
        model = nn.Sequential(nn.Linear(3, 5), norm, nn.Linear(5, 4)).double()
        x, y = torch.randn(4, 2, 3, dtype=torch.float64), torch.randint(0, 4, (4, 2))
        check_capture(model, x, y, expect=["linear", "rmsnorm", "linear"])


def test_fisher_diagonal_follows_the_weight_layout():
    """AdaFisher's F̃ of GPT-2's Conv1D is the transpose of an equal nn.Linear's."""
    from secondorder.precond.fisher_diagonal import diagonal_statistics, fisher_diagonal

    torch.manual_seed(9)
    conv1d, linear = Conv1D(6, 4).double(), nn.Linear(4, 6).double()
    with torch.no_grad():
        linear.weight.copy_(conv1d.weight.T)
        linear.bias.copy_(conv1d.bias)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    fishers = []
    for module in (conv1d, linear):
        capture = LayerCapture(module)
        module(x).pow(2).sum().backward()
        layer = capture.layers[0]
        h, s = diagonal_statistics(layer, capture.pop()[layer], torch.float64)
        fishers.append(fisher_diagonal(layer, h, s, 1e-3))
    assert fishers[0][0].shape == conv1d.weight.shape
    torch.testing.assert_close(fishers[0][0], fishers[1][0].T)
    torch.testing.assert_close(fishers[0][1], fishers[1][1])


def test_gated_rmsnorm_call_is_not_recorded():
    class GatedRMSNorm(LlamaRMSNorm):  # Mamba-style: normalises x · silu(gate)
        def forward(self, x, gate=None):
            return super().forward(x if gate is None else x * F.silu(gate))

    norm = GatedRMSNorm(4)
    capture = LayerCapture(norm, kinds=("rmsnorm",))
    assert capture.layers[0].kind == "rmsnorm"
    x = torch.randn(2, 3, 4)
    norm(x, gate=x).sum().backward()
    assert capture.pop() == {}
