"""AdaFisher / AdaFisherW: statistics vs brute force, F̃ layout, EMA closed forms, update algebra."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secondorder import AdaFisher, AdaFisherW
from secondorder.precond.capture import LayerCapture
from secondorder.precond.fisher_diagonal import (
    diagonal_statistics,
    fisher_diagonal,
    minmax_normalize,
)

KINDS = ("linear", "conv2d", "layernorm", "batchnorm")


def _capture_stats(model, x, loss_fn):
    capture = LayerCapture(model, kinds=KINDS)
    loss_fn(model(x)).backward()
    return capture, capture.pop()


def _per_example_output_grads(model, module, x, loss_per_example):
    """Brute force: gradient of each example's own loss w.r.t. ``module``'s output."""
    grads = []
    for n in range(x.shape[0]):
        store = {}
        handle = module.register_forward_hook(lambda m, a, out, s=store: s.setdefault("out", out))
        out = model(x[n : n + 1])
        handle.remove()
        grads.append(torch.autograd.grad(loss_per_example(out), store["out"])[0])
    return torch.cat(grads)


def test_linear_statistics_brute_force():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 6, 3, dtype=torch.float64)  # 3-D input: tokens are positions
    capture, stats = _capture_stats(model, x, lambda out: out.pow(2).sum(dim=(1, 2)).mean())
    layer = capture.layers[0]
    h_hat, s_hat = diagonal_statistics(layer, stats[layer], torch.float64)
    rows = torch.cat([x.reshape(-1, 3), torch.ones(30, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(h_hat, (rows**2).mean(0))
    g = _per_example_output_grads(model, model[0], x, lambda out: out.pow(2).sum()).reshape(-1, 4)
    torch.testing.assert_close(s_hat, (g**2).mean(0))


@pytest.mark.parametrize(
    "kwargs", [dict(stride=2, padding=1), dict(dilation=2, padding="same"), dict(groups=2)]
)
def test_conv_statistics_brute_force(kwargs):
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 4, 3, **kwargs)
    model = nn.Sequential(conv, nn.Tanh()).double()
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    capture, stats = _capture_stats(model, x, lambda out: out.pow(2).sum(dim=(1, 2, 3)).mean())
    layer = capture.layers[0]
    h_hat, s_hat = diagonal_statistics(layer, stats[layer], torch.float64)
    padding = 2 if kwargs.get("padding") == "same" else kwargs.get("padding", 0)
    patches = F.unfold(
        x, 3, dilation=kwargs.get("dilation", 1), padding=padding, stride=kwargs.get("stride", 1)
    )
    groups = kwargs.get("groups", 1)
    patches = (
        patches.transpose(1, 2)
        .reshape(-1, groups, patches.shape[1] // groups)
        .reshape(-1, 18 // groups)
    )
    patches = torch.cat([patches, torch.ones(patches.shape[0], 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(h_hat, (patches**2).mean(0))
    g = _per_example_output_grads(model, conv, x, lambda out: out.pow(2).sum())
    torch.testing.assert_close(s_hat, (g**2).transpose(0, 1).reshape(4, -1).mean(1))


@pytest.mark.parametrize("norm", ["layernorm", "batchnorm"])
def test_norm_statistics_brute_force(norm):
    torch.manual_seed(2)
    if norm == "layernorm":
        module, x = nn.LayerNorm(4), torch.randn(3, 5, 4, dtype=torch.float64) * 3 + 1
        x_hat = (x - x.mean(-1, keepdim=True)) / torch.sqrt(
            x.var(-1, unbiased=False, keepdim=True) + module.eps
        )
    else:
        module, x = nn.BatchNorm2d(4), torch.randn(3, 4, 2, 2, dtype=torch.float64) * 2
        mean, var = (
            x.mean(dim=(0, 2, 3), keepdim=True),
            x.var(dim=(0, 2, 3), unbiased=False, keepdim=True),
        )
        x_hat = ((x - mean) / torch.sqrt(var + module.eps)).movedim(1, -1)
    model = nn.Sequential(module, nn.Tanh()).double()
    capture, stats = _capture_stats(model, x, lambda out: out.pow(2).sum() / x.shape[0])
    layer = capture.layers[0]
    h_hat, s_hat = diagonal_statistics(layer, stats[layer], torch.float64)
    torch.testing.assert_close(
        h_hat, torch.stack([(x_hat**2).mean(), torch.tensor(1.0, dtype=torch.float64)])
    )
    store = {}
    handle = module.register_forward_hook(lambda m, a, out: store.setdefault("out", out))
    total = model(x).pow(2).sum()  # Σ of per-example losses; each depends on its own outputs only
    handle.remove()
    g = torch.autograd.grad(total, store["out"])[0]
    g = g.movedim(1, -1) if norm == "batchnorm" else g
    torch.testing.assert_close(s_hat, (g**2).reshape(-1, 4).mean(0))


def test_fisher_layout_matches_kronecker_product():
    torch.manual_seed(3)
    linear = nn.Linear(3, 2)
    model = nn.Sequential(linear, nn.LayerNorm(2))
    capture = LayerCapture(model, kinds=KINDS)
    lin, norm = capture.layers
    h, s = torch.rand(4), torch.rand(2)
    fisher_w, fisher_b = fisher_diagonal(lin, h, s, 0.1)
    dense = torch.kron(s, h).reshape(2, 4) + 0.1  # row-major [W | b] layout
    torch.testing.assert_close(fisher_w, dense[:, :3])
    torch.testing.assert_close(fisher_b, dense[:, 3])
    gamma, beta = fisher_diagonal(norm, torch.tensor([0.3, 0.7]), s, 0.1)
    torch.testing.assert_close(gamma, 0.3 * s + 0.1)
    torch.testing.assert_close(beta, 0.7 * s + 0.1)


def test_minmax_normalisation():
    values = torch.tensor([2.0, float("inf"), float("-inf"), 0.5])
    out = minmax_normalize(values, eps=1e-6)
    expected = torch.tensor([2.0, 1.0, 0.0, 0.5]) / (2.0 + 1e-6)
    torch.testing.assert_close(out, expected)
    assert out.min() >= 0 and out.max() < 1
    tiny = torch.tensor([0.0, 1e-8])
    assert float(minmax_normalize(tiny, 1e-6)[1]) == pytest.approx(1e-8 / (1e-8 + 1e-6))


def _constant_problem(seed=4):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 2))
    x = torch.randn(8, 3)
    y = torch.randn(8, 2)
    return model, x, y


@pytest.mark.parametrize("ema", ["paper", "reference"])
def test_ema_closed_form_with_constant_statistics(ema):
    """lr 0 keeps the statistics constant; after k refreshes H = a^k·1 + c·n·(1−a^k)/(1−a)."""
    model, x, y = _constant_problem()
    optimizer = AdaFisher(model, lr=0.0, update_freq=1, ema=ema, gamma=0.8)
    capture = LayerCapture(model)
    F.mse_loss(model(x), y).backward()
    layer = capture.layers[0]
    h_hat, s_hat = diagonal_statistics(layer, capture.pop()[layer], torch.float32)
    capture.remove()
    model.zero_grad()
    if ema == "paper":
        a, c, n_h, n_s = 0.8, 0.2, h_hat, s_hat
    else:
        a, c, n_h, n_s = 0.08, 0.008, minmax_normalize(h_hat), minmax_normalize(s_hat / 64)
    for k in range(1, 5):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        state = optimizer.state[layer.weight]
        torch.testing.assert_close(
            state["activation_diagonal"], a**k + c * n_h * (1 - a**k) / (1 - a)
        )
        torch.testing.assert_close(
            state["gradient_diagonal"], a**k + c * n_s * (1 - a**k) / (1 - a)
        )


def test_reference_rule_collapses_fisher_to_damping():
    """Official arithmetic: H, S ≤ 0.008/0.92, so F̃/λ ≤ 1 + 0.0087²/λ (adafisher.md §10)."""
    model, x, y = _constant_problem()
    optimizer = AdaFisher(model, lr=1e-3, update_freq=1, ema="reference")
    for _ in range(20):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
    stats = optimizer.factor_stats()["0"]
    assert (
        1.0 <= stats["min_over_damping"]
        and stats["max_over_damping"] <= 1 + (0.008 / 0.92) ** 2 / 1e-3 + 1e-6
    )


def test_update_algebra_adafisher_vs_adafisherw():
    """One step: AdaFisher divides the L2 term by F̃, AdaFisherW does not."""
    results = {}
    for cls in (AdaFisher, AdaFisherW):
        model, x, y = _constant_problem()
        optimizer = cls(model, lr=0.01, weight_decay=0.1, update_freq=1, betas=(0.9, 0.999),
                        graft="none", step_scale=1.0)
        before = model[0].weight.detach().clone()
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        grad = model[0].weight.grad.clone()
        optimizer.step()
        fisher = optimizer.fisher(model[0].weight)
        if cls is AdaFisher:
            expected = (
                before - 0.01 * (grad + 0.1 * before) / fisher
            )  # bias-corrected m̂ = g' at t = 1
        else:
            expected = before * (1 - 0.01 * 0.1) - 0.01 * grad / fisher
        torch.testing.assert_close(model[0].weight.detach(), expected)
        results[cls] = model[0].weight.detach()
    assert not torch.allclose(results[AdaFisher], results[AdaFisherW])


def test_identity_fallback_is_bias_corrected_momentum_sgd():
    """Unsupported parameters with unsupported="identity" (F̃ = 1): three hand-computed steps."""

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([1.0, -2.0]))

        def forward(self, x):
            return x * self.w

    model = Scale()
    optimizer = AdaFisher(model, lr=0.1, unsupported="identity", betas=(0.5, 0.999))
    x = torch.tensor([1.0, 1.0])
    w, m = model.w.detach().clone(), torch.zeros(2)
    for t in range(1, 4):
        optimizer.zero_grad()
        (model(x) ** 2).sum().backward()
        g = 2 * w * x**2
        m = 0.5 * m + 0.5 * g
        w = w - 0.1 * m / (1 - 0.5**t)
        optimizer.step()
        torch.testing.assert_close(model.w.detach(), w)


def test_refresh_gating_and_eval_forward():
    model, x, y = _constant_problem()
    optimizer = AdaFisher(model, lr=0.01, update_freq=3)
    history = []
    for _ in range(6):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        history.append(optimizer.state[model[0].weight]["activation_diagonal"].clone())
        with torch.no_grad():
            model(x)  # evaluation forwards record nothing
    changed = [not torch.equal(history[i], history[i - 1]) for i in range(1, 6)]
    assert changed == [False, False, True, False, False]


def test_inplace_activation_trains_identically():
    results = []
    for inplace in (False, True):
        torch.manual_seed(5)
        model = nn.Sequential(
            nn.Linear(3, 6), nn.ReLU(inplace=inplace), nn.LayerNorm(6), nn.Linear(6, 2)
        )
        optimizer = AdaFisherW(model, lr=1e-3, update_freq=1)
        torch.manual_seed(6)
        for _ in range(3):
            x, y = torch.randn(8, 3), torch.randn(8, 2)
            optimizer.zero_grad()
            F.mse_loss(model(x), y).backward()
            optimizer.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_identity_matching_with_embedding_frozen_and_tied_weights():
    """Regression for the official code's index-based matching (adafisher.md §11.2)."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(7, 4)
            self.frozen = nn.Linear(4, 4)
            self.frozen.requires_grad_(False)
            self.hidden = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)

        def forward(self, idx):
            h = self.norm(self.hidden(self.frozen(self.embed(idx))))
            return h @ self.embed.weight.T  # tied output layer

    torch.manual_seed(7)
    model = Model()
    optimizer = AdaFisher(model, lr=1e-3, update_freq=1)
    idx = torch.randint(0, 7, (3, 5))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.zero_grad()
    F.cross_entropy(model(idx).reshape(-1, 7), idx.reshape(-1)).backward()
    optimizer.step()
    for name, param in model.named_parameters():
        assert (not torch.equal(param, before[name])) == param.requires_grad, name
    assert [layer.name for layer in optimizer.capture.layers] == ["hidden", "norm"]
    assert optimizer.fisher(model.hidden.weight).shape == (4, 4)
    assert optimizer.fisher(model.embed.weight) is None


@pytest.mark.parametrize("loss_average", ["batch+sequence", "batch"])
def test_unnormalised_fisher_is_the_kronecker_diagonal_gauss_newton_of_the_loss(loss_average):
    """Default ``normalization="none"``: ``F̃ − λ = E[a²] ⊗ E[(∂ℓ_t/∂z)²]·c`` for a sequence
    model, with ``c = 1`` for a loss averaged over examples × positions and ``c = T`` for one
    averaged over examples and summed over positions (per-position loss ``ℓ_t = ½‖z − y‖²``)."""
    torch.manual_seed(0)
    n, t, d_in, d_out = 4, 5, 3, 2
    model = nn.Sequential(nn.Linear(d_in, d_out, bias=False)).double()
    x = torch.randn(n, t, d_in, dtype=torch.float64)
    y = torch.randn(n, t, d_out, dtype=torch.float64)
    optimizer = AdaFisher(model, lr=0.0, gamma=0.0, update_freq=1, loss_average=loss_average)
    optimizer.zero_grad()
    per_position = 0.5 * ((model(x) - y) ** 2).sum(-1)  # (n, t)
    loss = per_position.mean() if loss_average == "batch+sequence" else per_position.sum(1).mean()
    loss.backward()
    optimizer.step()
    residual = (model(x) - y).detach()  # lr 0: the weights did not move
    expected = torch.outer((residual**2).mean((0, 1)), (x**2).mean((0, 1)))
    if loss_average == "batch":
        expected = expected * t
    fisher = optimizer.fisher(model[0].weight)
    torch.testing.assert_close(fisher - optimizer.param_groups[0]["damping"], expected,
                               rtol=1e-10, atol=1e-14)


def test_default_step_is_scaled_fisher_step_capped_at_adams_norm():
    """One step at the defaults (``graft="adam_cap"``, ``step_scale=30``): the update is
    ``lr·30·m̂ ⊘ F̃`` where that is shorter than Adam's ``lr·m̂ ⊘ (√v̂ + ε)`` per parameter,
    and shrunk to Adam's length along the same direction where it is longer."""
    for loss_scale in (1.0, 1e3):
        model, x, y = _constant_problem()
        model, x, y = model.double(), x.double(), y.double()
        optimizer = AdaFisherW(model, lr=0.01, weight_decay=0.0, update_freq=1)
        before = model[0].weight.detach().clone()
        optimizer.zero_grad()
        (loss_scale * F.mse_loss(model(x), y)).backward()
        grad = model[0].weight.grad.clone()
        optimizer.step()
        fisher = optimizer.fisher(model[0].weight)
        own = 30.0 * grad / fisher  # t = 1: m̂ = g
        adam_norm = float((grad / (grad.abs() + 1e-8)).norm())
        step = before - model[0].weight.detach()
        expected = 0.01 * own * min(1.0, adam_norm / float(own.norm()))
        torch.testing.assert_close(step, expected, rtol=1e-9, atol=0)
        bites = float(own.norm()) > adam_norm
        assert bites == (loss_scale == 1.0)  # F̃ grows as the loss², m̂ ⊘ F̃ shrinks: both branches
