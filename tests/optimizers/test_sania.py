"""SANIA: closed-form τ, Newton exactness, SPS reduction, scale invariance, global G, guards,
the closure contract and argument checks."""

import copy
import math

import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_diabetes
from torch.nn import functional as F
from torch.testing import assert_close

from secondorder import SANIA
from secondorder.optimizers.sania import polyak_tau
from secondorder.precond.linalg import NumericalWarning

DT = torch.float64


# ----------------------------------------------------------------------------- helpers
def _linear_loss_closure(w, value, grad):
    """Loss ``value + ⟨grad, w⟩``: value ``value`` and gradient ``grad`` at w = 0."""
    return lambda: value + (grad * w).sum()


def _dataset(name):
    """Standardised features and targets as float64 tensors (breast_cancer: labels 0/1;
    diabetes: standardised target)."""
    if name == "breast_cancer":
        x, y = load_breast_cancer(return_X_y=True)
    else:
        x, y = load_diabetes(return_X_y=True)
        y = (y - y.mean()) / y.std()
    x = (x - x.mean(0)) / x.std(0)
    return torch.tensor(x, dtype=DT), torch.tensor(y, dtype=DT)


def _feature_scaling(dim, k=4.0, seed=1):
    """``e^u`` with ``u ~ U[−k, k]`` per feature (the paper's badly-scaled protocol)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.empty(dim, dtype=DT).uniform_(-k, k, generator=gen).exp()


def _train(x, y, task, steps=60, batch=64, groups=False, **kwargs):
    """Mini-batch SANIA on a linear model from w = 0; returns (loss history, w, b)."""
    w = torch.zeros(x.shape[1], dtype=DT, requires_grad=True)
    b = torch.zeros(1, dtype=DT, requires_grad=True)
    params = [{"params": [w]}, {"params": [b]}] if groups else [w, b]
    opt = SANIA(params, **kwargs)
    gen = torch.Generator().manual_seed(0)
    history = []
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)

        def closure(idx=idx):
            z = x[idx] @ w + b
            if task == "classification":
                return F.binary_cross_entropy_with_logits(z, y[idx])
            return 0.5 * ((z - y[idx]) ** 2).mean()

        history.append(opt.step(closure).item())
    return torch.tensor(history, dtype=DT), w.detach(), b.detach()


# ----------------------------------------------------------------------------- τ
@pytest.mark.parametrize("value", [0.3, 1.0, 1.9999])
def test_quadratic_tau_reaches_the_level_set(value):
    """2Δ ≤ G: the new point lies on the f* level set of the quadratic model, τ the smaller root."""
    g = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    w = torch.zeros(3, dtype=DT, requires_grad=True)
    opt = SANIA([w], preconditioner="identity", f_star=0.25)
    opt.step(_linear_loss_closure(w, value, g))
    delta, curvature = value - 0.25, float(g @ g)
    assert 2 * delta <= curvature
    d = w.detach()
    assert_close(value + g @ d + 0.5 * d @ d, torch.tensor(0.25, dtype=DT), rtol=0, atol=1e-12)
    tau = opt.last_tau
    assert_close(d, -tau * g, rtol=1e-14, atol=0)
    assert 0 < tau <= 1 and tau < 1 + math.sqrt(1 - 2 * delta / curvature)  # the smaller root
    assert tau == pytest.approx(1 - math.sqrt(1 - 2 * delta / curvature), rel=1e-12)
    assert opt.last_curvature == pytest.approx(curvature) and opt.last_delta == pytest.approx(delta)


def test_quadratic_tau_is_one_when_level_set_unreachable():
    g = torch.tensor([1.0, -2.0], dtype=DT)
    w = torch.zeros(2, dtype=DT, requires_grad=True)
    opt = SANIA([w], preconditioner="identity", lr=0.5)
    opt.step(_linear_loss_closure(w, 10.0, g))  # 2Δ = 20 > G = 5
    assert opt.last_tau == 1.0
    assert_close(w.detach(), -0.5 * g)


def test_quadratic_tau_in_the_metric_of_b():
    """AdaGrad-SQR with eps = 0 after one gradient: B = g², the model uses ½dᵀBd."""
    g = torch.tensor([0.5, -3.0, 2.0, 0.1], dtype=DT)
    w = torch.zeros(4, dtype=DT, requires_grad=True)
    opt = SANIA([w], preconditioner="adagrad_sqr", eps=0.0)
    opt.step(_linear_loss_closure(w, 1.5, g))  # G = Σ g²/g² = 4 ≥ 2Δ = 3
    d = w.detach()
    assert opt.last_curvature == pytest.approx(4.0)
    assert_close(
        1.5 + g @ d + 0.5 * (d * g * g) @ d, torch.tensor(0.0, dtype=DT), rtol=0, atol=1e-12
    )


def test_polyak_tau_closed_forms():
    assert polyak_tau(1.0, 4.0, "linear") == 0.25
    assert polyak_tau(3.0, 4.0, "linear") == 0.75
    assert polyak_tau(3.0, 4.0, "quadratic") == 1.0
    assert polyak_tau(1.0, 4.0, "quadratic") == pytest.approx(1 - math.sqrt(0.5), rel=1e-15)
    assert polyak_tau(1e-12, 1.0, "quadratic") == pytest.approx(1e-12, rel=1e-9)  # no cancellation


# ----------------------------------------------------------------------------- exact cases
@pytest.mark.parametrize("f_min", [0.0, 2.5])
def test_one_step_reaches_quadratic_minimum_when_b_is_the_hessian(f_min):
    """f = ½(w − w*)ᵀA(w − w*) + f_min, A diagonal: Hutchinson gives B = A exactly, G = 2Δ,
    τ = 1 and the step is Newton's."""
    gen = torch.Generator().manual_seed(0)
    a_w = torch.rand(3, 2, generator=gen, dtype=DT) * 5 + 0.5
    a_v = torch.rand(4, generator=gen, dtype=DT) * 5 + 0.5
    w_star = torch.randn(3, 2, generator=gen, dtype=DT)
    v_star = torch.randn(4, generator=gen, dtype=DT)
    w = torch.zeros(3, 2, dtype=DT, requires_grad=True)
    v = torch.zeros(4, dtype=DT, requires_grad=True)
    opt = SANIA(
        [w, v], preconditioner="hutchinson", hutch_alpha=1e-3, hutch_init_iters=1, f_star=f_min
    )

    def closure():
        return 0.5 * (a_w * (w - w_star) ** 2).sum() + 0.5 * (a_v * (v - v_star) ** 2).sum() + f_min

    opt.step(closure)
    assert_close(opt.state[w]["hutch_diag"], a_w, rtol=1e-14, atol=0)
    assert opt.last_tau == 1.0
    assert_close(w.detach(), w_star, rtol=1e-12, atol=1e-12)
    assert_close(v.detach(), v_star, rtol=1e-12, atol=1e-12)
    opt.step(closure)  # at the minimum: Δ = 0, no move; the running average stays exact
    assert opt.last_tau == 0.0
    assert_close(w.detach(), w_star, rtol=1e-12, atol=1e-12)
    assert_close(opt.state[w]["hutch_diag"], a_w, rtol=1e-13, atol=0)


def test_sps_is_the_identity_linear_case():
    x, y = _dataset("breast_cancer")
    x, y = x[:100, :5], y[:100]
    w = torch.zeros(5, dtype=DT, requires_grad=True)
    opt = SANIA([w], preconditioner="identity", model="linear", lr=0.7)
    w_ref = torch.zeros(5, dtype=DT)
    for step in range(10):
        idx = slice(10 * step, 10 * step + 10)
        opt.step(lambda idx=idx: F.binary_cross_entropy_with_logits(x[idx] @ w, y[idx]))
        # Hand-written SPS: w ← w − lr · f/‖g‖² · g.
        w_leaf = w_ref.clone().requires_grad_()
        loss = F.binary_cross_entropy_with_logits(x[idx] @ w_leaf, y[idx])
        (grad,) = torch.autograd.grad(loss, w_leaf)
        w_ref = w_ref - 0.7 * loss.detach() / (grad @ grad) * grad
        assert_close(w.detach(), w_ref, rtol=1e-12, atol=1e-14)
    assert opt.last_tau > 1.0  # the linear model is not capped at 1


# ----------------------------------------------------------------------------- invariance
@pytest.mark.parametrize("preconditioner", ["adagrad_sqr", "adam_sqr"])
@pytest.mark.parametrize(
    ("dataset", "task"), [("breast_cancer", "classification"), ("diabetes", "regression")]
)
def test_sqr_variants_are_invariant_to_feature_scaling(preconditioner, dataset, task):
    x, y = _dataset(dataset)
    scale = _feature_scaling(x.shape[1])
    hist, w, b = _train(x, y, task, preconditioner=preconditioner, eps=0.0)
    hist_scaled, w_scaled, b_scaled = _train(
        x * scale, y, task, preconditioner=preconditioner, eps=0.0
    )
    assert hist[-1] < hist[0]  # it trains
    # Equal up to rounding, which Adam-SQR's noisy steps (∝ 1/g per coordinate at eps = 0)
    # amplify to ~1e-10 over 60 steps on diabetes; the √ control below differs by > 1e-2.
    assert_close(hist_scaled, hist, rtol=1e-8, atol=1e-12)
    assert_close(w_scaled * scale, w, rtol=1e-7, atol=1e-10)  # w' = V⁻¹ w
    assert_close(b_scaled, b, rtol=1e-7, atol=1e-10)
    # Negative control: the square-root (AdaGrad/Adam-style) variant is not invariant.
    hist_sqrt, _, _ = _train(x, y, task, preconditioner=preconditioner, eps=0.0, sqrt=True)
    hist_sqrt_scaled, _, _ = _train(
        x * scale, y, task, preconditioner=preconditioner, eps=0.0, sqrt=True
    )
    assert (hist_sqrt - hist_sqrt_scaled).abs().max() > 1e-2


@pytest.mark.parametrize("preconditioner", ["adagrad_sqr", "hutchinson", "identity"])
def test_splitting_parameters_into_groups_leaves_the_trajectory_unchanged(preconditioner):
    x, y = _dataset("breast_cancer")
    kwargs = dict(preconditioner=preconditioner, hutch_init_iters=3, steps=15)
    hist, w, b = _train(x, y, "classification", **kwargs)
    hist_groups, w_groups, b_groups = _train(x, y, "classification", groups=True, **kwargs)
    assert_close(hist_groups, hist, rtol=1e-13, atol=0)
    assert_close(w_groups, w, rtol=1e-13, atol=1e-15)
    assert_close(b_groups, b, rtol=1e-13, atol=1e-15)


# ----------------------------------------------------------------------------- preconditioners
def test_adam_sqr_bias_correction_closed_form():
    g = torch.tensor([0.5, -2.0], dtype=DT)
    w = torch.zeros(2, dtype=DT, requires_grad=True)
    opt = SANIA([w], preconditioner="adam_sqr", lr=0.0, beta2=0.9, eps=0.0)
    for _ in range(5):
        opt.step(_linear_loss_closure(w, 1.0, g))
    assert_close(opt.state[w]["exp_avg_sq"], (1 - 0.9**5) * g * g, rtol=1e-14, atol=0)
    assert int(opt.state[w]["step"]) == 5
    assert opt.last_curvature == pytest.approx(2.0, rel=1e-13)  # v̂ = g², G = Σ g²/g²


def test_adagrad_sqr_accumulates_and_eps_floors():
    g = torch.tensor([1e-3, 2.0], dtype=DT)
    w = torch.zeros(2, dtype=DT, requires_grad=True)
    opt = SANIA([w], preconditioner="adagrad_sqr", lr=0.0, eps=0.5)
    for _ in range(3):
        opt.step(_linear_loss_closure(w, 1.0, g))
    assert_close(opt.state[w]["sum_sq"], 3 * g * g)
    expected = g[0] ** 2 / 0.5 + g[1] ** 2 / (3 * g[1] ** 2)
    assert opt.last_curvature == pytest.approx(expected.item(), rel=1e-13)


def test_hutchinson_preconditioner_converges_to_the_hessian_diagonal():
    """Initial average of N probes on a logistic regression: error within 5σ/√N of diag H."""
    x, y = _dataset("breast_cancer")
    x, y = x[:60, :4], y[:60]
    w0 = torch.randn(4, dtype=DT) * 0.3

    def loss_fn(w):
        return F.binary_cross_entropy_with_logits(x @ w, y)

    hess = torch.autograd.functional.hessian(loss_fn, w0)
    diag = torch.diagonal(hess)
    sigma = ((hess**2).sum(1) - diag**2).sqrt()
    errors = []
    for probes in (8, 2048):
        w = w0.clone().requires_grad_()
        opt = SANIA([w], preconditioner="hutchinson", lr=0.0, hutch_init_iters=probes, seed=3)
        opt.step(lambda w=w: loss_fn(w))
        error = (opt.state[w]["hutch_diag"] - diag).abs()
        assert (error <= 5 * sigma / probes**0.5).all()
        errors.append(error.norm().item())
    assert errors[1] < errors[0] / 4


# ----------------------------------------------------------------------------- guards
def test_no_move_when_delta_is_zero_or_gradient_vanishes():
    w = torch.ones(3, dtype=DT, requires_grad=True)
    opt = SANIA([w], f_star=1.0)
    opt.step(lambda: 0.5 + (w - 1.0).sum())  # f = 0.5 < f* = 1
    assert opt.last_tau == 0.0 and opt.last_delta == 0.0
    assert_close(w.detach(), torch.ones(3, dtype=DT))
    opt = SANIA([w], preconditioner="identity")
    opt.step(lambda: (w * 0.0).sum() + 3.0)  # zero gradient, G = 0
    assert opt.last_tau == 0.0
    assert torch.isfinite(w).all()
    assert_close(w.detach(), torch.ones(3, dtype=DT))


def test_parameters_without_gradient_are_skipped():
    used = torch.ones(2, dtype=DT, requires_grad=True)
    unused = torch.ones(2, dtype=DT, requires_grad=True)
    frozen = torch.ones(2, dtype=DT, requires_grad=False)
    opt = SANIA([used, unused, frozen])
    opt.step(lambda: (used**2).sum())
    assert not torch.equal(used.detach(), torch.ones(2, dtype=DT))
    assert torch.equal(unused.detach(), torch.ones(2, dtype=DT))
    assert torch.equal(frozen, torch.ones(2, dtype=DT))
    assert int(opt.state[unused]["step"]) == 0 and int(opt.state[used]["step"]) == 1


def test_non_finite_loss_warns_and_keeps_state():
    w = torch.ones(2, dtype=DT, requires_grad=True)
    opt = SANIA([w])
    opt.step(lambda: (w**2).sum())
    saved = copy.deepcopy(opt.state[w])
    before = w.detach().clone()
    with pytest.warns(NumericalWarning):
        opt.step(lambda: (w**2).sum() * float("inf"))
    assert torch.equal(w.detach(), before)
    assert torch.equal(opt.state[w]["sum_sq"], saved["sum_sq"])
    assert int(opt.state[w]["step"]) == 1 and int(opt.state[w]["nonfinite_skips"]) == 1


def test_group_lr_is_never_overwritten_and_scales_the_step():
    g = torch.tensor([1.0, 2.0], dtype=DT)
    w = torch.zeros(2, dtype=DT, requires_grad=True)
    v = torch.zeros(2, dtype=DT, requires_grad=True)
    opt = SANIA(
        [{"params": [w], "lr": 1.0}, {"params": [v], "lr": 0.25}], preconditioner="identity"
    )
    opt.step(lambda: 10.0 + (g * w).sum() + (g * v).sum())
    assert [group["lr"] for group in opt.param_groups] == [1.0, 0.25]
    assert_close(v.detach(), 0.25 * w.detach())


# ----------------------------------------------------------------------------- closure contract
def _mlp_problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)
    ).double()
    x = torch.randn(16, 3, dtype=DT)
    y = torch.randn(16, 1, dtype=DT)
    return model, x, y


GRADIENT_SOURCES = ("optimizer", "closure_backward", "precomputed")


def _train_with_gradient_source(mode, preconditioner):
    """Three SANIA steps on the MLP problem, gradients supplied the way ``mode`` says;
    returns the flat parameters."""
    model, x, y = _mlp_problem()
    opt = SANIA(model.parameters(), preconditioner=preconditioner, hutch_init_iters=4)
    graph = preconditioner == "hutchinson"

    def loss_only():
        return F.mse_loss(model(x), y)

    def with_backward():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward(create_graph=graph)
        return loss

    for _ in range(3):
        opt.zero_grad()
        if mode == "optimizer":
            opt.step(loss_only)
        elif mode == "closure_backward":
            opt.step(with_backward)
        else:
            loss = F.mse_loss(model(x), y)
            loss.backward(create_graph=graph)
            opt.step(lambda loss=loss: loss)
        if mode != "optimizer":
            assert all(not p.grad.requires_grad for p in model.parameters())  # graph released
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
@pytest.mark.parametrize("preconditioner", ["adam_sqr", "hutchinson"])
def test_gradient_sources_agree(preconditioner):
    """SANIA differentiating the loss, a closure calling backward, and gradients computed by
    the loop before step() give the same parameters."""
    results = [_train_with_gradient_source(mode, preconditioner) for mode in GRADIENT_SOURCES]
    assert_close(results[1], results[0], rtol=1e-13, atol=1e-15)
    assert_close(results[2], results[0], rtol=1e-13, atol=1e-15)


def test_optimizer_differentiation_leaves_grad_untouched():
    model, x, y = _mlp_problem()
    opt = SANIA(model.parameters())
    loss = opt.step(lambda: F.mse_loss(model(x), y))
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and not loss.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_hutchinson_refuses_gradients_without_graph():
    model, x, y = _mlp_problem()
    opt = SANIA(model.parameters(), preconditioner="hutchinson", hutch_init_iters=2)

    def closure():
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="create_graph=True"):
        opt.step(closure)


def test_closure_is_required():
    w = torch.zeros(2, requires_grad=True)
    opt = SANIA([w])
    assert opt.step() is None  # no gradient: the DCP state-materialising call, a no-op
    w.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    assert torch.equal(w, torch.zeros(2))
    with pytest.raises(ValueError, match="closure"):
        opt.step(lambda: None)
    with pytest.raises(ValueError, match="closure"):
        opt.step(lambda: (w * 2).sum(0, keepdim=True).expand(2))


def test_state_dict_round_trip_continues_identically():
    model, x, y = _mlp_problem()
    opt = SANIA(model.parameters(), preconditioner="hutchinson", hutch_init_iters=2)
    for _ in range(2):
        opt.step(lambda: F.mse_loss(model(x), y))
    clone = copy.deepcopy(model)
    opt_clone = SANIA(clone.parameters(), preconditioner="hutchinson", hutch_init_iters=2)
    opt_clone.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt_clone.state[next(clone.parameters())]["step"].dtype == torch.int64
    for _ in range(2):
        opt.step(lambda: F.mse_loss(model(x), y))
        opt_clone.step(lambda: F.mse_loss(clone(x), y))
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(p, q)


def test_bf16_parameters_keep_float32_state():
    w = torch.ones(3, dtype=torch.bfloat16, requires_grad=True)
    opt = SANIA([w], preconditioner="adam_sqr")
    opt.step(lambda: (w.float() ** 2).sum())
    assert opt.state[w]["exp_avg_sq"].dtype == torch.float32
    assert w.dtype == torch.bfloat16 and not torch.equal(w, torch.ones(3, dtype=torch.bfloat16))


# ----------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lr": -1.0}, "lr"),
        ({"preconditioner": "newton"}, "preconditioner"),
        ({"model": "cubic"}, "model"),
        ({"eps": -0.1}, "eps"),
        ({"beta2": 1.0}, "beta2"),
        ({"sqrt": 1}, "sqrt"),
        ({"f_star": float("nan")}, "f_star"),
        ({"hutch_init_iters": 0}, "hutch_init_iters"),
        ({"hutch_beta": -0.5}, "hutch_beta"),
        ({"hutch_alpha": 0.0}, "hutch_alpha"),
        ({"min_gnorm": -1.0}, "min_gnorm"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        SANIA([torch.zeros(2, requires_grad=True)], **kwargs)


def test_global_hyperparameters_must_match_across_groups():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="f_star"):
        SANIA([{"params": [a]}, {"params": [b], "f_star": 1.0}])
    opt = SANIA([a])
    with pytest.raises(ValueError, match="model"):
        opt.add_param_group({"params": [b], "model": "linear"})
    opt.add_param_group({"params": [b], "preconditioner": "identity", "lr": 0.5})
    assert "step" in opt.state[b]
