"""Shampoo: degenerate limits against torch.optim, the classic configuration against an
independent dense oracle, the eigenvalue-corrected mode, schedules and failure handling."""

import math
import warnings

import pytest
import torch
from torch import nn

from secondorder import Shampoo
from secondorder.distributed.blocking import BlockLayout
from secondorder.precond import kronecker
from secondorder.precond.linalg import NumericalWarning
from tests.optimizers.registry import toy_model
from tests.optimizers.training import refresh_steps


def make_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def make_data(dtype=torch.float32, n=64):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=generator).to(dtype)
    y = torch.randn(n, 3, generator=generator).to(dtype)
    return x, y


def train(make_optimizer, steps=50, dtype=torch.float32, seed=0, batch=16):
    model = make_model(dtype, seed)
    optimizer = make_optimizer(model.parameters())
    x, y = make_data(dtype)
    for step in range(steps):
        rows = slice((step % 4) * batch, (step % 4 + 1) * batch)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
        optimizer.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()]), optimizer


NEVER = math.inf

# (secondorder kwargs, torch optimizer factory): Shampoo that never starts preconditioning is
# its graft method; each pair must agree to float32 rounding over 50 steps.
DEGENERATE_CASES = {
    "adamw": (dict(betas=(0.9, 0.999), weight_decay=0.1, grafting="adam", graft_beta2=0.999, graft_epsilon=1e-8),
              lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)),
    "adam_l2": (dict(betas=(0.9, 0.999), weight_decay=0.1, weight_decay_type="l2", grafting="adam",
                     graft_beta2=0.999, graft_epsilon=1e-8),
                lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1)),
    "adagrad": (dict(betas=(0.0, 1.0), grafting="adagrad", graft_epsilon=1e-10, weight_decay=0.05,
                     weight_decay_type="l2"),
                lambda p: torch.optim.Adagrad(p, lr=1e-2, eps=1e-10, weight_decay=0.05)),
    "rmsprop": (dict(betas=(0.0, 0.99), grafting="rmsprop", graft_beta2=0.99, graft_epsilon=1e-8,
                     use_bias_correction=False, weight_decay=0.05, weight_decay_type="l2"),
                lambda p: torch.optim.RMSprop(p, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.05)),
    "sgd": (dict(betas=(0.0, 0.999), grafting="sgd"), lambda p: torch.optim.SGD(p, lr=1e-2)),
    "sgd_momentum": (dict(betas=(0.0, 0.999), grafting="sgd", momentum=0.9),
                     lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9)),
    "sgd_nesterov": (dict(betas=(0.0, 0.999), grafting="sgd", momentum=0.9, nesterov=True),
                     lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True)),
}


@pytest.mark.parametrize("case", sorted(DEGENERATE_CASES))
def test_never_preconditioning_equals_torch_optim(case):
    kwargs, make_reference = DEGENERATE_CASES[case]
    ours, _ = train(lambda p: Shampoo(p, lr=1e-2, start_preconditioning_step=NEVER, **kwargs))
    reference, _ = train(make_reference)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


def test_eigenvalue_corrected_before_first_basis_is_adam():
    # Q = I until the first amortised step: Adam with ε outside the root.
    # (graft_scale=1: SOAP mode's default 3 would make it Adam at 3× the lr)
    ours, _ = train(lambda p: Shampoo(p, lr=1e-2, betas=(0.9, 0.999), epsilon=1e-8, eigenvalue_correction=True,
                                      start_preconditioning_step=NEVER, precondition_1d=True, graft_scale=1.0,
                                          graft_beta2=0.999))
    reference, _ = train(lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.9, 0.999), eps=1e-8))
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


# ----- the classic configuration against an independent dense float64 oracle -------------

def oracle_root(factor, exponent, epsilon):
    """(F + εI)^(−e) with the shift-to-ε rule, from a float64 eigh (no code shared with the package)."""
    values, vectors = torch.linalg.eigh(factor + epsilon * torch.eye(factor.shape[0], dtype=factor.dtype))
    if values.min() < epsilon:
        values = values - values.min() + epsilon
    return vectors @ torch.diag(values ** -exponent) @ vectors.T


class ClassicShampooOracle:
    """Config B of reference/shampoo.md §2 written densely: Kronecker products are formed
    with torch.kron and blocks are given explicitly as (param index, slices)."""

    def __init__(self, params, blocks, *, lr, wd, frequency, epsilon=1e-12):
        self.params, self.blocks = params, blocks
        self.lr, self.wd, self.f, self.eps = lr, wd, frequency, epsilon
        self.t = 0
        self.state = []
        for index, slices in blocks:
            shape = params[index][slices].reshape(-1).shape if len(slices) == 1 else params[index][slices].shape
            dims = list(shape)
            self.state.append(dict(
                factors=[torch.zeros(d, d, dtype=torch.float64) for d in dims],
                roots=[torch.eye(d, dtype=torch.float64) for d in dims],
                m=torch.zeros(shape, dtype=torch.float64), v=torch.zeros(shape, dtype=torch.float64)))

    def step(self):
        self.t += 1
        t, c2 = self.t, 1 - 0.999 ** self.t
        updates = []
        for (index, slices), st in zip(self.blocks, self.state):
            g = self.params[index].grad[slices].double()
            order = len(st["factors"])
            if order == 1:
                g = g.reshape(-1)
                contributions = [torch.outer(g, g)]
            else:
                contributions = [g @ g.T, g.T @ g]
            for k in range(order):
                st["factors"][k] = 0.999 * st["factors"][k] + 0.001 * contributions[k]
            st["v"] = 0.999 * st["v"] + 0.001 * g * g
            if t == self.f or (t > self.f and t % self.f == 0):
                st["roots"] = [oracle_root(f / c2, 1 / (2 * order), self.eps) for f in st["factors"]]
            st["m"] = 0.9 * st["m"] + 0.1 * g
            m_hat = st["m"] / (1 - 0.9 ** t)
            graft = m_hat / (st["v"].sqrt() / math.sqrt(c2) + 1e-8)
            if t < self.f:
                direction = graft
            else:
                dense = st["roots"][0] if order == 1 else torch.kron(st["roots"][0], st["roots"][1])
                shampoo = (dense @ m_hat.reshape(-1)).reshape(m_hat.shape)
                direction = shampoo * graft.norm() / (shampoo.norm() + 1e-16)
            updates.append(direction)
        with torch.no_grad():
            for param in self.params:
                param.mul_(1 - self.lr * self.wd)
            for (index, slices), direction in zip(self.blocks, updates):
                view = self.params[index][slices]
                view.sub_(self.lr * direction.reshape(view.shape).to(view.dtype))


def classic_blocks():
    """Blocks of Linear(6,8) -> Tanh -> Linear(8,3) with max_preconditioner_dim = 4."""
    rows, cols = (slice(0, 4), slice(4, 8)), (slice(0, 4), slice(4, 6))
    first = [(0, (r, c)) for r in rows for c in cols]  # weight (8, 6) -> 2x2 grid of blocks
    bias1 = [(1, (slice(0, 4),)), (1, (slice(4, 8),))]
    second = [(2, (slice(0, 3), c)) for c in (slice(0, 4), slice(4, 8))]  # weight (3, 8)
    bias2 = [(3, (slice(0, 3),))]
    return first + bias1 + second + bias2


def test_oracle_blocks_are_the_package_blocks():
    model = make_model()
    shapes = [tuple(p[s].shape) for i, s in classic_blocks() for p in [list(model.parameters())[i]]]
    package = [shape for p in model.parameters() for shape in BlockLayout.for_shape(p.shape, 4).shapes]
    assert shapes == package


@pytest.mark.parametrize("dtype,frequency,tolerance", [
    (torch.float64, 3, 1e-8),  # first roots while the vector factors are still rank deficient
    (torch.float32, 5, 1e-5),  # every factor full rank at its first root: fp32 rounding only
])
def test_classic_configuration_matches_dense_oracle(dtype, frequency, tolerance):
    lr, wd = 1e-2, 0.01
    model = make_model(dtype)
    oracle_model = make_model(torch.float64)
    optimizer = Shampoo(model.parameters(), lr=lr, betas=(0.9, 0.999), epsilon=1e-12, weight_decay=wd,
                        precondition_frequency=frequency, max_preconditioner_dim=4, grafting="adam",
                        graft_beta2=0.999, graft_epsilon=1e-8, precondition_1d=True, relative_epsilon=0.0,
                        factor_dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    oracle = ClassicShampooOracle(list(oracle_model.parameters()), classic_blocks(), lr=lr, wd=wd, frequency=frequency)
    x, y = make_data(torch.float64)
    worst = 0.0
    for step in range(20):
        rows = slice((step % 4) * 16, (step % 4 + 1) * 16)
        before = [p.detach().double().clone() for p in oracle_model.parameters()]
        # Both take the step from the same (oracle's) weights, so per-step errors do not compound.
        with torch.no_grad():
            for p, q in zip(model.parameters(), oracle_model.parameters()):
                p.copy_(q)
        for m, opt in ((model, optimizer), (oracle_model, oracle)):
            for p in m.parameters():
                p.grad = None
            dtype_m = next(m.parameters()).dtype
            nn.functional.mse_loss(m(x[rows].to(dtype_m)), y[rows].to(dtype_m)).backward()
            opt.step()
        ours = torch.cat([(p.detach().double() - b).flatten() for p, b in zip(model.parameters(), before)])
        theirs = torch.cat([(p.detach() - b).flatten() for p, b in zip(oracle_model.parameters(), before)])
        worst = max(worst, float((ours - theirs).norm() / theirs.norm()))
    print(f"worst relative per-step difference: {worst:.2e}")
    assert worst < tolerance, worst


def test_single_block_equals_dense_formula():
    # One (5, 4) matrix block: direction = L^{-1/4} Ĝ R^{-1/4} with the roots of the factors.
    torch.manual_seed(3)
    weight = nn.Parameter(torch.randn(5, 4, dtype=torch.float64))
    optimizer = Shampoo([weight], lr=1.0, betas=(0.0, 1.0), epsilon=1e-10, grafting="none", relative_epsilon=0.0,
                        precondition_frequency=1, max_preconditioner_dim=5, factor_dtype=torch.float64)
    grads = [torch.randn(5, 4, dtype=torch.float64) for _ in range(3)]
    for grad in grads:
        before = weight.detach().clone()
        weight.grad = grad
        optimizer.step()
    left = sum(g @ g.T for g in grads)
    right = sum(g.T @ g for g in grads)
    expected = oracle_root(left, 0.25, 1e-10) @ grads[-1] @ oracle_root(right, 0.25, 1e-10)
    torch.testing.assert_close(before - weight.detach(), expected, atol=1e-10, rtol=1e-10)
    block_state = optimizer.state[weight]["block_0"]
    strategy = kronecker.KroneckerFactors((0.25, 0.25), beta2=1.0, epsilon=1e-10, factor_dtype=torch.float64)
    dense = strategy.to_dense(block_state, 3)
    torch.testing.assert_close(dense @ grads[-1].reshape(-1), expected.reshape(-1), atol=1e-10, rtol=1e-10)


def test_eigenvalue_corrected_direction_is_adam_in_eigenbasis():
    torch.manual_seed(4)
    weight = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    # Bases from step 3 on, when both factors are full rank (a degenerate spectrum would make
    # the basis, and so the accumulated Λ, arbitrary); Q = I before.
    optimizer = Shampoo([weight], lr=1.0, betas=(0.0, 0.9), epsilon=1e-8, eigenvalue_correction=True, grafting="none",
                        precondition_frequency=1, start_preconditioning_step=3, max_preconditioner_dim=4,
                        factor_dtype=torch.float64, refresh_method="eigh")
    grads = [torch.randn(4, 3, dtype=torch.float64) for _ in range(4)]
    left = torch.zeros(4, 4, dtype=torch.float64)
    right = torch.zeros(3, 3, dtype=torch.float64)
    corrected = torch.zeros(4, 3, dtype=torch.float64)
    for t, grad in enumerate(grads, start=1):
        before = weight.detach().clone()
        weight.grad = grad
        optimizer.step()
        left = 0.9 * left + 0.1 * grad @ grad.T
        right = 0.9 * right + 0.1 * grad.T @ grad
        c2 = 1 - 0.9**t
        q_left = torch.linalg.eigh(left / c2 + 1e-8 * torch.eye(4, dtype=torch.float64))[1]
        q_right = torch.linalg.eigh(right / c2 + 1e-8 * torch.eye(3, dtype=torch.float64))[1]
        if t < 3:
            q_left, q_right = torch.eye(4, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
        rotated = q_left.T @ grad @ q_right
        corrected = 0.9 * corrected + 0.1 * rotated**2
        expected = q_left @ (rotated / ((corrected / c2).sqrt() + 1e-8)) @ q_right.T
        # Eigenvectors are defined up to sign; the direction is not.
        torch.testing.assert_close(before - weight.detach(), expected, atol=1e-9, rtol=1e-9)
    strategy = optimizer._strategy((4, 3), weight, optimizer.param_groups[0])
    dense = strategy.to_dense(optimizer.state[weight]["block_0"], 4)
    torch.testing.assert_close(dense, dense.T)


def test_schedule_of_amortised_steps(monkeypatch):
    calls = []
    real = kronecker.compute_inverses

    def spy(items, step, **options):
        calls.append(step)
        return real(items, step, **options)

    monkeypatch.setattr("secondorder.optimizers.shampoo.compute_inverses", spy)
    train(lambda p: Shampoo(p, precondition_frequency=10, start_preconditioning_step=15), steps=41)
    assert calls == [15, 20, 30, 40]
    calls.clear()
    train(lambda p: Shampoo(p, precondition_frequency=4), steps=12)
    assert calls == [4, 8, 12]


def test_one_dimensional_parameters_are_diagonal_by_default():
    _, optimizer = train(lambda p: Shampoo(p, precondition_frequency=2), steps=3)
    bias = optimizer.param_groups[0]["params"][1]
    weight = optimizer.param_groups[0]["params"][0]
    assert not any(key.startswith("factor") for key in optimizer.state[bias]["block_0"])
    assert "factor_0" in optimizer.state[weight]["block_0"]
    _, optimizer = train(lambda p: Shampoo(p, precondition_frequency=2, precondition_1d=True), steps=3)
    bias = optimizer.param_groups[0]["params"][1]
    assert optimizer.state[bias]["block_0"]["factor_0"].shape == (8, 8)


def test_failed_eigendecomposition_keeps_last_root_counts_and_warns(monkeypatch):
    model = make_model()
    optimizer = Shampoo(model.parameters(), precondition_frequency=1, precondition_1d=True)
    x, y = make_data()

    def one_step():
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()

    one_step()
    weight = model[0].weight
    root_before = optimizer.state[weight]["block_0"]["root_0"].clone()

    def broken(matrix):
        raise RuntimeError("simulated LAPACK failure")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    with pytest.warns(NumericalWarning):
        one_step()
    block = optimizer.state[weight]["block_0"]
    torch.testing.assert_close(block["root_0"], root_before, rtol=0, atol=0)
    assert int(block["failed"]) == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    monkeypatch.undo()
    one_step()
    assert not torch.equal(optimizer.state[weight]["block_0"]["root_0"], root_before)


def test_non_finite_gradient_skips_block_without_losing_state():
    model = make_model()
    optimizer = Shampoo(model.parameters(), precondition_frequency=1)
    x, y = make_data()
    optimizer.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()
    snapshot = {k: v.clone() for k, v in optimizer.state[model[0].weight]["block_0"].items()}
    weight_before = model[0].weight.detach().clone()
    optimizer.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.warns(NumericalWarning, match="not finite"):
        optimizer.step()
    block = optimizer.state[model[0].weight]["block_0"]
    for key, value in snapshot.items():
        if key != "nonfinite_skips":
            torch.testing.assert_close(block[key], value, rtol=0, atol=0)
    assert int(block["nonfinite_skips"]) == 1
    torch.testing.assert_close(model[0].weight.detach(), weight_before, rtol=0, atol=0)
    assert torch.isfinite(model[2].weight).all()


def test_bf16_parameters_keep_float32_state():
    model = make_model(torch.bfloat16)
    optimizer = Shampoo(model.parameters(), precondition_frequency=1)
    x, y = make_data(torch.bfloat16)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    for param in model.parameters():
        for key, value in optimizer.state[param]["block_0"].items():
            if value.is_floating_point():
                assert value.dtype == torch.float32, key
        assert param.dtype == torch.bfloat16


def test_split_blocks_are_preconditioned_independently():
    torch.manual_seed(5)
    big = nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    halves = [nn.Parameter(big.detach()[:3].clone()), nn.Parameter(big.detach()[3:].clone())]
    kwargs = dict(lr=0.1, precondition_frequency=1, factor_dtype=torch.float64)
    split = Shampoo([big], max_preconditioner_dim=3, **kwargs)
    separate = Shampoo(halves, max_preconditioner_dim=3, **kwargs)
    for _ in range(3):
        grad = torch.randn(6, 4, dtype=torch.float64)
        big.grad = grad.clone()
        halves[0].grad, halves[1].grad = grad[:3].clone(), grad[3:].clone()
        split.step()
        separate.step()
    torch.testing.assert_close(big.detach(), torch.cat([h.detach() for h in halves]), atol=1e-12, rtol=0)


def test_soap_mode_trains_and_defaults_to_adam_grafting():
    final, optimizer = train(lambda p: Shampoo(p, lr=3e-3, eigenvalue_correction=True, precondition_frequency=5))
    assert optimizer.defaults["grafting"] == "adam"
    assert torch.isfinite(final).all()


def test_soap_mode_step_has_adams_averaged_norm_so_adamw_lr_carries_over():
    """Default SOAP mode: step ``t`` is SOAP's own direction ``P_t`` rescaled by
    ``graft_scale · N̄_D/N̄_P`` (3 × the ratio of the step-averaged norms of torch Adam's direction
    and of ``P``, β 0.99), so its length follows Adam's on average and SOAP's from step to step;
    ``graft_norm_beta=0`` is per-step grafting: exactly 3 × Adam's norm at every step. Ungrafted,
    the step is a fraction of Adam's (the eigenbasis concentrates the signal in few coordinates),
    which is why AdamW's lr did not carry over."""
    torch.manual_seed(3)
    grads = [torch.randn(8, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64) for _ in range(12)]

    def step_norms(make):
        weight = nn.Parameter(torch.zeros(8, 6, dtype=torch.float64))
        optimizer = make([weight])
        norms = []
        for grad in grads:
            before = weight.detach().clone()
            weight.grad = grad.clone()
            optimizer.step()
            norms.append(float((weight.detach() - before).norm()))
        return torch.tensor(norms, dtype=torch.float64)

    lr = 1e-2
    adam = step_norms(lambda p: torch.optim.Adam(p, lr=lr, betas=(0.9, 0.99))) / lr
    paper = step_norms(lambda p: Shampoo(p, lr=lr, eigenvalue_correction=True, precondition_frequency=3,
                                         grafting="none")) / lr
    soap = step_norms(lambda p: Shampoo(p, lr=lr, eigenvalue_correction=True, precondition_frequency=3)) / lr
    per_step = step_norms(lambda p: Shampoo(p, lr=lr, eigenvalue_correction=True, precondition_frequency=3,
                                            graft_norm_beta=0.0)) / lr
    weights = 0.01 * 0.99 ** torch.arange(len(grads) - 1, -1, -1, dtype=torch.float64)
    averaged = torch.stack([(weights[-t - 1:] * adam[:t + 1]).sum() / (weights[-t - 1:] * paper[:t + 1]).sum()
                            for t in range(len(grads))])
    torch.testing.assert_close(soap, 3 * paper * averaged, rtol=1e-10, atol=0)
    torch.testing.assert_close(per_step, 3 * adam, rtol=1e-10, atol=0)
    assert paper[3:].sum() < 0.9 * adam[3:].sum(), (paper / adam).tolist()


def test_warns_nothing_in_normal_training():
    with warnings.catch_warnings():
        warnings.simplefilter("error", NumericalWarning)
        train(lambda p: Shampoo(p, precondition_frequency=2), steps=10)


def test_soap_mode_first_basis_refresh_keeps_step_size_with_unseen_rows():
    """Embedding-like gradients (rows 16.. never seen): SOAP computes its first bases at step 1
    by default, so the refresh at step f does not put zero Λ entries (accumulated in the
    identity basis) under the largest eigen-directions. With the bases first computed at step
    f the step-f update was 3.4× the previous one (14× the embedding's norm on the race's
    transformer)."""

    def update_norms(**options) -> list[float]:
        torch.manual_seed(0)
        weight = nn.Parameter(torch.randn(32, 8))
        optimizer = Shampoo([weight], lr=1.0, betas=(0.9, 0.95), eigenvalue_correction=True,
                            grafting="none", precondition_frequency=5, weight_decay=0.0, **options)
        norms = []
        for t in range(8):
            grad = torch.zeros(32, 8)
            rows = torch.arange(16) if t == 0 else torch.randperm(16)[:6]
            grad[rows] = torch.randn(len(rows), 8)
            weight.grad = grad
            before = weight.detach().clone()
            optimizer.step()
            norms.append(float((weight.detach() - before).norm()))
        return norms

    default = update_norms()
    assert default[4] < 1.5 * default[3], default
    late = update_norms(start_preconditioning_step=5)  # the trap the default avoids
    assert late[4] > 2.5 * late[3], late


@pytest.mark.parametrize("refresh_method", ["qr", "eigh"])
@pytest.mark.parametrize("beta1", [0.0, 0.9])
@pytest.mark.parametrize("override", [None, {2: {0: 0.0}}, {2: 0.0}], ids=["bases", "one_basis", "no_basis"])
def test_soap_first_moment_kept_in_eigenbasis_equals_rotating_it_every_step(refresh_method, beta1, override):
    """SOAP mode keeps ``Qᵀ m Q`` and rotates only the gradient each step (re-rotating ``m`` at
    basis refreshes); the directions equal rotating the bias-corrected ``m`` every step, which
    is computed here from the optimizer's own bases and ``Λ`` before each step. Also with the
    basis change skipped on one dim or on both (the rotation is then partly or wholly the
    identity, and the rotated copy must still be a buffer of its own)."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(40, 30, dtype=torch.float64))
    # ε = 1e-4: the first steps' statistics are rank-deficient, and with ε = 1e-8 the rounding
    # noise of near-zero rotated coordinates is amplified 1e8-fold in both computations
    optimizer = Shampoo([weight], lr=1.0, betas=(beta1, 0.95), epsilon=1e-4, eigenvalue_correction=True,
                        grafting="none", precondition_frequency=3, refresh_method=refresh_method,
                        factor_dtype=torch.float64, inverse_exponent_override=override)
    # the same configuration; 40 × 30 > max_preconditioner_dim, so the dims are not merged
    strategy = optimizer._strategy((40, 30), weight, optimizer.param_groups[0])
    reference_state = strategy.init_state(weight.detach())
    average = torch.zeros(40, 30, dtype=torch.float64)
    for step in range(1, 11):
        grad = torch.randn(40, 30, dtype=torch.float64)
        strategy.update_stats(reference_state, grad, step)
        if step == 1 or step % 3 == 0:
            kronecker.compute_inverses([(strategy, reference_state)], step, initial=step == 1)
        strategy.update_correction(reference_state, grad)
        average = average * beta1 + (1 - beta1) * grad
        numerator = average / (1 - beta1**step) if beta1 > 0 else grad
        expected = strategy.precondition(reference_state, numerator, step)
        before = weight.detach().clone()
        weight.grad = grad
        optimizer.step()
        torch.testing.assert_close(before - weight.detach(), expected, rtol=1e-9, atol=1e-9,  # O(1) entries
                                   msg=lambda m, step=step: f"step {step}: {m}")
    block = next(value for key, value in optimizer.state[weight].items() if "block_" in key)
    assert ("rotated_average" in block) == (beta1 > 0)


def test_soap_state_without_the_rotated_first_moment_resumes_exactly():
    """A checkpoint from before the rotated first moment existed (no ``rotated_average``) resumes
    on the same trajectory: the rotated copy is rebuilt from ``m`` at the first step."""
    torch.manual_seed(0)
    grads = [torch.randn(40, 30, dtype=torch.float64) for _ in range(12)]

    def run(drop_after: int | None) -> torch.Tensor:
        weight = nn.Parameter(torch.ones(40, 30, dtype=torch.float64))
        make = lambda: Shampoo([weight], lr=0.1, eigenvalue_correction=True, precondition_frequency=5,  # noqa: E731
                               factor_dtype=torch.float64)
        optimizer = make()
        for step, grad in enumerate(grads):
            if step == drop_after:
                saved = optimizer.state_dict()
                for block in saved["state"][0].values():
                    if isinstance(block, dict):
                        block.pop("rotated_average", None)
                optimizer = make()
                optimizer.load_state_dict(saved)
            weight.grad = grad
            optimizer.step()
        return weight.detach()

    torch.testing.assert_close(run(7), run(None), rtol=1e-12, atol=1e-14)


def test_mode_defaults():
    """Root mode keeps distributed_shampoo's classic configuration; SOAP mode defaults to β₂ 0.99
    (factors, ``Λ``, graft) and a graft to 3 × Adam's step-averaged norm (the effect of
    ``graft_scale`` is in the contract matrix, its validation in the registry's bad arguments)."""
    root = Shampoo([nn.Parameter(torch.ones(3, 3))]).param_groups[0]
    assert (root["graft_scale"], root["graft_norm_beta"], root["betas"], root["graft_beta2"]) == (
        1.0, 0.0, (0.9, 0.999), 0.999)
    soap = Shampoo([nn.Parameter(torch.ones(3, 3))], eigenvalue_correction=True).param_groups[0]
    assert (soap["graft_scale"], soap["graft_norm_beta"], soap["betas"], soap["graft_beta2"]) == (
        3.0, 0.99, (0.9, 0.99), 0.99)
    paper = Shampoo([nn.Parameter(torch.ones(3, 3))], eigenvalue_correction=True, grafting="none")
    assert (paper.param_groups[0]["graft_scale"], paper.param_groups[0]["graft_norm_beta"]) == (1.0, 0.0)


@pytest.mark.parametrize("soap, frequency, expected", [(True, 6, [1, 6, 12, 18, 24]), (False, 3, [3, 6, 9])])
def test_explicit_precondition_frequency_wins_over_the_mode_default(soap, frequency, expected):
    """An explicit ``precondition_frequency`` replaces the mode's default (4 in SOAP mode, 10
    in root mode; the defaults are in the contract matrix, ``test_documented_default_refresh_schedule``)."""
    model = toy_model()
    optimizer = Shampoo(model.parameters(), eigenvalue_correction=soap, precondition_frequency=frequency)
    assert refresh_steps(optimizer, model, "basis_0" if soap else "root_0", max(expected)) == expected
    assert optimizer.param_groups[0]["precondition_frequency"] == frequency


@pytest.mark.parametrize("exponents", [(0.0, 0.0), (0.0, 0.5), (0.5, 0.5)])
def test_rotated_gradient_is_never_the_gradient_itself(exponents):
    """Shampoo writes SOAP's per-step direction into the tensor ``update_correction`` returns,
    so it must be new even where no dim has a basis (the rotation is then the identity)."""
    from secondorder.precond.kronecker import KroneckerFactors

    strategy = KroneckerFactors(exponents, beta2=0.99, epsilon=1e-8, eigenvalue_corrected=True)
    grad = torch.randn(3, 4)
    state = strategy.init_state(grad)
    rotated = strategy.update_correction(state, grad)
    assert rotated is not grad and rotated.data_ptr() != grad.data_ptr()
    torch.testing.assert_close(rotated, grad)  # identity bases at the start
