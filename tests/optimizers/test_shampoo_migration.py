"""The README's "Coming from distributed_shampoo" table, row by row, in float64.

Each row's ``Shampoo`` arguments are run against :class:`MetaOracle`, a dense float64
re-statement of distributed_shampoo's step (reference/shampoo.md §1.3–§1.10: statistics,
amortised roots or bases, β₁ filtering, grafting per block, decay folded into the direction,
momentum after preconditioning) written with ``torch.kron`` and ``torch.linalg.eigh`` and
sharing no code with the package. Where distributed_shampoo is importable the same rows also
run against it (skipped otherwise; it is not on PyPI).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from secondorder import Shampoo

SHAPES = ((5, 4), (3, 5))
# SOAP rows take their first bases at step 1: one gradient of a non-square block leaves a
# degenerate null space whose eigenvectors (and so Λ's coordinates) are arbitrary.
SQUARE_SHAPES = ((4, 4), (3, 3))
STEPS = 9


def oracle_root(matrix, exponent, epsilon):
    values, vectors = torch.linalg.eigh(matrix + epsilon * torch.eye(matrix.shape[0], dtype=matrix.dtype))
    if values.min() < epsilon:
        values = values - values.min() + epsilon
    return (vectors * values**-exponent) @ vectors.T


class MetaOracle:
    """One matrix block per parameter (no splitting); the options of the table's rows."""

    def __init__(self, params, *, lr, betas, epsilon, weight_decay=0.0, decay="decoupled", frequency,
                 start, grafting="adam", graft_beta2=0.999, graft_epsilon=1e-8, momentum=0.0, dampening=0.0,
                 nesterov=False, eigenvalue_corrected=False, refresh="eigh", exponents=None):
        self.params, self.lr, self.betas, self.eps = params, lr, betas, epsilon
        self.wd, self.decay, self.f, self.s = weight_decay, decay, frequency, start
        self.grafting, self.graft_beta2, self.graft_eps = grafting, graft_beta2, graft_epsilon
        self.mu, self.damp, self.nesterov = momentum, dampening, nesterov
        self.ec, self.refresh = eigenvalue_corrected, refresh
        self.exponents = exponents or ((0.5, 0.5) if eigenvalue_corrected else (0.25, 0.25))
        self.t = 0
        self.state = [dict(F=[torch.zeros(d, d, dtype=torch.float64) for d in p.shape],
                           R=[torch.eye(d, dtype=torch.float64) for d in p.shape],
                           lam=torch.zeros(p.shape, dtype=torch.float64), m=torch.zeros_like(p),
                           v=torch.zeros_like(p), b=torch.zeros_like(p), refreshed=False) for p in params]

    def step(self):
        self.t += 1
        t, (beta1, beta2) = self.t, self.betas
        weight = 1.0 if beta2 == 1.0 else 1 - beta2
        c2 = 1 - beta2**t if beta2 < 1 else 1.0
        for p, st in zip(self.params, self.state):
            g = p.grad.clone()
            if self.decay == "l2":
                g = g + self.wd * p.detach()
            contributions = (g @ g.T, g.T @ g)
            factored = [k for k in range(2) if self.exponents[k] > 0]
            for k in factored:
                st["F"][k] = beta2 * st["F"][k] + weight * contributions[k]
            st["v"] = self.graft_beta2 * st["v"] + (1 - self.graft_beta2) * g * g
            if t == self.s or (t > self.s and t % self.f == 0):
                for k in factored:
                    self._refresh(st, k, c2)
                st["refreshed"] = True
            if self.ec:
                rotated = st["R"][0].T @ g @ st["R"][1]
                st["lam"] = beta2 * st["lam"] + weight * rotated**2
            st["m"] = beta1 * st["m"] + (1 - beta1) * g
            m_hat = st["m"] / (1 - beta1**t)
            graft = m_hat / (st["v"].sqrt() / math.sqrt(1 - self.graft_beta2**t) + self.graft_eps)
            if t < self.s and self.grafting == "adam":
                direction = graft
            else:
                if self.ec:
                    basis = torch.kron(st["R"][0].contiguous(), st["R"][1].contiguous())
                    exponent = next((e for e in self.exponents if e > 0), 0.5)
                    scaled = (basis.T @ m_hat.reshape(-1)) / ((st["lam"].reshape(-1) / c2) ** exponent + self.eps)
                    direction = (basis @ scaled).reshape(m_hat.shape)
                else:
                    direction = (torch.kron(st["R"][0], st["R"][1]) @ m_hat.reshape(-1)).reshape(m_hat.shape)
                if self.grafting == "adam":
                    direction = direction * graft.norm() / (direction.norm() + 1e-16)
            if self.decay == "decoupled_before_momentum":
                direction = direction + self.wd * p.detach()
            if self.mu > 0:
                st["b"] = self.mu * st["b"] + (1 - self.damp) * direction
                direction = (1 - self.damp) * direction + self.mu * st["b"] if self.nesterov else st["b"]
            st["direction"] = direction
        with torch.no_grad():
            for p, st in zip(self.params, self.state):
                if self.decay == "decoupled":
                    p.mul_(1 - self.lr * self.wd)
                p.sub_(self.lr * st["direction"])

    def _refresh(self, st, k, c2):
        factor = st["F"][k] / c2
        if not self.ec:
            st["R"][k] = oracle_root(factor, self.exponents[k], self.eps)
        elif self.refresh == "qr" and st["refreshed"]:
            basis = st["R"][k]
            order = torch.argsort(torch.diag(basis.T @ factor @ basis), descending=True, stable=True)
            st["lam"] = st["lam"].index_select(k, order)
            st["R"][k] = torch.linalg.qr(factor @ basis[:, order]).Q
        else:
            st["R"][k] = torch.linalg.eigh(factor + self.eps * torch.eye(factor.shape[0], dtype=factor.dtype))[1]


# row: (our Shampoo kwargs, oracle kwargs). Common: lr 0.05; f = 3.
ROWS = {
    # AdamPreconditionerConfig(beta2, epsilon) grafting + RootInvShampooPreconditionerConfig, DECOUPLED decay
    "adam_grafting_root_inverse": (
        dict(grafting="adam", graft_beta2=0.999, graft_epsilon=1e-8, betas=(0.9, 0.999), epsilon=1e-12,
             weight_decay=0.01, weight_decay_type="decoupled_before_momentum"),
        dict(grafting="adam", betas=(0.9, 0.999), epsilon=1e-12, weight_decay=0.01, decay="decoupled_before_momentum",
             start=3)),
    # ClassicMomentumConfig(momentum, dampening, use_nesterov) with DECOUPLED decay inside it
    "classic_momentum_nesterov": (
        dict(grafting="adam", betas=(0.9, 0.99), epsilon=1e-12, weight_decay=0.05, momentum=0.5, dampening=0.1,
             nesterov=True, weight_decay_type="decoupled_before_momentum"),
        dict(grafting="adam", betas=(0.9, 0.99), epsilon=1e-12, weight_decay=0.05, momentum=0.5, dampening=0.1,
             nesterov=True, decay="decoupled_before_momentum", start=3)),
    # WeightDecayType.L2
    "weight_decay_l2": (
        dict(grafting="adam", betas=(0.9, 0.999), epsilon=1e-12, weight_decay=0.05, weight_decay_type="l2"),
        dict(grafting="adam", betas=(0.9, 0.999), epsilon=1e-12, weight_decay=0.05, decay="l2", start=3)),
    # AdaGrad factor sums (betas[1] = 1), no grafting, AdamW-ordered decay (our "decoupled")
    "adagrad_factors_no_graft": (
        dict(grafting="none", betas=(0.0, 1.0), epsilon=1e-10, weight_decay=0.01),
        dict(grafting="none", betas=(0.0, 1.0), epsilon=1e-10, weight_decay=0.01, decay="decoupled", start=3)),
    # inverse_exponent_override={2: {0: 0.0, 1: 0.5}} (root mode)
    "exponent_override_per_dim": (
        dict(grafting="adam", betas=(0.9, 0.999), epsilon=1e-12, inverse_exponent_override={2: {0: 0.0, 1: 0.5}}),
        dict(grafting="adam", betas=(0.9, 0.999), epsilon=1e-12, exponents=(0.0, 0.5), start=3)),
    # inverse_exponent_override={2: 0.0}: identity direction grafted to Adam's norm
    "exponent_override_all_zero": (
        dict(grafting="adam", betas=(0.9, 0.999), epsilon=1e-12, inverse_exponent_override={2: 0.0}),
        dict(grafting="adam", betas=(0.9, 0.999), epsilon=1e-12, exponents=(0.0, 0.0), start=3)),
    # EigenvalueCorrectedShampooPreconditionerConfig (eigh), first bases at the start step f
    "eigenvalue_corrected_eigh": (
        dict(eigenvalue_correction=True, grafting="none", betas=(0.9, 0.95), epsilon=1e-8, start_preconditioning_step=3,
             refresh_method="eigh"),
        dict(eigenvalue_corrected=True, grafting="none", betas=(0.9, 0.95), epsilon=1e-8, start=3)),
    # DefaultSOAPConfig (QR refreshes); ours: first basis by eigh, Λ permuted with the columns
    "soap_qr": (
        dict(eigenvalue_correction=True, grafting="none", betas=(0.95, 0.95), epsilon=1e-8, refresh_method="qr"),
        dict(eigenvalue_corrected=True, grafting="none", betas=(0.95, 0.95), epsilon=1e-8, refresh="qr", start=1)),
    # SOAP-mode inverse_exponent_override={2: 0.25}: denominator (Λ/c₂)^0.25 + ε
    "soap_exponent_override": (
        dict(eigenvalue_correction=True, grafting="none", betas=(0.9, 0.95), epsilon=1e-8,
             inverse_exponent_override={2: 0.25}),
        dict(eigenvalue_corrected=True, grafting="none", betas=(0.9, 0.95), epsilon=1e-8, exponents=(0.25, 0.25),
             start=1, refresh="qr")),
    # ignored_basis_change_dims={2: [0]}
    "soap_ignored_basis_change_dims": (
        dict(eigenvalue_correction=True, grafting="none", betas=(0.9, 0.95), epsilon=1e-8,
             inverse_exponent_override={2: {0: 0.0}}),
        dict(eigenvalue_corrected=True, grafting="none", betas=(0.9, 0.95), epsilon=1e-8, exponents=(0.0, 0.5),
             start=1, refresh="qr")),
}


def gradients(shapes=SHAPES, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes] for _ in range(STEPS)]


def make_params(shapes=SHAPES, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=generator, dtype=torch.float64)) for shape in shapes]


def run(optimizer, params, grads):
    trajectory = []
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()
        trajectory.append(torch.cat([p.detach().flatten().clone() for p in params]))
    return trajectory


@pytest.mark.parametrize("row", sorted(ROWS))
def test_migration_row_matches_dense_oracle(row):
    ours_kwargs, oracle_kwargs = ROWS[row]
    shapes = SQUARE_SHAPES if oracle_kwargs["start"] == 1 else SHAPES
    grads = gradients(shapes)
    params, oracle_params = make_params(shapes), make_params(shapes)
    ours = Shampoo(params, lr=0.05, precondition_frequency=3, relative_epsilon=0.0, max_preconditioner_dim=8,
                   factor_dtype=torch.float64, **ours_kwargs)
    oracle = MetaOracle(oracle_params, lr=0.05, frequency=3, **oracle_kwargs)
    # Bases from step 1: the rotated first gradient is diagonal (its SVD), so its off-diagonal
    # entries are rounding noise that Adam's division turns into ~ε-relative differences.
    tolerance = 1e-7 if oracle_kwargs["start"] == 1 else 1e-10
    for step, (mine, theirs) in enumerate(zip(run(ours, params, grads), run(oracle, oracle_params, grads)), start=1):
        torch.testing.assert_close(mine, theirs, atol=tolerance, rtol=tolerance, msg=f"{row}: step {step}")


def test_decoupled_before_momentum_differs_from_adamw_order_only_with_momentum():
    grads = gradients()
    results = {}
    for decay in ("decoupled", "decoupled_before_momentum"):
        for momentum in (0.0, 0.9):
            params = make_params()
            optimizer = Shampoo(params, lr=0.05, weight_decay=0.1, weight_decay_type=decay, momentum=momentum,
                                precondition_frequency=3, factor_dtype=torch.float64)
            results[decay, momentum] = run(optimizer, params, grads)[-1]
    torch.testing.assert_close(results["decoupled", 0.0], results["decoupled_before_momentum", 0.0],
                               atol=1e-12, rtol=0)
    assert (results["decoupled", 0.9] - results["decoupled_before_momentum", 0.9]).abs().max() > 1e-4


@pytest.mark.parametrize("kwargs,match", [
    (dict(precondition_frequency=10, start_preconditioning_step=5), "start_preconditioning_step"),
    (dict(eigenvalue_correction=True, inverse_exponent_override={2: {0: 0.25, 1: 0.5}}), "inverse_exponent_override"),
    (dict(inverse_exponent_override={2: {2: 0.25}}), "inverse_exponent_override dim"),
    (dict(refresh_method="qr"), "refresh_method"),
    (dict(eigenvalue_correction=True, grafting="none", refresh_method="newton"), "refresh_method"),
])
def test_options_distributed_shampoo_rejects_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=f"Invalid {match}"):
        Shampoo(make_params(), **kwargs)


def test_soap_mode_accepts_an_early_start():
    Shampoo(make_params(), eigenvalue_correction=True, precondition_frequency=10, start_preconditioning_step=1)


# ----- against distributed_shampoo itself, where it is installed -----------------------------

def _float64(config_class, **kwargs):
    """The config with every ``*_dtype`` field it has set to float64 (field names vary by version)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_class)}
    dtypes = {name: torch.float64 for name in names if name.endswith("_dtype")}
    return config_class(**dtypes, **{k: v for k, v in kwargs.items() if k in names})


def _meta_rows():
    shampoo = pytest.importorskip("distributed_shampoo")
    types = pytest.importorskip("distributed_shampoo.shampoo_types")
    decay_type = getattr(shampoo, "WeightDecayType", None) or getattr(types, "WeightDecayType", None)
    decoupled = {} if decay_type is None else {"weight_decay_type": decay_type.DECOUPLED}
    adam = shampoo.AdamPreconditionerConfig(beta2=0.999, epsilon=1e-8)
    return shampoo, {
        "adam_grafting_root_inverse": dict(
            betas=(0.9, 0.999), epsilon=1e-12, weight_decay=0.01, grafting_config=adam, **decoupled,
            preconditioner_config=_float64(shampoo.RootInvShampooPreconditionerConfig)),
        "eigenvalue_corrected_eigh": dict(
            betas=(0.9, 0.95), epsilon=1e-8, weight_decay=0.0, grafting_config=None,
            preconditioner_config=_float64(shampoo.EigenvalueCorrectedShampooPreconditionerConfig)),
    }


@pytest.mark.parametrize("row", ["adam_grafting_root_inverse", "eigenvalue_corrected_eigh"])
def test_migration_row_matches_distributed_shampoo(row):
    shampoo, meta_rows = _meta_rows()
    ours_kwargs, _ = ROWS[row]
    grads = gradients()
    params, meta_params = make_params(), make_params()
    ours = Shampoo(params, lr=0.05, precondition_frequency=3, start_preconditioning_step=3, relative_epsilon=0.0,
                   max_preconditioner_dim=8, factor_dtype=torch.float64,
                   **{k: v for k, v in ours_kwargs.items() if k != "start_preconditioning_step"})
    meta = shampoo.DistributedShampoo(meta_params, lr=0.05, precondition_frequency=3, start_preconditioning_step=3,
                                      max_preconditioner_dim=8, use_bias_correction=True, **meta_rows[row])
    for step, (mine, theirs) in enumerate(zip(run(ours, params, grads), run(meta, meta_params, grads)), start=1):
        torch.testing.assert_close(mine, theirs, atol=1e-9, rtol=1e-9, msg=f"{row}: step {step}")


# ----- the plain per-step path reads nothing back from the device -------------------------

def test_plain_steps_make_no_host_reads_and_skips_are_masked(monkeypatch):
    """Outside refresh steps, nothing but the int64 step counters is read back to the host; a
    non-finite block is masked out (state and weight unchanged, momentum included) and the
    warning comes at the next refresh."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(6, 5)), nn.Parameter(torch.randn(4, 3))]
    optimizer = Shampoo(params, lr=0.05, precondition_frequency=4, momentum=0.9, nesterov=True, weight_decay=0.0)
    optimizer._warn_at_once_on_cpu = False  # what an accelerator does: CPU reads are free, so CPU warns at once
    generator = torch.Generator().manual_seed(1)

    def step(nan=False):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        if nan:
            params[0].grad[1, 2] = float("nan")
        optimizer.step()

    for _ in range(4):  # through the first refresh (t = 4)
        step()
    reads = []
    real = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__bool__", "__int__", "__float__")}

    def recording(name):
        def read(self, *args):
            if not (self.dtype == torch.int64 and self.dim() == 0):  # the CPU step counters
                reads.append((name, tuple(self.shape), self.dtype))
            return real[name](self, *args)
        return read

    for name in real:
        monkeypatch.setattr(torch.Tensor, name, recording(name))
    step()  # t = 5: plain
    snapshot = {k: v.clone() for k, v in optimizer.state[params[0]]["block_0"].items()}
    weight = params[0].detach().clone()
    other = params[1].detach().clone()
    import warnings as warnings_module
    with warnings_module.catch_warnings():
        warnings_module.simplefilter("error")
        step(nan=True)  # t = 6: plain, skipped without a warning yet
    monkeypatch.undo()
    assert reads == []
    block = optimizer.state[params[0]]["block_0"]
    for key, value in snapshot.items():
        if key != "nonfinite_skips":
            assert torch.equal(block[key], value), key
    assert int(block["nonfinite_skips"]) == 1 and torch.equal(params[0].detach(), weight)
    assert not torch.equal(params[1].detach(), other)
    step()  # t = 7
    with pytest.warns(RuntimeWarning, match="skipped a block whose gradient is not finite"):
        step()  # t = 8: refresh
    assert all(torch.isfinite(p).all() for p in params)
