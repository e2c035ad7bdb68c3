"""Jacobian paths (secondorder.precond.jacobian): layer-wise Gram vs torch.func vs autograd."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from secondorder.precond.capture import LayerCapture
from secondorder.precond.jacobian import (
    capture_output_rows,
    example_major_permutation,
    jacobian_product,
    jacobian_transpose_product,
    layer_gram,
    layer_jacobian_rows,
    output_jacobian,
    per_sample_jacobian,
)

DTYPE = torch.float64


class MixedNet(nn.Module):
    """Every layer kind the Gram path knows, plus a LayerNorm for the autograd fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 3)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.gconv = nn.Conv2d(4, 4, 3, groups=2, stride=2)
        self.seq = nn.Linear(3, 2)  # applied to a (b, T, 3) sequence
        self.head = nn.Linear(4 + 2 * 5, 3)
        self.norm = nn.LayerNorm(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images, indices = x[:, :32].reshape(-1, 2, 4, 4), x[:, 32:].long()
        features = torch.tanh(self.gconv(torch.tanh(self.conv(images)))).flatten(1)
        tokens = self.seq(torch.tanh(self.emb(indices))).flatten(1)
        return self.norm(self.head(torch.cat([features, tokens], dim=1)))


def mixed_batch(b: int = 4) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = MixedNet().to(DTYPE)
    x = torch.cat([torch.randn(b, 32, dtype=DTYPE), torch.randint(0, 7, (b, 5)).to(DTYPE)], dim=1)
    return model, x


def column_slices(model: nn.Module) -> dict[int, slice]:
    slices, offset = {}, 0
    for p in model.parameters():
        slices[id(p)] = slice(offset, offset + p.numel())
        offset += p.numel()
    return slices


def explicit_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Row by row with plain autograd: the slowest, most obvious oracle, ``(bc, p)``."""
    params = list(model.parameters())
    out = model(x).reshape(-1)
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(o, params, retain_graph=True)])
        for o in out
    ]
    return torch.stack(rows)


def test_torch_func_and_autograd_jacobians_agree():
    model, x = mixed_batch()
    expected = explicit_jacobian(model, x)
    func = per_sample_jacobian(model, x)
    assert func.shape == (4, 3, expected.shape[1])
    assert_close(func.reshape(12, -1), expected, atol=1e-12, rtol=1e-12)
    batched = output_jacobian(model(x), list(model.parameters()))
    assert_close(batched, expected, atol=1e-12, rtol=1e-12)
    chunked = output_jacobian(model(x), list(model.parameters()), chunk_size=5)
    assert_close(chunked, expected, atol=1e-12, rtol=1e-12)
    assert_close(per_sample_jacobian(model, x, chunk_size=3), func, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("strategy", ["auto", "pairs", "rows"])
def test_layer_gram_matches_jacobian_blocks(strategy):
    model, x = mixed_batch()
    params = list(model.parameters())
    jac = per_sample_jacobian(model, x).reshape(12, -1)
    slices = column_slices(model)
    capture = LayerCapture(model, params, loss_reduction="sum")
    stats = capture_output_rows(capture, lambda: model(x), 3)
    perm = example_major_permutation(4, 3)
    kinds = set()
    for layer, layer_stats in stats.items():
        kinds.add((layer.kind, layer_stats.inputs.shape[1] > 1))
        columns = [slices[id(layer.weight)]] + ([slices[id(layer.bias)]] if layer.has_bias else [])
        block = torch.cat([jac[:, s] for s in columns], dim=1)
        gram = layer_gram(layer, layer_stats, strategy=strategy)[perm][:, perm]
        assert_close(gram, block @ block.T, atol=1e-12, rtol=1e-12)
        rows = torch.cat(
            [r.reshape(12, -1)[perm] for r in layer_jacobian_rows(layer, layer_stats)], dim=1
        )
        assert_close(rows, block, atol=1e-12, rtol=1e-12)
    assert kinds == {
        ("embedding", True),
        ("conv2d", True),
        ("conv2d", False),
        ("linear", True),
        ("linear", False),
    }
    fallback = capture.fallback_params(params)
    assert [p.shape for p in fallback] == [torch.Size([3]), torch.Size([3])]  # the LayerNorm


def test_gram_plus_fallback_is_full_gram():
    model, x = mixed_batch()
    params = list(model.parameters())
    jac = per_sample_jacobian(model, x).reshape(12, -1)
    capture = LayerCapture(model, params, loss_reduction="sum")
    stats = capture_output_rows(capture, lambda: model(x), 3)
    perm = example_major_permutation(4, 3)
    gram = sum(layer_gram(layer, s)[perm][:, perm] for layer, s in stats.items())
    capture.enabled = False
    rest = output_jacobian(model(x), capture.fallback_params(params))
    assert_close(gram + rest @ rest.T, jac @ jac.T, atol=1e-12, rtol=1e-12)


def test_capture_output_rows_counts_forwards_and_needs_sum_reduction():
    model, x = mixed_batch()
    capture = LayerCapture(model, loss_reduction="sum")
    calls = []

    def forward():
        calls.append(1)
        return model(x)

    first = model(x)
    capture_output_rows(capture, forward, 3, first_outputs=first)
    assert len(calls) == 2  # c − 1 extra forwards
    first.sum()  # graph still usable
    jacobian_transpose_product(first, list(model.parameters()), torch.ones(4, 3, dtype=DTYPE))
    with pytest.raises(ValueError, match="capture"):
        capture_output_rows(LayerCapture(model, loss_reduction="mean"), forward, 3)


def test_products_match_explicit_jacobian():
    model, x = mixed_batch()
    params = list(model.parameters())
    jac = explicit_jacobian(model, x)
    outputs = model(x)
    u = torch.randn(4, 3, dtype=DTYPE)
    jtu = torch.cat([t.reshape(-1) for t in jacobian_transpose_product(outputs, params, u)])
    assert_close(jtu, jac.T @ u.reshape(-1), atol=1e-12, rtol=1e-12)
    v = [torch.randn_like(p) for p in params]
    jv = jacobian_product(outputs, params, v)
    assert_close(
        jv.reshape(-1), jac @ torch.cat([t.reshape(-1) for t in v]), atol=1e-12, rtol=1e-12
    )


def test_unused_parameter_gets_zero_columns():
    torch.manual_seed(0)
    used, unused = nn.Linear(2, 2).to(DTYPE), nn.Linear(2, 2).to(DTYPE)
    x = torch.randn(3, 2, dtype=DTYPE)
    params = list(used.parameters()) + list(unused.parameters())
    jac = output_jacobian(used(x), params)
    assert jac.shape == (6, 12)
    assert jac[:, 6:].abs().max() == 0
    assert (
        jacobian_transpose_product(used(x), params, torch.ones(3, 2, dtype=DTYPE))[2].abs().max()
        == 0
    )


def test_example_major_permutation():
    perm = example_major_permutation(2, 3)
    pass_major = torch.tensor([10 * k + n for k in range(3) for n in range(2)])  # row k·b + n
    assert pass_major[perm].tolist() == [10 * k + n for n in range(2) for k in range(3)]
