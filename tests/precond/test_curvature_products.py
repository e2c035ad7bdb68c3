"""Curvature-vector products against dense float64 oracles (autograd.functional Hessian and
explicit Jacobians), and the Hutchinson estimator against the exact diagonal."""

import pytest
import torch
from torch.autograd.functional import hessian, jacobian
from torch.testing import assert_close

from secondorder.precond.curvature_products import (
    ggn_vector_product,
    ggn_vector_product_functional,
    gradients_with_graph,
    hessian_vector_product,
    hutchinson_diagonal,
    hutchinson_probe,
    hvp_functional,
    jacobian_vector_product,
    probe_generator,
    rademacher_like,
    running_average,
)

DT = torch.float64
# torch.func.jvp scripts its jvp decompositions on first use (a torch-internal deprecation notice).
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)


def _problem(seed=0):
    """A 3 -> 4 -> 2 tanh network on 5 samples; parameters (W1 (4,3), b1 (4,), W2 (2,4))."""
    gen = torch.Generator().manual_seed(seed)
    params = [
        torch.randn(4, 3, generator=gen, dtype=DT),
        torch.randn(4, generator=gen, dtype=DT),
        torch.randn(2, 4, generator=gen, dtype=DT),
    ]
    x = torch.randn(5, 3, generator=gen, dtype=DT)
    y = torch.randn(5, 2, generator=gen, dtype=DT)

    def outputs_fn(w1, b1, w2):
        return torch.tanh(x @ w1.T + b1) @ w2.T

    def loss_of_outputs(out):  # softmax cross-entropy-like plus squares: non-trivial H_o
        return torch.logsumexp(out, dim=1).mean() + ((out - y) ** 2).mean()

    return params, outputs_fn, loss_of_outputs


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def _dense_hessian(params, outputs_fn, loss_of_outputs):
    def flat_loss(flat):
        pieces, start = [], 0
        for p in params:
            pieces.append(flat[start : start + p.numel()].view_as(p))
            start += p.numel()
        return loss_of_outputs(outputs_fn(*pieces))

    return hessian(flat_loss, _flat(params))


def _dense_ggn(params, outputs_fn, loss_of_outputs):
    def flat_out(flat):
        pieces, start = [], 0
        for p in params:
            pieces.append(flat[start : start + p.numel()].view_as(p))
            start += p.numel()
        return outputs_fn(*pieces).reshape(-1)

    flat = _flat(params)
    out = outputs_fn(*params)
    jac = jacobian(flat_out, flat)  # (O, P)
    h_out = hessian(lambda o: loss_of_outputs(o.view_as(out)), out.reshape(-1))  # (O, O)
    return jac.T @ h_out @ jac


def _random_vectors(params, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, dtype=DT) for p in params]


def test_hessian_vector_product_matches_dense_hessian():
    params, outputs_fn, loss_of_outputs = _problem()
    leaves = [p.clone().requires_grad_() for p in params]
    grads = gradients_with_graph(loss_of_outputs(outputs_fn(*leaves)), leaves)
    dense = _dense_hessian(params, outputs_fn, loss_of_outputs)
    for seed in range(3):
        vectors = _random_vectors(params, seed)
        product = hessian_vector_product(grads, leaves, vectors)
        assert [t.shape for t in product] == [p.shape for p in params]
        assert_close(_flat(product), dense @ _flat(vectors), rtol=1e-10, atol=1e-12)


def test_hvp_functional_matches_dense_hessian():
    params, outputs_fn, loss_of_outputs = _problem(2)
    vectors = _random_vectors(params)
    product = hvp_functional(
        lambda *w: loss_of_outputs(outputs_fn(*w)), tuple(params), tuple(vectors)
    )
    dense = _dense_hessian(params, outputs_fn, loss_of_outputs)
    assert_close(_flat(product), dense @ _flat(vectors), rtol=1e-10, atol=1e-12)


def test_ggn_vector_product_matches_explicit_jt_h_j():
    params, outputs_fn, loss_of_outputs = _problem(3)
    leaves = [p.clone().requires_grad_() for p in params]
    outputs = outputs_fn(*leaves)
    loss = loss_of_outputs(outputs)
    dense = _dense_ggn(params, outputs_fn, loss_of_outputs)
    # The GGN differs from the Hessian here (tanh is curved), so the test can tell them apart.
    assert (dense - _dense_hessian(params, outputs_fn, loss_of_outputs)).abs().max() > 1e-3
    for seed in range(3):
        vectors = _random_vectors(params, seed)
        product = ggn_vector_product(outputs, loss, leaves, vectors)
        assert_close(_flat(product), dense @ _flat(vectors), rtol=1e-10, atol=1e-12)
    functional = ggn_vector_product_functional(
        outputs_fn, loss_of_outputs, tuple(params), tuple(vectors)
    )
    assert_close(_flat(functional), dense @ _flat(vectors), rtol=1e-10, atol=1e-12)


def test_jacobian_vector_product_matches_explicit_jacobian():
    params, outputs_fn, _ = _problem(4)
    leaves = [p.clone().requires_grad_() for p in params]
    outputs = outputs_fn(*leaves)
    vectors = _random_vectors(params)
    jac = jacobian(outputs_fn, tuple(params))  # tuple of (5, 2, *S_i)
    expected = sum(
        (j.reshape(10, -1) @ v.reshape(-1)) for j, v in zip(jac, vectors, strict=True)
    ).view(5, 2)
    assert_close(
        jacobian_vector_product(outputs, leaves, vectors), expected, rtol=1e-10, atol=1e-12
    )


def test_products_with_unused_parameter_and_linear_loss_are_zero():
    w = torch.randn(3, dtype=DT, requires_grad=True)
    unused = torch.randn(2, dtype=DT, requires_grad=True)
    loss = (w * torch.arange(3.0, dtype=DT)).sum()  # linear: Hessian zero
    grads = gradients_with_graph(loss, [w, unused])
    assert grads[1] is None
    product = hessian_vector_product(
        grads, [w, unused], [torch.ones(3, dtype=DT), torch.ones(2, dtype=DT)]
    )
    assert_close(product[0], torch.zeros(3, dtype=DT))
    assert_close(product[1], torch.zeros(2, dtype=DT))
    out = w * 2.0
    ggn = ggn_vector_product(
        out, out.sum(), [w, unused], [torch.ones(3, dtype=DT), torch.ones(2, dtype=DT)]
    )
    assert_close(_flat(ggn), torch.zeros(5, dtype=DT))


def test_rademacher_is_plus_minus_one_and_seeded():
    x = torch.empty(1000, dtype=torch.float32)
    z1 = rademacher_like(x, probe_generator(3, 1, 7, "cpu"))
    z2 = rademacher_like(x, probe_generator(3, 1, 7, "cpu"))
    z3 = rademacher_like(x, probe_generator(3, 1, 8, "cpu"))
    assert torch.equal(z1, z2)
    assert not torch.equal(z1, z3)
    assert set(z1.unique().tolist()) == {-1.0, 1.0}
    assert abs(z1.mean().item()) < 0.15
    assert z1.dtype == torch.float32


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    a = torch.tensor([0.5, 2.0, 7.0], dtype=DT)
    b = torch.tensor([[3.0, -1.0]], dtype=DT)
    w = torch.randn(3, dtype=DT, requires_grad=True)
    v = torch.randn(1, 2, dtype=DT, requires_grad=True)
    loss = 0.5 * (a * w**2).sum() + 0.5 * (b * v**2).sum()
    grads = gradients_with_graph(loss, [w, v])
    sample = hutchinson_probe(grads, [w, v], torch.Generator().manual_seed(0))
    assert_close(sample[0], a)
    assert_close(sample[1], b)


def test_hutchinson_converges_to_dense_diagonal():
    params, outputs_fn, loss_of_outputs = _problem(5)
    leaves = [p.clone().requires_grad_() for p in params]
    grads = gradients_with_graph(loss_of_outputs(outputs_fn(*leaves)), leaves)
    dense = _dense_hessian(params, outputs_fn, loss_of_outputs)
    diag = torch.diagonal(dense)
    # Variance of one sample at coordinate j is sum_{i != j} H_ij^2.
    sigma = ((dense**2).sum(1) - diag**2).sqrt()
    errors = []
    gens = [torch.Generator().manual_seed(i) for i in range(len(leaves))]
    for probes in (16, 1024):
        estimate = _flat(hutchinson_diagonal(grads, leaves, num_probes=probes, generators=gens))
        error = (estimate - diag).abs()
        assert (error <= 5 * sigma / probes**0.5 + 1e-12).all()
        errors.append(error.norm().item())
    assert errors[1] < errors[0] / 3


def test_running_average_and_bad_arguments():
    prev = torch.tensor([1.0, 2.0], dtype=DT)
    assert_close(
        running_average(prev, torch.tensor([3.0, 6.0], dtype=DT), 0.75),
        torch.tensor([1.5, 3.0], dtype=DT),
    )
    w = torch.randn(2, requires_grad=True)
    with pytest.raises(ValueError, match="num_probes"):
        hutchinson_diagonal([w * 1.0], [w], num_probes=0)
    with pytest.raises(ValueError, match="vectors"):
        hessian_vector_product([None], [w], [])
    with pytest.raises(ValueError, match="loss"):
        gradients_with_graph(w * 2, [w])
