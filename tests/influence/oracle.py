"""Brute-force float64 oracles for influence tests (no hooks, no capture).

Tiny models are written functionally with an additive zero "delta" on every layer's
pre-activation, so ``torch.func`` gives each example's layer inputs ``ā`` and output gradients
``g = ∂L_n/∂s`` directly. Per-example gradient matrices ``G_n = Σ_t g ā ᵀ`` come from
``torch.func.vmap(grad)`` of the parameters (an independent route). Dense blocks use the
row-major order of ``G`` (``d_out × d_in'``, bias column last), so a Kronecker block is
``kron(S, A)`` and the EK-FAC block is ``K diag(vec Λ) Kᵀ`` with ``K = kron(Q_S, Q_A)``.

Sign convention of every oracle score: ``vec(∇f_q)ᵀ (B + λI)⁻¹ vec(∇L_m)`` summed over layer
blocks ``B`` (positive = helpful for a loss measurement), the package's convention.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F


class TokenMLP(nn.Module):
    """``x (N, T, 4)`` → tanh(Linear(4, 5)) per token → mean over T → Linear(5, 3) logits.

    The first layer sees ``T`` positions, the second one; ``bias`` toggles both biases.
    """

    def __init__(self, bias: bool = True, d_in: int = 4, hidden: int = 5, classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)).mean(dim=1))


def make_problem(
    n_train: int = 12, n_query: int = 4, tokens: int = 3, bias: bool = True, seed: int = 0
):
    """Float64 TokenMLP with random data: ``(model, train (x, y), query (x, y))``."""
    generator = torch.Generator().manual_seed(seed)
    model = TokenMLP(bias=bias).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
    x = torch.randn(n_train + n_query, tokens, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (n_train + n_query,), generator=generator)
    return model, (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def _forward_with_deltas(
    model: TokenMLP, params: dict, x: torch.Tensor, deltas: tuple
) -> torch.Tensor:
    """Single example ``x (T, 4)``; deltas ``((T, 5), (3,))`` added to the pre-activations."""
    s1 = x @ params["fc1.weight"].T + deltas[0]
    if "fc1.bias" in params:
        s1 = s1 + params["fc1.bias"]
    pooled = torch.tanh(s1).mean(dim=0)
    s2 = pooled @ params["fc2.weight"].T + deltas[1]
    if "fc2.bias" in params:
        s2 = s2 + params["fc2.bias"]
    return s2


def layer_rows(model: TokenMLP, x: torch.Tensor, y: torch.Tensor):
    """Per-example ``(ā, g)`` per layer: ``{"fc1": (ā (N, T, d'), g (N, T, 5)), "fc2": ...}``."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    bias = "fc1.bias" in params
    tokens = x.shape[1]

    def loss(deltas, xi, yi):
        return F.cross_entropy(
            _forward_with_deltas(model, params, xi, deltas)[None], yi[None], reduction="sum"
        )

    zeros = (torch.zeros(tokens, 5, dtype=x.dtype), torch.zeros(3, dtype=x.dtype))
    g1, g2 = vmap(grad(loss), in_dims=(None, 0, 0))(zeros, x, y)
    a1 = x
    a2 = torch.tanh(x @ params["fc1.weight"].T + (params["fc1.bias"] if bias else 0)).mean(
        dim=1, keepdim=True
    )
    if bias:
        a1 = torch.cat([a1, torch.ones(*a1.shape[:-1], 1, dtype=x.dtype)], dim=-1)
        a2 = torch.cat([a2, torch.ones(*a2.shape[:-1], 1, dtype=x.dtype)], dim=-1)
    return {"fc1": (a1, g1), "fc2": (a2, g2[:, None, :])}


def per_example_matrices(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``G_n`` per layer from ``torch.func`` parameter gradients: ``{name: (N, d_out, d_in')}``."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None], reduction="sum")

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    result = {}
    for name in ("fc1", "fc2"):
        matrix = grads[f"{name}.weight"]
        if f"{name}.bias" in grads:
            matrix = torch.cat([matrix, grads[f"{name}.bias"][..., None]], dim=-1)
        result[name] = matrix
    return result


def kronecker_factors(rows):
    """``A = Σ ā āᵀ / M``, ``S = Σ g gᵀ / M`` from ``(ā (N, T, i), g (N, T, o))``."""
    a, g = rows
    count = a.shape[0] * a.shape[1]
    a, g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
    return a.T @ a / count, g.T @ g / count


def dense_blocks(
    model: TokenMLP, x: torch.Tensor, y: torch.Tensor, strategy: str
) -> dict[str, torch.Tensor]:
    """The dense curvature block of each layer for ``strategy`` (row-major order of ``G``)."""
    rows = layer_rows(model, x, y)
    matrices = per_example_matrices(model, x, y)
    blocks = {}
    for name in ("fc1", "fc2"):
        flat = matrices[name].flatten(1)
        empirical = flat.T @ flat / flat.shape[0]
        if strategy == "empirical_block":
            blocks[name] = empirical
            continue
        if strategy == "diagonal":
            blocks[name] = torch.diag(empirical.diagonal())
            continue
        factor_a, factor_s = kronecker_factors(rows[name])
        if strategy == "kfac":
            blocks[name] = torch.kron(factor_s, factor_a)
            continue
        _, basis_a = torch.linalg.eigh(factor_a)
        _, basis_s = torch.linalg.eigh(factor_s)
        basis = torch.kron(basis_s, basis_a)
        corrected = (basis.T @ empirical @ basis).diagonal()  # vec Λ = diag(Kᵀ EF K)
        blocks[name] = basis @ torch.diag(corrected) @ basis.T
    return blocks


def dense_scores(model, train, query, blocks: dict[str, torch.Tensor] | None, damping: float):
    """Brute-force ``(Q, N)`` scores with ``(B + λI)⁻¹`` per layer block (None = identity)."""
    train_grads = per_example_matrices(model, *train)
    query_grads = per_example_matrices(model, *query)
    total, per_layer = 0, {}
    for name in ("fc1", "fc2"):
        left, right = query_grads[name].flatten(1), train_grads[name].flatten(1)
        if blocks is None:
            solved = left
        else:
            matrix = blocks[name] + damping * torch.eye(
                blocks[name].shape[0], dtype=blocks[name].dtype
            )
            solved = torch.linalg.solve(matrix, left.T).T
        per_layer[name] = solved @ right.T
        total = total + per_layer[name]
    return total, per_layer
