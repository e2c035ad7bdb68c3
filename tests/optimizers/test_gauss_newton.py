"""ExactGaussNewton (Korbit et al. 2024) against dense float64 Levenberg-Marquardt solves."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import secondorder
from secondorder.optimizers import gauss_newton
from secondorder.optimizers.gauss_newton import ExactGaussNewton, adapt_damping, armijo_backtracking
from secondorder.precond.jacobian import per_sample_jacobian
from secondorder.precond.linalg import NumericalWarning
from tests import oracles

DTYPE = torch.float64


# --------------------------------------------------------------------------- problems and oracle
def per_example_loss(name):
    """Per-example loss whose batch mean is the optimizer's loss (oracles.py convention)."""
    if name == "mse":
        return lambda out, y: F.mse_loss(out, y, reduction="sum") / out.shape[1]
    if name == "bce":
        return lambda out, y: (
            F.binary_cross_entropy_with_logits(out, y, reduction="sum") / out.shape[1]
        )
    if name == "cross_entropy":
        return lambda out, y: F.cross_entropy(out, y, reduction="sum")
    return lambda out, y: 0.5 * ((out - y) ** 2).sum()


def half_squared_error(outputs, targets):
    return 0.5 * ((outputs - targets) ** 2).sum(dim=1)


def make_problem(loss, batch, outputs, *, seed=0, hidden=5, inputs=3):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, outputs)).to(
        DTYPE
    )
    x = torch.randn(batch, inputs, dtype=DTYPE)
    if loss == "cross_entropy":
        y = torch.randint(0, outputs, (batch,))
    elif loss == "bce":
        y = torch.rand(batch, outputs, dtype=DTYPE)
    else:
        y = torch.randn(batch, outputs, dtype=DTYPE)
    return model, x, y


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def optimizer_loss(name):
    return half_squared_error if name == "callable" else name


def mean_loss(name, model, x, y):
    out = model(x)
    return (
        sum(per_example_loss(name)(out[n : n + 1], y[n : n + 1]) for n in range(x.shape[0]))
        / x.shape[0]
    )


def dense_quantities(name, model, x, y):
    """``(GGN = JᵀH_LJ, ∇L)`` in float64, dense: ``J`` by ``jacrev`` of the whole batch and
    ``H_L`` the Hessian of the mean loss w.r.t. the flattened outputs (``blkdiag(Q_n)/b``)."""
    values = {key: p.detach() for key, p in model.named_parameters()}
    outputs = torch.func.functional_call(model, values, (x,)).detach()
    jac = torch.func.jacrev(lambda v: torch.func.functional_call(model, v, (x,)))(values)
    jac = torch.cat([jac[key].reshape(outputs.numel(), -1) for key in values], dim=1)
    batch = x.shape[0]

    def loss_of_outputs(flat):
        return per_example_loss(name)(flat.reshape(batch, -1), y) / batch

    hessian = torch.func.hessian(loss_of_outputs)(outputs.reshape(-1))
    grad = jac.T @ torch.func.grad(loss_of_outputs)(outputs.reshape(-1))
    return jac.T @ hessian @ jac, grad


def dense_direction(name, model, x, y, damping):
    """``(−(JᵀQJ/b + λI)⁻¹∇L, ∇L)``."""
    ggn, grad = dense_quantities(name, model, x, y)
    return -torch.linalg.solve(ggn + damping * torch.eye(ggn.shape[0], dtype=DTYPE), grad), grad


def one_step(net, x, y, **kwargs):
    """One step on ``net``; ``kwargs`` go to the optimizer (``model=`` included)."""
    before = flat_params(net)
    optimizer = ExactGaussNewton(net.parameters(), **kwargs)
    loss = optimizer.step(lambda: (net(x), y))
    return flat_params(net) - before, loss, optimizer


# --------------------------------------------------------------------------- the direction
LOSSES = [("mse", 1), ("mse", 3), ("bce", 1), ("bce", 2), ("cross_entropy", 4), ("callable", 2)]


@pytest.mark.parametrize("name,outputs", LOSSES)
@pytest.mark.parametrize("batch", [3, 40])  # bc below and above p (26..44 parameters)
@pytest.mark.parametrize("solve", ["auto", "batch", "parameter"])
@pytest.mark.parametrize("with_model", [True, False])
def test_direction_equals_dense_solve(name, outputs, batch, solve, with_model):
    model, x, y = make_problem(name, batch, outputs)
    damping = 0.1
    expected, _ = dense_direction(name, model, x, y, damping)
    p = expected.numel()
    assert (batch * outputs < p) == (batch == 3)
    step, loss, _ = one_step(
        model,
        x,
        y,
        model=model if with_model else None,
        loss=optimizer_loss(name),
        damping=damping,
        solve=solve,
    )
    assert_close(step, expected, atol=1e-10, rtol=1e-10)
    assert_close(
        loss,
        mean_loss(name, make_problem(name, batch, outputs)[0], x, y).detach(),
        atol=1e-12,
        rtol=1e-12,
    )


def test_dense_oracle_agrees_with_shared_oracles():
    model, x, y = make_problem("cross_entropy", 5, 3)
    ggn, grad = dense_quantities("cross_entropy", model, x, y)
    assert_close(
        ggn,
        oracles.gauss_newton(model, per_example_loss("cross_entropy"), x, y),
        atol=1e-12,
        rtol=1e-12,
    )
    expected = torch.autograd.grad(
        mean_loss("cross_entropy", model, x, y), list(model.parameters())
    )
    assert_close(grad, torch.cat([g.reshape(-1) for g in expected]), atol=1e-12, rtol=1e-12)


def test_callable_loss_with_explicit_hessian():
    model, x, y = make_problem("callable", 6, 2)
    expected, _ = dense_direction("callable", model, x, y, 0.3)
    step, _, _ = one_step(
        model,
        x,
        y,
        model=model,
        loss=half_squared_error,
        damping=0.3,
        loss_hessian=lambda out, target: torch.ones_like(out),
    )
    assert_close(step, expected, atol=1e-10, rtol=1e-10)


def test_convolutional_model_matches_dense_solve():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 2, 2, stride=2),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).to(DTYPE)
    x = torch.randn(5, 1, 4, 4, dtype=DTYPE)
    y = torch.randint(0, 3, (5,))
    expected, _ = dense_direction("cross_entropy", model, x, y, 0.05)
    step, _, _ = one_step(
        model, x, y, model=model, loss="cross_entropy", damping=0.05, solve="batch"
    )
    assert_close(step, expected, atol=1e-10, rtol=1e-10)


def test_batchnorm_eval_mode_works_and_train_mode_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)
    x, y = torch.randn(6, 3, dtype=DTYPE), torch.randn(6, 2, dtype=DTYPE)
    with pytest.raises(ValueError, match="BatchNorm"):
        one_step(model, x, y, model=model)
    model[1].running_mean.normal_()
    model.eval()
    expected, _ = dense_direction("mse", model, x, y, 0.2)
    step, _, _ = one_step(model, x, y, model=model, damping=0.2)
    assert_close(step, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name,outputs", [("mse", 2), ("bce", 1), ("cross_entropy", 3)])
def test_huge_damping_gives_scaled_gradient(name, outputs):
    """λd + ∇L = G(G + λI)⁻¹∇L, so ‖λd + ∇L‖ ≤ ‖G‖‖∇L‖/λ → 0."""
    model, x, y = make_problem(name, 7, outputs)
    ggn, grad = dense_quantities(name, model, x, y)
    for damping in (1e4, 1e8):
        step, _, _ = one_step(
            model, x, y, model=model, loss=name, damping=damping, lr=damping
        )  # step = λd
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(flat_params(model) - step, model.parameters())
        bound = torch.linalg.matrix_norm(ggn, ord=2) * grad.norm() / damping
        assert (step + grad).norm() <= bound * (1 + 1e-6) + 1e-13
    assert bound < 1e-7 * grad.norm()


def test_linear_least_squares_interpolates_in_one_step():
    """b·c < p, λ = 1e-10, α = 1: one step fits the batch with the minimum-norm change J⁺(y − f)."""
    torch.manual_seed(0)
    model = nn.Linear(10, 2).to(DTYPE)  # p = 22 > bc = 8
    x, y = torch.randn(4, 10, dtype=DTYPE), torch.randn(4, 2, dtype=DTYPE)
    jacobian = per_sample_jacobian(model, x).reshape(8, -1)
    minimum_norm = torch.linalg.pinv(jacobian) @ (y - model(x)).detach().reshape(-1)
    step, _, _ = one_step(model, x, y, model=model, damping=1e-10, solve="batch")
    assert (model(x) - y).abs().max() < 1e-7
    assert_close(step, minimum_norm, atol=1e-7, rtol=1e-7)


def test_full_rank_overdetermined_step_is_the_gauss_newton_step():
    """b·c ≥ p with full rank: λ → 0 gives −G⁻¹∇L (relative error ≤ λ/λ_min(G))."""
    model, x, y = make_problem("mse", 30, 2)
    ggn, grad = dense_quantities("mse", model, x, y)
    damping = 1e-14
    step, _, _ = one_step(model, x, y, model=model, damping=damping)
    newton = -torch.linalg.solve(ggn, grad)
    smallest = torch.linalg.eigvalsh(ggn)[0]
    assert smallest > 1e3 * damping  # full rank
    assert (step - newton).norm() <= (10 * damping / smallest + 1e-8) * newton.norm()


@pytest.mark.parametrize("name,outputs", [("mse", 2), ("bce", 1), ("cross_entropy", 4)])
@pytest.mark.parametrize("damping", [1e-8, 1e-4, 1e-1, 1.0, 1e3, 1e8])
def test_direction_is_a_descent_direction(name, outputs, damping):
    model, x, y = make_problem(name, 9, outputs, seed=3)
    _, grad = dense_direction(name, model, x, y, damping)
    step, _, _ = one_step(model, x, y, model=model, loss=name, damping=damping)
    assert float(grad @ step) < 0


# --------------------------------------------------------------------------- line search
def test_armijo_rule_accepts_first_sufficient_decrease():
    def quadratic(s):  # L(w + sΔ) for L = ½‖w‖², w = 1, Δ = −3: overshoots at s = 1
        return 0.5 * (1 - 3 * s) ** 2

    scale, value, accepted, trials = armijo_backtracking(
        quadratic, 0.5, -3.0, 1.0, armijo_c=0.1, factor=0.8
    )
    assert accepted and value <= 0.5 + 0.1 * scale * -3.0
    previous = scale / 0.8
    assert quadratic(previous) > 0.5 + 0.1 * previous * -3.0  # the scale before was rejected
    assert trials == round(math.log(scale) / math.log(0.8)) + 1


def test_armijo_exhaustion_returns_last_scale():
    tried = []

    def never(s):
        tried.append(s)
        return 1.0

    scale, _, accepted, trials = armijo_backtracking(
        never, 0.0, -1.0, 0.9, factor=0.5, max_trials=4
    )
    assert not accepted and trials == 4 and tried == [0.9, 0.45, 0.225, 0.1125] and scale == 0.1125


def test_line_search_in_the_optimizer(monkeypatch):
    starts = []
    original = gauss_newton.armijo_backtracking

    def recording(evaluate, loss, slope, initial_scale, **kwargs):
        starts.append(initial_scale)
        result = original(evaluate, loss, slope, initial_scale, **kwargs)
        recording.result = result
        recording.slope = slope
        return result

    monkeypatch.setattr(gauss_newton, "armijo_backtracking", recording)
    model, x, y = make_problem("cross_entropy", 12, 3)
    lr = 30.0  # far too long: forces backtracking
    optimizer = ExactGaussNewton(model, loss="cross_entropy", lr=lr, damping=0.01, line_search=True)
    loss0 = float(optimizer.step(lambda: (model(x), y)))
    scale, value, accepted, _ = recording.result
    assert accepted and scale < 1
    assert_close(float(F.cross_entropy(model(x), y)), value)  # the accepted point is where we are
    assert value <= loss0 + 0.1 * scale * recording.slope + 1e-12
    state = optimizer.state[next(model.parameters())]
    assert float(state["step_scale"]) == scale
    optimizer.step(lambda: (model(x), y))
    assert starts == [1.0, min(1.5 * scale, 1.0)]  # reset rule, never above α_max = lr


# --------------------------------------------------------------------------- damping and momentum
def test_adapt_damping_rule():
    assert adapt_damping(1.0, 0.1) == 1.01
    assert adapt_damping(1.0, -5.0) == 1.01
    assert adapt_damping(1.0, 0.5) == 1.0
    assert adapt_damping(1.0, 0.9) == 0.99
    assert adapt_damping(1.0, None) == 1.0
    assert adapt_damping(1e-12, 0.9, min_damping=1e-12) == 1e-12


@pytest.mark.parametrize("momentum,two_groups", [(0.0, False), (0.5, False), (0.0, True)])
def test_linear_least_squares_ratio_is_one(momentum, two_groups):
    """The GN model is exact for a linear model with MSE: ρ = 1 and λ shrinks by 0.99 each step."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2).to(DTYPE)
    x, y = torch.randn(5, 4, dtype=DTYPE), torch.randn(5, 2, dtype=DTYPE)
    params = (
        [{"params": [model.weight]}, {"params": [model.bias], "lr": 0.3}]
        if two_groups
        else model.parameters()
    )
    optimizer = ExactGaussNewton(
        params, model=model, lr=0.5, damping=1.0, momentum=momentum, adaptive_damping=True
    )
    for step in range(3):
        optimizer.step(lambda: (model(x), y))
        assert_close(optimizer.last_step["ratio"], 1.0, atol=1e-9, rtol=0)
        assert optimizer.param_groups[-1]["damping"] == pytest.approx(0.99 ** (step + 1))


def test_bad_step_increases_damping():
    """Tiny λ on a curved problem: the loss rises (ρ < 0), λ grows ×1.01; ρ checked densely."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)
    x, y = 3 * torch.randn(10, 3, dtype=DTYPE), torch.randint(0, 3, (10,))
    ggn, grad = dense_quantities("cross_entropy", model, x, y)
    optimizer = ExactGaussNewton(
        model, loss="cross_entropy", lr=1.0, damping=1e-4, adaptive_damping=True
    )
    before = flat_params(model)
    loss0 = float(optimizer.step(lambda: (model(x), y)))
    step = flat_params(model) - before
    new_loss = float(F.cross_entropy(model(x), y))
    predicted = float(grad @ step + 0.5 * step @ ggn @ step)
    ratio = optimizer.last_step["ratio"]
    assert new_loss > loss0 and ratio < 0.25
    assert_close(ratio, (new_loss - loss0) / predicted, atol=0, rtol=1e-8)
    assert optimizer.param_groups[0]["damping"] == pytest.approx(1e-4 * 1.01)


def test_heavy_ball_recursion():
    model, x, y = make_problem("mse", 8, 2)
    reference, _, _ = make_problem("mse", 8, 2)
    lr, mu, damping = 0.7, 0.6, 0.5
    optimizer = ExactGaussNewton(model, lr=lr, damping=damping, momentum=mu)
    previous = torch.zeros_like(flat_params(reference))
    for _ in range(3):
        optimizer.step(lambda: (model(x), y))
        direction, _ = dense_direction("mse", reference, x, y, damping)
        update = lr * direction + mu * previous
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(
                flat_params(reference) + update, reference.parameters()
            )
        previous = update
        assert_close(flat_params(model), flat_params(reference), atol=1e-10, rtol=1e-10)


# --------------------------------------------------------------------------- API contract
def test_closure_call_count():
    calls = []
    model, x, y = make_problem("cross_entropy", 4, 3)

    def closure():
        calls.append(1)
        return model(x), y

    ExactGaussNewton(model, loss="cross_entropy", solve="batch").step(closure)
    assert len(calls) == 3  # one forward per output coordinate, the first reused for the loss
    calls.clear()
    model, x, y = make_problem("mse", 4, 1)
    ExactGaussNewton(model).step(closure)
    assert len(calls) == 1


def test_step_without_closure_only_initialises_state():
    model, _, _ = make_problem("mse", 3, 1)
    before = flat_params(model)
    optimizer = ExactGaussNewton(model)
    assert optimizer.step() is None
    assert torch.equal(flat_params(model), before)
    first = optimizer.state[next(model.parameters())]
    assert first["step"].dtype == torch.int64 and int(first["step"]) == 0
    assert first["numerical_failures"].dtype == torch.int64


def test_numerical_failure_keeps_parameters_and_counts():
    model, x, y = make_problem("mse", 4, 1)
    before = flat_params(model)
    optimizer = ExactGaussNewton(model)
    with pytest.warns(NumericalWarning):
        optimizer.step(lambda: (model(x) * float("nan"), y))
    assert torch.equal(flat_params(model), before)
    assert int(optimizer.state[next(model.parameters())]["nonfinite_skips"]) == 1
    assert optimizer.nonfinite_skips() == 1


def test_state_dict_round_trip_continues_identically():
    model, x, y = make_problem("mse", 6, 2)
    twin, _, _ = make_problem("mse", 6, 2)
    kwargs = dict(lr=0.5, damping=0.3, momentum=0.5, line_search=True, adaptive_damping=True)
    optimizer = ExactGaussNewton(model, **kwargs)
    optimizer.step(lambda: (model(x), y))
    twin.load_state_dict(model.state_dict())
    restored = ExactGaussNewton(twin, **kwargs)
    restored.load_state_dict(optimizer.state_dict())
    optimizer.step(lambda: (model(x), y))
    restored.step(lambda: (twin(x), y))
    assert torch.equal(flat_params(model), flat_params(twin))
    assert optimizer.param_groups[0]["damping"] == restored.param_groups[0]["damping"]


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(damping=0.0), "damping"),
        (dict(lr=-1.0), "lr"),
        (dict(momentum=1.0), "momentum"),
        (dict(solve="qr"), "solve"),
        (dict(loss="hinge"), "loss"),
        (dict(loss=3), "loss"),
        (dict(loss="mse", loss_hessian=lambda o, t: o), "loss_hessian"),
        (dict(line_search="yes"), "line_search"),
        (dict(armijo_c=1.5), "armijo_c"),
        (dict(max_backtracks=0), "max_backtracks"),
        (dict(backtrack_factor=1.0), "backtrack_factor"),
        (dict(jacobian_chunk_size=0), "jacobian_chunk_size"),
    ],
)
def test_bad_arguments(kwargs, name):
    model, _, _ = make_problem("mse", 3, 1)
    with pytest.raises((ValueError, TypeError), match=name):
        ExactGaussNewton(model, **kwargs)


def test_closure_must_return_outputs_and_targets():
    model, x, y = make_problem("mse", 3, 1)
    optimizer = ExactGaussNewton(model)
    with pytest.raises(TypeError, match="closure"):
        optimizer.step(lambda: F.mse_loss(model(x), y))


def test_float32_training_decreases_the_loss_and_is_exported():
    assert secondorder.ExactGaussNewton is ExactGaussNewton
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    optimizer = ExactGaussNewton(model, loss="cross_entropy", damping=0.1, line_search=True)
    losses = [float(optimizer.step(lambda: (model(x), y))) for _ in range(10)]
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())
