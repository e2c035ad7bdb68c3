"""Dense float64 oracles for tiny problems (DESIGN.md "Testing ideas").

Everything here is brute force on purpose: explicit per-example gradients, empirical Fisher,
generalised Gauss-Newton and Hessian matrices built with ``torch.func``. Use models with at
most a few hundred parameters. Conventions shared by all functions:

* ``params`` is a list of parameter tensors of ``model`` (identity-matched); default: every
  parameter with ``requires_grad``. Dense matrices order coordinates by that list, each
  parameter flattened row-major (PyTorch's own order).
* ``loss_fn(output, target)`` is the loss of *one* example: called on an output of shape
  ``(1, ...)`` and a target of shape ``(1, ...)``, it must return the per-example loss (use
  ``reduction="sum"``). The objective of the dense matrices is the **mean** of per-example
  losses over the batch.
* Models must not mix examples (no BatchNorm in training mode).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

LossFn = Callable[[Tensor, Tensor], Tensor]


def _param_names(model: nn.Module, params: Sequence[Tensor] | None) -> list[str]:
    named = dict(model.named_parameters())
    if params is None:
        return [name for name, p in named.items() if p.requires_grad]
    by_id = {id(p): name for name, p in named.items()}
    return [by_id[id(p)] for p in params]


def _split(model: nn.Module, params: Sequence[Tensor] | None):
    names = _param_names(model, params)
    named = dict(model.named_parameters())
    others = {name: p.detach() for name, p in named.items() if name not in names}
    others.update(dict(model.named_buffers()))
    chosen = {name: named[name].detach() for name in names}
    return names, chosen, others


def per_example_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    params: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """Gradient of each example's own loss w.r.t. each parameter.

    Args:
        inputs: ``(N, ...)``; targets: ``(N, ...)``.

    Returns:
        One tensor per parameter, shape ``(N, *param.shape)``.
    """
    names, chosen, others = _split(model, params)

    def example_loss(values: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, {**others, **values}, (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    grads = vmap(grad(example_loss), in_dims=(None, 0, 0))(chosen, inputs, targets)
    return [grads[name] for name in names]


def flatten_per_example(grads: Sequence[Tensor]) -> Tensor:
    """Concatenate per-parameter per-example gradients into ``(N, P)`` (parameter order)."""
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1)


def empirical_fisher(per_example: Tensor) -> Tensor:
    """``(1/N) Σ_n g_n g_nᵀ`` from ``(N, P)`` per-example gradients; returns ``(P, P)``."""
    return per_example.transpose(0, 1) @ per_example / per_example.shape[0]


def gauss_newton(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    params: Sequence[Tensor] | None = None,
) -> Tensor:
    """Generalised Gauss-Newton ``(1/N) Σ_n J_nᵀ H_n J_n`` of the mean loss, ``(P, P)``.

    ``J_n`` is the Jacobian of example ``n``'s flattened output w.r.t. the parameters and
    ``H_n`` the Hessian of its loss w.r.t. that output.
    """
    names, chosen, others = _split(model, params)

    def output(values: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, {**others, **values}, (x.unsqueeze(0),)).reshape(-1)

    total = None
    for x, y in zip(inputs, targets, strict=True):
        jac = jacrev(output)(chosen, x)
        jac = torch.cat(
            [jac[name].reshape(jac[name].shape[0], -1) for name in names], dim=1
        )  # (O, P)
        out = output(chosen, x).detach()
        shape = functional_call(model, {**others, **chosen}, (x.unsqueeze(0),)).shape
        loss_hessian = hessian(lambda o, s=shape, t=y: loss_fn(o.reshape(s), t.unsqueeze(0)))(out)
        term = jac.transpose(0, 1) @ loss_hessian @ jac
        total = term if total is None else total + term
    return total / inputs.shape[0]


def loss_hessian(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    params: Sequence[Tensor] | None = None,
) -> Tensor:
    """Hessian of the mean per-example loss w.r.t. the chosen parameters, ``(P, P)``."""
    names, chosen, others = _split(model, params)
    sizes = [chosen[name].numel() for name in names]

    def mean_loss(flat: Tensor) -> Tensor:
        values = {
            name: chunk.reshape(chosen[name].shape)
            for name, chunk in zip(names, flat.split(sizes), strict=True)
        }
        out = functional_call(model, {**others, **values}, (inputs,))
        return (
            sum(loss_fn(out[n : n + 1], targets[n : n + 1]) for n in range(inputs.shape[0]))
            / inputs.shape[0]
        )

    flat = torch.cat([chosen[name].reshape(-1) for name in names])
    return hessian(mean_loss)(flat)
