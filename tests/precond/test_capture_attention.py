"""nn.MultiheadAttention in the capture: projections against dense per-example gradients, and
statistics identical to a model written with explicit nn.Linear projections."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secondorder.precond.capture import LayerCapture
from secondorder.precond.kfac import kronecker_factors, per_example_gradients
from tests.precond.test_capture_kinds import ce_sum, check_capture


class AttentionModel(nn.Module):
    def __init__(self, embed=6, heads=2, cross=False, **kwargs):
        super().__init__()
        self.attention = nn.MultiheadAttention(embed, heads, **kwargs)
        self.head = nn.Linear(embed, 3)
        self.cross = cross
        self.batch_first = kwargs.get("batch_first", False)

    def forward(self, x):
        if self.cross:  # keys: a different, shorter sequence derived from x
            memory = torch.tanh(x[:, :2] if self.batch_first else x[:2])
            out, _ = self.attention(x, memory, memory, need_weights=False)
        else:
            out, _ = self.attention(x, x, x)
        return self.head(out)


def _inputs(batch_first, n=3, length=4, embed=6):
    x = torch.randn(n, length, embed, dtype=torch.float64)
    y = torch.randint(0, 3, (n, length))
    return x, y


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(batch_first=True),
        dict(batch_first=True, bias=False),
        dict(batch_first=True, cross=True),
        dict(batch_first=True, kdim=4, vdim=5),
    ],
)
def test_projections_match_dense(kwargs):
    torch.manual_seed(0)
    cross = kwargs.pop("cross", False)
    if "kdim" in kwargs:  # separate projections need key/value of other widths
        model = _SeparateModel(**kwargs).double()
        expect = ["attention"] * 4 + ["linear"] * 3
    else:
        model = AttentionModel(cross=cross, **kwargs).double()
        expect = ["attention", "attention", "linear"]
    x, y = _inputs(True)
    capture, _ = check_capture(model, x, y, expect=expect)
    if "kdim" in kwargs:
        described = capture.describe()
        assert described["attention.in_proj_bias"]["status"] == "fallback"
        assert "separate" in described["attention.in_proj_bias"]["reason"]


class _SeparateModel(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.attention = nn.MultiheadAttention(6, 2, **kwargs)
        self.key, self.value = nn.Linear(6, 4), nn.Linear(6, 5)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        out, _ = self.attention(x, self.key(x).tanh(), self.value(x).tanh())
        return self.head(out)


def test_sequence_first_with_masks_and_used_weights():
    """Sequence-first input, a causal mask and the returned attention weights in the loss."""
    torch.manual_seed(1)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(6, 3)
            self.head = nn.Linear(6, 3)

        def forward(self, x):  # x: (N, L, E); the attention sees (L, N, E)
            seq = x.transpose(0, 1)
            mask = torch.triu(torch.ones(seq.shape[0], seq.shape[0], dtype=torch.bool), 1)
            out, weights = self.attention(seq, seq, seq, attn_mask=mask)
            return self.head(out.transpose(0, 1)) + weights.sum(-1, keepdim=True)

    model = Model().double()
    x, y = _inputs(False)
    check_capture(model, x, y, expect=["attention", "attention", "linear"])


@pytest.mark.parametrize("cross", [False, True])  # need_weights True / False (SDPA's dropout)
def test_dropout_is_replayed_exactly(cross):
    """In training mode with dropout, Σ_n Σ_t g aᵀ must equal .grad (same dropout mask)."""
    torch.manual_seed(2)
    model = AttentionModel(batch_first=True, dropout=0.5, cross=cross).double().train()
    capture = LayerCapture(model, loss_reduction="sum")
    x, y = _inputs(True)
    ce_sum(model(x), y).backward()
    stats = capture.pop()
    for layer in capture.layers:
        total = per_example_gradients(layer, stats[layer]).sum(0)
        weight, bias = layer.split_matrix(total)
        torch.testing.assert_close(weight, layer.weight.grad)
        torch.testing.assert_close(bias, layer.bias.grad)


def test_key_padding_mask():
    torch.manual_seed(5)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(6, 2, batch_first=True)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            padding = torch.zeros(x.shape[:2], dtype=torch.bool)
            padding[:, -1] = True  # the last key of every sequence is padding
            out, _ = self.attention(x, x, x, key_padding_mask=padding, need_weights=False)
            return self.head(out)

    model = Model().double()
    x, y = _inputs(True)
    _, stats = check_capture(model, x, y, expect=["attention", "attention", "linear"])
    in_proj = next(layer for layer in stats if layer.name == "attention.in_proj")
    assert torch.all(stats[in_proj].output_grads[:, -1, 1] == 0)  # padded key: no gradient


class ExplicitAttention(nn.Module):
    """Self-attention written with explicit nn.Linear projections (same maths as MHA)."""

    def __init__(self, embed, heads):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(embed, embed) for _ in range(3))
        self.out = nn.Linear(embed, embed)
        self.heads = heads

    def forward(self, x):
        n, length, embed = x.shape

        def split(t):
            return t.reshape(n, length, self.heads, -1).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).reshape(n, length, embed))


def test_statistics_equal_explicit_linear_projections():
    torch.manual_seed(3)
    embed, heads = 8, 2
    mha = nn.MultiheadAttention(embed, heads, batch_first=True).double()
    explicit = ExplicitAttention(embed, heads).double()
    with torch.no_grad():
        for linear, weight, bias in zip(
            (explicit.q, explicit.k, explicit.v),
            mha.in_proj_weight.chunk(3),
            mha.in_proj_bias.chunk(3),
            strict=True,
        ):
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        explicit.out.weight.copy_(mha.out_proj.weight)
        explicit.out.bias.copy_(mha.out_proj.bias)
    x = torch.randn(4, 5, embed, dtype=torch.float64)
    target = torch.randn(4, 5, embed, dtype=torch.float64)
    results = []
    for model, call in ((mha, lambda m: m(x, x, x)[0]), (explicit, lambda m: m(x))):
        capture = LayerCapture(model)
        (call(model) - target).pow(2).sum().div(4).backward()
        results.append((capture.layers, capture.pop()))
    (mha_layers, mha_stats), (lin_layers, lin_stats) = results
    in_proj, out_proj = mha_layers
    assert (in_proj.name, in_proj.groups, out_proj.name) == ("in_proj", 3, "out_proj")
    a_mha, g_mha = kronecker_factors(in_proj, mha_stats[in_proj])
    for group, layer in enumerate(lin_layers[:3]):
        a_lin, g_lin = kronecker_factors(layer, lin_stats[layer])
        torch.testing.assert_close(a_mha[group], a_lin[0])
        torch.testing.assert_close(g_mha[group], g_lin[0])
        torch.testing.assert_close(
            per_example_gradients(in_proj, mha_stats[in_proj])[:, group],
            per_example_gradients(layer, lin_stats[layer])[:, 0],
        )
    for mine, theirs in zip(
        kronecker_factors(out_proj, mha_stats[out_proj]),
        kronecker_factors(lin_layers[3], lin_stats[lin_layers[3]]),
        strict=True,
    ):
        torch.testing.assert_close(mine, theirs)


def test_transformer_encoder_layer_is_tracked():
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True),
        nn.Linear(8, 3),
    ).double()
    x, y = torch.randn(3, 4, 8, dtype=torch.float64), torch.randint(0, 3, (3, 4))
    capture, _ = check_capture(
        model, x, y, expect=["attention", "attention", "linear", "linear", "linear",
                             "layernorm", "layernorm"]
    )
    fallback = [n for n, d in capture.describe().items() if d["status"] == "fallback"]
    assert fallback == []
