"""Curvature-vector products by automatic differentiation, and the Hutchinson diagonal.

Pure functions over lists of tensors (one entry per parameter), so that every caller
(SANIA's Hutchinson preconditioner, the exact Gauss-Newton solver, tests) can use them on
any set of parameters. Nothing here keeps state: a running average lives in the caller's
``optimizer.state``.

Two styles are offered:

* **graph style** (lists, ``torch.autograd.grad``): the caller already ran the forward pass
  and holds graph-attached tensors (the loss, its gradients computed with
  ``create_graph=True``, the model outputs). Products are double-backward passes;
  ``retain_graph`` decides whether the graph survives for more products.
* **functional style** (tuples, ``torch.func``): the caller passes pure functions of the
  parameters. Products are ``jvp``/``vjp`` compositions and need no retained graph.

Notation: parameters ``w = (w_1, …, w_k)`` with shapes ``S_i``; ``f(w)`` a scalar loss;
``H = ∇²f``; model outputs ``o(w)`` of shape ``O``; ``J = ∂o/∂w``; ``H_o = ∂²ℓ/∂o²`` the
Hessian of the loss with respect to the outputs; the generalized Gauss-Newton matrix
``GGN = Jᵀ H_o J`` (Schraudolph 2002). A "vector" over the parameters is a list of tensors
of shapes ``S_i``.

Hutchinson's estimator (Hutchinson 1990; Bekas, Kokiopoulou & Saad 2007; OASIS, Jahani et al.
2022): for Rademacher ``z`` (entries ±1 with probability ½), ``E[z ⊙ Hz] = diag(H)``, and the
variance of coordinate ``j`` of one probe is ``Σ_{i≠j} H_ij²``: the estimate is exact for a
diagonal ``H``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def _check_same_length(name: str, values: Sequence, params: Sequence[Tensor]) -> None:
    if len(values) != len(params):
        raise ValueError(f"Invalid {name}: {len(values)} entries for {len(params)} parameters")


def _zeros_where_none(products: Sequence[Tensor | None], like: Sequence[Tensor]) -> list[Tensor]:
    return [
        torch.zeros_like(ref) if prod is None else prod
        for prod, ref in zip(products, like, strict=True)
    ]


def gradients_with_graph(loss: Tensor, params: Sequence[Tensor]) -> list[Tensor | None]:
    """``∇f`` with ``create_graph=True``, ready for :func:`hessian_vector_product`.

    Args:
        loss: scalar tensor ``f(w)`` attached to the graph of ``params``.
        params: ``k`` tensors with ``requires_grad``, shapes ``S_i``.

    Returns:
        ``k`` entries of shapes ``S_i``; ``None`` where ``loss`` does not depend on the
        parameter.
    """
    if loss.dim() != 0:
        raise ValueError(f"Invalid loss: expected a scalar, got shape {tuple(loss.shape)}")
    return list(torch.autograd.grad(loss, list(params), create_graph=True, allow_unused=True))


def hessian_vector_product(
    grads: Sequence[Tensor | None],
    params: Sequence[Tensor],
    vectors: Sequence[Tensor],
    *,
    retain_graph: bool = True,
) -> list[Tensor]:
    """``H v`` by double backward (Pearlmutter 1994): ``∇_w ⟨∇f(w), v⟩``.

    Args:
        grads: ``k`` gradients of ``f`` with their graph (``create_graph=True``), shapes
            ``S_i``; ``None`` (or a gradient without graph, e.g. of a loss linear in that
            parameter) contributes nothing.
        params: the ``k`` parameters the gradients were taken with respect to.
        vectors: ``k`` tensors of shapes ``S_i`` (the direction ``v``; not differentiated).
        retain_graph: keep the graph for further products (default ``True``).

    Returns:
        ``k`` tensors of shapes ``S_i``: the blocks of ``H v`` (zeros where ``f`` has no
        second-order dependence on a parameter).
    """
    _check_same_length("grads", grads, params)
    _check_same_length("vectors", vectors, params)
    pairs = [
        (g, v.to(g.dtype))
        for g, v in zip(grads, vectors, strict=True)
        if g is not None and g.requires_grad
    ]
    if not pairs:
        return [torch.zeros_like(p) for p in params]
    products = torch.autograd.grad(
        [g for g, _ in pairs],
        list(params),
        grad_outputs=[v for _, v in pairs],
        retain_graph=retain_graph,
        allow_unused=True,
    )
    return _zeros_where_none(products, params)


def jacobian_vector_product(
    outputs: Tensor,
    params: Sequence[Tensor],
    vectors: Sequence[Tensor],
    *,
    retain_graph: bool = True,
) -> Tensor:
    """``J v`` from reverse mode only (the double-vjp trick): ``∂/∂u ⟨Jᵀu, v⟩`` at ``u = 0``.

    Args:
        outputs: tensor of shape ``O`` attached to the graph of ``params``.
        params: ``k`` parameters, shapes ``S_i``.
        vectors: ``k`` tensors of shapes ``S_i``.
        retain_graph: keep the graph of ``outputs`` for further products.

    Returns:
        ``J v``, shape ``O``.
    """
    _check_same_length("vectors", vectors, params)
    dummy = torch.zeros_like(outputs, requires_grad=True)
    with torch.enable_grad():
        transposed = torch.autograd.grad(
            outputs,
            list(params),
            grad_outputs=dummy,
            create_graph=True,
            retain_graph=True,
            allow_unused=True,
        )
    pairs = [
        (t, v.to(t.dtype))
        for t, v in zip(transposed, vectors, strict=True)
        if t is not None and t.requires_grad
    ]
    if not pairs:
        return torch.zeros_like(outputs)
    (product,) = torch.autograd.grad(
        [t for t, _ in pairs], dummy, grad_outputs=[v for _, v in pairs], retain_graph=retain_graph
    )
    return product


def ggn_vector_product(
    outputs: Tensor,
    loss: Tensor,
    params: Sequence[Tensor],
    vectors: Sequence[Tensor],
    *,
    retain_graph: bool = True,
) -> list[Tensor]:
    """Generalized Gauss-Newton product ``Jᵀ H_o J v`` in three autograd passes.

    Args:
        outputs: model outputs ``o(w)``, shape ``O`` (any shape, e.g. ``(batch, classes)``).
        loss: scalar ``ℓ(o)`` computed *from this ``outputs`` tensor*; its Hessian with
            respect to ``outputs`` is ``H_o`` (``O × O``, never formed).
        params: ``k`` parameters, shapes ``S_i``.
        vectors: ``k`` tensors of shapes ``S_i``.
        retain_graph: keep the graphs for further products.

    Returns:
        ``k`` tensors of shapes ``S_i``: the blocks of ``Jᵀ H_o J v``.
    """
    if loss.dim() != 0:
        raise ValueError(f"Invalid loss: expected a scalar, got shape {tuple(loss.shape)}")
    jv = jacobian_vector_product(outputs, params, vectors, retain_graph=True)
    with torch.enable_grad():
        (output_grad,) = torch.autograd.grad(loss, outputs, create_graph=True, retain_graph=True)
    if output_grad.requires_grad:
        (hjv,) = torch.autograd.grad(
            output_grad, outputs, grad_outputs=jv, retain_graph=True, allow_unused=True
        )
        hjv = torch.zeros_like(outputs) if hjv is None else hjv
    else:  # loss linear in the outputs: H_o = 0
        hjv = torch.zeros_like(outputs)
    products = torch.autograd.grad(
        outputs, list(params), grad_outputs=hjv, retain_graph=retain_graph, allow_unused=True
    )
    return _zeros_where_none(products, params)


def hvp_functional(
    loss_fn: Callable[..., Tensor], params: tuple[Tensor, ...], vectors: tuple[Tensor, ...]
) -> tuple[Tensor, ...]:
    """``H v`` for a pure function, forward-over-reverse (``jvp`` of ``grad``).

    Args:
        loss_fn: ``loss_fn(*params) -> scalar``.
        params: ``k`` tensors, shapes ``S_i`` (the point ``w``).
        vectors: ``k`` tensors, shapes ``S_i``.

    Returns:
        ``k`` tensors of shapes ``S_i``: the blocks of ``∇²f(w) v``.
    """
    _check_same_length("vectors", vectors, params)
    argnums = tuple(range(len(params)))
    _, product = torch.func.jvp(
        torch.func.grad(loss_fn, argnums=argnums), tuple(params), tuple(vectors)
    )
    return tuple(product)


def ggn_vector_product_functional(
    model_fn: Callable[..., Tensor],
    loss_fn: Callable[[Tensor], Tensor],
    params: tuple[Tensor, ...],
    vectors: tuple[Tensor, ...],
) -> tuple[Tensor, ...]:
    """``Jᵀ H_o J v`` for pure functions: ``jvp`` of the model, ``jvp`` of ``∇ℓ``, ``vjp``.

    Args:
        model_fn: ``model_fn(*params) -> outputs`` of shape ``O``.
        loss_fn: ``loss_fn(outputs) -> scalar`` (targets closed over).
        params: ``k`` tensors, shapes ``S_i``.
        vectors: ``k`` tensors, shapes ``S_i``.

    Returns:
        ``k`` tensors of shapes ``S_i``.
    """
    _check_same_length("vectors", vectors, params)
    outputs, jv = torch.func.jvp(model_fn, tuple(params), tuple(vectors))
    _, hjv = torch.func.jvp(torch.func.grad(loss_fn), (outputs,), (jv,))
    _, pullback = torch.func.vjp(model_fn, *params)
    return tuple(pullback(hjv))


def probe_generator(
    seed: int, index: int, step: int, device: torch.device | str
) -> torch.Generator:
    """A generator whose stream depends only on ``(seed, index, step)``.

    Optimizers keep no ``torch.Generator`` in their state (it is not a tensor and would not
    survive ``state_dict``): they rebuild one per parameter (``index``: its position in
    ``param_groups``) and per step, so a run resumed from a checkpoint draws the same probes.
    """
    mixed = (seed * _MIX[0] + (index + 1) * _MIX[1] + (step + 1) * _MIX[2]) % (2**63 - 1)
    generator = torch.Generator(device=device)
    generator.manual_seed(mixed)
    return generator


def rademacher_like(tensor: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Entries ±1 with probability ½ each; shape, dtype and device of ``tensor``.

    ``generator`` (optional) must live on ``tensor.device``; without one the global RNG is used.
    """
    bits = torch.randint(
        0, 2, tensor.shape, generator=generator, device=tensor.device, dtype=torch.int8
    )
    return (bits * 2 - 1).to(tensor.dtype)


def hutchinson_probe(
    grads: Sequence[Tensor | None],
    params: Sequence[Tensor],
    generators: Sequence[torch.Generator | None] | torch.Generator | None = None,
) -> list[Tensor]:
    """One Hutchinson sample ``z ⊙ Hz`` for one Rademacher probe ``z`` over all parameters.

    Args:
        grads: ``k`` gradients with graph (see :func:`hessian_vector_product`).
        params: the ``k`` parameters, shapes ``S_i``.
        generators: one generator per parameter (each on its parameter's device), one
            generator shared by all (on their common device), or ``None`` (global RNG).

    Returns:
        ``k`` tensors of shapes ``S_i`` whose expectation is the diagonal of ``H``.
    """
    if generators is None or isinstance(generators, torch.Generator):
        generators = [generators] * len(params)
    _check_same_length("generators", generators, params)
    probes = [rademacher_like(p, gen) for p, gen in zip(params, generators, strict=True)]
    products = hessian_vector_product(grads, params, probes, retain_graph=True)
    return [z * hz for z, hz in zip(probes, products, strict=True)]


def hutchinson_diagonal(
    grads: Sequence[Tensor | None],
    params: Sequence[Tensor],
    *,
    num_probes: int = 1,
    generators: Sequence[torch.Generator | None] | torch.Generator | None = None,
) -> list[Tensor]:
    """Hutchinson estimate of ``diag(H)``: the mean of ``num_probes`` samples ``z ⊙ Hz``.

    Args:
        grads: ``k`` gradients with graph; the graph is retained.
        params: the ``k`` parameters, shapes ``S_i``.
        num_probes: number of Rademacher probes averaged (>= 1).
        generators: as in :func:`hutchinson_probe`; the probes are drawn in sequence.

    Returns:
        ``k`` tensors of shapes ``S_i``.
    """
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"Invalid num_probes: {num_probes!r} (expected an int >= 1)")
    total = [torch.zeros_like(p) for p in params]
    for _ in range(num_probes):
        for acc, sample in zip(total, hutchinson_probe(grads, params, generators), strict=True):
            acc.add_(sample)
    return [acc / num_probes for acc in total]


def running_average(previous: Tensor, sample: Tensor, beta: float) -> Tensor:
    """Exponential moving average ``β · previous + (1 − β) · sample`` (same shape), out of place."""
    return previous * beta + sample.to(previous.dtype) * (1.0 - beta)
